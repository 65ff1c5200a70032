"""
An OpenAI- and Anthropic-compatible server with continuous batching, on the standard library (no web framework).

    python serve.py --model=out/demo/final                 # chat page at http://127.0.0.1:8000
    python serve.py --model=DIR --max_batch=16 --api_key=secret --host=0.0.0.0
    torchrun --nproc_per_node=2 serve.py --model=DIR --tp=2      # one model split over 2 processes (parallel.py)
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}]}'

OpenAI clients use base_url=http://127.0.0.1:8000/v1, Anthropic clients base_url=http://127.0.0.1:8000. api.py
checks their requests and shapes their replies; httpd.py holds the HTTP plumbing under the routes (connections, the
watchdog, bodies, Host/Origin/key checks, SSE). How a request flows:

  accept thread   a thread per connection up to --max_connections (503 beyond); a watchdog ends connections idle
                  past --idle_timeout or whose request takes longer than --timeout to arrive
  handler thread  Host, Origin, key, Content-Type checks -> the JSON checked -> one Choice (a sample.Sequence + its
                  text) per choice -> EngineLoop.submit -> the engine's waiting queue (FIFO)
  engine thread   EngineLoop.run calls sample.Engine.step() while there is work: admit waiting sequences into free
                  KV cache rows while its blocks last (--kv_memory), a prefill chunk or a decode token for each row,
                  sample each with its own settings; Choice.on_token puts the new text on its request's event queue
  handler thread  events -> one JSON response, or SSE events as they come; every 0.2 s it checks that the client
                  is still there, and cancels the request's sequences when it is not
SIGTERM or SIGINT: stop accepting, answer waiting requests 503, give running ones --shutdown_timeout seconds, end
the streams still open with an error event and [DONE], exit 0.
"""
import bisect
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
from itertools import accumulate
from urllib.parse import urlsplit

import torch

import httpd
from api import (ApiError, anthropic_blocks, choice_json, embeddings_json, event_delta, flag, logprobs_json,
                 message_json, parse_anthropic, parse_detokenize, parse_embeddings, parse_json, parse_openai,
                 parse_tokenize, reply_choice_json, tokenizer_info_json, usage_json)
from compiled import compile_setting
from kv_cache import BLOCK, budget_text
from quant import pick_layout
from sample import Engine, Sequence, TextStream, load
from httpd import ClientGone, Connection, dumps
from settings import exit_torchrun, load_settings, pick_device
from structured import gather

DEFAULTS = dict(
    model="",  # MODELDIR: config.json + model.safetensors + tokenizer files (ours or Hugging Face), or a .gguf file
    adapter="",  # a LoRA adapter directory (train.py --lora_rank, or peft's) trained on --model: merged in on load
    host="127.0.0.1",  # loopback only; --host=0.0.0.0 exposes the server to the network
    port=8000,
    max_batch=8,  # sequences decoded together (KV cache rows; their memory comes from --kv_memory)
    max_waiting=64,  # queued sequences; beyond this a request gets 503 + Retry-After
    prefill_chunk=256,  # prompt tokens a row prefills per iteration, so a long prompt never stalls the others
    max_len=0,  # context of one sequence (prompt + reply); 0 = the model's max_len
    kv_memory="50%",  # KV cache budget: GB (like 8), or a share of the memory left after the weights (like 50%);
    # taken as tokens are written on a CPU, up front on a GPU; when full, new requests wait and the newest running
    # one is preempted (recomputed later)
    api_key="",  # require "Authorization: Bearer KEY" or "x-api-key: KEY" on /v1/*, /stats, /metrics; $ASTRAI_API_KEY
    model_name="",  # the id in /v1/models; default: the model directory's name
    max_body_bytes=1 << 20,  # larger request bodies get 413
    max_connections=128,  # open connections, a thread each; more get 503 + Retry-After
    timeout=30.0,  # seconds a request may take to arrive (headers and body), and one write may wait on a client
    idle_timeout=15.0,  # seconds a keep-alive connection may wait for its next request (clients' pools keep 5)
    allowed_hosts="",  # Host names accepted besides loopback ones when bound to loopback, comma-separated; * = any
    allowed_origins="",  # web page origins (https://app.example) allowed to call, with CORS; * = any
    shutdown_timeout=5.0,  # on SIGTERM/SIGINT: seconds running requests get to finish before they are ended
    device="auto",  # auto = cuda when available, else cpu
    dtype="auto",  # auto = bfloat16 where the GPU or CPU has it natively, else float32; or float32, bfloat16,
    # float16, int8 or int4 (weight-only int8 or int4 with bfloat16 activations: quant.py)
    compile="auto",  # decode steps through the compiled step (compiled.py), compiled at startup (seconds to a
    # minute): true, false, or auto = true: a server decodes past the steps where it pays (COMPILE_BREAK_EVEN_STEPS)
    weight_layout="auto",  # float32/bfloat16 on a CPU: plain, transposed, packed; auto: quant.py's pick_layout
    tp=1,  # tensor parallel: the model split over tp processes (torchrun --nproc_per_node=tp); rank 0 serves HTTP
    rag_index="",  # FILE.h5 (python data.py index): chats retrieve for their last user turn; replies carry "sources"
    rag_k=4,  # chunks retrieved per chat request with --rag_index
    retrieval="",  # with --rag_index: dense, bm25 or hybrid (rag.py); "" = the index's own (data.py index --retrieval)
)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
ROUTES = {"/": "GET", "/health": "GET", "/stats": "GET", "/metrics": "GET", "/v1/models": "GET",
          "/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/messages": "POST",
          "/v1/embeddings": "POST",
          "/tokenize": "POST", "/detokenize": "POST", "/tokenizer_info": "GET"}  # the last three: vLLM's
