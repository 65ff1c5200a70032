"""
The tokenizer: byte-level BPE encoded and decoded by tiktoken, read from and written as a Hugging Face
tokenizer.json (GPT-2, Llama 3, Qwen2/3 and DeepSeek-V3 tokenizers load; ours load in transformers), BPE
training, and the one chat renderer: the model's own chat_template (ChatML for ours), returning the loss mask.

    tokenizer = Tokenizer.load("data/demo/tokenizer")       # a directory holding tokenizer.json
    ids, loss_mask = tokenizer.render_chat(messages)        # 1 on what each assistant message adds
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools, enable_thinking=False)
    tokenizer = train_tokenizer(texts, vocab_size=2048)     # python data.py tokenizer ... runs this

tokenizer.json's pipeline, in the `tokenizers` library's order: added tokens are cut out of the text, the
normalizer runs on the text between them, the pre-tokenizer's splits run one after another (each on the pieces
of the one before), and BPE runs on each final piece. tiktoken takes exactly one split regex, so the last split
becomes tiktoken's regex and runs in Rust; only what one regex cannot say runs in Python: a normalizer, the
splits before the last one of a Sequence (DeepSeek-V3's digit and CJK runs), added tokens' strip flags, and
BPE on the pieces of a text holding a byte the vocab has no token for (the library drops such a byte).
"""
import collections
import datetime
import heapq
import json
import os
import pathlib
import sys
import time
import unicodedata
import warnings
from bisect import bisect_left, bisect_right
from functools import cached_property, lru_cache, reduce
from hashlib import sha256
from itertools import accumulate

import jinja2
import jinja2.ext
import jinja2.sandbox
import regex  # tiktoken depends on it; the Python-side splits and the pre-split when training
import tiktoken

