"""
The two APIs serve.py speaks, as plain functions over JSON: OpenAI's chat and completions, Anthropic's Messages.
parse_openai and parse_anthropic check a body and return a request (token ids of each prompt, what each of its
sequences needs); the *_json functions shape the replies; ApiError knows both APIs' error shapes.
"""
import base64
import json
import math
from types import SimpleNamespace

from sample import SamplingParams

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI; Anthropic's stop_sequences: MAX_STOP_SEQUENCES
MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
# Anthropic's error types by HTTP status; its "overloaded" status is 529 where OpenAI's is 503
ANTHROPIC_ERRORS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
# request fields that would change the result and that this server does not do, with the values that change nothing
OPENAI_UNSUPPORTED = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "functions": (None,),
                      "function_call": (None, "none"), "audio": (None,), "prediction": (None,),
                      "modalities": (None, ["text"]), "web_search_options": (None,)}
ANTHROPIC_UNSUPPORTED = {"mcp_servers": (None, []), "container": (None,), "output_config": (None,)}


class ApiError(Exception):
    """An error the client caused (or a full queue, or a failure): its HTTP status, and body() in either API's shape."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = \
            status, message, param, code, kind, headers or {}

    def body(self, anthropic=False):
        if anthropic:
            kind = ANTHROPIC_ERRORS.get(self.status, "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def short(value):
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_json(raw):
    """The request body -> a dict; 400 in our own words (never an exception's text) for anything else."""
    try:
        body = json.loads(raw, parse_constant={}.__getitem__)  # NaN, Infinity: a KeyError
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, KeyError, RecursionError):  # not UTF-8, NaN, an integer over 4300 digits, deep nesting
        raise ApiError(400, "the body is not valid JSON: it must be UTF-8 text, nested less than 1000 deep, with "
                            "finite numbers of under 4300 digits") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


# -----------------------------------------------------------------------------
# fields


def number(body, name, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{name}={short(value)} is invalid: expected {what} from {low} to {high}", param=name)
    return value


def flag(body, name):
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name}={short(value)} is invalid: expected true or false", param=name)
    return bool(value)


def refuse_unsupported(body, table):
    for name, neutral in table.items():
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"{name} is not supported by this server (got {short(body[name])}); leave it out",
                           param=name)


def stop_strings(body, name, limit):
    stop = body.get(name)
    stop = [] if stop is None else [stop] if isinstance(stop, str) and name == "stop" else stop
    if not isinstance(stop, list) or len(stop) > limit or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"{name} must be a list of up to {limit} non-empty strings", param=name)
    return stop


def sampling(body, vocab_size, max_temperature=2.0):
    """The request's sample.SamplingParams, each field within the API's limits; beyond OpenAI's own fields: top_k,
    min_p and repetition_penalty (vLLM's). A field the APIs take is a line here."""
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS or not all(
            k.isascii() and k.isdigit() and len(k) < 10 and int(k) < vocab_size and not isinstance(v, bool)
            and isinstance(v, (int, float)) and -100 <= v <= 100 for k, v in bias.items()):
        raise ApiError(400, f"logit_bias must map up to {MAX_LOGIT_BIAS} token ids (strings, 0..{vocab_size - 1}) "
                            'to numbers from -100 to 100, like {"42": -100}', param="logit_bias")
    try:
        return SamplingParams(temperature=number(body, "temperature", 1.0, 0, max_temperature),
                              top_p=number(body, "top_p", 1.0, 0, 1), min_p=number(body, "min_p", 0.0, 0, 1),
                              top_k=max(0, number(body, "top_k", 0, -1, 1 << 31, integer=True)),  # -1: vLLM's "off"
                              presence_penalty=number(body, "presence_penalty", 0.0, -2, 2),
                              frequency_penalty=number(body, "frequency_penalty", 0.0, -2, 2),
                              repetition_penalty=number(body, "repetition_penalty", 1.0, 0.01, 100),
                              logit_bias={int(k): float(v) for k, v in bias.items()})
    except ValueError as e:  # the object's own checks, should the limits above let a value through
        raise ApiError(400, str(e)) from None


