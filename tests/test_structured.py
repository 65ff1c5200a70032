"""Structured output, tool calls and reasoning: a live serve.py on a random-weight model, driven by the official
openai and anthropic clients; every constrained reply is checked with jsonschema (and pydantic, through the
clients' parse()), never against our own code."""
import enum
import json
import random
import time
from types import SimpleNamespace
from typing import Optional

import anthropic
import jsonschema
import openai
import pydantic
import pytest
import torch

from conftest import TEXT
from test_serve import KEY, request, start_server, stop_server

# a Qwen3-like template: ChatML, tools in the system message, calls in <tool_call> tags, results as user turns, a
# <think> block in the reply: enable_thinking=False closes it in the prompt, True opens it (DeepSeek-R1's way)
QWEN_LIKE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}{% if messages[0].role == 'system' %}"
    "{{ messages[0].content + '\\n\\n' }}{% endif %}{{ '# Tools\\n<tools>' }}{% for t in tools %}"
    "{{ '\\n' + (t | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\nCall one with <tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- for m in messages %}{%- if m.role == 'system' and loop.first %}"
    "{%- elif m.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% if m.reasoning_content %}"
    "{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}{% endif %}{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}{% set f = c.function if c.function else c %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + "
    "'}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined %}"
    "{{ '<think>\\n' if enable_thinking else '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}")


def make_model(path, template=None, seed=0):
    from model import ModelConfig, Transformer
    from tokenizer import train_tokenizer

    tokenizer = train_tokenizer([TEXT + '{"name": "get_weather", "arguments": {"city": "Paris"}}\n' * 20],
                                vocab_size=320, progress=False)
    tokenizer.chat_template = template or tokenizer.chat_template
    tokenizer.save(path)
    torch.manual_seed(seed)
    # a vocab padded past the tokenizer's, as many models have: those rows are never allowed
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size + 60, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    dim_ffn=128, max_len=1536, tie_weight=True))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    served = start_server(make_model(tmp_path_factory.mktemp("structured")), max_batch=8, prefill_chunk=512)
    served.claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{served.port}", api_key=KEY, max_retries=0,
                                        timeout=60)
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("thinking"), QWEN_LIKE)
    served = start_server(path, max_batch=4, prefill_chunk=512)
    served.path = path
    served.claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{served.port}", api_key=KEY, max_retries=0,
                                        timeout=60)
    yield served
    stop_server(served)


class Color(str, enum.Enum):
    red = "red"
    green = "green"


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=6)
    zip_code: int = pydantic.Field(ge=0, le=99999)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    favourite: Color
    address: Address
    scores: list[int] = pydantic.Field(max_length=3)
    nickname: Optional[str] = pydantic.Field(max_length=5)


USER = [{"role": "user", "content": "Tell me about a person."}]


def test_parse_with_a_pydantic_model(s):
    # the client turns the model into a strict json_schema (with $defs and $ref) and validates the reply with it
    for seed in range(3):
        r = s.client.chat.completions.parse(model="tiny", messages=USER, response_format=Person, max_tokens=300,
                                            seed=seed, temperature=1.0)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(r.choices[0].message.parsed, Person)


def test_json_object_and_schema_on_both_routes(s):
    r = s.client.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"},
                                         max_tokens=300, seed=1, n=3, extra_body={"top_k": 8})
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
    assert any(c.finish_reason == "stop" for c in r.choices)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7}},
              "required": ["n"], "additionalProperties": False}
    r = s.client.completions.create(model="tiny", prompt="Answer: ", max_tokens=50, seed=2, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    # a free request batched with constrained ones is untouched (the same text as alone)
    alone = s.client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, temperature=0)
    with_others = [s.client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, temperature=0,
                                                    n=2, response_format={"type": "json_object"}),
                   s.client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, temperature=0)]
    assert with_others[1].choices[0].message.content == alone.choices[0].message.content