KEYED = ("/stats", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")  # besides /v1/*: need --api_key


# -----------------------------------------------------------------------------
# the engine's thread, each choice's text, and the numbers /stats and /metrics report


def release_text(held, piece, stops):
    """Append piece to the held-back text -> (text safe to send, text still held, the stop string hit or None).
    Text is held while its end could be the beginning of a stop string; a stop string and what follows
    it are never sent."""
    text = held + piece
    hits = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    if hits:
        i, stop = min(hits)
        return text[:i], "", stop
    keep = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - keep], text[len(text) - keep :], None


class Choice:
    """One choice of one request: the engine's Sequence, and the text sent for it. Its on_token (run on the
    engine's thread) turns tokens into events on the request's queue: (index, text, [logprobs entries],
    finish_reason or None); text is held back while it may be the start of a stop string. params: the request's
    sample.SamplingParams; top_logprobs: None, or how many alternatives each logprobs entry lists. echo: the first
    event begins with the prompt's text (and, with top_logprobs, its tokens' entries: the prefill scores them);
    max_tokens=0 (with echo): one token is generated and not shown, so the reply is the prompt alone."""

    def __init__(self, loop, index, events, prompt, max_tokens, params, stop=(), seed=None, top_logprobs=None,
                 echo=False, constraint=None):
        self.loop, self.index, self.events, self.stop, self.echo = loop, index, events, list(stop), echo
        generator = None if seed is None else torch.Generator(device=loop.engine.device).manual_seed(seed)
        self.hidden = max_tokens == 0
        self.seq = Sequence(prompt, max(1, max_tokens), params, generator, top_logprobs=top_logprobs,
                            on_token=self.on_token, prompt_logprobs=top_logprobs if echo else None,
                            constraint=constraint)
        self.stream, self.held, self.stop_string = TextStream(loop.tokenizer), "", None
        self.submitted = self.last_token = time.perf_counter()  # time to first token counts from submission

    @property
    def completion_tokens(self):
        return 0 if self.hidden else len(self.seq.tokens)

    def echoed(self):
        """The prompt's text and its entries (token, logprob, top): none for the first token, whose top lists
        the token itself too, as OpenAI's legacy echo does."""
        seq = self.seq
        entries = [] if seq.top_logprobs is None else [(seq.prompt[0], None, None)] + [
            (t, lp, top + [(t, lp)] * all(i != t for i, _ in top)) for t, lp, top in seq.prompt_scores]
        return self.loop.tokenizer.decode(seq.prompt), entries

    def on_token(self, seq, token, logprobs_entry):
        """Sequence's callback: logprobs_entry is (token, logprob, [(id, logprob), ...]) or None (see Sequence)."""
        if token is None:  # the engine failed, or the server is shutting down
            self.events.put((self.index, "", [], "error"))
            return self.loop.count(self, seq, "error")
        if seq.constraint is not None and seq.constraint.error:  # the grammar engine gave up (a limit): fail, not
            print(f"grammar: {seq.constraint.error}", file=sys.stderr)  # a reply that breaks its schema
            self.events.put((self.index, "", [], "error"))
            self.loop.count(self, seq, "error")
            return True
        try:
            hit = None
            if seq.finish == "stop" or self.hidden:  # a stop token: counted, never shown
                text, logprobs_entry = "", None
            else:
                text, self.held, hit = release_text(self.held, self.stream.push(token), self.stop)
            if seq.finish is not None and hit is None:
                # the end: the held text and an incomplete character go out, unless they complete a stop string
                tail, rest, hit = release_text(self.held, self.stream.flush(), self.stop)
                text += tail if hit else tail + rest
            entries = [logprobs_entry] if logprobs_entry else []
            if self.echo and len(seq.tokens) == 1:
                prompt_text, prompt_entries = self.echoed()
                text, entries = prompt_text + text, prompt_entries + entries
        except Exception:  # a gap in an imported tokenizer's id table, say: this choice fails, the others go on
            traceback.print_exc()
            self.events.put((self.index, "", [], "error"))
            return True
        self.stop_string, finish = hit, "stop" if hit else seq.finish
        self.events.put((self.index, text, entries, finish))
        self.loop.count(self, seq, finish)
        return hit is not None


