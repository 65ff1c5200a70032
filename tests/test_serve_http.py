"""serve.py tried the way real clients and attackers behave, mostly over raw sockets: malformed bytes and request
smuggling, HTTP methods, keys, Host/Origin/Content-Type checks against hostile web pages, connection limits and
deadlines, failures inside the engine, /metrics (read by prometheus_client's own parser), and shutdown on signals."""
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from sample import generate
from serve import Handler
from test_serve import KEY, ROOT, chat_ids, pace, raw_chat, read_all, read_reply, reference, request, start_server, \
    stop_server, wait_idle

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def s(tiny_model_dir):
    served = start_server(tiny_model_dir, max_batch=4, prefill_chunk=256)
    yield served
    stop_server(served)


def exchange(port, data, timeout=30):
    """Raw bytes in -> every byte the server sends until it closes the connection (or `timeout`)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def post(path, body, headers=""):
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n").encode() + body


def status_and_error(reply):
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def strict_json(text):
    def refuse(name):
        raise AssertionError(f"{name} in the JSON")

    return json.loads(text, parse_constant=refuse)


# -----------------------------------------------------------------------------
# bytes


def test_malformed_input_gets_400_objects_and_no_exception_text(s):
    chat = "/v1/chat/completions"
    digits = "9" * 5000
    cases = [
        (f"POST {chat} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: \u00b2\r\n\r\n"
         .encode("latin-1") + b"{}", 400),  # "²".isdigit() is True in Python
        (post(chat, b"[" * 60_000), 400),  # RecursionError in json (the test server takes 64 KiB)
        (post(chat, f'{{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": {digits}}}'.encode()), 400),
        (post(chat, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}'), 400),
        (post(chat, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400),  # not UTF-8
        (post(chat, b"{}", "Content-Length: 2\r\n"), 400),  # two Content-Length headers
        (post(chat, b"{}", "Transfer-Encoding: chunked\r\n"), 411),
    ]
    for data, status in cases:
        reply = exchange(s.port, data)
        got, body = status_and_error(reply)
        assert got == status and body["error"]["message"], (data[:80], reply[:300])
        assert not re.search(rb"Traceback|Error\(|Exception|line \d+, in", reply), reply
    assert b"exceeds the limit" not in exchange(s.port, cases[2][0])  # Python's own words stay in the server


def test_a_get_body_is_not_read_as_a_second_request(s):
    smuggled = f"GET /stats HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()  # no key: would answer 401
    data = (f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode() + smuggled +
            f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    reply = exchange(s.port, data)
    assert re.findall(rb"HTTP/1\.1 (\d+)", reply) == [b"200", b"200"], reply


def test_methods_get_405_with_allow(s):
    conn = http.client.HTTPConnection(HOST, s.port, timeout=30)
    conn.request("HEAD", "/")
    r = conn.getresponse()
    assert (r.status, r.getheader("Allow"), r.read()) == (405, "GET", b"")  # HEAD: headers only
    for method, path, allow in [("PUT", "/v1/chat/completions", "POST"), ("DELETE", "/v1/completions", "POST"),
                                ("OPTIONS", "/v1/messages", "POST"), ("PATCH", "/v1/models", "GET"),
                                ("GET", "/v1/chat/completions", "POST"), ("POST", "/health", "GET")]:
        status, headers, data = request(s.port, method, path, {"prompt": "x"} if method == "POST" else None)
        assert (status, headers.get("allow")) == (405, allow), (method, path, data)
        assert method in data["error"]["message"]  # an error object: OpenAI's, or Anthropic's on /v1/messages
        assert data["error"].get("code", "method_not_allowed") == "method_not_allowed"
        assert data.get("type", "error") == "error" and ("code" in data["error"]) != path.startswith("/v1/messages")
    status, _, data = request(s.port, "BREW", "/")
    assert status == 501 and data["error"]["message"]
    assert request(s.port, "GET", "/nowhere")[0] == 404


def test_the_key_takes_a_case_insensitive_bearer_scheme_or_x_api_key(s):
    def models(headers):
        return request(s.port, "GET", "/v1/models", key=None, headers=headers)[0]

    for good in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"},
                 {"Authorization": f"BEARER  {KEY} "}, {"x-api-key": KEY}):
        assert models(good) == 200, good
    for bad in ({"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"},
                {"Authorization": f"Bearer {KEY}x"}, {"x-api-key": "sk-wrong"}, {}):
        assert models(bad) == 401, bad


def test_log_escapes_control_characters(tiny_model_dir, capfd):
    s = start_server(tiny_model_dir, max_batch=1, log_requests=True)
    try:
        exchange(s.port, f"GET /x\x1b[2J\x07\x9b HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                 .encode("latin-1"))
    finally:
        stop_server(s)
    err = capfd.readouterr().err
    assert "GET /x\\x1b[2J\\x07\\x9b 404" in err and "\x1b" not in err and "\x07" not in err


# -----------------------------------------------------------------------------
# browsers


def test_hostile_web_pages_are_refused(s):
    body, port = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, s.port
    chat = "/v1/chat/completions"
    for host in ("evil.example", f"evil.example:{port}", "0.0.0.0", f"127.0.0.1.evil.example:{port}", ""):
        status, _, data = request(port, "GET", "/v1/models", headers={"Host": host})
        assert status == 403 and data["error"]["code"] == "host_not_allowed", host  # DNS rebinding
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert request(port, "GET", "/v1/models", headers={"Host": host})[0] == 200, host
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"https://localhost:{port}.x"):
        status, headers, data = request(port, "POST", chat, body, headers={"Origin": origin})
        assert status == 403 and data["error"]["code"] == "origin_not_allowed", origin
        assert "access-control-allow-origin" not in headers
    status, headers, _ = request(port, "POST", chat, body, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and "access-control-allow-origin" not in headers  # the chat page, same origin
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, data = request(port, "POST", chat, body, headers={"Content-Type": content_type})
        assert status == 415 and content_type.split(";")[0] in data["error"]["message"]
    conn = http.client.HTTPConnection(HOST, port, timeout=30)  # no Content-Type at all
    conn.putrequest("POST", chat)
    data = json.dumps(body).encode()
    for k, v in (("Authorization", f"Bearer {KEY}"), ("Content-Length", str(len(data)))):
        conn.putheader(k, v)
    conn.endheaders(data)
    assert conn.getresponse().status == 415
    assert request(port, "POST", chat, body, headers={"Content-Type": "Application/JSON; charset=utf-8"})[0] == 200


def test_flags_allow_more_hosts_and_origins_with_cors(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=1, allowed_hosts=["llm.lan"], allowed_origins=["https://app.example"])
    try:
        assert request(s.port, "GET", "/v1/models", headers={"Host": f"llm.lan:{s.port}"})[0] == 200
        assert request(s.port, "GET", "/v1/models", headers={"Host": "other.lan"})[0] == 403
        status, headers, _ = request(s.port, "OPTIONS", "/v1/chat/completions", key=None, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
        assert headers["access-control-allow-methods"] == "POST"
        assert headers["access-control-allow-headers"] == "authorization,content-type"
        status, headers, _ = request(s.port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2},
                                     headers={"Origin": "https://app.example"})
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        assert request(s.port, "POST", "/v1/completions", {"prompt": "Hi"}, headers={"Origin": "https://b.example"}
                       )[0] == 403
    finally:
        stop_server(s)


# -----------------------------------------------------------------------------
# slow, idle and too many clients


def closes_within(sock, seconds):
    """True when the server closes the connection (after any reply) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except socket.timeout:
        return False


