"""serve.py against a live server on a tiny model, driven by the official openai client and raw HTTP.
Every generated text is checked against sample.generate (greedy or with the same seed) run alone, and
logprobs against transformers' logits."""
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import torch

from sample import Engine, SamplingParams, generate, load
from serve import EngineLoop, make_server, release_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-key"
QUESTIONS = ["Hello, world!", "What is 7 + 8?", "你好，世界！", "The quick brown fox", "Numbers: 0 1 2 3",
             "Emoji: 🙂🚀", "Mixed 中文 and English text.", "23 + 45 = 68."]


def start_server(model_dir, started=True, max_batch=8, max_waiting=64, prefill_chunk=256, stop_ids=None, **limits):
    """A live server on a free port; stop_ids=(): a model that never stops (only max_tokens or a cancel end a reply).
    limits: make_server's keyword arguments (timeout, idle_timeout, max_connections, allowed_hosts, ...)."""
    model, tokenizer = load(model_dir)
    stop_ids = tokenizer.stop_ids if stop_ids is None else list(stop_ids)
    engine = Engine(model, max_batch, prefill_chunk=prefill_chunk, stop_ids=stop_ids, vocab_size=tokenizer.vocab_size)
    loop = EngineLoop(engine, tokenizer, max_waiting)
    if started:
        loop.start()
    server = make_server(loop, port=0, api_key=KEY, model_name="tiny", max_body_bytes=64 * 1024,
                         log_requests=limits.pop("log_requests", False), **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    return SimpleNamespace(server=server, loop=loop, engine=engine, port=port, client=client, model=model,
                           tokenizer=tokenizer, stop_ids=stop_ids)


def pace(s, seconds):
    """Slow the engine to at most one step per `seconds`: long replies take a while, on any machine."""
    step = s.engine.step

    def paced_step():
        time.sleep(seconds)
        step()

    s.engine.step = paced_step


def stop_server(s):
    s.server.shutdown()
    s.server.server_close()
    s.loop.stop()


@pytest.fixture(scope="module")
def s(tiny_model_dir):
    served = start_server(tiny_model_dir, max_batch=8, max_waiting=64, prefill_chunk=16)  # small chunks: prompts split
    yield served
    stop_server(served)


def chat_ids(s, question):
    return list(s.tokenizer.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)[0])