def budgets(prompts, asked, default, limits, param, prompt_param):
    """Tokens each prompt may generate: `asked`, which must fit with the prompt in the context and in the KV
    cache's budget, limits = (context, tokens the budget holds) (400 context_length_exceeded otherwise, as OpenAI
    and Anthropic answer), else `default` capped by both."""
    max_len = min(limits)
    both = f"the context is {limits[0]} tokens and the KV cache budget (--kv_memory) holds {limits[1]}"
    for p in prompts:
        if len(p) >= max_len:
            raise ApiError(400, f"the prompt is {len(p)} tokens but {both}, which leaves no room for a reply: "
                                f"shorten it to at most {max_len - 1} tokens",
                           param=prompt_param, code="context_length_exceeded")
        if asked is not None and len(p) + asked > max_len:
            raise ApiError(400, f"the prompt is {len(p)} tokens and {param}={asked}, more than {both}: ask for at "
                                f"most {max_len - len(p)} tokens",
                           param=param, code="context_length_exceeded")
    return [min(default or max_len, max_len - len(p)) if asked is None else asked for p in prompts]


def text_of(content, where):
    """A message's content: a string, or a list of text blocks (OpenAI's content parts, Anthropic's blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind != "text" or not isinstance(block.get("text"), str):
                raise ApiError(400, f"{where}[{j}]: {short(kind)} content is not supported, only text blocks like "
                                    '{"type": "text", "text": "..."}', param=where)
        return "".join(block["text"] for block in content)
    raise ApiError(400, f"{where} must be a string or a list of text blocks", param=where)


def render(tokenizer, messages, where="messages", **variables):
    """The prompt's ids; variables: the template's (tools, enable_thinking, ...); a template's error is a 400."""
    try:
        return list(tokenizer.render_chat(messages, add_generation_prompt=True, **variables)[0])
    except ValueError as e:
        raise ApiError(400, f"{where}: {e}", param=where) from None


# -----------------------------------------------------------------------------
# OpenAI


def openai_chat(body, tokenizer):
    """A chat request's messages -> ([prompt], constraint, parser): openai_chat_prompt's. developer is o1's name
    for system."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, 'messages must be a non-empty list of {"role": ..., "content": ...} objects',
                       param="messages")
    prompt, constraint, parser = openai_chat_prompt(body, tokenizer, messages)
    return [prompt], constraint, parser


def openai_prompts(body, tokenizer, vocab_size):
    prompt = body.get("prompt")
    batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    prompts = []
    for p in batch:
        if isinstance(p, str) and p:
            prompts.append(list(tokenizer.encode(p)))
        elif isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab_size for t in p):  # bool is no id
            prompts.append(list(p))
        else:
            raise ApiError(400, f"prompt must be a non-empty string, a list of token ids in 0..{vocab_size - 1}, "
                                f"or a list of those; got {short(p)}", param="prompt")
    return prompts


def parse_openai(body, chat, tokenizer, limits, vocab_size, max_sequences):
    """A chat or completions request -> Request(prompts, n, seed, stop, max_tokens per prompt, sampling (a
    SamplingParams), top_logprobs, stream, include_usage, echo, constraint and parser: None or a function making
    each choice's structured.Constraint / ReplyParser). limits: (context, tokens the KV cache's budget holds)."""
    refuse_unsupported(body, OPENAI_UNSUPPORTED if chat else {**OPENAI_UNSUPPORTED, "echo": (None, False, True)})
    if chat:
        prompts, constraint, parser = openai_chat(body, tokenizer)
    else:
        prompts, constraint, parser = openai_prompts(body, tokenizer, vocab_size), completion_constraint(
            body, tokenizer), None
    echo = not chat and flag(body, "echo")
    if chat:
        top_logprobs = number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        if top_logprobs and not flag(body, "logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        top_logprobs = top_logprobs if flag(body, "logprobs") else None
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        number(body, "max_tokens", None, 1, math.inf, integer=True)  # the older name, checked too
    else:
        top_logprobs, name = number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True), "max_tokens"
    asked = number(body, name, None, 0 if echo else 1, math.inf, integer=True)  # 0 with echo: score the prompt
    stream, stream_options = flag(body, "stream"), body.get("stream_options")
    if stream_options is not None and (not stream or not isinstance(stream_options, dict)):
        raise ApiError(400, 'stream_options must be an object like {"include_usage": true}, and only with '
                            "stream=true", param="stream_options")
    n, seed = number(body, "n", 1, 1, MAX_N, integer=True), number(body, "seed", None, -(1 << 63), (1 << 63) - 1, True)
    if echo and n > 1:
        raise ApiError(400, f"echo with n={n} is not supported: send n=1 (each prompt is echoed once)", param="n")
    if len(prompts) * n > max_sequences:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} make {len(prompts) * n} sequences; the server queues "
                            f"at most {max_sequences}", param="n")
    return SimpleNamespace(
        prompts=prompts, n=n, seed=seed, stop=stop_strings(body, "stop", MAX_STOP), echo=echo,
        max_tokens=budgets(prompts, asked, None if chat else 16, limits, name, "messages" if chat else "prompt"),
        sampling=sampling(body, vocab_size), top_logprobs=top_logprobs, stream=stream,
        include_usage=flag(stream_options or {}, "include_usage"), constraint=constraint, parser=parser)


def finite(logprob):
    return logprob if math.isfinite(logprob) else -9999.0  # OpenAI's stand-in for -inf; JSON has no inf or nan


def logprobs_json(chat, tokenizer, entries, offset=0):
    """OpenAI's logprobs of (token, logprob, top) entries (sample.Sequence's logprobs entries): chat's "content"
    list, or completions' columns, whose text_offset counts the characters of the tokens before, from `offset`
    (a stream's running count)."""
    def token(i):
        return tokenizer.decode_bytes([i]).decode("utf-8", errors="replace")

    if chat:
        def item(i, logprob):
            return {"token": token(i), "logprob": finite(logprob), "bytes": list(tokenizer.decode_bytes([i]))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries],
                "refusal": None}
    tokens = [token(t) for t, _, _ in entries]
    offsets = [offset + sum(len(x) for x in tokens[:k]) for k in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [None if lp is None else finite(lp) for _, lp, _ in entries],
            "text_offset": offsets,  # None: an echoed prompt's first token, which nothing before predicts
            "top_logprobs": [None if top is None else {token(i): finite(v) for i, v in top} for _, _, top in entries]}