def test_connection_cap_answers_503(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=1, max_connections=3)
    idle = [socket.create_connection((HOST, s.port), timeout=30) for _ in range(3)]
    try:
        deadline = time.time() + 10
        while len(s.server.deadlines) < 3 and time.time() < deadline:
            time.sleep(0.01)
        reply = exchange(s.port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        status, body = status_and_error(reply)
        assert status == 503 and b"Retry-After: 1" in reply and "3" in body["error"]["message"]
        idle.pop().close()
        deadline = time.time() + 10
        while len(s.server.deadlines) > 2 and time.time() < deadline:
            time.sleep(0.01)
        assert request(s.port, "GET", "/health")[0] == 200
    finally:
        for sock in idle:
            sock.close()
        stop_server(s)


def test_deadlines_for_slow_and_idle_clients(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=1, timeout=1.0, idle_timeout=1.0)
    try:
        with socket.create_connection((HOST, s.port), timeout=30) as sock:  # connects, sends nothing
            assert closes_within(sock, 10)
        with socket.create_connection((HOST, s.port), timeout=30) as sock:  # keep-alive, then idle
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            assert closes_within(sock, 10)
        # headers trickling in (slowloris), and a body that stops short: 408 once `timeout` has passed
        for start, trickle in ((f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ", b"a"),
                               (f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                                "Content-Length: 100\r\n\r\n{", b" ")):
            with socket.create_connection((HOST, s.port), timeout=30) as sock:
                sock.sendall(start.encode())
                t0, reply = time.time(), b""
                sock.settimeout(0.2)
                while time.time() - t0 < 15 and not reply:
                    sock.sendall(trickle)  # a byte at a time: no single read ever waits for long
                    try:
                        reply = sock.recv(65536)
                    except socket.timeout:
                        pass
                assert reply.startswith(b"HTTP/1.1 408"), reply
                assert closes_within(sock, 10)
        assert request(s.port, "GET", "/health")[0] == 200
    finally:
        stop_server(s)


def test_a_client_that_stops_reading_is_cut_off(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=16, stop_ids=(), timeout=1.0)
    pace(s, 0.05)  # 16 replies of 120 tokens: 6 s or more when nobody cuts them short

    class SmallBuffers(Handler):  # a slow network in a few KB, where loopback would buffer megabytes first
        def setup(self):
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            super().setup()

    s.server.RequestHandlerClass = SmallBuffers
    try:
        before = s.loop.stats()["tokens_generated"]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, s.port))
        payload = json.dumps({"prompt": "Hi", "n": 16, "max_tokens": 120, "stream": True, "logprobs": 20,
                              "temperature": 0})
        sock.sendall(post("/v1/completions", payload.encode()))  # and never reads: the write blocks, then times out
        stats = wait_idle(s, timeout=30)
        sock.close()
        assert stats["tokens_generated"] - before < 16 * 60, stats  # well short of 16 x ~120 tokens
        deadline = time.time() + 10  # the handler counts its 499 just after it cancelled the sequences
        while s.server.statuses.get(499) != 1 and time.time() < deadline:
            time.sleep(0.01)
        assert s.server.statuses.get(499) == 1
    finally:
        stop_server(s)