def reference(s, prompt_ids, max_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=(), **sampling):
    """What the server must answer: sample.generate on this prompt alone -> (text, completion_tokens, finish)."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, **sampling)
    tokens = generate(s.model, [prompt_ids], max_tokens, params, s.stop_ids, seed)[0]
    hit_stop_token = bool(tokens) and tokens[-1] in s.stop_ids
    text = s.tokenizer.decode(tokens[:-1] if hit_stop_token else tokens)
    hits = [text.find(x) for x in stop if x in text]
    if hits:  # the completion ends at the first token whose text completes a stop string
        n = next(k for k in range(1, len(tokens) + 1) if any(x in s.tokenizer.decode(tokens[:k]) for x in stop))
        return text[: min(hits)], n, "stop"
    return text, len(tokens), "stop" if hit_stop_token else "length"


def request(port, method, path, body=None, key=KEY, headers=None):
    """Raw HTTP -> (status, headers, parsed JSON body or raw bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update({"Content-Type": "application/json"} if method == "POST" else {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers={**h, **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def sse_events(port, body, key=KEY):
    """A streaming request over raw HTTP -> the list of `data:` payloads, [DONE] included."""
    status, _, data = request(port, "POST", "/v1/chat/completions" if "messages" in body else "/v1/completions",
                              {**body, "stream": True}, key)
    assert status == 200, data
    text = data.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e]


def wait_idle(s, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = request(s.port, "GET", "/stats")[2]
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the engine is not idle after {timeout}s: {stats}")


# -----------------------------------------------------------------------------
# correctness with the official client


def test_release_text_holds_back_possible_stop_strings():
    assert release_text("", "Hello wor", ["world"]) == ("Hello ", "wor", None)
    assert release_text("wor", "ld! more", ["world"]) == ("", "", "world")
    assert release_text("wor", "m", ["world"]) == ("worm", "", None)
    assert release_text("", "abc", ["bcd", "c"]) == ("ab", "", "c")  # the earliest hit wins
    assert release_text("", "xab", ["abc", "bd"]) == ("x", "ab", None)  # the longest possible start is held


@pytest.mark.parametrize("question", QUESTIONS[:3])
def test_chat_greedy_equals_generate(s, question):
    text, n, finish = reference(s, chat_ids(s, question), 40)
    r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                         temperature=0, max_tokens=40)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(chat_ids(s, question))
    assert r.usage.completion_tokens == n and r.usage.total_tokens == n + r.usage.prompt_tokens


def test_a_second_chat_turn_reuses_the_first_turns_cache(tiny_model_dir):
    """The second turn's prompt starts with the first turn's prompt and reply, still in a free row: only the rest
    is prefilled, the reply is the one a fresh generate gives, and /stats and /metrics count the reused tokens."""
    s = start_server(tiny_model_dir, max_batch=2, stop_ids=())
    try:
        messages = [{"role": "user", "content": "Hello, world! " * 4}]
        first = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "What is 7 + 8?"}]
        second = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        prompt = list(s.tokenizer.render_chat(messages, add_generation_prompt=True)[0])
        text, _, _ = reference(s, prompt, 12)
        assert second.choices[0].message.content == text
        reused = s.loop.stats()["prompt_tokens_reused"]
        first_ids = chat_ids(s, messages[0]["content"])
        assert len(first_ids) <= reused < len(prompt)  # at least the first prompt, never the whole second one
        metrics = request(s.port, "GET", "/metrics")[2].decode()
        assert f"astrai_prompt_tokens_reused_total {reused}" in metrics
    finally:
        stop_server(s)


def test_chat_stream_equals_non_stream(s):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 8?"},
                {"role": "assistant", "content": "15."}, {"role": "user", "content": "And 23 + 45?"}]
    ids = list(s.tokenizer.render_chat(messages, add_generation_prompt=True)[0])
    text, n, finish = reference(s, ids, 30)
    chunks = list(s.client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # raw SSE: `data: {json}` events, the last one [DONE]
    events = sse_events(s.port, {"messages": messages, "temperature": 0, "max_tokens": 30})
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text


def test_completions_stream_and_not(s):
    prompt = "The quick brown fox"
    ids = s.tokenizer.encode(prompt)
    text, n, finish = reference(s, ids, 25)
    r = s.client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=25)
    assert r.object == "text_completion" and r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    chunks = list(s.client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=25, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == n
    # token ids as the prompt, and a batch of prompts: choices in prompt order
    r = s.client.completions.create(model="tiny", prompt=[ids, "Hello, world!"], temperature=0, max_tokens=25)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == text
    assert r.choices[1].text == reference(s, s.tokenizer.encode("Hello, world!"), 25)[0]
    assert r.usage.prompt_tokens == len(ids) + len(s.tokenizer.encode("Hello, world!"))


def test_max_tokens_gives_length(s):
    for field in ("max_tokens", "max_completion_tokens"):
        r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello, world!"}],
                                             temperature=0, **{field: 3})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
        assert r.choices[0].message.content == reference(s, chat_ids(s, "Hello, world!"), 3)[0]


