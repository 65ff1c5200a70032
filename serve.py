"""
An OpenAI-compatible server with continuous batching, on the standard library (no web framework).

    python serve.py --model=out/demo/final                 # chat page at http://127.0.0.1:8000
    python serve.py --model=DIR --max_batch=16 --api_key=secret --host=0.0.0.0
    curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Any OpenAI client works with base_url=http://127.0.0.1:8000/v1: chat and completions, streaming or not,
n, stop, seed, temperature/top_p/top_k, max_tokens, logprobs. How a request flows:

  handler thread  parse and check the JSON -> one Choice (a sample.Sequence + its text) per choice ->
                  EngineLoop.submit -> the engine's waiting queue (FIFO)
  engine thread   EngineLoop.run calls sample.Engine.step() while there is work: drop cancelled sequences ->
                  admit waiting ones into free KV cache rows -> one prefill chunk for rows still reading their
                  prompt, one batched decode token for the rest -> sample every row with its own settings and
                  seed -> Choice.on_token sends the new text to its request's event queue. A finished row
                  frees its slot for the next step.
  handler thread  events -> one JSON response, or SSE chunks as they come
"""
import hmac
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from sample import Engine, Sequence, TextStream, load, stop_ids_for
from settings import load_settings, pick_device

DEFAULTS = dict(
    model="",  # MODELDIR: config.json + model.safetensors + tokenizer files (ours or Hugging Face)
    host="127.0.0.1",  # loopback only; --host=0.0.0.0 exposes the server to the network
    port=8000,
    max_batch=8,  # rows decoded together = rows of the preallocated KV cache
    max_waiting=64,  # queued sequences; beyond this a request gets 503 + Retry-After
    prefill_chunk=256,  # prompt tokens a row prefills per iteration, so a long prompt never stalls the others
    max_len=0,  # context = KV cache length per row (prompt + reply); 0 = the model's max_len
    api_key="",  # require "Authorization: Bearer KEY" on /v1/* and /stats; also read from $ASTRAI_API_KEY
    model_name="",  # the id in /v1/models; default: the model directory's name
    max_body_bytes=1 << 20,  # larger request bodies get 413
    device="auto",  # auto = cuda when available, else cpu
    dtype="auto",  # auto = bfloat16 on a GPU that has it, else float32; or float32, bfloat16, float16
)
MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class ApiError(Exception):
    """An error the client caused (or a full queue), sent as OpenAI does: {"error": {...}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    pass


# -----------------------------------------------------------------------------
# the engine's thread, and each choice's text


def release_text(held, piece, stops):
    """Append piece to the held-back text -> (text safe to send, text still held, a stop string was hit).
    Text is held while its end could be the beginning of a stop string; a stop string and what follows
    it are never sent."""
    text = held + piece
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    keep = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - keep], text[len(text) - keep :], False


class Choice:
    """One choice of one request: the engine's Sequence, and the text sent for it. Its on_token (run on the
    engine's thread) turns tokens into events on the request's queue: (index, text, logprob or None,
    finish_reason or None); text is held back while it may be the start of a stop string."""

    def __init__(self, loop, index, events, prompt, max_tokens, stop=(), seed=None, **settings):
        self.loop, self.index, self.events, self.stop = loop, index, events, list(stop)
        generator = None if seed is None else torch.Generator(device=loop.engine.device).manual_seed(seed)
        self.seq = Sequence(prompt, max_tokens, generator=generator, on_token=self.on_token, **settings)
        self.stream, self.held = TextStream(loop.tokenizer), ""
        self.submitted = time.perf_counter()  # time to first token counts from here

    def on_token(self, seq, token, logprob):
        if token is None:  # the engine failed
            self.events.put((self.index, "", None, "error"))
            self.loop.count(self, seq, "error")
            return False
        hit = False
        if seq.finish == "stop":  # a stop token: counted, never shown
            text, logprob = "", None
        else:
            text, self.held, hit = release_text(self.held, self.stream.push(token), self.stop)
        if seq.finish is not None and not hit:
            # the end: the held text and an incomplete character go out, unless they complete a stop string
            tail, rest, hit = release_text(self.held, self.stream.flush(), self.stop)
            text += tail if hit else tail + rest
        finish = "stop" if hit else seq.finish
        self.events.put((self.index, text, logprob, finish))
        self.loop.count(self, seq, finish)
        return hit


class EngineLoop:
    """sample.Engine stepped by one thread while requests come and go: a bounded waiting queue (503 beyond
    it), cancellation when a client leaves, and the numbers /stats reports."""

    def __init__(self, engine, tokenizer, max_waiting=64):
        self.engine, self.tokenizer, self.max_waiting = engine, tokenizer, max_waiting
        self.wake = threading.Condition()
        self.thread, self.stopping = None, False
        self.started = time.time()
        self.tokens_generated = self.prompt_tokens = self.sequences_done = 0
        self.busy_seconds = self.ttft_sum = 0.0
        self.ttft_count = 0

    def start(self):
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def submit(self, choices):
        with self.wake:
            if len(self.engine.waiting) + len(choices) > self.max_waiting:
                raise ApiError(503, f"the server is busy: {len(self.engine.waiting)} sequences are waiting (limit "
                                    f"{self.max_waiting}); retry shortly", code="overloaded", kind="server_error")
            self.engine.add([c.seq for c in choices])
            self.wake.notify()

    def cancel(self, choices):
        """The client went away: waiting sequences leave now, running ones at the next step."""
        self.engine.cancel([c.seq for c in choices])

    def run(self):
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not (self.engine.has_work() or self.stopping):
                        self.wake.wait()
                    if self.stopping:
                        return
                t0 = time.perf_counter()
                try:
                    self.engine.step()
                except Exception:  # a bug or out of memory: fail the running requests, keep serving
                    traceback.print_exc()
                    self.engine.fail()
                self.busy_seconds += time.perf_counter() - t0

    def count(self, choice, seq, finish):
        """Called for each token, and once more when the engine fails (on the engine's thread)."""
        self.sequences_done += finish is not None
        if finish == "error":
            return
        self.tokens_generated += 1
        if len(seq.tokens) == 1:
            self.prompt_tokens += len(seq.prompt)
            self.ttft_sum += time.perf_counter() - choice.submitted
            self.ttft_count += 1

    def stats(self):
        return {
            "running": len(self.engine.running), "waiting": len(self.engine.waiting),
            "max_batch": self.engine.max_batch, "prompt_tokens": self.prompt_tokens,
            "tokens_generated": self.tokens_generated, "sequences_done": self.sequences_done,
            "tokens_per_s": round(self.tokens_generated / self.busy_seconds, 2) if self.busy_seconds else 0.0,
            "mean_time_to_first_token_s": round(self.ttft_sum / self.ttft_count, 4) if self.ttft_count else None,
            "uptime_s": round(time.time() - self.started, 1),
        }


# -----------------------------------------------------------------------------
# the OpenAI API: request checking and response shapes


def number(body, name, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{name}={json.dumps(value)} is invalid: expected {what} from {low} to {high}", param=name)
    return value


def flag(body, name, default=False):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}={json.dumps(value)} is invalid: expected true or false", param=name)
    return value


def chat_prompt(body, tokenizer):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, 'messages must be a non-empty list of {"role": ..., "content": ...} objects',
                       param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        plain.append({"role": m.get("role"), "content": content})
    try:
        ids, _ = tokenizer.render_chat(plain, add_generation_prompt=True)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    return [list(ids)]


def completion_prompts(body, tokenizer, vocab_size):
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
                                f"or a list of those; got {json.dumps(p)[:80]}", param="prompt")
    return prompts


