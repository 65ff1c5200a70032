"""
Benchmarks, side by side with Hugging Face transformers (when installed) in one run, reported as ratios.

    python bench.py                       # everything
    python bench.py --only=train,decode   # some sections: train, decode, serve, prepare
    python bench.py --preset=configs/tiny.py --steps=10

Speed claims live here, never in timed unit tests.
"""
import sys
import time

import torch

from model import ModelConfig, Transformer
from settings import load_settings
from train import measure_peak_flops

DEFAULTS = dict(
    only="train,decode,serve,prepare",  # comma-separated sections
    preset="configs/tiny.py",  # model shape for the decode/serve sections
    # train section: model shapes, each a preset with optional :key=value overrides of its config, batch_size
    # or block_size; the 1B preset at 2 of its 24 layers keeps a CPU step to seconds (per-layer cost is the same)
    train_shapes="configs/tiny.py,configs/astrai_1b.py:n_layers=2:batch_size=1,"
                 "configs/astrai_1b_mla.py:n_layers=2:batch_size=1",
    batch_size=8,
    block_size=256,
    steps=10,  # timed rounds after a warmup round (the fastest counts)
    prompt_len=32,  # decode: prompt tokens per row
    decode_tokens=64,  # decode: new tokens per generate() call, no early stop
    serve_requests=32,  # serve: completions per measurement, prompts of 16-64 tokens
    serve_tokens=32,  # serve: new tokens per completion, no early stop
    threads=0,  # torch threads, 0 = torch's default
    seed=0,
    prepare_mb=32,  # prepare: MB of generated English/Chinese text
    prepare_vocab=4096,  # prepare: vocab of the BPE tokenizer trained on a sample of it
    workers=0,  # prepare: worker processes and tiktoken threads, 0 = one per core
)

# -----------------------------------------------------------------------------
# helpers


def timed(fn, steps, warmup=2):
    """Seconds per call of fn, median of `steps` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(n_bytes=256 * 2**20):
    """Measured bytes/s of a large tensor copy (read + write): the memory-bandwidth bound of decoding."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * n_bytes / timed(lambda: dst.copy_(src), steps=5)


def hf_model_like(model):
    """The transformers model with our weights, via save_pretrained -> AutoModelForCausalLM, or None."""
    try:
        import tempfile

        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    return hf


def table(rows, header):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


# -----------------------------------------------------------------------------
# train: tokens/s and MFU of forward+backward and of a whole step (with AdamW), ours vs transformers


def fastest(calls, rounds):
    """{name: seconds}, the fastest of `rounds` calls of each, interleaved after one warmup round: on a shared
    machine other processes land in many runs, and interleaving spreads them over all implementations."""
    best = {}
    for r in range(rounds + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if r:
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return best


def parse_shape(spec):
    """'configs/astrai_1b.py:n_layers=2:batch_size=1' -> (ModelConfig, {batch_size, block_size} given)."""
    path, *pairs = spec.split(":")
    extra = {k: int(v) for k, _, v in (p.partition("=") for p in pairs) if k in ("batch_size", "block_size")}
    overrides = ["--" + p for p in pairs if p.partition("=")[0] not in extra]
    return ModelConfig.from_file(path, overrides), extra


def bench_train(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"== train: tokens/s and MFU, same weights, float32 on {device}; fwd+bwd = forward, cross-entropy, backward; "
          "step = that plus AdamW")
    peak = measure_peak_flops(device)
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s (MFU's denominator)")
    rows = []
    for spec in args.train_shapes.split(","):
        torch.manual_seed(args.seed)
        config, extra = parse_shape(spec)
        B = extra.get("batch_size", args.batch_size)
        T = min(extra.get("block_size", args.block_size), config.max_len)
        model = Transformer(config).to(device)
        x = torch.randint(0, config.vocab_size, (B, T), device=device)
        hf = hf_model_like(model)
        impls = {"model.py": (model, lambda: model(x))}
        if hf is not None:
            hf = hf.to(device)
            impls["transformers"] = (hf, lambda: hf(x).logits.float())
        calls = {}
        for name, (m, forward) in impls.items():
            opt = torch.optim.AdamW(m.parameters(), lr=1e-5)

            def fwd_bwd(forward=forward, m=m):
                logits = forward()
                torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), x.view(-1)).backward()
                m.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()

            def step(forward=forward, opt=opt):
                logits = forward()
                torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), x.view(-1)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()

            calls[name, "fwd+bwd"], calls[name, "step"] = fwd_bwd, step
        best = fastest(calls, args.steps)
        flops = model.flops_per_token(T) * B * T
        for name in impls:
            t, t_step = best[name, "fwd+bwd"], best[name, "step"]
            ratio = f"{best['transformers', 'fwd+bwd'] / t:.2f}x" if hf is not None and name == "model.py" else ""
            rows.append([spec, f"{config.n_layers}x{config.dim}", f"{model.num_params() / 1e6:,.1f}M", f"{B}x{T}",
                         name, f"{B * T / t:,.0f}", f"{flops / t / peak:.1%}", ratio, f"{B * T / t_step:,.0f}",
                         f"{flops / t_step / peak:.1%}"])
        del model, hf, impls, calls
    table(rows, ["shape", "layers x dim", "params", "batch", "impl", "fwd+bwd tok/s", "MFU", "ours/theirs",
                 "step tok/s", "step MFU"])