class Histogram:
    """A Prometheus histogram: observations counted under upper bounds (cumulative when written), their sum."""

    def __init__(self, bounds):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self):
        cumulative = list(accumulate(self.counts))
        return ([(f'_bucket{{le="{b}"}}', n) for b, n in zip(self.bounds, cumulative)] +
                [('_bucket{le="+Inf"}', cumulative[-1]), ("_sum", self.sum), ("_count", cumulative[-1])])


class EngineLoop:
    """sample.Engine stepped by one thread while requests come and go: a bounded waiting queue (503 beyond
    it), cancellation when a client leaves, shutdown, and the numbers /stats and /metrics report."""

    def __init__(self, engine, tokenizer, max_waiting=64):
        self.engine, self.tokenizer, self.max_waiting = engine, tokenizer, max_waiting
        self.wake = threading.Condition()
        self.thread, self.closing, self.stop_at = None, False, 0.0
        self.started = time.time()
        self.tokens_generated = self.prompt_tokens = self.prompt_tokens_reused = self.sequences_done = 0
        self.busy_seconds = 0.0
        self.ttft = Histogram([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.itl = Histogram([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5])

    def start(self):
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, grace=0.0):
        """New work gets 503; waiting sequences end now, running ones when done or after `grace` seconds (ended
        with an error); then the engine's thread ends."""
        with self.wake:
            self.closing, self.stop_at = True, time.monotonic() + grace
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()
        else:
            self.engine.fail()

    def submit(self, choices):
        with self.wake:
            if self.closing:
                raise ApiError(503, "the server is shutting down; retry shortly", code="shutting_down",
                               kind="server_error")
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
                    while not (self.engine.has_work() or self.closing):
                        self.wake.wait()
                if self.closing:
                    if not self.engine.running or time.monotonic() >= self.stop_at:
                        self.engine.fail()
                        return
                    if self.engine.waiting:
                        self.engine.fail(list(self.engine.waiting))
                t0 = time.perf_counter()
                try:
                    self.engine.step()
                except Exception:  # a bug or out of memory: step() failed the rows it came from; keep serving
                    traceback.print_exc()
                self.busy_seconds += time.perf_counter() - t0

    def count(self, choice, seq, finish):
        """Called for each token, and once more when a sequence fails (on the engine's thread)."""
        self.sequences_done += finish is not None
        if finish == "error":
            return
        now = time.perf_counter()
        self.tokens_generated += 1
        if len(seq.tokens) == 1:
            self.prompt_tokens += len(seq.prompt)
            self.prompt_tokens_reused += seq.reused
            self.ttft.observe(now - choice.submitted)
        else:
            self.itl.observe(now - choice.last_token)
        choice.last_token = now

    def stats(self):
        ttft_count = self.ttft.samples()[-1][1]
        return {
            "running": len(self.engine.running), "waiting": len(self.engine.waiting),
            "max_batch": self.engine.max_batch, "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_reused": self.prompt_tokens_reused,
            "tokens_generated": self.tokens_generated, "sequences_done": self.sequences_done,
            "tokens_per_s": round(self.tokens_generated / self.busy_seconds, 2) if self.busy_seconds else 0.0,
            "mean_time_to_first_token_s": round(self.ttft.sum / ttft_count, 4) if ttft_count else None,
            "kv_cache_tokens": self.engine.kv_tokens, "kv_cache_tokens_free": len(self.engine.cache.free) * BLOCK,
            "kv_cache_bytes_touched": self.engine.cache.bytes_touched(), "preemptions": self.engine.preemptions,
            "uptime_s": round(time.time() - self.started, 1),
        }


# -----------------------------------------------------------------------------
# HTTP


class Handler(Connection):
    """The routes: one router for every method, then OpenAI's chat and completions and Anthropic's Messages on
    the engine."""

    def dispatch(self):  # every method: one router
        t0, self.note, self.streaming, self.probed = time.perf_counter(), "", False, False
        path, status = urlsplit(self.path).path, 200
        self.anthropic = path.startswith("/v1/messages")
        try:
            self.route(path)
        except ClientGone:
            status, self.note = 499, "client closed the connection"
        except Exception as e:
            if not isinstance(e, ApiError):  # a bug: log it, answer 500 without its text, keep serving
                traceback.print_exc()
                e, self.close_connection = ApiError(500, "internal server error; see the server log",
                                                    kind="server_error"), True
            status, self.note = e.status, e.message
            if not self.streaming:  # once a stream has begun it is too late for a status code
                self.send_error_object(e)
        self.close_connection |= self.server.closing
        self.server.count(status)
        self.log_message("%s %s %s %.3fs %s", self.command, self.path, status, time.perf_counter() - t0, self.note)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = dispatch

    def route(self, path):
        if time.monotonic() > self.server.deadlines[self.connection]:  # the watchdog cut the headers short
            self.close_connection = True
            raise ApiError(408, f"the request took longer than {self.server.timeout:g} s to arrive", code="timeout")
        body = self.read_body()
        self.deadline(math.inf)  # the request is in: from here on the time is the engine's, not the client's
        self.check_origin()
        method = ROUTES.get(path, "GET" if path.startswith("/v1/models/") else None)
        if method is None:
            raise ApiError(404, f"unknown request URL: {self.command} {path}", code="unknown_url")
        if self.command == "OPTIONS" and self.cors:  # a CORS preflight from an allowed origin
            return self.send_bytes(204, b"", "text/plain", {
                "Access-Control-Allow-Methods": method, "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Headers": self.headers.get("Access-Control-Request-Headers", "")})
        if self.command != method:
            raise ApiError(405, f"{self.command} is not allowed on {path}: use {method}", code="method_not_allowed",
                           headers={"Allow": method})
        if path.startswith("/v1/") or path in KEYED:
            self.check_key()
        if method == "POST":
            if self.headers.get_content_type() != "application/json":
                raise ApiError(415, "the body must be JSON sent with Content-Type: application/json (got "
                                    f"{self.headers.get('Content-Type', 'none')!r})", code="unsupported_media_type")
            body = parse_json(body)
            self.check_model(body.get("model"))
        loop = self.server.loop
        card = {"id": self.server.model_name, "object": "model", "owned_by": "astrai", "created": int(loop.started),
                "max_model_len": loop.engine.max_len}
        if path == "/":
            with open(PAGE, "rb") as f:
                self.send_bytes(200, f.read(), "text/html; charset=utf-8")
        elif path == "/metrics":
            self.send_bytes(200, metrics(self.server).encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path.startswith("/v1/models/"):
            self.check_model(path[len("/v1/models/"):])
            self.send_json(200, card)
        elif path == "/tokenizer_info":
            self.send_json(200, tokenizer_info_json(loop.tokenizer, loop.engine.max_len))
        elif method == "GET":
            self.send_json(200, {"/health": {"status": "ok"}, "/stats": loop.stats(),
                                 "/v1/models": {"object": "list", "data": [card]}}[path])
        elif path == "/tokenize":
            tokens = parse_tokenize(body, loop.tokenizer)
            strs = [loop.tokenizer.decode_bytes([t]).decode("utf-8", errors="replace") for t in tokens]
            self.send_json(200, {"count": len(tokens), "max_model_len": loop.engine.max_len, "tokens": tokens,
                                 "token_strs": strs if flag(body, "return_token_strs") else None})
        elif path == "/detokenize":
            tokens = parse_detokenize(body, loop.tokenizer.vocab_size)
            self.send_json(200, {"prompt": loop.tokenizer.decode(tokens)})
        elif path == "/v1/messages":
            self.messages(body)
        elif path == "/v1/embeddings":
            self.embeddings(body)
        else:
            self.openai(body, chat=path == "/v1/chat/completions")

    def check_model(self, name):
        if name is not None and name != self.server.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.server.model_name!r}",
                           param="model", code="model_not_found")

    def failure(self):
        """The error for a sequence that ended in "error"."""
        if self.server.loop.closing:
            return ApiError(503, "the server is shutting down; retry", code="shutting_down", kind="server_error")
        return ApiError(500, "the engine failed while generating; see the server log", kind="server_error")

    def generate(self, request, respond):
        """Submit a parsed request's sequences, give their events to respond(choices, events), cancel what is left."""
        loop, events = self.server.loop, queue.Queue()
        choices = [Choice(loop, p * request.n + j, events, prompt, request.max_tokens[p], request.sampling,
                          request.stop, None if request.seed is None else (request.seed + j) % (1 << 63),
                          request.top_logprobs, request.echo, request.constraint and request.constraint())
                   for p, prompt in enumerate(request.prompts) for j in range(request.n)]  # choice j: its own seed
        loop.submit(choices)
        try:
            respond(choices, events)
        finally:
            loop.cancel(choices)  # no-op for finished sequences
        self.note = (f"prompt={sum(map(len, request.prompts))} completion={sum(c.completion_tokens for c in choices)} "
                     f"n={len(choices)}" + (" stream" if request.stream else ""))

    # --- OpenAI ------------------------------------------------------------------------------------------------

    def with_sources(self, body, chat=True):
        """(tokenizer, response fields): with --rag_index, a chat's tokenizer hands the chunks retrieved for its
        last user turn to the chat template (rag.WithSources), and the reply gets them as "sources"."""
        if self.server.rag is None or not chat:
            return self.server.loop.tokenizer, {}
        tokenizer, sources = self.server.rag.augment(self.server.loop.tokenizer, body.get("messages"))
        return tokenizer, {} if sources is None else {"sources": sources}

    def embeddings(self, body):
        from rag import embed_ids, forward_lock  # imported when asked for

        model = self.server.loop.engine.model
        if model.tp_size > 1:  # a forward of a split model is collective: only the engine's steps run one
            raise ApiError(400, f"/v1/embeddings is not served by a model split over tp={model.tp_size} processes",
                           code="unsupported")
        rows, fmt = parse_embeddings(body, self.server.loop.tokenizer, model.config.vocab_size, model.config.max_len,
                                     model.config.dim)
        with forward_lock:
            vectors = embed_ids(model, rows)
        self.send_json(200, embeddings_json(vectors, fmt, self.server.model_name, rows))
        self.note = f"embeddings={len(rows)} tokens={sum(map(len, rows))}"

    def openai(self, body, chat):
        loop = self.server.loop
        limits = (loop.engine.context, loop.engine.kv_tokens)
        tokenizer, self.sources = self.with_sources(body, chat)
        request = parse_openai(body, chat, tokenizer, limits, loop.engine.model.config.vocab_size, loop.max_waiting)
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": self.server.model_name}
        respond = self.openai_stream if request.stream else self.openai_response
        self.generate(request, lambda choices, events: respond(head, chat, request, choices, events))

    def openai_response(self, head, chat, request, choices, events):
        text, entries, finish = [[] for _ in choices], [[] for _ in choices], [None] * len(choices)
        for index, piece, entry, reason in self.events(events, len(choices)):
            text[index].append(piece)
            entries[index] += entry
            finish[index] = reason
        if "error" in finish:
            raise self.failure()
        tokenizer = self.server.loop.tokenizer
        body = []
        for c in choices:
            reply = "".join(text[c.index])
            logprobs = None if c.seq.top_logprobs is None else logprobs_json(chat, tokenizer, entries[c.index])
            body.append(choice_json(chat, False, c.index, reply, logprobs, finish[c.index]) if request.parser is None
                        else reply_choice_json(request.parser(), c.index, reply, finish[c.index], logprobs))
        self.send_json(200, {**head, "object": "chat.completion" if chat else "text_completion", "choices": body,
                             "usage": usage_json(request.prompts, choices), **self.sources})

    def openai_stream(self, head, chat, request, choices, events):
        self.start_stream()
        tokenizer = self.server.loop.tokenizer
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        offsets, failed = [0] * len(choices), False  # characters of the tokens sent: completions' text_offset
        parsers = request.parser and {c.index: request.parser() for c in choices}

        def send(choices, **extra):
            self.write(b"data: " + dumps({**head, "choices": choices, **extra}) + b"\n\n")

        if chat:  # the first delta of each choice carries the role
            send([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                   "finish_reason": None} for c in choices], **self.sources)
        for index, text, entry, reason in self.events(events, len(choices)):
            if reason == "error":
                if not failed:
                    send([], error=self.failure().body()["error"])
                failed = True
                continue
            if parsers:  # reasoning and tool calls split out of the text
                reason = self.send_parsed(send, parsers[index], index, text, entry, reason)
            elif text or entry:
                logprobs = entry and logprobs_json(chat, tokenizer, entry, offsets[index])
                send([choice_json(chat, True, index, text, logprobs)])
                offsets[index] += sum(map(len, logprobs["tokens"])) if logprobs and not chat else 0
            if reason:
                send([choice_json(chat, True, index, "", finish=reason)])
        if request.include_usage:
            send([], usage=usage_json(request.prompts, choices))
        self.write(b"data: [DONE]\n\n")

    def send_parsed(self, send, parser, index, text, entry, reason):
        """A choice's text through its ReplyParser: a delta per event (the logprobs entries with the first, or alone);
        -> the finish_reason, "tool_calls" where calls end the reply."""
        events = parser.push(text) + (parser.finish() if reason else [])
        logprobs = entry and logprobs_json(True, self.server.loop.tokenizer, entry)
        for event in events or ([None] if logprobs else []):
            delta = {} if event is None else event_delta(event)
            send([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
            logprobs = None
        return "tool_calls" if reason == "stop" and parser.calls else reason

    # --- Anthropic Messages ------------------------------------------------------------------------------------

    def messages(self, body):
        loop = self.server.loop
        limits = (loop.engine.context, loop.engine.kv_tokens)
        tokenizer, sources = self.with_sources(body)
        request = parse_anthropic(body, tokenizer, limits, loop.engine.model.config.vocab_size)
        head = {"id": "msg_" + uuid.uuid4().hex, "model": self.server.model_name, **sources}
        respond = self.messages_stream if request.stream else self.messages_response
        self.generate(request, lambda choices, events: respond(head, len(request.prompts[0]), choices[0], events,
                                                               request.parser and request.parser()))

    def messages_response(self, head, input_tokens, choice, events, parser=None):
        text = []
        for _, piece, _, finish in self.events(events, 1):
            if finish == "error":
                raise self.failure()
            text.append(piece)
        text = "".join(text)
        blocks = parser and anthropic_blocks(*gather(parser.push(text) + parser.finish()))
        self.send_json(200, message_json(head, text, finish, choice, input_tokens, blocks))

    def messages_stream(self, head, input_tokens, choice, events, parser=None):
        """Anthropic's event sequence: message_start, content_block_start, ping, content_block_delta...,
        content_block_stop (a block at a time: thinking, text, tool_use), message_delta (stop_reason, usage),
        message_stop; or an error event."""
        self.start_stream()
        block = [None, -1]  # the open block's type and index

        def send(kind, **data):
            self.write(f"event: {kind}\ndata: ".encode() + dumps({"type": kind, **data}) + b"\n\n")

        def into(kind, start=None):
            if block[0] != kind or start is not None:
                if block[0] is not None:
                    send("content_block_stop", index=block[1])
                block[:] = [kind, block[1] + 1]
                send("content_block_start", index=block[1], content_block=start or {"type": kind, kind: ""})

        send("message_start", message=message_json(head, None, None, choice, input_tokens))
        if parser is None:
            into("text")
        send("ping")
        for _, text, _, finish in self.events(events, 1):
            if finish == "error":
                return send("error", error=self.failure().body(anthropic=True)["error"])
            for event in (parser.push(text) + (parser.finish() if finish else []) if parser else
                          [("content", text)] if text else []):
                if event[0] == "call":
                    into("tool_use", {"type": "tool_use", "id": "toolu_" + event[2].removeprefix("call_"),
                                      "name": event[3], "input": {}})
                elif event[0] == "arguments":
                    send("content_block_delta", index=block[1], delta={"type": "input_json_delta",
                                                                       "partial_json": event[2]})
                else:
                    kind = "thinking" if event[0] == "reasoning" else "text"
                    into(kind, {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                         and block[0] != "thinking" else None)
                    send("content_block_delta", index=block[1], delta={"type": kind + "_delta", kind: event[1]})
        if block[0] is None:
            into("text")
        send("content_block_stop", index=block[1])
        message = message_json(head, "", finish, choice, input_tokens,
                               [{"type": "tool_use"}] if parser and parser.calls else None)
        send("message_delta", delta={"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
             usage={"output_tokens": message["usage"]["output_tokens"]})
        send("message_stop")


def metrics(server):
    """Prometheus' text exposition format, version 0.0.4."""
    loop, engine, lines = server.loop, server.loop.engine, []
    with server.lock:
        statuses = sorted(server.statuses.items())
    for name, kind, about, samples in [
        ("requests_total", "counter", "HTTP requests answered, by status code (499: the client left).",
         [(f'{{status="{s}"}}', n) for s, n in statuses]),
        ("prompt_tokens_total", "counter", "Prompt tokens of sequences that began to generate.",
         [("", loop.prompt_tokens)]),
        ("prompt_tokens_reused_total", "counter", "Prompt tokens whose keys and values a KV cache row still "
         "held from an earlier request (prefix reuse): not computed again.", [("", loop.prompt_tokens_reused)]),
        ("generation_tokens_total", "counter", "Tokens generated.", [("", loop.tokens_generated)]),
        ("time_to_first_token_seconds", "histogram", "From submission to a sequence's first token.",
         loop.ttft.samples()),
        ("inter_token_latency_seconds", "histogram", "Between tokens of a sequence.", loop.itl.samples()),
        ("sequences_running", "gauge", "Sequences holding a KV cache row.", [("", len(engine.running))]),
        ("sequences_waiting", "gauge", "Sequences queued for a row.", [("", len(engine.waiting))]),
        ("kv_cache_rows_in_use", "gauge", "KV cache rows in use.",
         [("", engine.max_batch - len(engine.free_slots))]),
        ("kv_cache_rows", "gauge", "KV cache rows (--max_batch).", [("", engine.max_batch)]),
        ("kv_cache_tokens", "gauge", "Tokens the KV cache budget holds (--kv_memory).", [("", engine.kv_tokens)]),
        ("kv_cache_tokens_free", "gauge", "Tokens of KV cache blocks no row holds.",
         [("", len(engine.cache.free) * BLOCK)]),
        ("preemptions_total", "counter", "Sequences preempted when the KV cache was full (recomputed later).",
         [("", engine.preemptions)])]:
        lines += [f"# HELP astrai_{name} {about}", f"# TYPE astrai_{name} {kind}"]
        lines += [f"astrai_{name}{labels} {value}" for labels, value in samples]
    return "\n".join(lines) + "\n"


def warm_up(engine):
    """Decode a batch of each library's fewest rows that the engine holds: the compiled step's libraries exist
    before the first request (one, or an MoE model's two: compiled.batch_ranges)."""
    from compiled import batch_ranges

    for rows in [first for first, _ in batch_ranges(engine.model.config) if first <= engine.max_batch]:
        engine.add([Sequence([0], 3) for _ in range(rows)])
        while engine.has_work():
            engine.step()


def make_server(loop, host="127.0.0.1", port=8000, api_key="", model_name="model", **limits):
    """The HTTP server for an EngineLoop (started separately); port 0 picks a free port. limits: httpd.make_server's
    (max_body_bytes, log_requests, max_connections, timeout, idle_timeout, allowed_hosts, allowed_origins)."""
    server = httpd.make_server(Handler, host, port, api_key, **limits)
    server.loop, server.model_name, server.rag = loop, model_name, None  # rag: a rag.Retriever (--rag_index)
    return server


def shut_down(server, loop, grace):
    """Stop accepting, close idle connections, let running sequences finish for up to `grace` seconds and end the
    rest (streams get an error event and [DONE], waiting requests a 503), and let the replies go out."""
    server.closing = True
    server.shutdown()  # serve_forever returns
    server.server_close()  # new connections are refused
    server.expire(math.isfinite)  # connections between requests (a request in hand has no deadline)
    loop.stop(grace)
    deadline = time.monotonic() + 5
    while math.inf in server.deadlines.values() and time.monotonic() < deadline:
        time.sleep(0.05)


# -----------------------------------------------------------------------------
# command line


def main(argv):
    args = load_settings(DEFAULTS, argv, "serve.py")
    if not args.model:
        sys.exit("serve.py: --model=MODELDIR|FILE.gguf is required (a directory with config.json, model.safetensors, "
                 "tokenizer, or a .gguf file)")
    for key in ("max_batch", "prefill_chunk", "max_connections"):
        if args[key] < 1:
            sys.exit(f"serve.py: --{key}={args[key]} must be at least 1")
    if args.tp > 1 and args.rag_index:
        sys.exit(f"serve.py: --rag_index with --tp={args.tp}: retrieval embeds on rank 0 alone, which a split model "
                 "cannot do; serve retrieval without --tp")
    device, dtype = pick_device(args.device, args.dtype, inference=True)
    engine_class = Engine
    try:
        args.compile = compile_setting(args.compile, math.inf, "serve.py", args.tp)
        if args.tp > 1:  # every process runs rank 0's engine steps on its share of the model (parallel.py)
            from parallel import SplitEngine, split_for_inference, start_inference

            device, mesh = start_inference(args.tp, device, "serve.py")
            engine_class = SplitEngine
        layout = pick_layout(args.weight_layout, device, dtype, args.max_batch, args.tp)
        model, tokenizer = load(args.model, device, dtype, args.adapter, layout)  # adapter: merged in
        if args.tp > 1:
            model, _, args.kv_memory = split_for_inference(model, mesh["tp"], None, args.kv_memory, device)
    except (OSError, ValueError) as e:
        sys.exit(f"serve.py: {e}")
    try:
        engine = engine_class(model, args.max_batch, args.max_len, args.prefill_chunk,
                              tokenizer.stop_ids, tokenizer.vocab_size, args.compile, args.kv_memory)
    except ValueError as e:
        sys.exit(f"serve.py: {e}")
    if args.tp > 1 and not engine.leader:  # signals reach rank 0, which ends its requests and then these
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        return engine.follow()
    if args.compile:
        print("compiling the decode step (--compile=false skips this)", file=sys.stderr, flush=True)
        warm_up(engine)
    if args.rag_index:
        from rag import Retriever

        try:
            rag = Retriever.sharing(args.rag_index, model, tokenizer, args.rag_k, device, args.retrieval)
        except (OSError, ValueError) as e:
            sys.exit(f"serve.py: --rag_index: {e}")
    loop = EngineLoop(engine, tokenizer, args.max_waiting).start()
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    api_key = args.api_key or os.environ.get("ASTRAI_API_KEY", "")
    server = make_server(loop, args.host, args.port, api_key, name, max_body_bytes=args.max_body_bytes,
                         max_connections=args.max_connections, timeout=args.timeout, idle_timeout=args.idle_timeout,
                         allowed_hosts=[h for h in args.allowed_hosts.split(",") if h],
                         allowed_origins=[o for o in args.allowed_origins.split(",") if o])
    server.rag = rag if args.rag_index else None
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    print(f"serving {name} ({model.num_params() / 1e6:.1f}M params, {device} {dtype}, max_batch {args.max_batch}) "
          f"on http://{args.host}:{server.server_address[1]}" + (" with an API key" if api_key else "") + "; " +
          budget_text(args.kv_memory, engine.kv_bytes, engine.kv_tokens // BLOCK, device), file=sys.stderr, flush=True)
    stop.wait()
    print(f"shutting down: running requests get {args.shutdown_timeout:g} s", file=sys.stderr, flush=True)
    shut_down(server, loop, args.shutdown_timeout)
    if args.tp > 1:
        engine.close()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_torchrun()  # with --tp (settings.py says why)
