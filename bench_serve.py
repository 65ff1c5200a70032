"""
bench.py's serving sections (python bench.py --only=serve,serve_memory,loglikelihood,structured): serve.py behind
HTTP against llama-server, its memory at 16 long prompts, lm-eval's loglikelihood requests through serve.py against
lm-eval's own --model hf, and grammar-constrained against free decode. bench.py's options apply; run it from there.
"""
import os
import time

import torch

from bench import GGUF_TYPES, bench_model, dtypes, fastest, gguf_file, hf_model_like, in_dtype, table


def clients_throughput(port, prompts, clients, path, body, count):
    """Output tokens/s of `clients` HTTP clients working through `prompts`, each sending its next request when
    the last is answered. body(prompt) -> the request's JSON; count(reply) -> the tokens it generated."""
    import http.client
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    todo, lock = list(prompts), threading.Lock()

    def client(_):
        conn, tokens = http.client.HTTPConnection("127.0.0.1", port, timeout=600), 0
        while True:
            with lock:
                if not todo:
                    return tokens
                prompt = todo.pop()
            conn.request("POST", path, json.dumps(body(prompt)), {"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = json.loads(reply.read())
            if reply.status != 200:
                raise RuntimeError(f"POST {path}: {reply.status} {data}")
            tokens += count(data)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    return tokens / (time.perf_counter() - t0)


def served(model, tokenizer, prompts, n_tokens, clients, compile):
    """serve.py's output tokens/s (an engine of 16 rows behind its HTTP server) for greedy completions."""
    import threading

    from sample import Engine
    from serve import EngineLoop, make_server, warm_up

    engine = Engine(model, 16, compile=compile)
    if compile:
        warm_up(engine)  # as serve.py does before it listens
    loop = EngineLoop(engine, tokenizer, max_waiting=len(prompts)).start()
    server = make_server(loop, port=0, log_requests=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return clients_throughput(server.server_address[1], prompts, clients, "/v1/completions",
                                  lambda p: {"prompt": p, "max_tokens": n_tokens, "temperature": 0},
                                  lambda reply: reply["usage"]["completion_tokens"])
    finally:
        server.shutdown()
        server.server_close()
        loop.stop()


def llama_served(llamacpp, gguf, prompts, n_tokens, clients, threads, rss=None):
    """llama-server's output tokens/s (16 slots, -np 16) for the same greedy completions of the same token ids;
    rss, a dict, gets the server's peak RSS as "peak"."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = 16 * (max(len(p) for p in prompts) + n_tokens + 16)
    command = [os.path.join(llamacpp, "build", "bin", "llama-server"), "-m", gguf, "-np", "16", "-c", str(context),
               "-t", str(threads), "--port", str(port), "--no-webui"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        body = {"n_predict": n_tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
        speed = clients_throughput(port, prompts, clients, "/completion", lambda p: {**body, "prompt": p},
                                   lambda reply: reply["tokens_predicted"])
        if rss is not None:
            rss["peak"] = peak_rss(server.pid)
        return speed
    finally:
        server.terminate()
        server.wait(timeout=30)


def peak_rss(pid):
    """VmHWM of another process (Linux), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def bench_serve_memory(args):
    """serve.py as a user starts it (its defaults but --max_batch=16) and llama-server (-np 16, its context split
    over the slots as its docs say) on the same bfloat16 weights, 16 clients at once with prompts of
    --memory_prompt_len tokens: each server process's peak RSS."""
    import re
    import subprocess
    import sys
    import tempfile

    server_bin = os.path.join(args.llamacpp, "build", "bin", "llama-server")
    model, tokenizer = bench_model(args.serve_memory_preset, args.seed)
    n, new = args.memory_prompt_len, 16
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(16)]
    print(f"== serve_memory: {args.serve_memory_preset} (random weights, bfloat16), 16 clients at once, prompts of "
          f"{n} tokens, {new} new tokens each; peak = the server process's peak RSS")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        model_dir = os.path.join(directory, "model")
        model.to(torch.bfloat16).save_pretrained(model_dir)
        tokenizer.save(model_dir)
        gguf = gguf_file(model, tokenizer, "bfloat16", directory) if os.path.isfile(server_bin) else None
        del model
        p = subprocess.Popen([sys.executable, "serve.py", f"--model={model_dir}", "--port=0", "--max_batch=16"],
                             stderr=subprocess.PIPE, text=True)
        try:
            found = None
            while found is None and (line := p.stderr.readline()):
                found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            t0 = time.perf_counter()
            clients_throughput(int(found.group(1)), prompts, 16, "/v1/completions",
                               lambda q: {"prompt": q, "max_tokens": new, "temperature": 0},
                               lambda reply: reply["usage"]["completion_tokens"])
            rows.append(["serve.py", f"{peak_rss(p.pid) / 2**30:.2f}", f"{time.perf_counter() - t0:.0f}"])
        finally:
            p.terminate()
            p.wait(timeout=30)
        if gguf:
            rss = {}
            t0 = time.perf_counter()
            llama_served(args.llamacpp, gguf, prompts, new, 16, args.threads or os.cpu_count(), rss)
            rows.append(["llama-server", f"{rss['peak'] / 2**30:.2f}", f"{time.perf_counter() - t0:.0f}"])
    if len(rows) == 2:
        rows.append(["ours/theirs", f"{float(rows[0][1]) / float(rows[1][1]):.2f}x", ""])
    table(rows, ["server", "peak RSS GiB", "seconds"])


def second_turn(model, history, n_tokens=8):
    """Seconds to the first token of a chat's second turn whose prompt starts with `history` tokens a free row
    still holds, with prefix reuse and without (a fresh engine)."""
    from sample import Engine, SamplingParams, Sequence

    def first_token(engine, prompt):
        seq = Sequence(prompt, n_tokens, SamplingParams(temperature=0.0))
        t0 = time.perf_counter()
        engine.add([seq])
        while not seq.tokens:
            engine.step()
        seconds = time.perf_counter() - t0
        while engine.has_work():
            engine.step()
        return seconds, seq

    prompt = torch.randint(0, model.config.vocab_size, (history,)).tolist()
    engine = Engine(model, 1, history + 64, prefill_chunk=512)
    _, seq = first_token(engine, prompt)
    follow_up = prompt + seq.tokens + torch.randint(0, model.config.vocab_size, (20,)).tolist()
    with_reuse, _ = first_token(engine, follow_up)
    without, _ = first_token(Engine(model, 1, history + 64, prefill_chunk=512), follow_up)
    return with_reuse, without


def bench_serve(args):
    """serve.py's output tokens/s behind its HTTP server with 1, 4 and 16 clients, against llama-server (-np 16)
    and transformers' continuous batching (generate_batch, float32) on the same weights and prompts; then a
    chat's second turn with and without prefix reuse."""
    import logging
    import random
    import tempfile

    n_requests, n_tokens, threads = args.serve_requests, args.serve_tokens, torch.get_num_threads()
    print(f"== serve: output tokens/s, {n_requests} greedy completions of {n_tokens} tokens (no stop token), "
          f"prompts of 16-64 tokens, cpu, {threads} torch threads; ours {'compiled' if args.compile else 'eager'}")
    rows = []
    for preset in args.presets.split(","):
        base, tokenizer = bench_model(preset, args.seed)
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(16, 64))] for _ in range(n_requests)]
        hf = hf_model_like(base)
        for dtype in dtypes(args):
            model = in_dtype(base, dtype)
            served(model, tokenizer, prompts[:8], n_tokens, 4, args.compile)  # warm up (and compile)
            theirs = {}
            if hf is not None and dtype == "float32":
                from transformers import ContinuousBatchingConfig, GenerationConfig

                logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # psutil warnings on CPU
                config = GenerationConfig(max_new_tokens=n_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)

                def generate_batch(clients, requests=prompts):
                    t0, batching = time.perf_counter(), ContinuousBatchingConfig(max_requests_per_batch=clients)
                    out = hf.generate_batch(requests, generation_config=config, progress_bar=False, warmup=False,
                                            continuous_batching_config=batching)
                    return sum(len(o.generated_tokens) for o in out.values()) / (time.perf_counter() - t0)

                generate_batch(4, prompts[:4])  # warm up: the first call pays one-time setup
                theirs["transformers"] = generate_batch
            with tempfile.TemporaryDirectory() as d:
                if args.llamacpp:
                    gguf = gguf_file(base, tokenizer, dtype, d, args.llamacpp)
                    theirs[f"llama-server {GGUF_TYPES[dtype]}"] = lambda clients: llama_served(
                        args.llamacpp, gguf, prompts, n_tokens, clients, threads)
                for clients in (1, 4, 16):
                    ours = served(model, tokenizer, prompts, n_tokens, clients, args.compile)
                    rows.append([preset, dtype, clients, "serve.py", f"{ours:,.0f}", ""])
                    for name, measure in theirs.items():
                        speed = measure(clients)
                        rows.append([preset, dtype, clients, name, f"{speed:,.0f}", f"{ours / speed:.2f}x"])
        history = min(1000, base.config.max_len - 100)
        with_reuse, without = second_turn(in_dtype(base, dtypes(args)[0]), history)
        print(f"{preset}: a second chat turn after {history} tokens of history: first token in "
              f"{with_reuse * 1e3:.0f} ms "
              f"with prefix reuse, {without * 1e3:.0f} ms without ({without / with_reuse:.1f}x sooner)")
        del base, hf
    table(rows, ["preset", "dtype", "clients", "impl", "output tokens/s", "ours/theirs"])


