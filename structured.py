"""
Replies that parse: grammar-constrained decoding on llguidance, the tool-call syntaxes, and reasoning's
<think>...</think> block: what serve.py's chat and messages routes and generate()'s grammars use.

    tokens, = generate(model, [ids], 200, tokenizer=tokenizer, json_schema={"type": "object", ...})
    tokens, = generate(model, [ids], 20, tokenizer=tokenizer, regex=r"\\d{3}-\\d{4}")

Engine glue (llguidance is imported only when a grammar is compiled): engine_tokenizer() hands llguidance our
tokenizer (each id's bytes; the added tokens flagged special, so no grammar's text can ever produce one; the stop ids
as its end tokens). compile_grammar() turns a JSON schema, a regex or a Lark grammar into a matcher, or a
GrammarError naming the part it cannot do, with llguidance's limits bounding the work a hostile schema can ask for.
A Constraint is one row's state: free text (nothing masked) while its reply thinks or until a trigger text
appears, then the grammar's allowed tokens; a thinking budget forces the block's end. sample.Engine.sample calls
apply_constraints for the rows that have one: other rows pay nothing.

Replies: ReplyParser splits a reply's text, as it comes, into reasoning, content and tool calls (Hermes/Qwen's
<tool_call>{"name": ..., "arguments": ...}</tool_call>, Llama 3.1's {"name": ..., "parameters": ...}); serve.py
feeds it whole replies and streamed pieces alike, so both give the same result.
"""
import functools
import json
import re
import uuid

import torch

# llguidance's limits (its defaults are larger): about 100 ms of work to build a grammar's lexer, a few ms a token
LIMITS = dict(max_grammar_size=100_000, initial_lexer_fuel=2_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=50_000)
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON (", " and ": " never): a reply cannot stall on spaces
MAX_GRAMMAR_CHARS = 500_000  # a schema, regex or grammar longer than this is refused before compiling
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


class GrammarError(ValueError):
    """A schema, regex or grammar the engine cannot compile; the message names the part."""


# -----------------------------------------------------------------------------
# llguidance: our tokenizer, grammars, and each row's matcher


class _Vocab:
    """What llguidance.TokenizerWrapper reads: each id's bytes, the special ids, an encoder of bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens = [tokenizer._decode_table[i] or b"" for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(i for text, i in tokenizer._added_ids.items() if text not in
                                        tokenizer._plain_added)
        self.eos_token_id, self.bos_token_id = tokenizer.stop_ids[0], tokenizer.bos_id

    def __call__(self, data):
        return self.tokenizer.encode(data.decode("utf-8", errors="replace"))


@functools.lru_cache(maxsize=4)
def engine_tokenizer(tokenizer):
    """The llguidance.LLTokenizer of our Tokenizer (built once per tokenizer): byte-level tokens, added tokens that
    are special flagged so (never text a grammar matches), every stop id an end token."""
    import llguidance

    if not tokenizer.stop_ids:
        raise GrammarError("the tokenizer has no stop token, so a constrained reply could never end")
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tokenizer)), eos_token=list(tokenizer.stop_ids))


def json_schema_grammar(schema, where="json_schema"):
    """A JSON schema (a dict, or True for any JSON object: JSON mode) -> llguidance's grammar text."""
    from llguidance import LLMatcher

    if schema is True:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError(f"{where} must be a JSON schema object, got {type(schema).__name__}")
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"{where}: {e}") from None


def grammar_text(json_schema=None, regex=None, lark=None):
    """Exactly one of a JSON schema, a regex or a Lark grammar (llguidance's dialect: %json {...} embeds a schema)
    -> llguidance's grammar text."""
    from llguidance import LLMatcher

    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("lark", lark))
             if value is not None]
    if len(given) != 1:
        raise GrammarError(f"give one of json_schema, regex, lark (got {', '.join(given) or 'none'})")
    if json_schema is not None:
        return json_schema_grammar(json_schema)
    if not isinstance(regex if regex is not None else lark, str):
        raise GrammarError(f"{given[0]} must be a string")
    return LLMatcher.grammar_from_regex(regex) if regex is not None else LLMatcher.grammar_from_lark(lark)