def test_bad_and_hostile_schemas_are_400_naming_the_part(s):
    deep = {"type": "string"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    cases = [({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
             ({"type": "string", "format": "no-such-format"}, "no-such-format"),
             ({"type": "frobnicate"}, "frobnicate"),
             (deep, "recursion")]
    for schema, word in cases:
        t0 = time.perf_counter()
        status, _, data = request(s.port, "POST", "/v1/chat/completions", {"messages": USER, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        assert status == 400 and data["error"]["param"] == "response_format", data
        assert word in data["error"]["message"] and time.perf_counter() - t0 < 10, (word, data)
    status, _, data = request(s.port, "POST", "/v1/chat/completions", {"messages": USER, "response_format": {
        "type": "xml"}})
    assert status == 400 and data["error"]["param"] == "response_format"
    # a huge enum and a regex whose DFA has 2^30 states: compiled lazily, within llguidance's limits
    for schema in ({"enum": [f"value {i}" for i in range(4000)]},
                   {"type": "string", "pattern": "^(a|b|c|d|e)*x(a|b|c|d|e){30}$"}):
        t0 = time.perf_counter()
        r = s.client.chat.completions.create(model="tiny", messages=USER, max_tokens=60, seed=0, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert time.perf_counter() - t0 < 60
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # the engine is still serving
    r = s.client.chat.completions.create(model="tiny", messages=USER, max_tokens=5)
    assert r.usage.completion_tokens >= 1


def random_schema(rng, depth=0):
    """A schema of OpenAI's strict subset; the root is an object, as OpenAI requires."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "anyOf", "array", "object", "ref"]
    kind = "object" if depth == 0 else rng.choice(kinds[:7] if depth >= 3 else kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6), **rng.choice([{}, {"minLength": 1}]),
                **rng.choice([{}, {"pattern": "^[a-z]{0,1}$"}])}
    if kind in ("integer", "number"):
        low = rng.randint(-50, 50)
        return {"type": kind, "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample(["a", "bb", 3, None, True, "ccc"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["x", 7, False])}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    if kind == "ref":
        return {"$ref": "#/$defs/leaf"}
    names = rng.sample(["alpha", "b", "c_d", "eee", "f"], rng.randint(1, 3))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": rng.sample(names, rng.randint(0, len(names))), "additionalProperties": False}


def test_fifty_random_schemas_all_validate(s):
    rng = random.Random(0)
    schemas = [{**random_schema(rng), "$defs": {"leaf": {"type": "integer", "minimum": 0, "maximum": 9}}}
               for _ in range(50)]
    from concurrent.futures import ThreadPoolExecutor

    def ask(i):
        return s.client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=400, seed=i, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(50)))
    for schema, r in zip(schemas, replies):
        assert r.choices[0].finish_reason == "stop", (schema, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 8},
                                                "unit": {"enum": ["C", "F"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_calls(chunks):
    """A stream's tool calls put together as the openai documentation does: by index, id and name from the first
    delta, arguments appended -> ([(name, arguments)], finish_reason, content)."""
    calls, finish, content = {}, None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.id:
                    assert delta.index not in calls and delta.function.name
                    calls[delta.index] = [delta.id, delta.function.name, delta.function.arguments or ""]
                else:
                    assert delta.function.name is None
                    calls[delta.index][2] += delta.function.arguments
            finish = choice.finish_reason or finish
    return [(name, arguments) for _, name, arguments in (calls[i] for i in sorted(calls))], finish, content


def test_tool_round_trip_required_and_named(s):
    r = s.client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id and call.type == "function" and call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    # the result goes back; the final answer is text
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    final = s.client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, ADD], max_tokens=20,
                                             tool_choice="none", seed=4)
    assert isinstance(final.choices[0].message.content, str) and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens > r.usage.prompt_tokens
    # a named function, with parallel calls allowed: exactly that one
    for seed in range(3):
        r = s.client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ADD], max_tokens=200,
                                             tool_choice={"type": "function", "function": {"name": "add"}}, seed=seed)
        [call] = r.choices[0].message.tool_calls
        assert call.function.name == "add" and r.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["add"])


class GetWeather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    unit: Color  # a $ref into the model's own $defs


def test_parse_with_pydantic_function_tools(s):
    """The client's strict function tools from pydantic models, whose $refs point into their own $defs; it parses
    the arguments into the model."""
    for seed in range(2):
        r = s.client.chat.completions.parse(model="tiny", messages=ASK, max_tokens=200, seed=seed,
                                            tools=[openai.pydantic_function_tool(GetWeather),
                                                   openai.pydantic_function_tool(Address)], tool_choice="required")
        assert r.choices[0].finish_reason == "tool_calls"
        for call in r.choices[0].message.tool_calls:
            assert isinstance(call.function.parsed_arguments, {"GetWeather": GetWeather, "Address": Address}[
                call.function.name])


def test_streamed_tool_calls_equal_unstreamed(s):
    for extra in ({"tool_choice": "required"}, {"tool_choice": "required", "parallel_tool_calls": False},
                  {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}):
        args = dict(model="tiny", messages=ASK, tools=[WEATHER, ADD], max_tokens=300, temperature=0, **extra)
        r = s.client.chat.completions.create(**args)
        whole = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
        calls, finish, content = streamed_calls(s.client.chat.completions.create(**args, stream=True))
        assert (calls, finish, content) == (whole, r.choices[0].finish_reason, "") and calls
        if "parallel_tool_calls" in extra or "name" in str(extra):  # one call, whole
            assert finish == "tool_calls" and len(calls) == 1
        for name, arguments in calls if finish == "tool_calls" else calls[:-1]:  # "length" may cut the last
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_tool_requests_that_cannot_be_honoured_are_400(s):
    cases = [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
             ({"tools": [WEATHER, WEATHER]}, "tools"),
             ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
               "tool_choice": "required"}, "tools"),
             ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
             ({"thinking_budget": 5}, "thinking_budget")]  # this template does not think
    for extra, param in cases:
        status, _, data = request(s.port, "POST", "/v1/chat/completions", {"messages": ASK, **extra})
        assert status == 400 and data["error"]["param"] == param, (extra, data)
    for param, value in (("tools", [WEATHER]), ("tool_choice", "auto"), ("chat_template_kwargs", {}),
                         ("thinking_budget", 5)):
        status, _, data = request(s.port, "POST", "/v1/completions", {"prompt": "Hi", param: value})
        assert status == 400 and data["error"]["param"] == param, (param, data)


CLAUDE_TOOLS = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                 "input_schema": t["function"]["parameters"]} for t in (WEATHER, ADD)]


def test_anthropic_tool_use_round_trip_and_stream(s):
    args = dict(model="tiny", max_tokens=200, messages=ASK, tools=CLAUDE_TOOLS,
                tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    r = s.claude.messages.create(**args)
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["tool_use"]
    use = r.content[0]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, SCHEMAS["get_weather"])
    # streamed: the client's own accumulation of input_json_delta events gives the same call
    with s.claude.messages.stream(**args) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use" and [(b.name, b.input) for b in streamed.content] == [
        (use.name, use.input)]
    # any: some tool; the result goes back in a tool_result block and the answer is text
    r = s.claude.messages.create(**{**args, "tool_choice": {"type": "any", "disable_parallel_tool_use": True}})
    [use] = r.content
    jsonschema.validate(use.input, SCHEMAS[use.name])
    history = ASK + [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}]}]
    final = s.claude.messages.create(model="tiny", max_tokens=10, messages=history, tools=CLAUDE_TOOLS,
                                     tool_choice={"type": "none"})
    assert final.content[0].type == "text" and final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > r.usage.input_tokens
    status, _, data = request(s.port, "POST", "/v1/messages", {"model": "tiny", "max_tokens": 5, "messages": ASK,
                                                              "tools": [{"name": "f"}]})
    assert status == 400 and "input_schema" in data["error"]["message"]


def test_a_template_with_tools_renders_as_in_transformers(thinker):
    """Tools, an assistant's tool_calls and a tool result go through the model's own template: the prompt is the
    one transformers' apply_chat_template makes."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(thinker.path)
    args = dict(model="tiny", messages=ASK, tools=[WEATHER, ADD], max_tokens=200, temperature=0,
                tool_choice="required", parallel_tool_calls=False,
                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    r = thinker.client.chat.completions.create(**args)
    [call] = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert r.choices[0].message.reasoning_content is None if hasattr(r.choices[0].message, "reasoning_content") \
        else True
    ids = reference.apply_chat_template(ASK, tools=[WEATHER, ADD], add_generation_prompt=True, enable_thinking=False,
                                        tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(ids)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
                      "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
                     {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    ids = reference.apply_chat_template(history, tools=[WEATHER, ADD], add_generation_prompt=True,
                                        enable_thinking=False, tokenize=True, return_dict=False)
    sent = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    final = thinker.client.chat.completions.create(**{**args, "messages": sent, "tool_choice": "none",
                                                      "max_tokens": 5})
    assert final.usage.prompt_tokens == len(ids)


def test_thinking_budget_then_structured_answer(thinker):
    """The prompt leaves the <think> block to the model; after 8 thinking tokens the engine closes it, and the
    answer follows the schema. Streamed reasoning_content and content equal the whole reply's."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    args = dict(model="tiny", messages=USER, max_tokens=100, seed=5, extra_body={"thinking_budget": 8},
                response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}})
    r = thinker.client.chat.completions.create(**args)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and message.reasoning_content
    jsonschema.validate(json.loads(message.content), schema)
    reasoning, content = "", ""
    for chunk in thinker.client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == (message.reasoning_content, message.content)
    # the block ends within the budget's 8 tokens and the forced "\n</think>"
    pieces = [entry.token for entry in thinker.client.chat.completions.create(**args, logprobs=True).choices[
        0].logprobs.content]
    closed = next(k for k in range(len(pieces) + 1) if "</think>" in "".join(pieces[:k]))
    assert closed <= 8 + len(thinker.tokenizer.encode("\n</think>"))
    # without a budget or a grammar, enable_thinking=false closes the block in the prompt: no reasoning
    r = thinker.client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0,
                                               extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(r.choices[0].message, "reasoning_content", None) is None


def test_anthropic_thinking_blocks(thinker):
    args = dict(model="tiny", max_tokens=40, messages=USER, thinking={"type": "enabled", "budget_tokens": 6},
                extra_body={"seed": 3})
    r = thinker.claude.messages.create(**args)
    assert [b.type for b in r.content] == ["thinking", "text"] and r.content[0].thinking
    with thinker.claude.messages.stream(**args) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert "thinking_delta" in kinds and [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None))
                                          for b in streamed.content] == [
        (b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in r.content]


@pytest.mark.parametrize("text, reasoning, thinking, syntax, want", [
    ("<think>\nhmm\n</think>\n\nHello", True, False, None, ("hmm", "Hello", [])),
    ("a thought</think>\n\nSo <tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, \"}\"]}}\n</tool_call>\n"
     "<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>", True, True, "hermes",
     ("a thought", "So ", [("f", '{"a": [1, "}"]}'), ("g", "{}")])),
    ("plain <tool text", False, False, "hermes", (None, "plain <tool text", [])),
    ("<tool_call>\nnot json", False, False, "hermes", (None, "<tool_call>\nnot json", [])),
    ('{"name": "f", "parameters": {"x": 1}}', False, False, "llama3", (None, "", [("f", '{"x": 1}')])),
    ("Hi there", False, False, "llama3", (None, "Hi there", []))])
def test_reply_parser_in_any_pieces(text, reasoning, thinking, syntax, want):
    from structured import ReplyParser, gather

    rng = random.Random(0)
    for trial in range(50):
        parser, events, i = ReplyParser(reasoning, thinking, syntax), [], 0
        while i < len(text):
            k = 1 + rng.randrange(4) if trial else len(text)
            events += parser.push(text[i:i + k])
            i += k
        got = gather(events + parser.finish())
        assert (got[0], got[1], [c[1:] for c in got[2]]) == want


def test_auto_tool_call_is_held_to_the_grammar_once_opened(s):
    """tool_choice auto: free text until the reply writes <tool_call>, then the call's grammar (random scores
    stand in for a model that opened a call)."""
    from structured import Constraint, apply_constraints, compile_grammar, parse_reply, tools_grammar

    tokenizer = s.tokenizer
    matcher = compile_grammar(tokenizer, tools_grammar([WEATHER["function"], ADD["function"]], "hermes", True,
                                                       triggered=True))
    row = SimpleNamespace(constraint=Constraint(tokenizer, matcher, after="<tool_call>"))
    tokens, generator = tokenizer.encode("Let me look. <tool_call>"), torch.Generator().manual_seed(0)
    for token in tokens:
        assert not row.constraint.wants_mask()
        row.constraint.consume(token)
    while len(tokens) < 3000:
        scores = torch.randn(1, s.model.config.vocab_size, generator=generator)
        apply_constraints(scores, [row], [0])
        tokens.append(int(scores.argmax()))
        if tokens[-1] in tokenizer.stop_ids:
            break
        row.constraint.consume(tokens[-1])
    assert tokens[-1] in tokenizer.stop_ids
    _, content, calls = parse_reply(tokenizer.decode(tokens[:-1]), syntax="hermes")
    assert content == "Let me look. " and calls
    for _, name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


THOUGHTS = [("What is 2 + 3?", "two plus three makes five", "5"), ("What is 4 + 4?", "four and four is eight", "8"),
            ("Hello!", "a greeting, so greet back", "Hi there.")]


@pytest.fixture(scope="module")
def sft_thinker(tmp_path_factory):
    """A tiny model fine-tuned (the one chat renderer's loss mask, AdamW) on conversations whose replies think in a
    <think> block first, served."""
    from model import CrossEntropy, ModelConfig, Transformer
    from tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("sft_thinker")
    tokenizer = train_tokenizer([TEXT + " ".join(" ".join(t) for t in THOUGHTS) * 20], vocab_size=320,
                                progress=False)
    tokenizer.chat_template = QWEN_LIKE
    tokenizer.save(path)
    rows = [tokenizer.render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a,
                                                                     "reasoning_content": r}]) for q, r, a in THOUGHTS]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (T - len(i)) for i, _ in rows])
    targets = torch.tensor([[t if m else -100 for t, m in zip(i[1:], mask[1:])] + [-100] * (T - len(i) + 1)
                            for i, mask in rows])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    dim_ffn=128, max_len=256, tie_weight=True))
    optimizer, threads = torch.optim.AdamW(model.parameters(), lr=1e-2), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and much faster on a busy machine
    try:
        for step in range(200):
            loss = model(ids, CrossEntropy(targets)) / (targets != -100).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.02:
                break
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05
    model.save_pretrained(path)
    served = start_server(str(path), max_batch=4, prefill_chunk=256)
    served.claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{served.port}", api_key=KEY, max_retries=0,
                                        timeout=60)
    yield served
    stop_server(served)


def test_a_model_that_thinks_gets_its_thinking_apart(sft_thinker):
    s = sft_thinker
    for question, thought, answer in THOUGHTS:
        args = dict(model="tiny", messages=[{"role": "user", "content": question}], max_tokens=60, temperature=0)
        message = s.client.chat.completions.create(**args).choices[0].message
        assert (message.reasoning_content, message.content) == (thought, answer)
        reasoning, content = "", ""
        for chunk in s.client.chat.completions.create(**args, stream=True):
            reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
            content += chunk.choices[0].delta.content or ""
        assert (reasoning, content) == (thought, answer)
        # the template opens the block (DeepSeek-R1's way): the reply starts inside it
        r = s.client.chat.completions.create(**args, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (thought, answer)
        # Anthropic thinking blocks, with a budget the thought fits in
        r = s.claude.messages.create(model="tiny", max_tokens=60, messages=args["messages"],
                                     thinking={"type": "enabled", "budget_tokens": 40}, extra_body={"temperature": 0})
        assert [(b.type, getattr(b, "thinking", None) or b.text) for b in r.content] == [
            ("thinking", thought), ("text", answer)] and r.stop_reason == "end_turn"
    # a budget shorter than the thought: the engine closes the block, the answer follows
    r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": THOUGHTS[0][0]}],
                                         max_tokens=60, temperature=0, extra_body={"thinking_budget": 3})
    assert THOUGHTS[0][1].startswith(r.choices[0].message.reasoning_content) and r.choices[0].message.reasoning_content
    assert r.choices[0].message.reasoning_content != THOUGHTS[0][1]


def test_special_tokens_are_never_text_inside_json(s):
    """Inside a JSON string every byte-level token may follow, but no special token of tokenizer.json: a reply's
    '<|im_start|>' can only be the token, never the string, and the grammar never allows the token."""
    from structured import Constraint, apply_constraints, compile_grammar, json_schema_grammar

    tokenizer = s.tokenizer
    special = [t["id"] for t in tokenizer.hf_json["added_tokens"] if t["special"]]
    row = SimpleNamespace(constraint=Constraint(tokenizer, compile_grammar(tokenizer, json_schema_grammar(
        {"type": "string"}))))
    row.constraint.consume(tokenizer.encode('"')[0])
    scores = torch.zeros(1, s.model.config.vocab_size)
    apply_constraints(scores, [row], [0])
    allowed = set(torch.nonzero(scores[0] == 0).flatten().tolist())
    assert special and not allowed & set(special)
    assert set(tokenizer.encode("Hello, world!")) <= allowed  # (not UTF-8 continuation bytes: they cannot start)
    assert not allowed & set(range(tokenizer.vocab_size, s.model.config.vocab_size))  # padded rows


def test_a_grammar_that_gives_up_fails_the_request(s, monkeypatch):
    """Should llguidance stop a matcher (a limit reached mid-reply), the request fails rather than return text that
    breaks its schema; the server goes on."""
    import structured

    consume = structured.Constraint.consume

    def failing(self, token):
        consume(self, token)
        self.error = "step_lexer_fuel exhausted (simulated)"

    monkeypatch.setattr(structured.Constraint, "consume", failing)
    status, _, data = request(s.port, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 50,
                                                                       "response_format": {"type": "json_object"}})
    assert status == 500 and data["error"]["type"] == "server_error"
    monkeypatch.undo()
    r = s.client.chat.completions.create(model="tiny", messages=USER, max_tokens=50, seed=0,
                                         response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict)


# a Llama 3.1-like template: tools in the system turn, a call is a bare JSON object, results in ipython turns
LLAMA_LIKE = (
    "{%- if tools %}{{ '<|im_start|>system\\nRespond with {\"name\": function name, \"parameters\": arguments}.\\n' }}"
    "{%- for t in tools %}{{ (t | tojson) + '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}{{ '<|im_start|>ipython\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + (m.content or '') + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_llama_syntax_tool_calls(tmp_path):
    served = start_server(make_model(tmp_path, LLAMA_LIKE), max_batch=2, prefill_chunk=512)
    try:
        args = dict(model="tiny", messages=ASK, tools=[WEATHER, ADD], max_tokens=200, temperature=0,
                    tool_choice={"type": "function", "function": {"name": "add"}})
        r = served.client.chat.completions.create(**args)
        [call] = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["add"])
        calls, finish, content = streamed_calls(served.client.chat.completions.create(**args, stream=True))
        assert (calls, finish, content) == ([("add", call.function.arguments)], "tool_calls", "")
    finally:
        stop_server(served)