def bench_loglikelihood(args):
    """lm-eval's loglikelihood requests/s: `--model local-completions` against serve.py (echo + logprobs, prompts
    scored in the prefill) vs `--model hf` on the same model directory, both float32, 16 requests a batch."""
    import json
    import random
    import tempfile

    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    rows = []
    for preset in args.presets.split(","):
        model, tokenizer = bench_model(preset, args.seed)
        rng = random.Random(args.seed)
        words = [tokenizer.decode([i]) for i in range(300, min(2000, tokenizer.vocab_size))]
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            tokenizer.save(d)
            with open(f"{d}/mc.jsonl", "w") as f:
                for _ in range(args.loglikelihood_docs):
                    f.write(json.dumps({"q": "".join(rng.choices(words, k=rng.randint(48, 96))), "label": 0,
                                        "choices": ["".join(rng.choices(words, k=8)) for _ in range(4)]}) + "\n")
            with open(f"{d}/mc.yaml", "w") as f:
                f.write(f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d}/mc.jsonl\n"
                        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
                        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
            url, seconds = None, {}
            for name, model_args in [("lm-eval --model hf", f"pretrained={d},dtype=float32,batch_size=16"),
                                     ("serve.py", "model=model,base_url={url},tokenizer_backend=remote,batch_size=16")]:
                if name == "serve.py":
                    server, loop = serve_in_thread(model, tokenizer, 16)
                    url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
                lm = get_model("hf" if url is None else "local-completions").create_from_arg_string(
                    model_args.format(url=url), {"device": "cpu"})
                score = lm.loglikelihood

                def timed(requests, *rest, name=name, score=score):  # the requests alone, not lm-eval's setup
                    t0 = time.perf_counter()
                    result = score(requests, *rest)
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                    return result

                lm.loglikelihood = timed
                lm_eval.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=TaskManager(include_path=d),
                                        verbosity="ERROR")
            server.shutdown()
            server.server_close()
            loop.stop()
        n = 4 * args.loglikelihood_docs
        rows.append([preset, f"{n / seconds['serve.py']:.1f}", f"{n / seconds['lm-eval --model hf']:.1f}",
                     f"{seconds['lm-eval --model hf'] / seconds['serve.py']:.2f}x"])
    table(rows, ["model", "serve.py req/s", "lm-eval hf req/s", "serve.py vs hf"])