# -----------------------------------------------------------------------------
# decode: generate() tokens/s vs transformers' generate (sample.py's section)


def bench_decode(args):
    from sample import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("== decode: greedy generate() vs transformers' generate, KV cache on both, same weights, float32 on", device)
    torch.manual_seed(args.seed)
    config = ModelConfig.from_file(args.preset)
    model = Transformer(config).to(device).eval()
    hf = hf_model_like(model)
    if hf is not None:
        hf = hf.to(device).eval()
        hf.generation_config.eos_token_id = None  # a fixed number of new tokens on both sides
        hf.generation_config.pad_token_id = 0
    P, N, steps = args.prompt_len, args.decode_tokens, args.steps

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def ours(prompts, n):
        generate(model, prompts.tolist(), n, temperature=0.0)

    def theirs(prompts, n):
        with torch.no_grad():
            hf.generate(prompts, do_sample=False, max_new_tokens=n)
        sync()

    impls = [("sample.generate", ours)] + ([("transformers", theirs)] if hf is not None else [])
    rows, ours_tokens_per_s = [], {}
    for B in (1, 8):
        prompts = torch.randint(0, config.vocab_size, (B, P), device=device)
        # decode alone: N new tokens minus the prefill and first token that 1 new token costs (fastest of
        # interleaved rounds: the difference of two medians can even come out negative on a shared machine)
        best = fastest({(name, n): lambda fn=fn, n=n: fn(prompts, n) for name, fn in impls for n in (N, 1)}, steps)
        for name, _ in impls:
            seconds = best[name, N] - best[name, 1]
            tokens_per_s = B * (N - 1) / seconds
            rows.append([B, name, f"{tokens_per_s:,.0f}", f"{seconds / (N - 1) * 1e3:.2f}", ""])
            if name == "sample.generate":
                ours_tokens_per_s[B] = tokens_per_s
            else:
                rows[-2][4] = f"{ours_tokens_per_s[B] / tokens_per_s:.2f}x"
    print(f"preset {args.preset} ({model.num_params() / 1e6:.1f}M params), prompts of {P} tokens, {N} new tokens")
    table(rows, ["batch", "impl", "decode tokens/s", "ms/step", "ours/theirs"])

    # batch 1 reads every weight once per token (the output head even when tied; embedding rows are negligible)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not config.tie_weight:
        weight_bytes -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    if device == "cuda":
        src = torch.empty(64 * 2**20, device=device)
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() * 4 / timed(lambda: (dst.copy_(src), sync()), steps=5)
    else:
        bandwidth = copy_bandwidth()
    bound = bandwidth / weight_bytes
    print(f"batch-1 memory-bandwidth bound: {weight_bytes / 1e6:.1f} MB of weights / {bandwidth / 1e9:.1f} GB/s copy "
          f"= {bound:,.0f} tokens/s; generate() reaches {ours_tokens_per_s[1] / bound:.1%} of it")


# -----------------------------------------------------------------------------
# serve: engine throughput under concurrent clients (serve.py's section)