def choice_json(chat, stream, index, text, logprobs=None, finish=None):
    """One entry of "choices": a chat message, a chat delta, or a completion's text."""
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if stream:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def usage_json(prompts, choices):
    prompt = sum(len(p) for p in prompts)  # each prompt counts once, however many choices it has
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -----------------------------------------------------------------------------
# Anthropic Messages


def parse_anthropic(body, tokenizer, limits, vocab_size):
    """A Messages request -> the same Request as parse_openai's (one prompt, n=1). A final assistant message is
    a prefill: the reply continues it. temperature/top_p/top_k come from the body (the official client sends them
    with extra_body), as do our extras (min_p, the penalties, seed)."""
    refuse_unsupported(body, ANTHROPIC_UNSUPPORTED)
    if body.get("max_tokens") is None:
        raise ApiError(400, "max_tokens is required: the most tokens to generate, like 1024", param="max_tokens")
    asked = number(body, "max_tokens", None, 1, math.inf, integer=True)
    messages, system = body.get("messages"), body.get("system")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, 'messages must be a non-empty list of {"role": "user", "content": ...} objects',
                       param="messages")
    plain = ([] if system is None else [{"role": "system", "content": text_of(system, "system")}]) + \
        anthropic_history(messages)
    prefill = plain.pop() if plain[-1]["role"] == "assistant" else {"content": ""}
    if set(prefill) - {"role", "content"} or prefill["content"] != prefill["content"].rstrip():
        raise ApiError(400, "the final assistant message (a prefill) must be text (no tool_use or thinking) that "
                            "does not end with whitespace", param="messages")
    if not isinstance(body.get("metadata", {}), dict):
        raise ApiError(400, 'metadata must be an object like {"user_id": "..."}', param="metadata")
    prompt, constraint, parser = anthropic_prompt(body, tokenizer, plain, asked)
    if prefill["content"] and (constraint or parser):
        raise ApiError(400, "a prefill (a final assistant message) cannot be combined with tools or thinking",
                       param="messages")
    prompt += list(tokenizer.encode(prefill["content"]) if prefill["content"] else [])
    return SimpleNamespace(
        prompts=[prompt], n=1, seed=number(body, "seed", None, -(1 << 63), (1 << 63) - 1, True),
        stop=stop_strings(body, "stop_sequences", MAX_STOP_SEQUENCES),
        max_tokens=budgets([prompt], asked, None, limits, "max_tokens", "messages"),
        sampling=sampling(body, vocab_size, max_temperature=1.0), top_logprobs=None, echo=False,
        stream=flag(body, "stream"), include_usage=False, constraint=constraint, parser=parser)