def serve_in_thread(model, tokenizer, max_batch):
    """serve.py's server and engine thread on a free port, compiled decode off (scoring is prefill)."""
    import threading

    from sample import Engine
    from serve import EngineLoop, make_server

    loop = EngineLoop(Engine(model, max_batch), tokenizer, max_waiting=256).start()
    server = make_server(loop, port=0, log_requests=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, loop
# -----------------------------------------------------------------------------
# structured: every row held to a JSON schema (structured.py's masks) vs free decode, the same run


def bench_structured(args):
    """Sampled decode tokens/s (no stop: -1 is no token) of the bench82m shape at batch 1 and 16, free vs JSON
    schema; 1 - free time / constrained time is what the masks cost."""
    from sample import generate

    model, tokenizer = bench_model("configs/bench82m.py", args.seed)
    item = {"type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}, "tags": {
        "type": "array", "items": {"enum": ["red", "green", "blue"]}}}, "required": ["name", "count", "tags"]}
    print(f"== structured: bench82m, {args.decode_tokens} sampled tokens a row, {torch.get_num_threads()} threads")
    rows = []
    for B in (1, 16):
        prompts, N = torch.randint(0, 2000, (B, args.prompt_len)).tolist(), args.decode_tokens
        best = fastest({"free": lambda: generate(model, prompts, N, temperature=1.0, seed=0), "json_schema": lambda:
                        generate(model, prompts, N, temperature=1.0, seed=0, stop_ids=[-1], tokenizer=tokenizer,
                                 json_schema={"type": "array", "items": item})}, args.steps)
        rows += [[B, name, f"{B * N / best[name]:,.0f}", f"{1 - best['free'] / best[name]:.1%}"] for name in best]
    table(rows, ["batch", "decode", "tokens/s", "time over free"])