def parse_request(body, chat, loop, events):
    """The checked request -> (prompts, one Choice per prompt and choice, stream, include_usage)."""
    tokenizer, max_len = loop.tokenizer, loop.engine.max_len
    if chat:
        prompts = chat_prompt(body, tokenizer)
    else:
        prompts = completion_prompts(body, tokenizer, loop.engine.model.config.vocab_size)
    for p in prompts:
        if len(p) >= max_len:
            raise ApiError(400, f"the prompt is {len(p)} tokens but the context is {max_len} tokens, which "
                                f"leaves no room for a reply: shorten it to at most {max_len - 1} tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
    if chat:
        top_logprobs = number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        if top_logprobs and not flag(body, "logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        top_logprobs = top_logprobs if flag(body, "logprobs") else None
        max_tokens = number(body, "max_tokens", None, 1, float("inf"), integer=True)  # the older name
        max_tokens = number(body, "max_completion_tokens", max_tokens, 1, float("inf"), integer=True)
    else:
        top_logprobs = number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        max_tokens = number(body, "max_tokens", 16, 1, float("inf"), integer=True)  # OpenAI's default for completions
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    n, seed = number(body, "n", 1, 1, MAX_N, integer=True), number(body, "seed", None, -(1 << 63), (1 << 63) - 1, True)
    settings = dict(temperature=number(body, "temperature", 1.0, 0, 2), top_p=number(body, "top_p", 1.0, 0, 1),
                    top_k=max(0, number(body, "top_k", 0, -1, 1 << 31, integer=True)),  # -1 (vLLM's "off") = 0
                    stop=stop, top_logprobs=top_logprobs)
    if len(prompts) * n > loop.max_waiting:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} make {len(prompts) * n} sequences; the server queues "
                            f"at most {loop.max_waiting}", param="n")
    choices = [Choice(loop, p * n + j, events, prompt, min(max_tokens or max_len, max_len - len(prompt)),
                      seed=None if seed is None else (seed + j) % (1 << 63), **settings)  # choice j: its own seed
               for p, prompt in enumerate(prompts) for j in range(n)]
    return prompts, choices, flag(body, "stream"), flag(stream_options, "include_usage")


