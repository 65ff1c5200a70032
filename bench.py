"""
Benchmarks, side by side with Hugging Face transformers (when installed) in one run, reported as ratios.

    python bench.py                       # everything
    python bench.py --only=train,decode   # some sections: train, train_memory, decode, serve, prepare, gguf_load,
                                          # hardware, serve_memory, loglikelihood, structured (not in the
                                          # default run)
    python bench.py --only=decode,serve --llamacpp=DIR   # llama.cpp rows too (DIR: README, Benchmarks)
    python bench.py --only=moe            # a mixture-of-experts model vs the dense one of equal active parameters

Speed claims live here, never in timed unit tests.
"""
import os
import sys
import time

import torch

from model import CrossEntropy, ModelConfig, Transformer
from settings import DTYPES, load_settings
from train import measure_peak_flops

DEFAULTS = dict(
    only="train,decode,serve,prepare",  # comma-separated sections
    # model shapes for the decode and serve sections, each a preset with optional :key=value overrides; the tiny
    # preset takes its vocab from the tokenizer in train.py: here the demo tokenizer's 2,048
    presets="configs/tiny.py:vocab_size=2048,configs/bench82m.py",
    dtypes="auto",  # decode/serve: float32,bfloat16,int8,int4; auto = all but bfloat16, bfloat16 too where native
    batches="1,8,16",  # decode batch sizes
    compile=True,  # ours with the compiled decode step (serve.py's default, --compile=auto); false = eager
    weight_layout="auto",  # decode: ours with float weights laid out as sample.py/serve.py would for each batch
    # size (quant.pick_layout); plain, transposed or packed for all
    llamacpp="",  # DIR of a llama.cpp source tree with its tools built in build/bin (README: Benchmarks)
    # train section: model shapes, each a preset with optional :key=value overrides of its config, batch_size
    # or block_size; the 1B preset at 2 of its 24 layers keeps a CPU step to seconds (per-layer cost is the same)
    train_shapes="configs/tiny.py:vocab_size=2048,configs/astrai_1b.py:n_layers=2:batch_size=1,"
                 "configs/astrai_1b_mla.py:n_layers=2:batch_size=1",
    batch_size=8,
    block_size=256,
    steps=10,  # timed rounds after a warmup round (the fastest counts)
    prompt_len=32,  # decode: prompt tokens per row
    decode_tokens=64,  # decode: new tokens per generate() call, no early stop
    serve_requests=32,  # serve: completions per measurement, prompts of 16-64 tokens
    serve_tokens=32,  # serve: new tokens per completion, no early stop
    # train_memory section: peak memory and tokens/s of one training step (forward, loss, backward) as train.py
    # runs it vs transformers' model(x, labels=x).loss, each in its own process, at the 1B preset's vocab and
    # block size with 2 of its 24 layers
    memory_shape="configs/astrai_1b.py:n_layers=2:batch_size=1:block_size=2048",
    memory_steps=2,  # timed steps after one warmup step
    gguf_preset="configs/smollm2_135m.py",  # gguf_load: the model shape quantized to Q4_K_M (needs --llamacpp)
    hardware_presets="configs/smollm2_135m.py,configs/qwen3_0_6b.py,configs/llama3_2_1b.py",  # hardware: shapes
    hardware_dtypes="float32,bfloat16,int8",  # hardware: dtypes measured for each shape
    serve_memory_preset="configs/qwen3_0_6b.py",  # serve_memory: the model shape both servers hold
    memory_prompt_len=2000,  # serve_memory: tokens of each of the 16 clients' prompts
    threads=0,  # torch threads, 0 = torch's default
    seed=0,
    prepare_mb=32,  # prepare: MB of generated English/Chinese text
    prepare_vocab=4096,  # prepare: vocab of the BPE tokenizer trained on a sample of it
    workers=0,  # prepare: worker processes and tiktoken threads, 0 = one per core
    loglikelihood_docs=64,  # loglikelihood: 4-choice questions (4 requests each) of 48-96 token contexts
    # moe: pairs of shapes, a MoE one then the dense one of its active parameters
    moe_shapes="configs/tiny_moe.py:vocab_size=2048,configs/tiny.py:vocab_size=2048:use_qk_norm=true",
)

