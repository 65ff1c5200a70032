"""serve.py's Anthropic Messages API (POST /v1/messages), driven by the official `anthropic` client and raw HTTP.
Every reply is checked against sample.generate run alone on the same prompt (greedy, or with the same seed)."""
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import pytest

from sample import generate
from test_serve import KEY, raw_chat, request, start_server, stop_server

GREEDY = {"temperature": 0}  # the current client has no temperature argument: it goes in extra_body


@pytest.fixture(scope="module")
def s(tiny_model_dir):
    served = start_server(tiny_model_dir, max_batch=4, prefill_chunk=16)
    served.claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{served.port}", api_key=KEY, max_retries=0,
                                        timeout=60)
    yield served
    stop_server(served)


def prompt_ids(s, messages, system=None):
    """Our rendering of an Anthropic conversation: the system prompt first; a final assistant turn is a prefill."""
    plain = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
         "".join(b["text"] for b in m["content"])} for m in messages]
    prefill = plain.pop()["content"] if plain[-1]["role"] == "assistant" else ""
    ids = list(s.tokenizer.render_chat(plain, add_generation_prompt=True)[0])
    return ids + (s.tokenizer.encode(prefill) if prefill else [])


def expected(s, ids, max_tokens, stop=(), **sampling):
    """(text, output_tokens, stop_reason, stop_sequence) from sample.generate alone."""
    tokens = generate(s.model, [ids], max_tokens, stop_ids=s.stop_ids, **{"temperature": 0.0, **sampling})[0]
    ended = bool(tokens) and tokens[-1] in s.stop_ids
    text = s.tokenizer.decode(tokens[:-1] if ended else tokens)
    hits = sorted((text.find(x), x) for x in stop if x in text)
    if hits:  # it ends at the first token whose text completes a stop sequence
        n = next(k for k in range(1, len(tokens) + 1) if any(x in s.tokenizer.decode(tokens[:k]) for x in stop))
        return text[:hits[0][0]], n, "stop_sequence", hits[0][1]
    return text, len(tokens), "end_turn" if ended else "max_tokens", None


def events(s, body, headers=None):
    """A streaming request over raw HTTP -> [(event name, data)]."""
    status, _, data = request(s.port, "POST", "/v1/messages", {**body, "stream": True}, key=None,
                              headers={"x-api-key": KEY, **(headers or {})})
    assert status == 200, data
    return [(m.group(1), json.loads(m.group(2))) for m in re.finditer(r"event: (\w+)\ndata: (.*)\n\n", data.decode())]


@pytest.mark.parametrize("system", [None, "Be brief.", [{"type": "text", "text": "Be "}, {"type": "text",
                                                                                       "text": "brief."}]])
def test_message_equals_generate(s, system):
    messages = [{"role": "user", "content": "What is 7 + 8?"}]
    text = system if isinstance(system, str) or system is None else "".join(b["text"] for b in system)
    ids = prompt_ids(s, messages, text)
    want = expected(s, ids, 30)
    r = s.claude.messages.create(model="tiny", max_tokens=30, messages=messages, extra_body=GREEDY,
                                 **({} if system is None else {"system": system}))
    assert r.type == "message" and r.role == "assistant" and r.model == "tiny" and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == want[0]
    assert (r.usage.input_tokens, r.usage.output_tokens, r.stop_reason, r.stop_sequence) == (len(ids), *want[1:])