def test_stop_strings(s):
    question = "What is 7 + 8?"
    full, _, _ = reference(s, chat_ids(s, question), 60)
    # stop strings made of ASCII letters/digits taken from the middle of the greedy reply
    candidates = [m.group() for m in re.finditer(r"[A-Za-z0-9 ]{2,3}", full[3:])]
    assert candidates, full
    for stop in (candidates[0], [candidates[-1], "never appears"]):
        stops = [stop] if isinstance(stop, str) else stop
        text, n, finish = reference(s, chat_ids(s, question), 60, stop=stops)
        assert finish == "stop" and len(text) < len(full)
        r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                             temperature=0, max_tokens=60, stop=stop)
        assert r.choices[0].message.content == text
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == n
        chunks = list(s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                       temperature=0, max_tokens=60, stop=stop, stream=True))
        streamed = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(streamed) == text  # nothing of the stop string leaked out before it was complete
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_and_seed_reproduce(s):
    messages = [{"role": "user", "content": "Numbers: 0 1 2 3"}]
    ids = chat_ids(s, "Numbers: 0 1 2 3")
    r = s.client.chat.completions.create(model="tiny", messages=messages, n=3, seed=1234, max_tokens=20)
    again = s.client.chat.completions.create(model="tiny", messages=messages, n=3, seed=1234, max_tokens=20)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) == 3  # each choice has its own seed (seed + index)
    refs = [reference(s, ids, 20, temperature=1.0, seed=1234 + j) for j in range(3)]
    assert texts == [t for t, _, _ in refs]
    assert r.usage.completion_tokens == sum(n for _, n, _ in refs) and r.usage.prompt_tokens == len(ids)
    # the sampling settings reach the sampler: top_k (an extra field), top_p and temperature
    r = s.client.completions.create(model="tiny", prompt="Numbers:", seed=5, max_tokens=20, temperature=0.8, top_p=0.9,
                                    extra_body={"top_k": 7})
    ref = reference(s, s.tokenizer.encode("Numbers:"), 20, temperature=0.8, top_k=7, top_p=0.9, seed=5)
    assert (r.choices[0].text, r.usage.completion_tokens) == ref[:2]
    chunks = list(s.client.chat.completions.create(model="tiny", messages=messages, n=2, seed=1234, max_tokens=20,
                                                   stream=True))
    for j in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == j) == texts[j]


def test_logprobs_match_transformers(s, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    question = "Hello, world!"
    ids = chat_ids(s, question)
    r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                         temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    tokens = generate(s.model, [ids], 8, temperature=0.0, stop_ids=s.stop_ids)[0]
    assert len(content) == len(tokens) == 8
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].float(), -1)  # (8, V)
    for i, (entry, token) in enumerate(zip(content, tokens)):
        assert bytes(entry.bytes) == s.tokenizer.decode_bytes([token])
        assert entry.logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        top = torch.topk(ref[i], 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [s.tokenizer.decode_bytes([t]) for t in top.indices.tolist()]
    r = s.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0


def test_sampling_options_reach_the_sampler(s):
    question = "Numbers: 0 1 2 3"
    ids, messages = chat_ids(s, question), [{"role": "user", "content": question}]
    options = dict(presence_penalty=0.7, frequency_penalty=0.4, logit_bias={"5": 3.0, "17": -100})
    extras = dict(min_p=0.05, repetition_penalty=1.3)  # vLLM's extras, through extra_body
    r = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, seed=11, **options,
                                         extra_body=extras)
    expected = reference(s, ids, 30, 1.0, seed=11, presence_penalty=0.7, frequency_penalty=0.4,
                         logit_bias={5: 3.0, 17: -100.0}, **extras)
    assert (r.choices[0].message.content, r.usage.completion_tokens) == expected[:2]
    assert expected[0] != reference(s, ids, 30, 1.0, seed=11)[0]  # the options did change the reply
    # greedy with a +100 bias: that token every time, in chat and completions, streamed or not
    token_text = s.tokenizer.decode([42])
    r = s.client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, logit_bias={"42": 100})
    assert r.choices[0].text == token_text * 6
    chunks = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                              logit_bias={"42": 100}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == token_text * 6
    # a temperature too small for float32 is greedy, not token 0 forever
    r = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=1e-38)
    assert r.choices[0].message.content == reference(s, ids, 20)[0]
    for bad in ({"logit_bias": {"42": 101}}, {"logit_bias": {"300": 1}}, {"logit_bias": {"x": 1}},
                {"logit_bias": [1]}, {"presence_penalty": 2.5}, {"frequency_penalty": "a"}, {"min_p": 1.5},
                {"repetition_penalty": 0}):
        status, _, data = request(s.port, "POST", "/v1/chat/completions", {"messages": messages, **bad})
        assert status == 400 and data["error"]["param"] == next(iter(bad)), (bad, data)