def logprobs_json(chat, tokenizer, entries, offset=0):
    """OpenAI's logprobs of (token, logprob, top) entries: chat's "content" list, or completions' columns."""
    def token(i):
        return tokenizer.decode_bytes([i]).decode("utf-8", errors="replace")

    if chat:
        def item(i, logprob):
            return {"token": token(i), "logprob": logprob, "bytes": list(tokenizer.decode_bytes([i]))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries],
                "refusal": None}
    tokens = [token(t) for t, _, _ in entries]
    offsets = [offset + sum(len(x) for x in tokens[:k]) for k in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "text_offset": offsets,
            "top_logprobs": [{token(i): v for i, v in top} for _, _, top in entries]}


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
    completion = sum(len(c.seq.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -----------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
    server_version = "astrai-serve"
    disable_nagle_algorithm = True  # else headers then body (or SSE events) wait on the client's delayed ACK: 40 ms

    def do_GET(self):  # and do_POST: one router for both
        t0, self.note, self.streaming = time.perf_counter(), "", False
        try:
            self.route(self.command, urlsplit(self.path).path)
            status = 200
        except ClientGone:
            status, self.note = 499, "client closed the connection"
        except Exception as e:
            if not isinstance(e, ApiError):  # a bug: log it, answer 500, keep serving
                traceback.print_exc()
                self.close_connection = True
                e = ApiError(500, f"internal server error: {e!r}", kind="server_error")
            status, self.note = e.status, e.message
            if not self.streaming:  # once a stream has begun it is too late for a status code
                headers = {503: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"}}.get(e.status)
                try:
                    self.send_json(e.status, e.body(), headers)
                except ClientGone:
                    pass
        if self.server.log_requests:
            print(f"{self.client_address[0]} {self.command} {self.path} {status} {time.perf_counter() - t0:.3f}s "
                  f"{self.note}", file=sys.stderr, flush=True)

    do_POST = do_GET

    def log_request(self, code="-", size="-"):
        pass  # do_GET logs one line per request, with its token counts

    def route(self, method, path):
        body = self.read_body() if method == "POST" else b""
        if path.startswith("/v1/") or path == "/stats":
            self.check_key()
        card = {"id": self.server.model_name, "object": "model", "created": int(self.server.loop.started),
                "owned_by": "astrai", "max_model_len": self.server.loop.engine.max_len}
        if (method, path) == ("GET", "/"):
            with open(PAGE, "rb") as f:
                self.send_bytes(200, f.read(), "text/html; charset=utf-8")
        elif (method, path) == ("GET", "/health"):
            self.send_json(200, {"status": "ok"})
        elif (method, path) == ("GET", "/stats"):
            self.send_json(200, self.server.loop.stats())
        elif (method, path) == ("GET", "/v1/models"):
            self.send_json(200, {"object": "list", "data": [card]})
        elif method == "GET" and path.startswith("/v1/models/"):
            self.check_model(path[len("/v1/models/") :])
            self.send_json(200, card)
        elif (method, path) in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            self.complete(self.parse_json(body), chat=path.endswith("chat/completions"))
        else:
            raise ApiError(404, f"unknown request URL: {method} {path}", code="unknown_url")

    def read_body(self):
        length = self.headers.get("Content-Length", "0")
        if self.headers.get("Transfer-Encoding") or not length.isdigit():
            self.close_connection = True
            raise ApiError(411, f"send the body with a Content-Length header (got {length!r}; chunked bodies are "
                                "not supported)")
        length, limit = int(length), self.server.max_body_bytes
        if length > limit:
            self.close_connection = length > 4 * limit
            if not self.close_connection:  # read and drop it, so that the client sees the 413 rather than a reset
                self.rfile.read(length)
            raise ApiError(413, f"the request body is {length} bytes; the limit is {limit} bytes",
                           code="body_too_large")
        return self.rfile.read(length)

    def check_key(self):
        key = self.server.api_key
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if key and not hmac.compare_digest(given.encode(), key.encode()):
            what = "no API key given" if not given else "wrong API key"
            raise ApiError(401, f"{what}: send the header 'Authorization: Bearer KEY' with the server's --api_key",
                           code="invalid_api_key")

    def check_model(self, name):
        if name != self.server.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.server.model_name!r}",
                           param="model", code="model_not_found")

    def parse_json(self, raw):
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        if body.get("model") is not None:
            if not isinstance(body["model"], str):
                raise ApiError(400, "model must be a string", param="model")
            self.check_model(body["model"])
        return body

    def send_bytes(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.write(data)

    def write(self, data):
        try:
            self.wfile.write(data)
        except OSError:
            raise ClientGone from None

    def send_json(self, status, obj, headers=None):
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def client_gone(self):
        """The peer closed its end: the socket reads as ready with nothing in it."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def events(self, events, count):
        """Yield engine events until `count` sequences have finished; ClientGone if the client leaves."""
        while count:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if self.client_gone():
                    raise ClientGone from None
                continue
            count -= event[3] is not None
            yield event

    # --- completions ---------------------------------------------------------

    def complete(self, body, chat):
        loop, events = self.server.loop, queue.Queue()
        prompts, choices, stream, include_usage = parse_request(body, chat, loop, events)
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": self.server.model_name}
        loop.submit(choices)
        try:
            if stream:
                self.stream(head, chat, prompts, choices, events, include_usage)
            else:
                self.respond(head, chat, prompts, choices, events)
        finally:
            loop.cancel(choices)  # no-op for finished sequences
        usage = usage_json(prompts, choices)
        self.note = f"prompt={usage['prompt_tokens']} completion={usage['completion_tokens']} n={len(choices)}" + (
            " stream" if stream else "")

    def respond(self, head, chat, prompts, choices, events):
        text, entries, finish = [[] for _ in choices], [[] for _ in choices], [None] * len(choices)
        for index, piece, logprob, reason in self.events(events, len(choices)):
            text[index].append(piece)
            entries[index] += [logprob] if logprob else []
            finish[index] = reason
        if "error" in finish:
            raise ApiError(500, "the engine failed while generating; see the server log", kind="server_error")
        tokenizer = self.server.loop.tokenizer
        body = [choice_json(chat, False, c.index, "".join(text[c.index]), finish=finish[c.index],
                            logprobs=None if c.seq.top_logprobs is None
                            else logprobs_json(chat, tokenizer, entries[c.index]))
                for c in choices]
        self.send_json(200, {**head, "object": "chat.completion" if chat else "text_completion", "choices": body,
                             "usage": usage_json(prompts, choices)})

    def stream(self, head, chat, prompts, choices, events, include_usage):
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        tokenizer = self.server.loop.tokenizer
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        offsets = [0] * len(choices)  # characters sent per choice, for completions' text_offset

        def send(choices, **extra):
            self.write(b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n")

        if chat:  # the first delta of each choice carries the role
            send([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                   "finish_reason": None} for s in choices])
        for index, text, logprob, reason in self.events(events, len(choices)):
            if reason == "error":
                send([], error={"message": "the engine failed while generating; see the server log",
                                "type": "server_error"})
                continue
            if text or logprob:
                logprobs = logprob and logprobs_json(chat, tokenizer, [logprob], offsets[index])
                send([choice_json(chat, True, index, text, logprobs)])
                offsets[index] += len(text)
            if reason:
                send([choice_json(chat, True, index, "", finish=reason)])
        if include_usage:
            send([], usage=usage_json(prompts, choices))
        self.write(b"data: [DONE]\n\n")


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog: many clients connecting at once must not be refused
    daemon_threads = True


def make_server(loop, host="127.0.0.1", port=8000, api_key="", model_name="model", max_body_bytes=1 << 20,
                log_requests=True):
    """The HTTP server for an EngineLoop (started separately); port 0 picks a free port."""
    server = Server((host, port), Handler)
    server.loop, server.api_key, server.model_name = loop, api_key, model_name
    server.max_body_bytes, server.log_requests = max_body_bytes, log_requests
    return server


# -----------------------------------------------------------------------------
# command line


def main(argv):
    args = load_settings(DEFAULTS, argv, "serve.py")
    if not args.model:
        sys.exit("serve.py: --model=MODELDIR is required (a directory with config.json, model.safetensors, tokenizer)")
    for key in ("max_batch", "prefill_chunk"):
        if args[key] < 1:
            sys.exit(f"serve.py: --{key}={args[key]} must be at least 1")
    device, dtype = pick_device(args.device, args.dtype)
    try:
        model, tokenizer = load(args.model, device=device, dtype=dtype)
    except (OSError, ValueError) as e:
        sys.exit(f"serve.py: {e}")
    engine = Engine(model, args.max_batch, args.max_len, args.prefill_chunk, stop_ids_for(args.model, tokenizer),
                    tokenizer.vocab_size)
    loop = EngineLoop(engine, tokenizer, args.max_waiting).start()
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    api_key = args.api_key or os.environ.get("ASTRAI_API_KEY", "")
    server = make_server(loop, args.host, args.port, api_key, name, args.max_body_bytes)
    print(f"serving {name} ({model.num_params() / 1e6:.1f}M params, {device} {dtype}, max_batch {args.max_batch}) "
          f"on http://{args.host}:{server.server_address[1]}" + (" with an API key" if api_key else ""),
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        loop.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