def test_stream_equals_non_stream(s):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello, world!"}]}]
    r = s.claude.messages.create(model="tiny", max_tokens=40, messages=messages, extra_body=GREEDY)
    with s.claude.messages.stream(model="tiny", max_tokens=40, messages=messages, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == r.content[0].text == final.content[0].text and len(text) > 0
    assert (final.stop_reason, final.usage.output_tokens, final.usage.input_tokens) == (
        r.stop_reason, r.usage.output_tokens, r.usage.input_tokens)
    # the raw event sequence, as Anthropic sends it
    got = events(s, {"model": "tiny", "max_tokens": 40, "messages": messages, **GREEDY})
    names = [name for name, _ in got]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(name == data["type"] for name, data in got)
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] == len(
        prompt_ids(s, [{"role": "user", "content": "Hello, world!"}]))
    assert got[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta") == text
    assert all(d["delta"]["type"] == "text_delta" and d["index"] == 0 for n, d in got if n == "content_block_delta")
    delta = got[-2][1]
    assert delta["delta"] == {"stop_reason": r.stop_reason, "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == r.usage.output_tokens


def test_stop_sequences_and_max_tokens(s):
    messages = [{"role": "user", "content": "What is 7 + 8?"}]
    ids = prompt_ids(s, messages)
    full = expected(s, ids, 60)[0]
    stop = [m.group() for m in re.finditer(r"[A-Za-z0-9 ]{2,3}", full[3:])][:1] + ["never appears"]
    want = expected(s, ids, 60, stop=stop)
    assert want[2] == "stop_sequence" and len(want[0]) < len(full)
    r = s.claude.messages.create(model="tiny", max_tokens=60, messages=messages, stop_sequences=stop,
                                 extra_body=GREEDY)
    assert (r.content[0].text, r.usage.output_tokens, r.stop_reason, r.stop_sequence) == want
    with s.claude.messages.stream(model="tiny", max_tokens=60, messages=messages, stop_sequences=stop,
                                  extra_body=GREEDY) as stream:
        assert "".join(stream.text_stream) == want[0]  # nothing of the stop sequence leaked out
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", want[3])
    r = s.claude.messages.create(model="tiny", max_tokens=3, messages=messages, extra_body=GREEDY)
    assert (r.content[0].text, r.usage.output_tokens, r.stop_reason) == (expected(s, ids, 3)[0], 3, "max_tokens")


def test_multi_turn_prefill_and_sampling_from_the_body(s):
    messages = [{"role": "user", "content": "What is 7 + 8?"}, {"role": "assistant", "content": "15."},
                {"role": "user", "content": [{"type": "text", "text": "And 23 + 45?"}]}]
    ids = prompt_ids(s, messages, "Be brief.")
    r = s.claude.messages.create(model="tiny", max_tokens=25, system="Be brief.", messages=messages,
                                 extra_body=GREEDY, metadata={"user_id": "u-1"})
    assert (r.content[0].text, r.usage.input_tokens) == (expected(s, ids, 25)[0], len(ids))
    prefilled = messages + [{"role": "assistant", "content": "The answer is"}]  # the reply continues this turn
    ids = prompt_ids(s, prefilled, "Be brief.")
    r = s.claude.messages.create(model="tiny", max_tokens=25, system="Be brief.", messages=prefilled,
                                 extra_body=GREEDY)
    assert (r.content[0].text, r.usage.input_tokens) == (expected(s, ids, 25)[0], len(ids))
    # temperature, top_p, top_k (and our seed) read from the body
    sampling = {"temperature": 0.8, "top_p": 0.9, "top_k": 7, "seed": 5}
    r = s.claude.messages.create(model="tiny", max_tokens=20, messages=messages, extra_body=sampling)
    ids = prompt_ids(s, messages)
    want = expected(s, ids, 20, temperature=0.8, top_p=0.9, top_k=7, seed=5)
    assert (r.content[0].text, r.usage.output_tokens) == want[:2] and want[0] != expected(s, ids, 20)[0]


def test_errors_are_anthropic_shaped(s):
    user = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"messages": user}, "max_tokens"),
        ({"max_tokens": 5, "messages": []}, "messages"),
        ({"max_tokens": 5, "messages": [{"role": "system", "content": "Hi"}]}, "role"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}, "image"),
        ({"max_tokens": 5, "messages": user + [{"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "tool_use"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]},
         "thinking"),
        ({"max_tokens": 5, "messages": user, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"max_tokens": 5, "messages": user, "tools": [{"name": "f"}]}, "tools"),
        ({"max_tokens": 5, "messages": user, "temperature": 1.5}, "temperature"),  # Anthropic's range is 0..1
        ({"max_tokens": 5, "messages": user, "stop_sequences": "x"}, "stop_sequences"),
        ({"max_tokens": 10**6, "messages": user}, "context"),
        ({"max_tokens": 5, "messages": user + [{"role": "assistant", "content": "ends in a space "}]}, "whitespace"),
    ]
    for body, word in cases:  # raw: the client refuses a missing max_tokens itself
        status, _, data = request(s.port, "POST", "/v1/messages", {"model": "tiny", **body})
        assert status == 400 and data["type"] == "error" and set(data["error"]) == {"type", "message"}, body
        assert data["error"]["type"] == "invalid_request_error" and word in data["error"]["message"], data
    with pytest.raises(anthropic.BadRequestError) as e:
        s.claude.messages.create(model="tiny", **cases[3][0])
    assert "image" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        s.claude.messages.create(model="no-such-model", max_tokens=5, messages=user)
    assert e.value.body["error"]["type"] == "not_found_error"
    for client in (anthropic.Anthropic(base_url=f"http://127.0.0.1:{s.port}", api_key="sk-wrong", max_retries=0),
                   anthropic.Anthropic(base_url=f"http://127.0.0.1:{s.port}", api_key=None, auth_token=KEY + "x",
                                       max_retries=0)):
        with pytest.raises(anthropic.AuthenticationError) as e:
            client.messages.create(model="tiny", max_tokens=5, messages=user)
        assert e.value.body["error"]["type"] == "authentication_error"
    # the key as a Bearer token works too
    bearer = anthropic.Anthropic(base_url=f"http://127.0.0.1:{s.port}", api_key=None, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model="tiny", max_tokens=2, messages=user).usage.output_tokens == 2
    # the same Host, Origin, Content-Type and size limits as the OpenAI routes, in Anthropic's shape
    body = {"max_tokens": 2, "messages": user}
    for headers, status, kind in [({"Origin": "http://evil.example"}, 403, "permission_error"),
                                  ({"Host": "evil.example"}, 403, "permission_error"),
                                  ({"Content-Type": "text/plain"}, 415, "invalid_request_error")]:
        got, _, data = request(s.port, "POST", "/v1/messages", body, headers=headers)
        assert (got, data["type"], data["error"]["type"]) == (status, "error", kind), headers
    got, _, data = request(s.port, "POST", "/v1/messages", b"x" * (64 * 1024 + 1))
    assert (got, data["error"]["type"]) == (413, "request_too_large")


def test_a_full_queue_is_529_overloaded(tiny_model_dir):
    s = start_server(tiny_model_dir, started=False, max_batch=1, max_waiting=1)
    try:
        claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{s.port}", api_key=KEY, max_retries=0, timeout=60)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(claude.messages.create, model="tiny", max_tokens=3,
                                  messages=[{"role": "user", "content": "Hi"}])
            deadline = time.time() + 10
            while s.loop.stats()["waiting"] < 1 and time.time() < deadline:
                time.sleep(0.01)
            with pytest.raises(anthropic.OverloadedError) as e:
                claude.messages.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
            assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"
            s.loop.start()
            assert waiting.result(timeout=30).usage.output_tokens == 3
    finally:
        stop_server(s)


def test_an_error_mid_stream_is_an_error_event(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=2)
    forward, calls = s.engine.forward, []

    def failing_forward(*args, **kwargs):  # the engine fails on its fifth step
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated failure")
        return forward(*args, **kwargs)

    s.engine.forward = failing_forward
    try:
        claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{s.port}", api_key=KEY, max_retries=0, timeout=60)
        with pytest.raises(anthropic.APIStatusError) as e:
            with claude.messages.stream(model="tiny", max_tokens=50, messages=[{"role": "user", "content": "Hi"}],
                                        extra_body=GREEDY) as stream:
                for _ in stream.text_stream:
                    pass
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error"
        assert "simulated" not in str(e.value.body)
        s.engine.forward = forward
        sock = raw_chat(s.port, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the server goes on
        sock.close()
    finally:
        s.engine.forward = forward
        stop_server(s)