def stop_reason(finish, stop_string):
    return "max_tokens" if finish == "length" else "stop_sequence" if stop_string is not None else "end_turn"


def message_json(head, text, finish, choice, input_tokens, blocks=None):
    """A Messages response; text None: the message_start event's, before any content; blocks: its content blocks
    when a parser split the text (anthropic_blocks), stop_reason "tool_use" when calls end it."""
    done = text is not None
    reason = "tool_use" if finish == "stop" and any(b["type"] == "tool_use" for b in blocks or []) else \
        stop_reason(finish, choice.stop_string) if done else None
    return {**head, "type": "message", "role": "assistant",
            "content": blocks if blocks is not None else [{"type": "text", "text": text}] if done else [],
            "stop_reason": reason,
            "stop_sequence": choice.stop_string if done else None,
            "usage": {"input_tokens": input_tokens, "output_tokens": choice.completion_tokens}}


# -----------------------------------------------------------------------------
# vLLM's tokenizer endpoints (lm-eval's tokenizer_backend=remote uses them)


def added_by_template(tokenizer):
    """-> (ids before, ids after) that tokenizer.json's post-processor puts around one text (Hugging Face's
    add_special_tokens=True: Llama 3's BOS; none for Qwen's or ours); an ApiError for a post-processor not read here."""
    processor = tokenizer.hf_json.get("post_processor") or {}
    steps = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            pieces, names = step.get("single", []), step.get("special_tokens", {})
            cut = next(i for i, piece in enumerate(pieces) if "Sequence" in piece)
            ids = [[i for piece in part for i in names[piece["SpecialToken"]["id"]]["ids"]]
                   for part in (pieces[:cut], pieces[cut + 1:])]
            return ids[0], ids[1]
        if step and step.get("type") != "ByteLevel":
            raise ApiError(400, f"add_special_tokens=true: the tokenizer's post-processor {step.get('type')!r} is "
                                "not supported; send add_special_tokens=false", param="add_special_tokens")
    return [], []


def parse_tokenize(body, tokenizer):
    """/tokenize's body -> token ids: {"prompt": text, "add_special_tokens": true} (special-token strings in the
    text are special tokens, as in Hugging Face tokenizers and vLLM), or {"messages": [...],
    "add_generation_prompt": true} through the chat template."""
    refuse_unsupported(body, {"tools": (None, []), "chat_template": (None,), "chat_template_kwargs": (None, {}),
                              "continue_final_message": (None, False), "mm_processor_kwargs": (None, {})})
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, 'messages must be a non-empty list of {"role": ..., "content": ...} objects',
                           param="messages")
        plain = [{"role": m.get("role"), "content": text_of(m.get("content"), f"messages[{i}].content")}
                 for i, m in enumerate(messages)]
        try:
            ids = tokenizer.render_chat(plain, add_generation_prompt=flag(body, "add_generation_prompt")
                                        or body.get("add_generation_prompt") is None)[0]
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        before, after = added_by_template(tokenizer) if flag(body, "add_special_tokens") else ([], [])
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, 'send {"prompt": "text"} or {"messages": [...]}', param="prompt")
        ids = tokenizer.encode_with_special(prompt)
        add = flag(body, "add_special_tokens") or body.get("add_special_tokens") is None  # vLLM's default: true
        before, after = added_by_template(tokenizer) if add else ([], [])
    return before + list(ids) + after


def parse_detokenize(body, vocab_size):
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise ApiError(400, f"tokens must be a list of token ids in 0..{vocab_size - 1}", param="tokens")
    return tokens


def tokenizer_info_json(tokenizer, max_len):
    """/tokenizer_info: what tokenizer_config.json says (special tokens, chat template), as vLLM's endpoint."""
    names = {i: content for content, i in tokenizer._added_ids.items()}
    eos = tokenizer.special_token_names.get("eos_token") or names.get(tokenizer.stop_ids[0] if tokenizer.stop_ids
                                                                        else None)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "bos_token": None,
            "pad_token": None, "unk_token": None, **tokenizer.special_token_names, "eos_token": eos,
            "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None}