# -----------------------------------------------------------------------------
# helpers


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
# train_memory: peak resident memory of a training step, ours vs transformers, a process each


def memory_status(key):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def train_step_in_child(impl, spec, steps, threads, queue):
    """In a fresh process: one training step's peak RSS (the high-water mark reset just before it, after a
    warmup step) and the fastest of `steps` more. Random weights: memory and speed do not depend on them."""
    if threads:
        torch.set_num_threads(threads)
    config, extra = parse_shape(spec)
    B, T = extra.get("batch_size", 1), min(extra.get("block_size", 2048), config.max_len)
    torch.manual_seed(0)
    x = torch.randint(0, config.vocab_size, (B, T))
    if impl == "model.py":
        model = Transformer(config)
        targets = x.roll(-1, 1)
        targets[:, -1] = -100

        def step():  # what strategies.NextToken does: the chunked cross-entropy, a mean over scored tokens
            (model(x, CrossEntropy(targets)) / (targets != -100).sum()).backward()
    else:
        import transformers

        from hf import config_to_hf

        hf = config_to_hf(config)
        hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                              dtype=torch.float32)

        def step():  # transformers shifts the labels itself
            model(x, labels=x).loss.backward()
    model.train()
    step()
    model.zero_grad(set_to_none=True)
    before = memory_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    peak = memory_status("VmHWM")
    model.zero_grad(set_to_none=True)
    seconds = float("inf")
    for _ in range(steps):  # the fastest: other programs on the machine only ever slow a step down
        t0 = time.perf_counter()
        step()
        seconds = min(seconds, time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    queue.put({"before": before, "peak": peak, "tokens_per_s": B * T / seconds, "batch": f"{B}x{T}",
               "params": sum(p.numel() for p in model.parameters())})


def in_children(target, impls, *args):
    """{impl: what target(impl, *args, queue) put}, each implementation in a fresh process; None if one failed."""
    import multiprocessing

    context, results = multiprocessing.get_context("spawn"), {}
    for impl in impls:
        queue = context.Queue()
        child = context.Process(target=target, args=(impl, *args, queue))
        child.start()
        child.join()
        if child.exitcode != 0:
            print(f"{impl}: the child process failed (exit code {child.exitcode})")
            return None
        results[impl] = queue.get()
    return results


def bench_train_memory(args):
    print(f"== train_memory: one training step (forward, loss, backward; float32 on CPU) at {args.memory_shape}, "
          "each implementation in a fresh process; peak = the process's peak RSS during the step (weights, "
          "gradients, activations, logits), step = that peak minus the RSS just before the step")
    results = in_children(train_step_in_child, ("model.py", "transformers"), args.memory_shape, args.memory_steps,
                          args.threads)
    if results is None:
        return
    rows = [[impl, r["batch"], f"{r['params'] / 1e6:,.1f}M", f"{r['before'] / 2**30:.2f}", f"{r['peak'] / 2**30:.2f}",
             f"{(r['peak'] - r['before']) / 2**30:.2f}", f"{r['tokens_per_s']:,.0f}"] for impl, r in results.items()]
    ours, theirs = results["model.py"], results["transformers"]
    rows.append(["ours/theirs", "", "", "", f"{ours['peak'] / theirs['peak']:.2f}x",
                 f"{(ours['peak'] - ours['before']) / (theirs['peak'] - theirs['before']):.2f}x",
                 f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"])
    table(rows, ["impl", "batch", "params", "RSS before GiB", "peak GiB", "step GiB", "tokens/s"])


# -----------------------------------------------------------------------------
# gguf_load: a quantized .gguf file as people download it, loaded by gguf_in.py vs transformers, a process each


def load_in_child(impl, path, threads, queue):
    """In a fresh process: seconds and peak RSS to get a float32 model and its tokenizer from the .gguf file."""

    if threads:
        torch.set_num_threads(threads)
    before, t0 = memory_status("VmRSS"), time.perf_counter()
    if impl == "gguf_in.py":
        from tokenizer import Tokenizer

        model, tokenizer = Transformer.from_pretrained(path), Tokenizer.load(path)
    else:
        import transformers

        where, name = os.path.dirname(path), os.path.basename(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    queue.put({"seconds": time.perf_counter() - t0, "before": before, "peak": memory_status("VmHWM"),
               "params": sum(p.numel() for p in model.parameters()), "tokens": len(tokenizer)
               if impl != "gguf_in.py" else tokenizer.vocab_size})


def bench_gguf_load(args):
    import subprocess
    import tempfile

    quantize = os.path.join(args.llamacpp, "build", "bin", "llama-quantize")
    if not os.path.isfile(quantize):
        print("== gguf_load: skipped (needs --llamacpp=DIR with build/bin/llama-quantize to make the Q4_K_M file)")
        return
    model, tokenizer = bench_model(args.gguf_preset, args.seed)
    with tempfile.TemporaryDirectory() as directory:
        f32 = gguf_file(model, tokenizer, "float32", directory)
        del model
        path = os.path.join(directory, "model-q4_k_m.gguf")
        subprocess.run([quantize, f32, path, "Q4_K_M"], check=True, capture_output=True)
        size = os.path.getsize(path) / 1e6
        print(f"== gguf_load: {args.gguf_preset} (random weights) as a Q4_K_M file of {size:.0f} MB made by "
              "llama-quantize, loaded to a float32 model and its tokenizer, each implementation in a fresh process; "
              "peak = the process's peak RSS (Python and torch included)")
        results = in_children(load_in_child, ("gguf_in.py", "transformers"), path, args.threads)
        if results is None:
            return
    rows = [[impl, f"{r['params'] / 1e6:,.1f}M", f"{r['seconds']:.2f}", f"{r['before'] / 2**30:.2f}",
             f"{r['peak'] / 2**30:.2f}"] for impl, r in results.items()]
    ours, theirs = results["gguf_in.py"], results["transformers"]
    rows.append(["ours/theirs", "", f"{ours['seconds'] / theirs['seconds']:.2f}x", "",
                 f"{ours['peak'] / theirs['peak']:.2f}x"])
    table(rows, ["impl", "params", "load s", "RSS before GiB", "peak GiB"])


# -----------------------------------------------------------------------------
# hardware: what each published model shape needs and decodes at, per dtype


def hardware_in_child(dtype, spec, tokens, threads, queue):
    """In a fresh process: a random model of the preset in dtype, the resident memory it added, and its greedy
    decode tokens/s at batch 1 after a 32-token prompt (eager, sample.py's default)."""
    from kv_cache import BLOCK, KVCache
    from model import QUANTIZED, release_freed_memory
    from quant import quantize
    from sample import generate

    if threads:
        torch.set_num_threads(threads)
    config = ModelConfig.from_file(spec)
    before = memory_status("VmRSS")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    model = quantize(model, dtype) if dtype in QUANTIZED else model.to(DTYPES[dtype])
    release_freed_memory()  # the float32 weights it was made from
    weights = memory_status("VmRSS") - before
    prompt, seconds = list(range(32)), float("inf")
    for _ in range(2):  # the first call warms the allocator and the kernels up
        t0 = time.perf_counter()
        generate(model, [prompt], tokens, temperature=0.0)
        seconds = min(seconds, time.perf_counter() - t0)
    kv = KVCache.block_bytes(config, model.embed_tokens.weight.dtype) / BLOCK  # bytes per token of context
    queue.put({"weights": weights, "kv": kv, "tokens_per_s": tokens / seconds})


def bench_hardware(args):
    print(f"== hardware: random models of published shapes; weights = the resident memory the model added, KV = the "
          f"cache for 2k, 8k and 32k tokens of context (kv_cache.py's bytes per token); decode = greedy tokens/s at "
          f"batch 1 after a 32-token prompt, {args.decode_tokens} new tokens, eager, {torch.get_num_threads()} "
          "threads; each in a fresh process")
    rows = []
    for spec in args.hardware_presets.split(","):
        results = in_children(hardware_in_child, args.hardware_dtypes.split(","), spec, args.decode_tokens,
                              args.threads)
        if results is None:
            return
        for dtype, r in results.items():
            rows.append([spec, dtype, f"{r['weights'] / 2**30:.2f}",
                         *[f"{r['kv'] * n / 2**30:.2f}" for n in (2048, 8192, 32768)], f"{r['tokens_per_s']:.1f}"])
    table(rows, ["preset", "dtype", "weights GiB", "KV 2k GiB", "KV 8k GiB", "KV 32k GiB", "decode tok/s"])


# -----------------------------------------------------------------------------
# decode and serve: the same random weights in sample.py's engine, transformers and llama.cpp


def bench_model(preset, seed):
    """A random model of the preset's shape (float32) and a BPE tokenizer of its vocab_size trained on random
    words: llama.cpp wants one in the GGUF and serve.py one to answer with; the prompts are random ids anyway."""
    import random

    from tokenizer import train_tokenizer

    torch.manual_seed(seed)
    config = parse_shape(preset)[0]
    model = Transformer(config).eval()
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(6000)]
    text = " ".join(rng.choice(words) for _ in range(60000))
    return model, train_tokenizer([text], config.vocab_size, progress=False)


def in_dtype(model, dtype, layout="plain"):
    """The model as sample.load would give it in dtype (float32, bfloat16, int8 or int4) and layout (quant.py)."""
    import copy

    from model import QUANTIZED
    from quant import quantize, relayout

    if dtype == "float32" and layout == "plain":
        return model
    if dtype in QUANTIZED:
        return quantize(copy.deepcopy(model), dtype)
    return relayout(copy.deepcopy(model).to(DTYPES[dtype]), layout)


def cpu_features():
    """The CPU's model name and which of the features our kernels and llama.cpp's pick between it has (Linux)."""
    flags, name = set(), "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    wanted = {"AVX2": "avx2", "AVX512": "avx512f", "AVX512-BF16": "avx512_bf16", "AMX-BF16": "amx_bf16"}
    return name, [label for label, flag in wanted.items() if flag in flags]


def dtypes(args):
    """--dtypes, with auto = float32, int8 and int4, plus bfloat16 where this CPU computes it natively."""
    if args.dtypes != "auto":
        return args.dtypes.split(",")
    native = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if torch.cuda.is_available():
        print("(int4 skipped: torch's int4 kernel here is the CPU one)")
        return ["float32", "bfloat16", "int8"]
    if not native:
        print("(bfloat16 skipped: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where torch's bfloat16 "
              "matmuls are ~20x slower than float32; --dtypes=float32,bfloat16,int8,int4 runs it anyway)")
    return ["float32", "bfloat16", "int8", "int4"] if native else ["float32", "int8", "int4"]


# the GGUF type closest to each dtype: export.py writes the first four, llama-quantize makes q4_0 from f32
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "float16": "f16", "int4": "q4_0"}


def gguf_file(model, tokenizer, dtype, directory, llamacpp=""):
    """The model exported by export.py to GGUF in the type closest to dtype (int8: llama.cpp's q8_0; int4: q4_0,
    made from the f32 file by llamacpp's build/bin/llama-quantize, as llama.cpp's users make theirs)."""
    import subprocess

    from export import export

    model_dir, path = os.path.join(directory, "model"), os.path.join(directory, f"model-{dtype}.gguf")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        model.save_pretrained(model_dir)
        tokenizer.save(model_dir)
    if os.path.exists(path):
        return path
    if dtype == "int4":
        quantize = os.path.join(llamacpp, "build", "bin", "llama-quantize")
        if not os.path.isfile(quantize):
            raise FileNotFoundError(f"{quantize}: needed to make a q4_0 GGUF (--llamacpp=DIR)")
        f32 = gguf_file(model, tokenizer, "float32", directory)
        subprocess.run([quantize, f32, path, "Q4_0"], check=True, capture_output=True)
    else:
        export(model_dir, path, GGUF_TYPES[dtype])
    return path


def llamacpp_decode(llamacpp, gguf, batches, prompt_len, n_tokens, threads):
    """{batch: decode tokens/s} from llama-batched-bench (its tg speed: batch x new tokens / their time)."""
    import json
    import signal
    import subprocess

    command = [os.path.join(llamacpp, "build", "bin", "llama-batched-bench"), "-m", gguf, "-npp", str(prompt_len),
               "-ntg", str(n_tokens), "-npl", ",".join(map(str, batches)), "-t", str(threads),
               "-c", str(max(batches) * (prompt_len + n_tokens)), "--output-format", "jsonl"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if out.returncode == -signal.SIGILL:  # llama.cpp's AMX int8 kernel runs tilezero before any ldtilecfg
        print(f"(llama.cpp died of SIGILL on {os.path.basename(gguf)}, in its AMX kernels on this CPU: measured "
              "again with --no-repack, which turns its AMX and repacked-weight kernels off)")
        out = subprocess.run(command + ["--no-repack"], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit code {out.returncode}):\n{out.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out.stdout + out.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    return {r["pl"]: r["speed_tg"] for r in rows}


def bench_decode(args):
    """Decode tokens/s (new tokens after the first, which pays the prefill) at batch 1, 8 and 16: generate() vs
    transformers' generate (float32) vs llama-batched-bench on the same weights as GGUF."""
    import tempfile

    from quant import pick_layout
    from sample import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    P, N, batches, threads = args.prompt_len, args.decode_tokens, [int(b) for b in args.batches.split(",")], \
        torch.get_num_threads()
    print(f"== decode: greedy, no stop token, prompts of {P} tokens, {N} new tokens, {device}, {threads} threads; "
          f"ours {'compiled' if args.compile else 'eager'}; weights GB/s = the bytes a step reads (all weights but "
          f"the embedding table) x steps/s; memory read bandwidth (torch.sum over 512 MB): "
          f"{memory_bandwidth(device) / 1e9:.1f} GB/s")
    rows = []
    for preset in args.presets.split(","):
        base, tokenizer = bench_model(preset, args.seed)
        hf = hf_model_like(base)
        if hf is not None:
            hf.generation_config.eos_token_id = None  # a fixed number of new tokens on both sides
            hf.generation_config.pad_token_id = 0
        for dtype in dtypes(args):
            theirs, model, laid_out = {}, None, None
            if args.llamacpp and device == "cpu":
                with tempfile.TemporaryDirectory() as d:
                    gguf = gguf_file(base, tokenizer, dtype, d, args.llamacpp)
                    theirs = llamacpp_decode(args.llamacpp, gguf, batches, P, N, threads)
            for B in batches:  # the weights laid out as sample.py/serve.py would for B rows (--weight_layout)
                layout = pick_layout(args.weight_layout, device, dtype, B)
                if layout != laid_out:  # one model of the dtype at a time
                    model, laid_out = in_dtype(base, dtype, layout).to(device), layout
                    laid = "+".join(sorted({m.layout for m in model.modules() if hasattr(m, "layout")})) or "plain"
                impls = {"ours": lambda p, n: generate(model, p.tolist(), n, temperature=0.0, compile=args.compile)}
                if hf is not None and dtype == "float32":
                    impls["transformers"] = lambda p, n: hf.generate(p, do_sample=False, max_new_tokens=n)
                prompts = torch.randint(0, base.config.vocab_size, (B, P), device=device)
                # decode alone: N new tokens minus the prefill and first token that 1 new token costs
                with torch.no_grad():
                    best = fastest({(name, n): lambda fn=fn, n=n: fn(prompts, n) for name, fn in impls.items()
                                    for n in (N, 1)}, args.steps)
                speed = {name: B * (N - 1) / (best[name, N] - best[name, 1]) for name in impls}
                if B in theirs:
                    speed[f"llama.cpp {GGUF_TYPES[dtype]}"] = theirs[B]
                for name, tokens_per_s in speed.items():
                    ratio = "" if name == "ours" else f"{speed['ours'] / tokens_per_s:.2f}x"
                    rate = f"{step_bytes(model) * tokens_per_s / B / 1e9:.1f}" if name == "ours" else ""
                    rows.append([preset, dtype, B, name, laid if name == "ours" else "", f"{tokens_per_s:,.0f}",
                                 rate, ratio])
        del base, hf
    table(rows, ["preset", "dtype", "batch", "impl", "layout", "decode tokens/s", "weights GB/s", "ours/theirs"])


def step_bytes(model):
    """The weight bytes one decode step reads: every parameter and buffer but the embedding table (a step gathers
    a row of it), which a tied head reads whole."""
    tied = model.lm_head.weight is model.embed_tokens.weight
    tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
    return sum(t.nbytes for name, t in tensors.items() if name != "embed_tokens.weight" or tied)


def memory_bandwidth(device, mb=512):
    """Bytes/s torch.sum reads from a tensor much larger than the caches, with this process's threads (the best of
    5): the machine's memory read bandwidth, a GEMV's ceiling."""
    x = torch.ones(mb * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


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

def bench_moe(args):
    """Train-step (with AdamW) and decode tokens/s of each MoE shape of --moe_shapes beside its dense pair, one run."""
    from sample import generate

    shapes, P, N = args.moe_shapes.split(","), args.prompt_len, args.decode_tokens
    rows, whats = [], ["train", *map(int, args.batches.split(","))]
    for pair in zip(shapes[::2], shapes[1::2]):
        calls, speeds = {}, {}
        for spec in pair:
            torch.manual_seed(args.seed)
            m = Transformer(parse_shape(spec)[0])
            x, opt = torch.randint(0, 99, (args.batch_size, args.block_size)), torch.optim.AdamW(m.parameters())
            calls[spec, "train"] = lambda m=m, x=x, opt=opt: ((m(x, CrossEntropy(x)) / x.numel()).backward(),
                                                              opt.step(), opt.zero_grad())
            for B, n, p in [(B, n, torch.randint(0, 99, (B, P)).tolist()) for B in whats[1:] for n in (N, 1)]:
                calls[spec, B, n] = lambda m=m, p=p, n=n: generate(m, p, n, temperature=0.0, compile=args.compile)
        best = fastest(calls, args.steps)
        for what, spec in [(what, spec) for what in whats for spec in pair]:
            speeds[spec] = (args.batch_size * args.block_size / best[spec, what] if what == "train" else
                            what * (N - 1) / (best[spec, what, N] - best[spec, what, 1]))
            rows.append([spec, f"decode batch {what}" if what != "train" else "train step", f"{speeds[spec]:,.0f}",
                         f"{speeds[pair[0]] / speeds[spec]:.2f}x" if spec == pair[1] else ""])
    table(rows, ["shape", "what", "tokens/s", "moe/dense"])


if __name__ == "__main__":
    import bench_serve  # the serving sections: serve.py, lm-eval through it, structured decode

    args = load_settings(DEFAULTS, sys.argv[1:], "bench.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu, features = cpu_features()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; features: {', '.join(features) or 'none of AVX2/AVX512/AMX'}; "
          f"torch's oneDNN bfloat16: {'native' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'emulated'}\n")
    sections = {"train": bench_train, "train_memory": bench_train_memory, "decode": bench_decode,
                "prepare": bench_prepare, "gguf_load": bench_gguf_load, "hardware": bench_hardware, "moe": bench_moe,
                "serve": bench_serve.bench_serve, "serve_memory": bench_serve.bench_serve_memory,
                "loglikelihood": bench_serve.bench_loglikelihood, "structured": bench_serve.bench_structured}
    for name in args.only.split(","):
        if name not in sections:
            sys.exit(f"bench.py: unknown section {name!r}; choose from {', '.join(sections)}")
        sections[name](args)
        print()