# -----------------------------------------------------------------------------
# failures inside the engine


def test_an_engine_failure_fails_only_its_request(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=4, prefill_chunk=256)
    pace(s, 0.01)
    forward = s.model.forward

    def forward_that_runs_out_of_memory(ids, *args, **kwargs):
        if ids.shape[1] > 40:  # one long prefill
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(ids, *args, **kwargs)

    s.model.forward = forward_that_runs_out_of_memory
    try:
        short = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "temperature": 0}
        long = {"messages": [{"role": "user", "content": "The quick brown fox " * 6}], "max_tokens": 5}
        expected = reference(s, chat_ids(s, "Hi"), 40)[0]
        for stream in (False, True):
            sock = raw_chat(s.port, {**short, "stream": stream})
            time.sleep(0.2)  # the short one is decoding
            status, _, data = request(s.port, "POST", "/v1/chat/completions", long)
            assert status == 500 and "engine failed" in data["error"]["message"] and "memory" not in str(data)
            head, body = read_reply(sock)
            body += read_all(sock).decode() if stream else ""
            sock.close()
            if stream:
                text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "")
                               for e in body.split("\n\n") if e.startswith("data: {") and '"choices": [{' in e)
            else:
                text = json.loads(body)["choices"][0]["message"]["content"]
            assert head.startswith("HTTP/1.1 200") and text == expected
        # a token the tokenizer cannot decode (a gap in an imported id table) fails only the request that drew it
        s.model.forward = forward
        other = reference(s, chat_ids(s, "What is 7 + 8?"), 20)
        gap = next(t for t in generate(s.model, [chat_ids(s, "What is 7 + 8?")], 20, temperature=0.0)[0]
                   if t not in generate(s.model, [chat_ids(s, "Hi")], 40, temperature=0.0)[0])
        decode_bytes = s.tokenizer.decode_bytes
        s.tokenizer.decode_bytes = lambda ids: (_ for _ in ()).throw(KeyError(gap)) if gap in ids else decode_bytes(ids)
        sock = raw_chat(s.port, short)
        status, _, data = request(s.port, "POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "What is 7 + 8?"}], "max_tokens": 20,
                                   "temperature": 0})
        assert status == 500 and other[0]
        assert json.loads(read_reply(sock)[1])["choices"][0]["message"]["content"] == expected
        sock.close()
        s.tokenizer.decode_bytes = decode_bytes
        assert wait_idle(s)["running"] == 0
    finally:
        s.model.forward = forward
        stop_server(s)