# -----------------------------------------------------------------------------
# structured output, tools and reasoning (structured.py does the work; imported only when a request asks)

# the description of tools given to a chat template that does not take them (the Hermes/Qwen 2.5 wording)
TOOLS_SYSTEM = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
                "function call, return a json object with function name and arguments within <tool_call></tool_call> "
                'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
TOOL_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_TOOLS = 128


def grammar_error(e, param):
    return ApiError(400, str(e), param=param)


def response_format_grammar(body):
    """OpenAI's response_format -> llguidance's grammar text, or None for text: json_object (any JSON object) or
    json_schema ({"json_schema": {"name": ..., "schema": {...}, "strict": ...}}; the grammar is always strict)."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    from structured import GrammarError, json_schema_grammar

    try:
        if kind == "json_object":
            return json_schema_grammar(True)
        spec = fmt.get("json_schema")
        if kind == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return json_schema_grammar(spec["schema"], "response_format.json_schema.schema")
    except GrammarError as e:
        raise grammar_error(e, "response_format") from None
    raise ApiError(400, f"response_format={short(fmt)} is invalid: expected {{\"type\": \"text\"}}, "
                        '{"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": ..., "schema": '
                        "{...}}}", param="response_format")


def function_spec(tool, where, name_key="name", schema_key="parameters"):
    """A tool's {"name", "description", "parameters"} (OpenAI's function, or Anthropic's tool under its keys)."""
    name, schema = tool.get(name_key) if isinstance(tool, dict) else None, (tool or {}).get(schema_key)
    if not isinstance(name, str) or not 0 < len(name) <= 64 or not set(name) <= TOOL_NAME:
        raise ApiError(400, f"{where}.{name_key} must be 1 to 64 letters, digits, _ or -", param="tools")
    if schema is not None and not isinstance(schema, dict):
        raise ApiError(400, f"{where}.{schema_key} must be a JSON schema object", param="tools")
    if not isinstance(tool.get("description", ""), str):
        raise ApiError(400, f"{where}.description must be a string", param="tools")
    return {"name": name, "description": tool.get("description", ""), "parameters": schema or {"type": "object"}}


def openai_tools(body):
    """tools, tool_choice and parallel_tool_calls -> None (no tools) or (functions, choice, parallel): choice
    "none" (the tools are rendered, as vLLM does, and no reply is parsed for calls), "auto", "required" or a
    function's name."""
    tools, choice = body.get("tools") or [], body.get("tool_choice")
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS or not all(
            isinstance(t, dict) and t.get("type") == "function" for t in tools):
        raise ApiError(400, f'tools must be a list of up to {MAX_TOOLS} {{"type": "function", "function": {{"name": '
                            '..., "parameters": {...}}} objects', param="tools")
    functions = [function_spec(t.get("function"), f"tools[{i}].function") for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: each function needs a name of its own", param="tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be true or false", param="parallel_tool_calls")
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if choice not in names:
            raise ApiError(400, f"tool_choice names {short(choice)}, which is not in tools", param="tool_choice")
    elif choice not in (None, "none", "auto", "required"):
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                            '{"name": ...}}', param="tool_choice")
    if not functions:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    return functions, choice or "auto", parallel is not False


def history_message(m, i, native):
    """One OpenAI message as a chat template takes it (transformers' shape: tool_calls' arguments as objects);
    native: the template takes tools, else calls and results are written in Hermes' tags into plain messages."""
    role = "system" if m.get("role") == "developer" else m.get("role")
    where = f"messages[{i}]"
    calls = m.get("tool_calls") if role == "assistant" else None
    content = "" if (calls or role == "tool") and m.get("content") is None else text_of(m.get("content"),
                                                                                          f"{where}.content")
    if role == "tool":
        if native:
            return {"role": "tool", "content": content, "tool_call_id": m.get("tool_call_id")}
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    message = {"role": role, "content": content}
    if isinstance(m.get("reasoning_content"), str) and role == "assistant":
        message["reasoning_content"] = m["reasoning_content"]
    if not calls:
        return message
    parsed = []
    for j, call in enumerate(calls if isinstance(calls, list) else [None]):
        function = call.get("function") if isinstance(call, dict) else None
        try:
            arguments = json.loads(function["arguments"])
            assert isinstance(function["name"], str) and isinstance(arguments, dict)
        except (TypeError, KeyError, ValueError, AssertionError):
            raise ApiError(400, f'{where}.tool_calls[{j}] must be {{"id": ..., "type": "function", "function": '
                                '{"name": ..., "arguments": "a JSON object as a string"}}', param="messages") from None
        parsed.append({"id": call.get("id"), "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})
    if native:
        return {**message, "content": content or None, "tool_calls": parsed}
    text = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"][
        "arguments"]}, ensure_ascii=False) + "\n</tool_call>" for c in parsed)
    return {**message, "content": (content + "\n" if content else "") + text}