def compile_grammar(tokenizer, grammar, where="json_schema"):
    """llguidance's grammar text -> a fresh LLMatcher (Constraint.copy()s it per row), or a GrammarError naming
    `where` and the part. Building it is bounded by LIMITS: a hostile schema gets an error, never a hung engine."""
    from llguidance import LLMatcher, LLParserLimits

    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"{where} is too large: its grammar has {len(grammar)} characters, the limit is "
                           f"{MAX_GRAMMAR_CHARS}")
    matcher = LLMatcher(engine_tokenizer(tokenizer), grammar, log_level=0, limits=LLParserLimits(**LIMITS))
    if matcher.is_error():
        raise GrammarError(f"{where} cannot be compiled: {matcher.get_error().strip()}")
    return matcher


def allow(bits, row, tokens):
    """bits[row] (int32 words of 32 tokens) -> only `tokens` allowed."""
    words = bits[row].numpy().view("uint32")
    words[:] = 0
    for token in tokens:
        words[token // 32] |= 1 << (token % 32)


class Constraint:
    """One row's sampling rule. matcher: an LLMatcher (this row's own), applied once `after` (text) has appeared in
    the reply, or from the start when after is None; thinking: the reply starts inside a <think> block (the prompt
    opened it), where nothing is masked and `after` is looked for only once it closes; budget: the most tokens a
    reply may think before the block is closed for it (its closing text forced, token by token)."""

    def __init__(self, tokenizer, matcher=None, after=None, thinking=False, budget=None):
        self.tokenizer, self.matcher, self.after = tokenizer, matcher, after
        self.thinking, self.budget, self.thought = thinking, budget, 0
        self.text, self.active = "", matcher is not None and after is None and not thinking
        self.forced, self.error = [], None  # tokens still to force; the matcher's error, should it fail

    def wants_mask(self):
        return self.active or bool(self.forced) or (self.thinking and self.budget is not None and
                                                    self.thought >= self.budget)

    def fill(self, bits, row):
        """Write this row's allowed tokens into bits[row] (int32 words, 32 tokens each, zeroed)."""
        if self.thinking and not self.forced and self.budget is not None and self.thought >= self.budget:
            self.forced = self.tokenizer.encode("\n" + THINK_CLOSE + "\n\n")
        if self.forced:
            allow(bits, row, [self.forced[0]])
            return
        words = bits[row]  # llguidance.torch's fill_next_token_bitmask, without importing torch.compile with it
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        if self.matcher.is_error():  # fail closed: the reply ends here, and says why
            self.error = self.matcher.get_error()
            allow(bits, row, self.tokenizer.stop_ids)

    def consume(self, token):
        if self.forced and self.forced[0] == token:
            self.forced.pop(0)
        if self.active:
            if not self.matcher.consume_token(token) and self.error is None:
                self.error = self.matcher.get_error()
            return
        self.text += self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")
        if self.thinking:
            self.thought += 1
            if THINK_CLOSE not in self.text:
                return
            self.thinking, self.text = False, self.text[self.text.index(THINK_CLOSE) + len(THINK_CLOSE):]
            self.forced = []
        if self.matcher is not None and (self.after is None or self.after in self.text):
            self.active = True


def apply_constraints(scores, seqs, rows):
    """Mask scores (b, V) in place to what the Constraint of each of `rows` (their sequences: seqs) allows now;
    other rows, and rows whose constraint masks nothing at this step (free text, thinking), are left alone. The
    bits are unpacked by numpy and the scores masked in one torch call: torch's small ops cost more than the work."""
    import numpy as np

    wanted = [(row, s.constraint) for row, s in zip(rows, seqs) if s.constraint.wants_mask()]
    if not wanted:
        return
    B, V = scores.shape
    n = min(V, wanted[0][1].tokenizer.vocab_size)  # a model's padded embedding rows are no tokens: never allowed
    bits = torch.zeros(len(wanted), (wanted[0][1].tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    for j, (_, constraint) in enumerate(wanted):  # 32 tokens a word, the lowest bit first
        constraint.fill(bits, j)
    allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, :n]  # (w, n)
    masked = [row for row, _ in wanted]
    blocked = np.zeros((B, V), dtype=bool)
    blocked[masked] = True
    blocked[masked, :n] = allowed == 0
    scores.masked_fill_(torch.from_numpy(blocked).to(scores.device), float("-inf"))


# -----------------------------------------------------------------------------
# tool-call syntaxes and the reply parser


def tool_syntax(template):
    """The tool-call syntax a chat template teaches: "hermes" (<tool_call> tags: Qwen, Hermes, and our own
    fallback) or "llama3" (a bare JSON object with "name" and "parameters")."""
    if template and TOOL_OPEN not in template and ("<|python_tag|>" in template or "ipython" in template):
        return "llama3"
    return "hermes"


def moved_refs(schema, base):
    """schema with each local $ref ("#...", as pydantic writes "#/$defs/Model") pointing under `base` instead."""
    if isinstance(schema, list):
        return [moved_refs(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: base + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else moved_refs(value, base) for key, value in schema.items()}


def call_schema(tools, syntax):
    """The JSON schema of one call to any of `tools` (OpenAI function dicts): its name, then its arguments. Each
    tool's parameters sit in $defs, their own $refs moved there, so that tools' $defs never meet."""
    key = "parameters" if syntax == "llama3" else "arguments"
    defs = {f"tool{i}": moved_refs(t.get("parameters") or {"type": "object"}, f"#/$defs/tool{i}")
            for i, t in enumerate(tools)}
    options = [{"type": "object", "properties": {"name": {"const": t["name"]}, key: {"$ref": f"#/$defs/tool{i}"}},
                "required": ["name", key], "additionalProperties": False} for i, t in enumerate(tools)]
    return {**(options[0] if len(options) == 1 else {"anyOf": options}), "$defs": defs}


def tools_grammar(tools, syntax, parallel, triggered=False):
    """A Lark grammar forcing one call (or, parallel, one or more) to any of `tools` in the template's syntax;
    triggered: the reply has already written the opening <tool_call> (tool_choice auto), the grammar does the rest."""
    schema = json.dumps({**call_schema(tools, syntax), "x-guidance": JSON_OPTIONS})
    if syntax == "llama3":
        return f"start: call\ncall: %json {schema}\n"
    more = ' ("\\n" "<tool_call>" call)*' if parallel else ""
    first = "call" if triggered else '"<tool_call>" call'
    return (f'start: {first}{more}\ncall: "\\n" body "\\n" "</tool_call>"\nbody: %json {schema}\n')


class ReplyParser:
    """A reply's text, pushed in pieces as it comes, -> events: ("reasoning", text), ("content", text),
    ("call", index, id, name) and ("arguments", index, text), arguments in pieces. thinking: the reply starts inside
    a <think> block (its prompt opened it); reasoning: split a <think> block out at all; syntax: "hermes", "llama3"
    or None (no tools: everything after the thinking is content). Text that may turn out to start a tag is held
    back until it does or does not."""

    def __init__(self, reasoning=False, thinking=False, syntax=None):
        self.state = "think" if thinking else "start" if reasoning else "content"
        self.syntax, self.buffer, self.calls, self.started = syntax, "", [], False

    def push(self, text):
        self.buffer += text
        events, progress = [], True
        while progress:
            progress = getattr(self, "_" + self.state)(events)
        return events

    def finish(self):
        """The held-back text, at the reply's end."""
        events = self.push("")
        if self.state == "call_args":  # cut by max_tokens inside a call: what there is goes out as arguments
            events.append(("arguments", len(self.calls) - 1, self.buffer))
        elif self.state == "llama3":
            events += self._llama3_end()
        elif self.state == "call_head":  # an opening tag with no call after it: text
            events.append(("content", TOOL_OPEN + self.buffer))
        elif self.buffer.strip() if self.state == "think" else self.buffer and self.state != "gap":
            events.append(("reasoning" if self.state == "think" else "content", self.buffer))
        self.buffer = ""
        return events

    def _emit_until(self, events, kind, tag):
        """Send the buffer up to `tag` as `kind` (False: not there yet; what could start it is held). Reasoning
        goes without the space around it, as templates write it back."""
        if tag in self.buffer:
            before, self.buffer = self.buffer.split(tag, 1)
            before = before.rstrip() if kind == "reasoning" else before
            if before:
                events.append((kind, before))
            return True
        keep = max((k for k in range(1, len(tag)) if self.buffer.endswith(tag[:k])), default=0)
        if kind == "reasoning":
            keep += len(self.buffer[:len(self.buffer) - keep]) - len(self.buffer[:len(self.buffer) - keep].rstrip())
        if len(self.buffer) > keep:
            events.append((kind, self.buffer[: len(self.buffer) - keep]))
            self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _start(self, events):  # a reasoning reply may open its block itself
        stripped = self.buffer.lstrip()
        if stripped.startswith(THINK_OPEN):
            self.buffer, self.state = stripped[len(THINK_OPEN):], "think"
            return True
        if THINK_OPEN.startswith(stripped):
            return False
        self.state = "content"
        return True

    def _think(self, events):
        if not self.started:
            self.buffer = self.buffer.lstrip()
            self.started = bool(self.buffer)
            if not self.started:
                return False
        if self._emit_until(events, "reasoning", THINK_CLOSE):
            self.state = "gap"
            return True
        return False

    def _gap(self, events):  # the space after </think> or </tool_call>, however it is cut into pieces, is no content
        self.buffer = self.buffer.lstrip()
        if self.buffer:
            self.state = "content"
        return bool(self.buffer)

    def _content(self, events):
        if self.syntax == "llama3" and not self.calls and self.buffer.lstrip()[:1] in ("{", "<"):
            self.state = "llama3"  # a bare JSON object, or <|python_tag|>: a call, perhaps; held to the end
            return False
        if self.syntax != "hermes":
            if self.buffer:
                events.append(("content", self.buffer))
                self.buffer = ""
            return False
        if self._emit_until(events, "content", TOOL_OPEN):
            self.state = "call_head"
            return True
        return False

    def _llama3(self, events):
        return False

    def _llama3_end(self):
        text = self.buffer.strip().removeprefix("<|python_tag|>")
        try:
            call = json.loads(text)
            assert isinstance(call, dict) and isinstance(call.get("name"), str) and set(call) == {"name", "parameters"}
        except (ValueError, AssertionError):
            return [("content", self.buffer)]
        arguments = json.dumps(call["parameters"], ensure_ascii=False)
        self.calls.append(call["name"])
        return [("call", 0, "call_" + uuid.uuid4().hex[:24], call["name"]), ("arguments", 0, arguments)]

    HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')

    def _call_head(self, events):
        found = self.HEAD.match(self.buffer)
        if found is None:
            if TOOL_CLOSE in self.buffer:  # not the syntax after all: the text is content
                text, self.buffer = self.buffer.split(TOOL_CLOSE, 1)
                events.append(("content", TOOL_OPEN + text + TOOL_CLOSE))
                self.state = "content"
                return True
            return False
        self.calls.append(json.loads(found.group(1)))
        events.append(("call", len(self.calls) - 1, "call_" + uuid.uuid4().hex[:24], self.calls[-1]))
        self.buffer, self.state, self.started = self.buffer[found.end():], "call_args", False
        return True

    def _call_args(self, events):
        """The arguments object runs to the call's closing "}" before </tool_call>: held back from the last "}"
        while only space and the start of the closing tag follow it."""
        index = len(self.calls) - 1
        if not self.started:  # the space before the arguments, however it is cut into pieces, is not theirs
            self.buffer = self.buffer.lstrip()
            self.started = bool(self.buffer)
            if not self.started:
                return False
        if TOOL_CLOSE in self.buffer:
            body, self.buffer = self.buffer.split(TOOL_CLOSE, 1)
            body = body.rstrip()
            body = body[:-1].rstrip() if body.endswith("}") else body
            if body:
                events.append(("arguments", index, body))
            self.state = "gap"
            return True
        tail = re.search(r"\}?\s*<?/?[a-z_]*$", self.buffer)
        keep = len(self.buffer) - tail.start() if tail and TOOL_CLOSE.startswith(
            tail.group().lstrip("}").lstrip()[:len(TOOL_CLOSE)]) else 0
        if len(self.buffer) > keep:
            events.append(("arguments", index, self.buffer[: len(self.buffer) - keep]))
            self.buffer = self.buffer[len(self.buffer) - keep:]
        return False


def parse_reply(text, reasoning=False, thinking=False, syntax=None):
    """A whole reply -> (reasoning text or None, content text, [(id, name, arguments)]): ReplyParser's events
    gathered, so that a streamed reply and a whole one agree."""
    parser = ReplyParser(reasoning, thinking, syntax)
    return gather(parser.push(text) + parser.finish())


def gather(events):
    reasoning, content, calls = [], [], []
    for event in events:
        if event[0] == "reasoning":
            reasoning.append(event[1])
        elif event[0] == "content":
            content.append(event[1])
        elif event[0] == "call":
            calls.append([event[2], event[3], ""])
        else:
            calls[event[1]][2] += event[2]
    return ("".join(reasoning) if reasoning else None), "".join(content), [tuple(c) for c in calls]