# -----------------------------------------------------------------------------
# formats: special tokens, split regexes, ChatML, GPT-2's byte map

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-split: a run of letters with at most one non-letter in front (" the", or a whole run of Chinese
# characters up to the next punctuation) is one chunk, every digit is its own chunk (so numbers are spelled
# digit by digit, which helps arithmetic), punctuation and whitespace runs are chunks. BPE never merges across chunks.
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT_PATTERN = SPLIT_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
DEEPSEEK3_SPLIT_PATTERNS = (r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
                            r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                            r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# the split regexes of the families, as llama.cpp names them (GGUF's tokenizer.ggml.pre); each matches every character
KNOWN_SPLITS = {(GPT2_SPLIT_PATTERN,): "gpt-2", (LLAMA3_SPLIT_PATTERN,): "llama-bpe", (SPLIT_PATTERN,): "qwen2",
                DEEPSEEK3_SPLIT_PATTERNS: "deepseek-v3", (r"\p{N}", GPT2_SPLIT_PATTERN): "smollm"}  # digits, GPT-2
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_ROLES = ("system", "user", "assistant")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # transformers hands a template the first under all
BEHAVIORS = ("Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous")
NOT_IN_UTF8 = bytes([0xC0, 0xC1, *range(0xF5, 0x100)])  # bytes no UTF-8 text holds


def _bytes_to_unicode():
    # GPT-2's reversible map from the 256 bytes to printable characters: the keys of a byte-level vocab
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

# -----------------------------------------------------------------------------
# tokenizer.json's normalizer and pre-tokenizer, as Python functions and regexes


def _lowercase(text):
    # the tokenizers library lowercases char by char; str.lower() alone would turn a word-final capital sigma into ς
    return text.lower() if "Σ" not in text else "".join(c.lower() for c in text)


def _normalizer(spec, source):
    """A function on text doing what tokenizer.json's normalizer does, or None for no normalizer."""
    kind = (spec or {}).get("type")
    if kind is None:
        return None
    if kind == "Sequence":
        steps = [f for f in (_normalizer(s, source) for s in spec.get("normalizers", [])) if f]
        return (lambda text: reduce(lambda t, f: f(t), steps, text)) if steps else None
    if kind in ("NFC", "NFKC", "NFD", "NFKD"):
        return lambda text: unicodedata.normalize(kind, text)
    if kind == "Lowercase":
        return _lowercase
    if kind == "Replace":
        pattern, content = spec["pattern"], spec["content"]
        compiled = regex.compile(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
        return lambda text: compiled.sub(lambda _: content, text)
    raise ValueError(f"{source}: normalizer {kind!r} is not supported; supported: NFC, NFKC, NFD, NFKD, Lowercase, "
                     "Replace and Sequences of them")


def _splits(pre, source):
    """The pre_tokenizer as a list of splits (regex, behavior, invert), run in order; ByteLevel must come last."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    kinds, splits = [step.get("type") for step in steps], []
    for step, kind in zip(steps, kinds):
        if kind == "Split":
            pattern, behavior = step["pattern"], step.get("behavior")
            if behavior not in BEHAVIORS:
                raise ValueError(f"{source}: Split behavior {behavior!r} is not one of {', '.join(BEHAVIORS)}")
            text = pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])
            try:
                if regex.search(text, "") is not None:  # its empty matches would drop text from tiktoken's pieces
                    raise ValueError(f"{source}: Split pattern {text!r} matches the empty string: not supported")
            except regex.error as e:
                raise ValueError(f"{source}: pre_tokenizer regex {text!r}: {e}") from None
            splits.append((text, behavior, bool(step.get("invert"))))
        elif kind == "Digits":
            splits.append((r"\p{N}", "Isolated" if step.get("individual_digits") else "Contiguous", False))
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise ValueError(f"{source}: ByteLevel add_prefix_space=true is not supported (decoding would not "
                                 "give the text back)")
            if step.get("use_regex", True):
                splits.append((GPT2_SPLIT_PATTERN, "Isolated", False))
        else:
            raise ValueError(f"{source}: pre_tokenizer {kind!r} is not supported; supported: Split, Digits, "
                             "ByteLevel and a Sequence of them")
    if kinds.count("ByteLevel") != 1 or kinds[-1] != "ByteLevel":
        raise ValueError(f"{source}: pre_tokenizer {kinds}: a byte-level tokenizer needs exactly one ByteLevel, "
                         "last (after any Split and Digits)")
    return splits


def _one_regex(pattern, behavior, invert):
    """A regex whose matches, in order, are the pieces a split keeps (tiktoken drops what its regex skips), or None
    where no regex can say it. `gap` is a run of text where the pattern matches nowhere: the text between matches."""
    if behavior == "Isolated" and not invert and (pattern,) in KNOWN_SPLITS:
        return pattern  # it matches every character: no gaps
    match, gap = f"(?>{pattern})", f"(?:(?:(?!{pattern})[\\s\\S])+)"
    if behavior in ("Isolated", "Contiguous"):  # Contiguous joins touching matches (gaps never touch)
        return f"{match}{'+' if behavior == 'Contiguous' else ''}|{gap}"
    m, g = match, gap
    return {("Removed", True): m, ("Removed", False): None,  # the matches dropped: a regex matches, never skips
            ("MergedWithPrevious", False): f"{g}{m}?|{m}", ("MergedWithNext", False): f"{m}?{g}|{m}",
            ("MergedWithPrevious", True): f"{m}{g}?|{g}", ("MergedWithNext", True): f"{g}?{m}|{g}"}[behavior, invert]


def _python_split(pattern, behavior, invert):
    """A function splitting one piece as a Split does, for the splits before the last."""
    compiled, one = regex.compile(pattern), _one_regex(pattern, behavior, invert)
    if one is None:  # Removed: the text between matches (regex.split puts each match's groups between them)
        return lambda text: [piece for piece in compiled.split(text)[:: compiled.groups + 1] if piece]
    if behavior == "Isolated" and not compiled.groups:  # [gap, match, gap, ...] from regex.split, in C: 3x faster
        split = regex.compile(f"({pattern})").split
        return lambda text: [piece for piece in split(text) if piece]
    finditer = regex.compile(one).finditer
    return lambda text: [found.group() for found in finditer(text)]


def _added_matcher(tokens, normalize):
    """(regex of the added tokens' contents, longest first as the library matches them, {text: token}) or None."""
    texts = {(normalize(t["content"]) if normalize and t.get("normalized") else t["content"]): t for t in tokens}
    if not texts:
        return None
    return regex.compile("|".join(regex.escape(t) for t in sorted(texts, key=len, reverse=True))), texts


def _cut(text, matcher):
    """[(text, None) | (added token's text, its id)]: the added tokens found, with their lstrip/rstrip/single_word."""
    if matcher is None:
        return [(text, None)] if text else []
    compiled, tokens = matcher
    out, start = [], 0
    for found in compiled.finditer(text):
        token, begin, end = tokens[found.group()], found.start(), found.end()
        if token.get("single_word") and (regex.search(r"\w$", text[:begin]) or regex.match(r"\w", text[end:])):
            continue
        if token.get("lstrip"):
            begin = max(start, regex.search(r"\s*\Z", text[:begin]).start())
        if token.get("rstrip"):
            end += regex.match(r"\s*", text[end:]).end()
        if begin > start:
            out.append((text[start:begin], None))
        out.append((found.group(), token["id"]))
        start = end
    return out + [(text[start:], None)] if start < len(text) else out


def _library_ids(added, vocab, source):
    """added_tokens with the ids the tokenizers library gives them, whatever the file says: the vocab's id where the
    vocab holds the token, else the next after the largest so far, and at least the vocab's size (its length)."""
    out, top = [], -1
    for token in added:
        given = vocab.get(token["content"], top + 1 if top >= len(vocab) else len(vocab))
        if given != token["id"]:
            warnings.warn(f"{source}: added token {token['content']!r} has id {token['id']} in the file; the "
                          f"tokenizers library gives it id {given}, and so do we")
        out.append(token | {"id": given})
        top = max(top, given)
    return out


def _read_json(file):
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def model_stop_ids(path):
    """The ids a model names as ends of generation: the eos_token_id(s) of the Hugging Face config.json and
    generation_config.json in the directory `path` (an instruct model's end-of-turn token often lives only in the
    latter), or a .gguf file's eos, eot and eom token ids."""
    if str(path).endswith(".gguf"):
        from gguf_in import stop_ids

        return stop_ids(str(path))
    ids = []
    for name in ("config.json", "generation_config.json"):
        file = os.path.join(path, name)
        config = _read_json(file) if os.path.isfile(file) else {}
        if not isinstance(config, dict):
            raise ValueError(f"{file}: expected a JSON object")
        eos = config.get("eos_token_id")
        listed = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(type(i) is int and i >= 0 for i in listed):
            raise ValueError(f"{file}: eos_token_id={eos!r}: expected a token id or a list of token ids")
        ids += listed
    return ids


@lru_cache(maxsize=16)
def _compiled_template(template):
    """jinja2 set up as transformers' apply_chat_template sets it up: sandboxed, with its helpers."""
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(x, ensure_ascii=ensure_ascii, **kw)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat_template does not compile: {e}") from None


def _chat_messages(messages, roles):
    """The messages as transformers' apply_chat_template hands them to a template: keys holding None dropped (an
    assistant message's content=None beside its tool_calls), a message's reasoning under each of REASONING_KEYS."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    out = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {n} must be a {{'role', 'content'}} dict, got {type(message).__name__}")
        message = {key: value for key, value in message.items() if value is not None}
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or roles and role not in roles:
            raise ValueError(f"message {n}: role {role!r} is not one of {', '.join(roles or ['a string'])}")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ValueError(f"message {n} ({role}): content must be a string, got {type(content).__name__} (it "
                             "may be None or left out only beside tool_calls)")
        reasoning = next((message[key] for key in REASONING_KEYS if key in message), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out


# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """Byte-level BPE: encode/decode with tiktoken, stored as a Hugging Face tokenizer.json (self.hf_json).
    config: tokenizer_config.json's content (bos/eos token names, chat_template); chat_template wins over it."""

    def __init__(self, hf_json: dict, source: str = "tokenizer.json", config: dict | None = None,
                 chat_template: str | None = None):
        self.hf_json, self.source = hf_json, source
        model, decoder = hf_json.get("model") or {}, (hf_json.get("decoder") or {}).get("type")
        if model.get("type") != "BPE" or decoder != "ByteLevel":
            raise ValueError(f"{source}: only byte-level BPE tokenizers (model BPE, decoder ByteLevel, as GPT-2, "
                             f"Llama 3 and Qwen ship) can be loaded; this one has model {model.get('type')!r} "
                             f"and decoder {decoder!r}")
        if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"{source}: BPE dropout, continuing_subword_prefix and end_of_word_suffix are "
                             "not supported")
        self._normalize = _normalizer(hf_json.get("normalizer"), source)
        self.splits = _splits(hf_json.get("pre_tokenizer") or {}, source)  # [(regex, behavior, invert)]
        last = _one_regex(*self.splits[-1]) if self.splits else r"[\s\S]+"
        self._python_splits = [_python_split(*split) for split in self.splits[: -1 if last else None]]
        added = _library_ids(hf_json.get("added_tokens", []), model.get("vocab", {}), source)
        self._added_ids = {t["content"]: t["id"] for t in added}
        self._build_bpe(model, added, last or r"[\s\S]+")
        # tiktoken cuts out added tokens itself where they have no flags and no normalizer or split runs in Python
        contents = sorted(self._added_ids)  # and no token starts another: tiktoken would pick either
        self._fast = not self._python_splits and self._normalize is None and \
            not any(t.get(k) for t in added for k in ("lstrip", "rstrip", "single_word")) and \
            not any(b.startswith(a) for a, b in zip(contents, contents[1:]))
        self._plain_added = {t["content"] for t in added if not t.get("special")}
        pick = lambda special, normalized: [t for t in added if (special or not t.get("special"))  # noqa: E731
                                            and bool(t.get("normalized")) == normalized]
        self._matchers = {special: (_added_matcher(pick(special, False), None),
                                    _added_matcher(pick(special, True), self._normalize)) for special in (False, True)}
        self._read_config(config or {}, chat_template)

    def _read_config(self, config, chat_template):
        name = lambda value: value.get("content") if isinstance(value, dict) else value  # noqa: E731
        self.special_token_names = {key: name(config[key]) for key in ("bos_token", "eos_token", "unk_token",
                                    "sep_token", "pad_token", "cls_token", "mask_token") if name(config.get(key))}
        ids = self._added_ids
        self.bos_id = ids.get(self.special_token_names.get("bos_token"))
        eos_id = ids.get(self.special_token_names.get("eos_token"))
        self.eot_id = ids.get("<|endoftext|>", ids.get("<|end_of_text|>", eos_id))  # the latter is Llama 3's
        self.im_start_id, self.im_end_id = ids.get("<|im_start|>"), ids.get("<|im_end|>")
        stops = (self.im_end_id, ids.get("<|eot_id|>"), self.eot_id, eos_id)
        self.stop_ids = list(dict.fromkeys(i for i in stops if i is not None))
        template = chat_template or config.get("chat_template")
        self.tool_template = None  # transformers renders with a template named tool_use, where given, when tools are
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template, self.tool_template = named.get("default"), named.get("tool_use")
        if template is None and self.im_start_id is not None and self.im_end_id is not None:
            template = CHAT_TEMPLATE
        self.chat_template = template

    def _build_bpe(self, model, added, pattern):
        source, vocab = self.source, model["vocab"]
        token_bytes = {}  # decoding needs no tiktoken: a token id is its bytes
        for text, token_id in vocab.items():
            if text not in self._added_ids:
                try:
                    token_bytes[token_id] = bytes(CHAR_TO_BYTE[c] for c in text)
                except KeyError:
                    raise ValueError(f"{source}: vocab entry {text!r} is not byte-level (a character outside GPT-2's "
                                     "byte map)") from None
        for token in added:  # the library decodes a normalized=True added token normalized
            normalize = self._normalize if token.get("normalized") and self._normalize else str
            token_bytes[token["id"]] = normalize(token["content"]).encode()
        missing = bytes(b for b in range(256) if BYTE_TO_CHAR[b] not in vocab)
        if missing:  # published vocabs often lack control bytes their training text never held
            warnings.warn(f"{source}: {len(missing)} of the 256 single-byte tokens are missing (bytes "
                          f"{' '.join(f'{b:02x}' for b in missing)}): encoding drops them from the text, as the "
                          "tokenizers library does")
        # text is checked for the missing bytes that UTF-8 can hold, and loses them before BPE (_encode_ordinary)
        self._missing = missing.translate(None, NOT_IN_UTF8)
        # with ignore_merges the library looks a whole piece up first; a token holding a missing byte (BPE never
        # makes it: the byte is dropped) is found only that way
        gone = {BYTE_TO_CHAR[b] for b in missing} if model.get("ignore_merges") else set()
        self._whole_only = {token_bytes[i]: i for text, i in vocab.items()
                            if not gone.isdisjoint(text) and text not in self._added_ids}
        # tiktoken merges the adjacent pair whose joined bytes have the lowest rank; HF merges the pair listed
        # first in `merges`. Both agree when a token's rank is the index of the merge that made it.
        merged_ids, seen = [], set()
        for merge in model["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            if left + right not in vocab:
                raise ValueError(f"{source}: merge {left!r} + {right!r} makes a token missing from the vocab")
            if left + right not in seen:  # a token made by two merges: the first one ranks it
                seen.add(left + right)
                merged_ids.append(vocab[left + right])
        bpe_ids = [vocab[BYTE_TO_CHAR[b]] for b in range(256) if b not in missing] + merged_ids
        added_ids = self._added_ids
        if all(a < b for a, b in zip(merged_ids, merged_ids[1:])) and \
                len(set(bpe_ids) | set(added_ids.values())) == len(bpe_ids) + len(added_ids):
            self._rank_to_id = None  # the usual case (GPT-2, Llama 3, Qwen, ours): rank == id
            ranks, special_ranks = {token_bytes[i]: i for i in bpe_ids}, dict(added_ids)
        else:  # ids out of merge order: tiktoken gets ranks 0.., and we translate ranks back to ids
            self._rank_to_id = bpe_ids + list(added_ids.values())
            ranks = {token_bytes[i]: rank for rank, i in enumerate(bpe_ids)}
            special_ranks = {content: len(bpe_ids) + n for n, content in enumerate(added_ids)}
        top = max([*ranks.values(), *special_ranks.values()]) + 1  # tiktoken needs a rank for every byte: these
        ranks |= {bytes([b]): top + n for n, b in enumerate(missing)}  # never come out (no piece holds the byte)
        try:
            self._tiktoken = tiktoken.Encoding("tokenizer", pat_str=pattern, mergeable_ranks=ranks,
                                               special_tokens=special_ranks)
        except Exception as e:
            raise ValueError(f"{source}: tiktoken rejects the split pattern {pattern!r}: {e}") from None
        self._last_split = regex.compile(pattern) if self._missing else None
        self.vocab_size = max(token_bytes) + 1
        self._decode_table = [token_bytes.get(i) for i in range(self.vocab_size)]

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        """tokenizer.json, with the tokenizer_config.json and chat_template.jinja beside it when there; or the
        tokenizer inside a .gguf file (gguf_in.py). stop_ids: the tokenizer's own end tokens, then every other id
        the model there names as an end (model_stop_ids): the one list that sample.py, serve.py, export.py and GRPO's
        rollouts stop at."""
        if str(directory).endswith(".gguf"):
            from gguf_in import read_tokenizer

            tokenizer = read_tokenizer(str(directory))
        else:
            path = directory if os.path.isfile(directory) else os.path.join(directory, "tokenizer.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: not found; a tokenizer directory holds a Hugging Face "
                                        "tokenizer.json (make one with: python data.py tokenizer --input=... "
                                        "--out=DIR)")
            folder = os.path.dirname(path)
            config = os.path.join(folder, "tokenizer_config.json")
            template = os.path.join(folder, "chat_template.jinja")
            tokenizer = cls(_read_json(path), path, _read_json(config) if os.path.isfile(config) else None,
                            pathlib.Path(template).read_text(encoding="utf-8") if os.path.isfile(template) else None)
            directory = folder
        tokenizer.stop_ids += [i for i in model_stop_ids(directory) if i not in tokenizer.stop_ids]
        return tokenizer

    def token_ids(self):
        """The special token ids a model's config.json names (Transformer.save_pretrained's token_ids)."""
        return {"bos_token_id": self.bos_id, "eos_token_id": self.stop_ids, "pad_token_id": self.eot_id}

    def save(self, directory: str):
        """tokenizer.json + tokenizer_config.json: what transformers.AutoTokenizer.from_pretrained(directory) reads."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(self.hf_json, f, ensure_ascii=False, indent=1)
        names = {i: content for content, i in self._added_ids.items()}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "bos_token": None, "eos_token": names.get(self.stop_ids[0]) if self.stop_ids else None,
                  "pad_token": names.get(self.eot_id), "unk_token": None}
        config |= self.special_token_names
        if self.chat_template:
            named = {"default": self.chat_template, "tool_use": self.tool_template}
            config["chat_template"] = self.chat_template if self.tool_template is None else [
                {"name": name, "template": template} for name, template in named.items()]
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)

    @cached_property
    def hash(self) -> str:
        canonical = json.dumps(self.hf_json, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return sha256(canonical.encode()).hexdigest()

    # --- encoding and decoding ------------------------------------------------

    def _ids(self, ranks):
        return ranks if self._rank_to_id is None else [self._rank_to_id[r] for r in ranks]

    def encode(self, text: str) -> list[int]:
        """Plain text: '<|im_end|>' typed by a user stays text, never becomes the special token (added tokens not
        marked special still match, as in the tokenizers library with encode_special_tokens=True)."""
        if self._fast and not self._holds_missing(text):
            if not self._plain_added:
                return self._ids(self._tiktoken.encode_ordinary(text))
            return self._ids(self._tiktoken.encode(text, allowed_special=self._plain_added, disallowed_special=()))
        return self._encode(text, special=False)

    def encode_with_special(self, text: str) -> list[int]:
        """Special-token strings in `text` become their ids, as Hugging Face tokenizers do."""
        if self._fast and not self._holds_missing(text):
            return self._ids(self._tiktoken.encode(text, allowed_special="all"))
        return self._encode(text, special=True)

    def _holds_missing(self, text):
        """Whether text holds a byte the vocab has no token for (a C-speed check; most text holds none)."""
        if not self._missing:
            return False
        data = text.encode(errors="surrogatepass")
        return len(data.translate(None, self._missing)) != len(data)

    def _cut_added(self, text, special):
        """The library's order: added tokens found in the raw text (normalized=False ones), the text between them
        normalized, then normalized=True ones found in that -> [(text, None) | (token text, id)]."""
        raw, normalized = self._matchers[special]
        pieces = []
        for piece, token_id in _cut(text, raw):
            if token_id is not None:
                pieces.append((piece, token_id))
            else:
                pieces += _cut(self._normalize(piece) if self._normalize else piece, normalized)
        return pieces

    def _encode(self, text, special):
        ids = []
        for piece, token_id in self._cut_added(text, special):
            if token_id is not None:
                ids.append(token_id)
                continue
            pieces = [piece]
            for split in self._python_splits:
                pieces = [p for piece in pieces for p in split(piece)]
            ids += [t for p in pieces for t in self._encode_ordinary(p)]
        return ids

    def _encode_ordinary(self, text):
        """tiktoken's encode_ordinary, as ids. The library's BPE skips a byte with no token and merges the bytes
        around it as if adjacent: so each piece of the split loses those bytes before BPE, one by one (splitting
        the text without them could cut it elsewhere)."""
        if not self._holds_missing(text):
            return self._ids(self._tiktoken.encode_ordinary(text))
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # a lone surrogate: as tiktoken
        ids = []
        for piece in self._last_split.findall(text):
            data = piece.encode()
            if data in self._whole_only:
                ids.append(self._whole_only[data])
            elif data := data.translate(None, self._missing):
                ids += self._ids(self._tiktoken._encode_single_piece(data))  # tiktoken 0.14: BPE, no regex split
        return ids

    def decode_bytes(self, ids) -> bytes:
        try:
            return b"".join([self._decode_table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size or self._decode_table[i] is None)
            raise ValueError(f"token id {bad} is not in the tokenizer (vocab_size {self.vocab_size})") from None

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- chat -----------------------------------------------------------------

    def _render(self, messages, add_generation_prompt, variables):
        """variables: tools, documents and any other the template reads (enable_thinking, date_string, ...); they
        win over the special token names, as in transformers."""
        try:
            tool_use = self.tool_template is not None and variables.get("tools") is not None
            return _compiled_template(self.tool_template if tool_use else self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **{**self.special_token_names, **variables})
        except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"chat_template: {type(e).__name__}: {e}") from None

    def _as_tokenized(self, text):
        """The bytes the ids of `text` decode to: text after normalization and added tokens' strip flags, without
        the bytes the vocab has no token for."""
        data = text.encode() if self._fast else b"".join(p.encode() for p, _ in self._cut_added(text, True))
        return data.translate(None, self._missing)

    def _encode_chat(self, messages, text):
        """The rendered chat's ids: special-token strings are special tokens where the template wrote them and
        text where a message's content holds them, so a user typing '<|im_end|>' cannot end a turn or open one."""
        contents = [m.get("content", "") for m in messages]
        typed = [t for t in self._added_ids if t not in self._plain_added and any(t in c for c in contents)]
        if not typed:
            return self.encode_with_special(text)
        spans, start = [], 0  # where the template put those contents (as they are, or stripped)
        for content in (c for c in contents if any(t in c for t in typed)):
            found = [(k, len(c)) for c in (content, content.strip()) if (k := text.find(c, start)) >= 0]
            if not found:
                raise ValueError(f"a message holds the special token {typed[0]!r} and chat_template changes its "
                                 "content, so it cannot be kept as text: remove it from the message")
            spans.append((found[0][0], found[0][0] + found[0][1]))
            start = spans[-1][1]
        cut = regex.compile("|".join(regex.escape(t) for t in sorted(self._added_ids, key=len, reverse=True)))
        ids, plain_from = [], 0
        for found in cut.finditer(text):  # split at the special tokens outside those contents
            if not any(a <= found.start() < b for a, b in spans):
                ids += self.encode(text[plain_from:found.start()]) + [self._added_ids[found.group()]]
                plain_from = found.end()
        return ids + self.encode(text[plain_from:])

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
                    documents: list[dict] | None = None, **template_kwargs) -> tuple[list[int], list[int]]:
        """messages -> (ids, loss_mask): rendered with the chat_template (ChatML for ours) and tokenized as
        transformers' apply_chat_template does, but for contents holding special tokens (_encode_chat). tools (JSON
        schemas), documents and template_kwargs (enable_thinking=False, date_string=...) go to the template as there.
        The mask is 1 on the tokens each assistant message adds: from the end of the conversation before it rendered
        with a generation prompt to the end of the conversation up to it, cut after its last special token (ChatML's
        <|im_end|>, not the "\\n" after it, which generation never produces); a token straddling the start counts
        as the message's. A prompt (add_generation_prompt=True) is for generating: its mask is all 0."""
        if self.chat_template is None:
            raise ValueError(f"{self.source}: no chat_template (tokenizer_config.json or chat_template.jinja) and no "
                             "<|im_start|>/<|im_end|> tokens for ChatML, so this tokenizer cannot render a chat")
        roles = CHAT_ROLES if self.chat_template == CHAT_TEMPLATE else None  # a model's template checks its own
        messages = _chat_messages(messages, roles)
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                raise ValueError(f"{name} must be a list of dicts (JSON schemas for tools), got {value!r:.80}")
        variables = {"tools": tools, "documents": documents, **template_kwargs}
        text = self._render(messages, add_generation_prompt, variables)
        ids = self._encode_chat(messages, text)
        mask = [0] * len(ids)
        if add_generation_prompt:
            return ids, mask
        full, ends = self._as_tokenized(text), list(accumulate(len(self._decode_table[i]) for i in ids))
        if self.decode_bytes(ids) != full:
            raise ValueError(f"{self.source}: the ids do not decode to the rendered text (a Split with behavior "
                             "Removed drops text, or ignore_merges found a token holding a byte the vocab lacks), so "
                             "tokens cannot be matched to messages for the loss mask")
        added = set(self._added_ids.values())
        for n, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = (self._as_tokenized(self._render(messages[:k], k == n, variables)) for k in (n, n + 1))
            if not (full.startswith(start) and full.startswith(end)):
                raise ValueError(f"chat_template renders messages[:{n + 1}] differently inside the whole "
                                 f"conversation, so the tokens message {n} adds are not defined")
            first, last = bisect_right(ends, len(start)), min(len(ids), bisect_left(ends, len(end)) + 1)
            special = [i for i in range(first, last) if ids[i] in added]
            last = special[-1] + 1 if special else last
            mask[first:last] = [1] * max(0, last - first)
        return ids, mask


# -----------------------------------------------------------------------------
# BPE training: count unique pre-split chunks, then merge the most frequent pair, updating counts incrementally


def _merge_pair(word, left, right, new_id):
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def train_tokenizer(texts, vocab_size: int, progress: bool = True) -> Tokenizer:
    """Ids 0..255 are the bytes, 256.. one per merge in order, then <|endoftext|>, <|im_start|>, <|im_end|>."""
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small: 256 bytes + {len(SPECIAL_TOKENS)} special tokens "
                         "at least")
    t0, split = time.time(), regex.compile(SPLIT_PATTERN)
    chunk_counts = collections.Counter()
    for text in texts:
        chunk_counts.update(split.findall(text))
    words = [list(chunk.encode()) for chunk in chunk_counts]  # each unique chunk once, as token ids
    counts = list(chunk_counts.values())
    pair_counts = collections.defaultdict(int)
    where = collections.defaultdict(list)  # pair -> indices of words that held it (may hold stale entries)
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            where[pair].append(w)
    # a lazy max-heap: an entry may overstate its pair's count; popped, it is checked and pushed back if stale
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    if progress:
        print(f"{len(words):,} unique chunks of {sum(counts):,} counted in {time.time() - t0:.1f}s", file=sys.stderr)
    merges, token_bytes = [], [bytes([b]) for b in range(256)]
    while len(merges) < n_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -negative_count:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < 2:
            break  # a pair seen once teaches nothing
        new_id = 256 + len(merges)
        merges.append(pair)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        delta = collections.defaultdict(int)
        for w in set(where.pop(pair)):
            word = words[w]
            merged = _merge_pair(word, pair[0], pair[1], new_id)
            if len(merged) == len(word):
                continue
            for old in zip(word, word[1:]):
                delta[old] -= counts[w]
            for new in zip(merged, merged[1:]):
                delta[new] += counts[w]
                if new_id in new:
                    where[new].append(w)
            words[w] = merged
        for changed, d in delta.items():
            if d:
                pair_counts[changed] += d
                if d > 0:
                    heapq.heappush(heap, (-pair_counts[changed], changed))
        pair_counts.pop(pair, None)
        if progress and (len(merges) % 200 == 0 or len(merges) == n_merges):
            print(f"\rmerge {len(merges):,}/{n_merges:,} count {count:,} {token_bytes[-1]!r:.40} "
                  f"{time.time() - t0:.0f}s   ", end="", file=sys.stderr, flush=True)
    if progress:
        print(f"\n{len(merges):,} merges in {time.time() - t0:.1f}s", file=sys.stderr)

    to_text = lambda b: "".join(BYTE_TO_CHAR[x] for x in b)  # noqa: E731
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False}
    added = [{"id": len(token_bytes) + n, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for n, content in enumerate(SPECIAL_TOKENS)]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {to_text(b): i for i, b in enumerate(token_bytes)},
             "merges": [[to_text(token_bytes[a]), to_text(token_bytes[b])] for a, b in merges]}
    return Tokenizer({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
                      "post_processor": byte_level, "decoder": byte_level, "model": model}, source="trained tokenizer")