def tool_messages(messages, tools, native):
    """The conversation for the template; tools described in (or as) the system message when it takes none."""
    out = [history_message(m, i, native) for i, m in enumerate(messages)]
    if tools and not native:
        described = TOOLS_SYSTEM.format(tools="\n".join(json.dumps({"type": "function", "function": f},
                                                                   ensure_ascii=False) for f in tools))
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def template_kwargs(body):
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or any(k in ("messages", "tools", "add_generation_prompt") for k in kwargs):
        raise ApiError(400, 'chat_template_kwargs must be an object of template variables like {"enable_thinking": '
                            "false} (not messages, tools or add_generation_prompt)", param="chat_template_kwargs")
    return kwargs


def reply_plan(tokenizer, prompt, grammar, tools, budget, where):
    """What a chat reply needs beyond sampling -> (prompt, constraint() making each choice's structured.Constraint
    or None, parser() making each choice's structured.ReplyParser or None). grammar: response_format's; tools:
    openai_tools' (functions, choice, parallel); budget: thinking tokens allowed, or None. A reasoning template
    (one that writes </think>) has its reply's block split out; structured output and tool calls apply after it,
    so a prompt that leaves the block to the model gets it opened."""
    from structured import (THINK_CLOSE, THINK_OPEN, Constraint, GrammarError, ReplyParser, compile_grammar,
                            tool_syntax, tools_grammar)

    template = tokenizer.chat_template or ""
    tools = tools if tools and tools[1] != "none" else None
    reasoning, syntax, after = THINK_CLOSE in template, tool_syntax(template) if tools else None, None
    if tools and tools[1] != "auto":
        chosen = [f for f in tools[0] if tools[1] in ("required", f["name"])]
        grammar = tools_grammar(chosen, syntax, tools[2] and tools[1] == "required")
    elif tools and syntax == "hermes":  # auto: free text, and once the reply opens a call, the call's grammar
        grammar, after = tools_grammar(tools[0], syntax, tools[2], triggered=True), "<tool_call>"
    tail = tokenizer.decode(prompt[-16:]).rstrip()
    thinking = reasoning and tail.endswith(THINK_OPEN)
    if reasoning and (grammar is not None and after is None or budget is not None) and not thinking and \
            not tail.endswith(THINK_CLOSE):
        prompt, thinking = prompt + tokenizer.encode(THINK_OPEN + "\n"), True
    if budget is not None and not reasoning:
        raise ApiError(400, "a thinking budget needs a reasoning model (a chat template that writes </think>)",
                       param=where)
    try:
        matcher = None if grammar is None else compile_grammar(tokenizer, grammar, "tools" if tools else
                                                               "response_format")
    except GrammarError as e:
        raise grammar_error(e, "tools" if tools else "response_format") from None
    constraint = None if matcher is None and budget is None else lambda: Constraint(
        tokenizer, matcher and matcher.deep_copy(), after, thinking, budget)
    parser = None if not (reasoning or tools) else lambda: ReplyParser(reasoning, thinking, syntax)
    return prompt, constraint, parser


def openai_chat_prompt(body, tokenizer, messages):
    """A chat request's prompt with its tools and template variables -> (prompt, constraint, parser): reply_plan's."""
    tools, grammar = openai_tools(body), response_format_grammar(body)
    if tools and tools[1] != "none" and grammar is not None:
        raise ApiError(400, 'response_format with tools is not supported: leave one out (or tool_choice="none")',
                       param="response_format")
    native = "tools" in (tokenizer.chat_template or "")
    plain = tool_messages(messages, tools and tools[0], native)
    budget = number(body, "thinking_budget", None, 0, 1 << 20, integer=True)
    prompt = render(tokenizer, plain, tools=body["tools"] if tools and native else None,  # as the client sent them
                    **template_kwargs(body))
    return reply_plan(tokenizer, prompt, grammar, tools, budget, "thinking_budget")