def test_options_that_would_change_the_result_are_refused_or_honoured(s):
    messages = [{"role": "user", "content": "Hi"}]
    for path, extra in [("/v1/completions", {"best_of": 2}), ("/v1/completions", {"n": 2, "echo": True}),
                        ("/v1/completions", {"suffix": "end"}), ("/v1/chat/completions", {"tools": [{"type": "x"}]}),
                        ("/v1/chat/completions", {"response_format": {"type": "xml"}}),
                        ("/v1/chat/completions", {"tool_choice": "auto"}),
                        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}),  # without stream
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": "data:,"}}]}]})]:
        body = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": messages}
        status, _, data = request(s.port, "POST", path, {**body, **extra})
        param = next(iter(extra))
        assert status == 400 and data["error"]["param"] == (param if param != "messages" else "messages[0].content")
        assert (param if param != "messages" else "image_url") in data["error"]["message"], data
    # their neutral values change nothing
    r = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                         response_format={"type": "text"}, extra_body={"best_of": 1})
    assert r.choices[0].message.content == reference(s, chat_ids(s, "Hi"), 5)[0]
    # the developer role is the system role
    for role in ("developer", "system"):
        r = s.client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
            {"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        ids = list(s.tokenizer.render_chat([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}], add_generation_prompt=True)[0])
        assert r.choices[0].message.content == reference(s, ids, 8)[0] and r.usage.prompt_tokens == len(ids)


def test_completions_text_offset_is_the_same_streamed(s):
    for prompt in ("你好，世界！", "Emoji: 🙂🚀"):
        r = s.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
        chunks = list(s.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                  logprobs=2, stream=True))
        streamed = [(o, t) for c in chunks if c.choices and c.choices[0].logprobs
                    for o, t in zip(c.choices[0].logprobs.text_offset, c.choices[0].logprobs.tokens)]
        lp = r.choices[0].logprobs
        assert streamed == list(zip(lp.text_offset, lp.tokens)) and len(streamed) == 12
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(12)]