def served(model, tokenizer, prompts, n_tokens, max_batch, clients):
    """Output tokens/s of `clients` HTTP clients working through `prompts` (greedy completions of n_tokens)
    against a fresh serve.py engine of max_batch rows; each client sends its next request when answered."""
    import http.client
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sample import Engine
    from serve import EngineLoop, make_server

    loop = EngineLoop(Engine(model, max_batch), tokenizer, max_waiting=len(prompts)).start()
    server = make_server(loop, port=0, log_requests=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    todo, lock = list(prompts), threading.Lock()

    def client(_):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=600)
        tokens = 0
        while True:
            with lock:
                if not todo:
                    return tokens
                prompt = todo.pop()
            body = json.dumps({"prompt": prompt, "max_tokens": n_tokens, "temperature": 0})
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            tokens += json.loads(conn.getresponse().read())["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    seconds = time.perf_counter() - t0
    server.shutdown()
    server.server_close()
    loop.stop()
    return tokens / seconds


def bench_serve(args):
    """Output tokens/s of serve.py behind its HTTP server with 1, 4 and 16 concurrent clients, against the same
    engine serving one request at a time (max_batch=1) and transformers' continuous batching (generate_batch)
    on the same weights and prompts."""
    import logging
    import random

    from tokenizer import train_tokenizer

    n_requests, n_tokens = args.serve_requests, args.serve_tokens
    threads = torch.get_num_threads()
    if not args.threads:  # a tiny model gains nothing from intra-op threads; the HTTP threads need a core
        torch.set_num_threads(1)
    print(f"== serve: output tokens/s, {n_requests} greedy completions of {n_tokens} tokens (no stop token), "
          f"prompts of 16-64 tokens, cpu, {torch.get_num_threads()} torch thread(s)")
    torch.manual_seed(args.seed)
    config = ModelConfig.from_file(args.preset)
    model = Transformer(config).eval()
    rng = random.Random(args.seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    tokenizer = train_tokenizer([" ".join(rng.choice(words) for _ in range(40000))], config.vocab_size, progress=False)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(rng.randint(16, 64))] for _ in range(n_requests)]
    served(model, tokenizer, prompts[:8], n_tokens, 16, 4)  # warm up
    hf = hf_model_like(model)
    if hf is not None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # psutil warnings on CPU
        generation_config = GenerationConfig(max_new_tokens=n_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)

        def theirs(batch, requests=prompts):
            t0 = time.perf_counter()
            out = hf.generate_batch(requests, generation_config=generation_config, progress_bar=False, warmup=False,
                                    continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=batch))
            return sum(len(o.generated_tokens) for o in out.values()) / (time.perf_counter() - t0)

        theirs(4, prompts[:4])  # warm up: the first call pays one-time setup
    rows = []
    for clients in (1, 4, 16):
        batched = served(model, tokenizer, prompts, n_tokens, 16, clients)
        one_at_a_time = served(model, tokenizer, prompts, n_tokens, 1, clients)
        row = [clients, f"{batched:,.0f}", f"{one_at_a_time:,.0f}", f"{batched / one_at_a_time:.2f}x"]
        if hf is not None:
            hf_rate = theirs(clients)
            row += [f"{hf_rate:,.0f}", f"{batched / hf_rate:.2f}x"]
        rows.append(row)
    print(f"preset {args.preset} ({model.num_params() / 1e6:.1f}M params); transformers runs generate_batch "
          f"with max_requests_per_batch = clients, on all {n_requests} prompts at once")
    header = ["clients", "serve.py max_batch=16", "max_batch=1", "ratio"]
    table(rows, header + (["transformers generate_batch", "ours/theirs"] if hf is not None else []))
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# prepare: data.py prepare's MB/s against tiktoken's own encode_ordinary_batch on the same text and cores