def completion_constraint(body, tokenizer):
    """/v1/completions' response_format -> constraint() making each choice's structured.Constraint, or None. The
    chat-only fields are refused here, by name."""
    for name in ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "thinking_budget"):
        if body.get(name) is not None:
            raise ApiError(400, f"{name} is for /v1/chat/completions; /v1/completions takes a prompt as it is",
                           param=name)
    grammar = response_format_grammar(body)
    if grammar is None:
        return None
    from structured import Constraint, GrammarError, compile_grammar

    try:
        matcher = compile_grammar(tokenizer, grammar, "response_format")
    except GrammarError as e:
        raise grammar_error(e, "response_format") from None
    return lambda: Constraint(tokenizer, matcher.deep_copy())


def reply_choice_json(parser, index, text, finish, logprobs=None):
    """A chat choice whose reply a structured.ReplyParser splits: reasoning_content (as vLLM and DeepSeek's API),
    content (None when there are only calls), tool_calls, and finish_reason "tool_calls" when they end it."""
    from structured import gather

    reasoning, content, calls = gather(parser.push(text) + parser.finish())
    message = {"role": "assistant", "content": content if content or not calls else None, "refusal": None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{"id": i, "type": "function", "function": {"name": name, "arguments": arguments}}
                                 for i, name, arguments in calls]
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": "tool_calls" if calls and finish == "stop" else finish}


def event_delta(event):
    """A ReplyParser event -> a chat chunk's delta, in OpenAI's shape: a call's index, id and name first, then its
    arguments in pieces."""
    if event[0] in ("reasoning", "content"):
        return {event[0] if event[0] == "content" else "reasoning_content": event[1]}
    if event[0] == "call":
        return {"tool_calls": [{"index": event[1], "id": event[2], "type": "function",
                                "function": {"name": event[3], "arguments": ""}}]}
    return {"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}


# --- Anthropic's tools and thinking, through the same machinery


def anthropic_history(messages):
    """Anthropic's messages -> OpenAI-shaped ones (history_message's input): tool_use blocks become tool_calls,
    tool_result blocks tool messages (before the user's text), thinking blocks reasoning_content."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f'messages[{i}].role must be "user" or "assistant"', param=f"messages[{i}].role")
        role, content = m["role"], m.get("content")
        if not isinstance(content, list):
            out.append({"role": role, "content": text_of(content, f"messages[{i}].content")})
            continue
        texts, calls, message = [], [], {"role": role}
        for j, block in enumerate(content):
            kind, where = block.get("type") if isinstance(block, dict) else None, f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant" and isinstance(block.get("input"), dict):
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": json.dumps(block["input"], ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user":
                result = text_of(block.get("content", ""), f"{where}.content")
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": "Error: " + result if block.get("is_error") else result})
            elif kind == "thinking" and role == "assistant" and isinstance(block.get("thinking"), str):
                message["reasoning_content"] = block["thinking"]
            else:
                raise ApiError(400, f"{where}: {short(kind)} content is not supported in a {role} message, only "
                                    "text, tool_use (assistant), tool_result (user) and thinking (assistant) blocks",
                               param="messages")
        if texts or calls or role == "assistant" or not out or out[-1]["role"] != "tool":
            out.append({**message, "content": "".join(texts), **({"tool_calls": calls} if calls else {})})
    return out


def anthropic_tools(body):
    """tools and tool_choice -> openai_tools' (functions, choice, parallel), or None."""
    tools, choice = body.get("tools") or [], body.get("tool_choice") or {"type": "auto"}
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS or not all(
            isinstance(t, dict) and t.get("type", "custom") == "custom" for t in tools):
        raise ApiError(400, f'tools must be a list of up to {MAX_TOOLS} {{"name": ..., "input_schema": {{...}}}} '
                            "objects (server tools are not supported)", param="tools")
    functions = [function_spec(t, f"tools[{i}]", schema_key="input_schema") for i, t in enumerate(tools)]
    if any("input_schema" not in t for t in tools):
        raise ApiError(400, "tools: each tool needs an input_schema", param="tools")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none") or kind == "tool" and choice.get("name") not in [
            f["name"] for f in functions] or not isinstance(choice.get("disable_parallel_tool_use", False), bool):
        raise ApiError(400, 'tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or {"type": '
                            '"tool", "name": ...} naming one of tools', param="tool_choice")
    if not functions:
        if kind == "any":
            raise ApiError(400, 'tool_choice {"type": "any"} needs tools', param="tool_choice")
        return None
    chosen = {"auto": "auto", "any": "required", "none": "none"}.get(kind, choice.get("name"))
    return functions, chosen, not choice.get("disable_parallel_tool_use", False)