def test_models_and_health(s):
    assert [m.id for m in s.client.models.list().data] == ["tiny"]
    assert s.client.models.retrieve("tiny").id == "tiny"
    assert request(s.port, "GET", "/health", key=None)[:3:2] == (200, {"status": "ok"})
    status, headers, page = request(s.port, "GET", "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<script" in page and b"http://" not in page and b"https://" not in page  # self-contained, no CDN
    assert b"innerHTML" not in page  # model text goes in with textContent


# -----------------------------------------------------------------------------
# errors


def test_errors_are_openai_shaped(s):
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "Hi"}]
    cases = [
        (chat, b"{not json", 400, None),
        (chat, b"[1, 2]", 400, None),
        (chat, {"messages": "Hi"}, 400, "messages"),
        (chat, {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages"),
        (chat, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        (chat, {"messages": msgs, "temperature": "hot"}, 400, "temperature"),
        (chat, {"messages": msgs, "temperature": 3}, 400, "temperature"),
        (chat, {"messages": msgs, "top_p": 1.5}, 400, "top_p"),
        (chat, {"messages": msgs, "n": 0}, 400, "n"),
        (chat, {"messages": msgs, "n": True}, 400, "n"),
        (chat, {"messages": msgs, "max_tokens": -1}, 400, "max_tokens"),
        (chat, {"messages": msgs, "max_tokens": 2.5}, 400, "max_tokens"),
        (chat, {"messages": msgs, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        (chat, {"messages": msgs, "stop": 7}, 400, "stop"),
        (chat, {"messages": msgs, "stream": "yes"}, 400, "stream"),
        (chat, {"messages": msgs, "seed": "x"}, 400, "seed"),
        (chat, {"messages": msgs, "top_logprobs": 2}, 400, "top_logprobs"),
        (chat, {"messages": msgs, "n": 16, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        (chat, {"messages": msgs, "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 100000]}, 400, "prompt"),
        ("/v1/nothing", {"prompt": "x"}, 404, None),
    ]
    for path, body, status, param in cases:
        got, _, data = request(s.port, "POST", path, body)
        assert got == status, (body, data)
        assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"], data
        assert data["error"]["param"] == param, (body, data)
    # a prompt longer than the context: 400 that says the numbers
    ids = list(range(3, 3 + 200))
    got, _, data = request(s.port, "POST", "/v1/completions", {"prompt": ids})
    assert got == 400 and data["error"]["code"] == "context_length_exceeded"
    assert "200 tokens" in data["error"]["message"] and "128" in data["error"]["message"]
    # keys
    for key in (None, "sk-wrong"):
        got, headers, data = request(s.port, "POST", chat, {"messages": msgs}, key=key)
        assert got == 401 and data["error"]["code"] == "invalid_api_key"
    assert request(s.port, "GET", "/v1/models", key="sk-wrong")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        s.client.chat.completions.create(model="gpt-4", messages=msgs)
    with pytest.raises(openai.BadRequestError):
        s.client.chat.completions.create(model="tiny", messages=msgs, temperature=-1)
    # bodies over the limit: 413, whether the body is sent or only announced
    got, _, data = request(s.port, "POST", chat, b"x" * (64 * 1024 + 1))
    assert got == 413 and "65537" in data["error"]["message"]
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 413")
    # max_tokens given beyond the context is a 400, as OpenAI answers; not given, the context caps the reply
    ids = s.tokenizer.encode("Hello")
    for max_tokens in (10**12, 128 - len(ids) + 1):
        with pytest.raises(openai.BadRequestError) as e:
            s.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=max_tokens)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
        assert f"at most {128 - len(ids)} tokens" in e.value.body["message"]
    r = s.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=128 - len(ids))
    assert (r.choices[0].text, r.usage.completion_tokens) == reference(s, ids, 128 - len(ids))[:2]
    r = s.client.chat.completions.create(model="tiny", messages=msgs, temperature=0)
    text, n, finish = reference(s, chat_ids(s, "Hi"), 10**9)
    assert (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason) == (text, n, finish)
    assert r.usage.total_tokens <= 128


def test_full_queue_gets_503_then_serves(tiny_model_dir):
    s = start_server(tiny_model_dir, started=False, max_batch=1, max_waiting=2)
    try:
        question = "Hello, world!"
        body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 10}
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(request, s.port, "POST", "/v1/chat/completions", body) for _ in range(2)]
            deadline = time.time() + 10
            while s.loop.stats()["waiting"] < 2 and time.time() < deadline:
                time.sleep(0.01)
            status, headers, data = request(s.port, "POST", "/v1/chat/completions", body)
            assert status == 503 and headers["retry-after"] == "1" and data["error"]["type"] == "server_error"
            s.loop.start()  # the two queued requests now run, one at a time
            text = reference(s, chat_ids(s, question), 10)[0]
            for f in waiting:
                status, _, data = f.result(timeout=30)
                assert status == 200 and data["choices"][0]["message"]["content"] == text
    finally:
        stop_server(s)


def raw_chat(port, body, key=KEY):
    """A chat request written to a raw socket -> the socket."""
    payload = json.dumps(body)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n{payload}".encode())
    return sock


def read_all(sock):
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_reply(sock):
    """One HTTP reply from a raw socket -> (head, body) as text: Content-Length bytes of body, or all until close."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"Content-Length: (\d+)", head)
    while body and not length or length and len(body) < int(length.group(1)):
        if not (chunk := sock.recv(65536)):
            break
        body += chunk
    return head.decode(), body.decode()


def test_client_disconnect_cancels_the_row(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=2, stop_ids=())  # never stops: only the cancel ends a reply early
    pace(s, 0.02)  # at most 50 tokens a second: a 100-token reply takes 2 s or more
    try:
        for stream in (True, False):
            before = s.loop.stats()["tokens_generated"]
            sock = raw_chat(s.port, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100,
                                     "stream": stream})
            if stream:
                received = b""
                while b"data: " not in received:  # the reply has started
                    received += sock.recv(4096)
            else:  # tokens are flowing: the check must not wait for a lull in them
                deadline = time.time() + 30
                while s.loop.stats()["tokens_generated"] - before < 5 and time.time() < deadline:
                    time.sleep(0.01)
            sock.close()
            stats = wait_idle(s, timeout=10)
            assert stats["tokens_generated"] - before < 60, stats  # stopped well before its 100 tokens
        # a client that half-closes its socket after sending (shutdown(SHUT_WR)) is still there: it gets it all
        ids = chat_ids(s, "Hi")
        text = s.tokenizer.decode(generate(s.model, [ids], 100, temperature=0.0)[0])
        for stream in (True, False):
            sock = raw_chat(s.port, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100,
                                     "stream": stream, "temperature": 0})
            sock.shutdown(socket.SHUT_WR)
            reply = read_all(sock).decode()
            sock.close()
            while reply.startswith("HTTP/1.1 100 Continue\r\n\r\n"):  # an interim response may come first
                reply = reply[len("HTTP/1.1 100 Continue\r\n\r\n"):]
            assert reply.startswith("HTTP/1.1 200"), reply[:200]
            body = reply.partition("\r\n\r\n")[2]
            if stream:
                chunks = [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: {")]
                assert body.endswith("data: [DONE]\n\n")
                assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == text
            else:
                data = json.loads(body)
                assert data["choices"][0]["message"]["content"] == text and data["usage"]["completion_tokens"] == 100
        r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                             max_tokens=5)
        assert r.choices[0].message.content == s.tokenizer.decode(generate(s.model, [ids], 5, temperature=0.0)[0])
    finally:
        stop_server(s)


# -----------------------------------------------------------------------------
# load: 200 requests from 32 concurrent clients, good and bad mixed


def test_load_with_bad_input(s):
    rng = random.Random(0)
    jobs = []
    for i in range(200):
        kind = ["chat", "chat_stream", "seeded", "stop_stream", "bad_json", "bad_type", "huge", "too_long",
                "bad_key", "disconnect"][i % 10]
        question = QUESTIONS[rng.randrange(len(QUESTIONS))]
        max_tokens = rng.randrange(4, 24)
        job = SimpleNamespace(i=i, kind=kind, question=question, max_tokens=max_tokens, expect=None)
        ids = chat_ids(s, question)
        if kind in ("chat", "chat_stream"):
            job.expect = reference(s, ids, max_tokens)
        elif kind == "seeded":  # completions, n=2, each choice its own seed
            job.expect = [reference(s, s.tokenizer.encode(question), max_tokens, 1.0, seed=i + j) for j in range(2)]
        elif kind == "stop_stream":
            job.stop = [" ", "!", "\n"]
            job.expect = reference(s, ids, max_tokens, stop=job.stop)
        elif kind == "huge":
            job.expect = reference(s, ids, 10**9)
        jobs.append(job)
    jobs.sort(key=lambda j: rng.random())
    client = s.client

    def run(job):
        messages = [{"role": "user", "content": job.question}]
        if job.kind == "chat":
            r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=job.max_tokens)
            got = (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason)
            assert got == job.expect, (job, got)
        elif job.kind == "chat_stream":
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                         max_tokens=job.max_tokens, stream=True,
                                                         stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert (text, chunks[-1].usage.completion_tokens, finish[0]) == job.expect, job
        elif job.kind == "seeded":
            r = client.completions.create(model="tiny", prompt=job.question, n=2, seed=job.i, max_tokens=job.max_tokens)
            assert [(c.text, c.finish_reason) for c in r.choices] == [(t, f) for t, _, f in job.expect], job
            assert r.usage.completion_tokens == sum(n for _, n, _ in job.expect)
        elif job.kind == "stop_stream":
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, stop=job.stop,
                                                         max_tokens=job.max_tokens, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == job.expect[0], job
        elif job.kind == "huge":
            r = client.chat.completions.create(model="tiny", messages=messages, temperature=0)  # to the context's end
            got = (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason)
            assert got == job.expect and r.usage.total_tokens <= 128, job
        elif job.kind == "bad_json":
            status, _, data = request(s.port, "POST", "/v1/chat/completions", b'{"messages": [')
            assert status == 400 and "JSON" in data["error"]["message"]
        elif job.kind == "bad_type":
            field = ["temperature", "max_tokens", "n", "top_p"][job.i % 4]
            status, _, data = request(s.port, "POST", "/v1/chat/completions", {"messages": messages, field: "many"})
            assert status == 400 and data["error"]["param"] == field
        elif job.kind == "too_long":
            status, _, data = request(s.port, "POST", "/v1/chat/completions",
                                      {"messages": [{"role": "user", "content": job.question * 40}]})
            assert status == 400 and data["error"]["code"] == "context_length_exceeded"
        elif job.kind == "bad_key":
            status, _, data = request(s.port, "POST", "/v1/chat/completions", {"messages": messages}, key="sk-nope")
            assert status == 401
        elif job.kind == "disconnect":
            payload = json.dumps({"messages": messages, "stream": True})  # to the context's end
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
                sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n{payload}"
                             .encode())
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        return job.kind

    t0 = time.time()
    with ThreadPoolExecutor(32) as pool:
        done = list(pool.map(run, jobs))
    assert len(done) == 200
    stats = wait_idle(s)
    assert stats["running"] == 0 and stats["waiting"] == 0
    r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello, world!"}],
                                         temperature=0, max_tokens=10)
    assert r.choices[0].message.content == reference(s, chat_ids(s, "Hello, world!"), 10)[0]
    assert time.time() - t0 < 120


# -----------------------------------------------------------------------------
# the command line


def test_cli(tiny_model_dir):
    env = {**os.environ, "ASTRAI_API_KEY": "sk-env", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "serve.py", f"--model={tiny_model_dir}", "--max_batch=two"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "max_batch" in p.stderr
    p = subprocess.Popen([sys.executable, "serve.py", f"--model={tiny_model_dir}", "--port=0", "--max_batch", "2"],
                         cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        assert line.startswith("compiling the decode step"), line  # --compile is on by default: a warm-up first
        line = p.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        assert request(port, "GET", "/health", key=None)[0] == 200
        assert request(port, "GET", "/v1/models", key=None)[0] == 401  # the key from $ASTRAI_API_KEY is required
        status, _, data = request(port, "GET", "/v1/models", key="sk-env")
        assert status == 200 and data["data"][0]["id"] == os.path.basename(tiny_model_dir)
        status, _, data = request(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, key="sk-env")
        assert status == 200 and data["usage"]["completion_tokens"] == 3
        log = [p.stderr.readline() for _ in range(4)]  # one line per request
        assert re.search(r"POST /v1/completions 200 .* prompt=\d+ completion=3", log[-1]), log
    finally:
        p.terminate()
        p.wait(timeout=10)