def test_json_never_carries_nan(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=2)
    forward, decode = s.model.forward, s.engine.decode  # prefill and decode steps
    s.model.forward = lambda *args, **kwargs: forward(*args, **kwargs) * math.nan  # a model gone bad
    s.engine.decode = lambda *args, **kwargs: decode(*args, **kwargs) * math.nan
    try:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                      "logprobs": True, "top_logprobs": 2}),
                           ("/v1/completions", {"prompt": "Hi", "logprobs": 2})):
            for stream in (False, True):
                status, _, data = request(s.port, "POST", path, {**body, "max_tokens": 3, "stream": stream})
                assert status == 200
                text = data.decode() if stream else json.dumps(data)
                for event in ([e[6:] for e in text.split("\n\n") if e.startswith("data: {")] if stream else [text]):
                    strict_json(event)
                assert "-9999.0" in text
    finally:
        s.model.forward, s.engine.decode = forward, decode
        stop_server(s)


# -----------------------------------------------------------------------------
# /metrics


def test_metrics_in_prometheus_text_format(tiny_model_dir):
    s = start_server(tiny_model_dir, max_batch=2)
    try:
        ids = chat_ids(s, "Hi")
        replies = [s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=8, temperature=0) for _ in range(2)]
        request(s.port, "POST", "/v1/chat/completions", {"messages": "Hi"})  # one 400
        assert request(s.port, "GET", "/metrics", key=None)[0] == 401
        status, headers, text = request(s.port, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        value = {(x.name, tuple(sorted(x.labels.items()))): x.value for f in families.values() for x in f.samples}
        generated = sum(r.usage.completion_tokens for r in replies)
        assert value[("astrai_requests_total", (("status", "200"),))] == 2
        assert value[("astrai_requests_total", (("status", "400"),))] == 1
        assert value[("astrai_prompt_tokens_total", ())] == 2 * len(ids)
        assert value[("astrai_generation_tokens_total", ())] == generated
        assert families["astrai_time_to_first_token_seconds"].type == "histogram"
        assert value[("astrai_time_to_first_token_seconds_count", ())] == 2
        assert value[("astrai_inter_token_latency_seconds_count", ())] == generated - 2
        itl = families["astrai_inter_token_latency_seconds"].samples
        buckets = [x.value for x in itl if x.name.endswith("_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == generated - 2
        assert value[("astrai_kv_cache_rows", ())] == 2
        for name in ("astrai_sequences_running", "astrai_sequences_waiting", "astrai_kv_cache_rows_in_use"):
            assert families[name].type == "gauge" and value[(name, ())] == 0
        pace(s, 0.05)  # a reply under way holds a row
        sock = raw_chat(s.port, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "stream": True})
        deadline, text = time.time() + 10, ""
        while "astrai_sequences_running 1" not in text and time.time() < deadline:
            text = request(s.port, "GET", "/metrics")[2].decode()
        assert "astrai_sequences_running 1" in text and "astrai_kv_cache_rows_in_use 1" in text
        sock.close()
    finally:
        stop_server(s)


# -----------------------------------------------------------------------------
# shutdown


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 4096-token context (RoPE tables are computed, not stored): long generations."""
    path = tmp_path_factory.mktemp("long_model")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    with open(path / "config.json") as f:
        config = json.load(f)
    config["max_position_embeddings"] = config["astrai"]["max_len"] = 4096
    with open(path / "config.json", "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_ends_streams_answers_waiting_requests_and_exits_0(long_model_dir, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "serve.py", f"--model={long_model_dir}", "--port=0", "--max_batch=1",
                          "--shutdown_timeout=1", "--compile=false"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", p.stderr.readline()).group(1))
        stops = {"0": -100, "1": -100, "2": -100}  # the tokenizer's special ids: a reply that never stops
        body = {"prompt": "Hi", "max_tokens": 4000, "temperature": 0, "logit_bias": stops}
        stream = socket.create_connection((HOST, port), timeout=60)
        stream.sendall(post("/v1/completions", {**body, "stream": True}))
        received = b""
        while b"data: {" not in received:  # under way
            received += stream.recv(65536)
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(r=request(port, "POST", "/v1/completions", body)))
        thread.start()
        deadline = time.time() + 30
        while request(port, "GET", "/stats", key=None)[2]["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        t0 = time.time()
        p.send_signal(sig)
        assert p.wait(timeout=30) == 0 and time.time() - t0 < 15
        thread.join(timeout=30)
        status, headers, data = waiting["r"]
        assert status == 503 and data["error"]["code"] == "shutting_down" and headers["retry-after"] == "1"
        rest = read_all(stream).decode()
        stream.close()
        events = [e for e in rest.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "shutting down" in json.loads(events[-2][6:])["error"]["message"]
        with pytest.raises(OSError):
            socket.create_connection((HOST, port), timeout=5).close()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