def bench_corpus(rng, n_bytes):
    """Documents of Zipf-distributed English-like words and Chinese characters with numbers and punctuation,
    separated by blank lines: about n_bytes of UTF-8."""
    latin = [" " + "".join(rng.choices("etaoinshrdlcumwfgypbvkjxqz", k=rng.randint(1, 10))) for _ in range(20000)]
    hanzi = ["".join(chr(rng.randint(0x4E00, 0x6FFF)) for _ in range(rng.randint(1, 3))) for _ in range(5000)]
    pieces = latin + hanzi + [f" {n}" for n in range(1000)] + [",", ".", "。", "，", "!", "?", "\n"]
    weights = [1 / (rank + 1) for rank in range(len(pieces))]
    rng.shuffle(weights)  # Zipf over all pieces, in no particular order
    documents, size = [], 0
    while size < n_bytes:
        document = "".join(rng.choices(pieces, weights, k=rng.randint(50, 1000))).strip()
        documents.append(document)
        size += len(document.encode()) + 2
    return documents


def bench_prepare(args):
    import os
    import random
    import tempfile

    from data import default_workers, prepare
    from tokenizer import train_tokenizer

    workers = args.workers or default_workers()
    print(f"== prepare: data.py prepare --stage=seq --workers={workers} (read, tokenize, write HDF5) vs tiktoken's "
          f"encode_ordinary_batch(num_threads={workers}) on the same documents held in memory, same tokenizer")
    rng = random.Random(args.seed)
    documents = bench_corpus(rng, args.prepare_mb * 10**6)
    text = "\n\n".join(documents) + "\n"
    n_bytes = len(text.encode())
    tokenizer = train_tokenizer(rng.sample(documents, min(len(documents), 1000)), args.prepare_vocab, progress=False)
    encoding = tokenizer._tiktoken  # the tiktoken Encoding our Tokenizer.encode runs (rank == id for ours)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(f"{d}/tokenizer")
        with open(f"{d}/corpus.txt", "w", encoding="utf-8") as f:
            f.write(text)
        del text
        calls = {
            "prepare": lambda: prepare("seq", [f"{d}/corpus.txt"], f"{d}/tokenizer", f"{d}/out.h5", val_fraction=0,
                                       progress=False, workers=workers),
            "prepare 1 worker": lambda: prepare("seq", [f"{d}/corpus.txt"], f"{d}/tokenizer", f"{d}/out.h5",
                                                val_fraction=0, progress=False, workers=1),
            "tiktoken": lambda: encoding.encode_ordinary_batch(documents, num_threads=workers),
            "tiktoken 1 thread": lambda: encoding.encode_ordinary_batch(documents, num_threads=1),
        }
        wall, cpu = {}, {}  # the least of interleaved rounds after a warmup; cpu: this process and its workers
        for r in range(max(1, min(args.steps, 3)) + 1):
            for name, call in calls.items():
                t0, times0 = time.perf_counter(), os.times()
                call()
                seconds, times = time.perf_counter() - t0, os.times()
                if r:
                    wall[name] = min(wall.get(name, float("inf")), seconds)
                    cpu[name] = min(cpu.get(name, float("inf")), sum(times[:4]) - sum(times0[:4]))
        size = os.path.getsize(f"{d}/out.h5")
    rows = [[name, f"{n_bytes / 1e6 / wall[name]:.2f}", f"{wall[theirs] / wall[name]:.2f}x", f"{cpu[name]:.2f}",
             f"{cpu[theirs] / cpu[name]:.2f}x"]
            for name, theirs in (("prepare", "tiktoken"), ("tiktoken", "tiktoken"), ("prepare 1 worker",
                                 "tiktoken 1 thread"), ("tiktoken 1 thread", "tiktoken 1 thread"))]
    print(f"{n_bytes / 1e6:.1f} MB in {len(documents):,} documents, vocab {tokenizer.vocab_size}, "
          f"{size / 1e6:.1f} MB of HDF5; the fastest of interleaved rounds. CPU seconds (this process and its "
          "workers) tell more than MB/s where other programs share the cores")
    table(rows, ["impl", "MB/s", "vs tiktoken (same cores)", "CPU s", "tiktoken's CPU / ours"])


if __name__ == "__main__":
    args = load_settings(DEFAULTS, sys.argv[1:], "bench.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = {"train": bench_train, "decode": bench_decode, "serve": bench_serve, "prepare": bench_prepare}
    for name in args.only.split(","):
        if name not in sections:
            sys.exit(f"bench.py: unknown section {name!r}; choose from {', '.join(sections)}")
        sections[name](args)
        print()