def anthropic_prompt(body, tokenizer, plain, asked):
    """-> reply_plan's (prompt, constraint, parser). thinking {"type": "enabled", "budget_tokens": N} sets the
    template's enable_thinking and a thinking budget of N tokens (any N below max_tokens: Anthropic's floor of 1024
    is for its own models); without it enable_thinking is false."""
    thinking, budget = body.get("thinking"), None
    if thinking is not None and thinking != {"type": "disabled"}:
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if thinking.get("type") != "enabled" or type(budget) is not int or not 0 < budget < asked:
            raise ApiError(400, 'thinking must be {"type": "enabled", "budget_tokens": N} with N less than '
                                f"max_tokens={asked}, or {{\"type\": \"disabled\"}}", param="thinking")
    tools = anthropic_tools(body)
    native = "tools" in (tokenizer.chat_template or "")
    prompt = render(tokenizer, tool_messages(plain, tools and tools[0], native), enable_thinking=budget is not None,
                    tools=[{"type": "function", "function": f} for f in tools[0]] if tools and native else None)
    return reply_plan(tokenizer, prompt, None, tools, budget, "thinking")


def anthropic_blocks(reasoning, content, calls):
    """A parsed reply -> Messages content blocks: thinking, text, tool_use."""
    blocks = [] if reasoning is None else [{"type": "thinking", "thinking": reasoning, "signature": ""}]
    blocks += [{"type": "text", "text": content}] if content or not (blocks or calls) else []
    return blocks + [{"type": "tool_use", "id": "toolu_" + i.removeprefix("call_"), "name": name,
                      "input": json.loads(arguments or "{}")} for i, name, arguments in calls]


# -----------------------------------------------------------------------------
# OpenAI's embeddings (the vectors: rag.embed_ids)

MAX_EMBEDDING_INPUTS = 2048  # inputs per request, as OpenAI


def parse_embeddings(body, tokenizer, vocab_size, max_len, dim):
    """An embeddings request -> (token ids of each input, encoding_format). input: a string, a list of strings, a
    list of token ids or a list of those; dimensions: only the model's own (vectors are not truncated here)."""
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"encoding_format={short(fmt)} is invalid: expected float or base64",
                       param="encoding_format")
    if body.get("dimensions") not in (None, dim):
        raise ApiError(400, f"dimensions={short(body['dimensions'])}: this model's embeddings have {dim} dimensions "
                            "and are not truncated; leave it out", param="dimensions")
    items = body.get("input")
    if isinstance(items, str) or (isinstance(items, list) and items and all(type(t) is int for t in items)):
        items = [items]
    if not isinstance(items, list) or not 0 < len(items) <= MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input must be a string, a list of token ids, or a list of 1 to {MAX_EMBEDDING_INPUTS} "
                            "of those", param="input")
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item:
            rows.append(list(tokenizer.encode(item)))
        elif isinstance(item, list) and item and all(type(t) is int and 0 <= t < vocab_size for t in item):
            rows.append(list(item))
        else:
            raise ApiError(400, f"input[{i}] must be a non-empty string or a non-empty list of token ids in "
                                f"0..{vocab_size - 1}; got {short(item)}", param="input")
        if len(rows[-1]) > max_len:
            raise ApiError(400, f"input[{i}] is {len(rows[-1])} tokens, more than this model's {max_len}: shorten it",
                           param="input", code="context_length_exceeded")
    return rows, fmt


def embeddings_json(vectors, fmt, model_name, rows):
    """vectors (n, dim) float32 numpy -> OpenAI's list of embeddings; base64: the little-endian float32 bytes."""
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()}
            for i, v in enumerate(vectors)]
    tokens = sum(map(len, rows))
    return {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
