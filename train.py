"""
The training loop: one CPU/GPU, or many with torchrun (DDP, or FSDP2 with --parallel=fsdp).

    python train.py configs/demo.py
    python train.py configs/sft.py --init_from=out/demo/final --max_iters=200
    torchrun --nproc_per_node=4 train.py configs/pretrain.py

Settings: the defaults below, then config files (plain Python assignments) in order, then --key=value
overrides. An unknown key or a value of the wrong type is an error that names it.
Writes OUT_DIR/metrics.jsonl, OUT_DIR/loss.svg, OUT_DIR/ckpt-STEP/ and OUT_DIR/final/ (README.md).
"""
import glob
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from data import ResumableSampler, Tokenizer, load_dataset, parse_args
from model import ModelConfig, Transformer
from strategies import STRATEGIES

# -----------------------------------------------------------------------------
# settings
DEFAULTS = dict(
    # I/O
    out_dir="out",  # metrics, checkpoints and the final model go here
    data="data/demo/pretrain.h5",  # an .h5 from `data.py prepare`, or a directory of .h5 shards
    tokenizer="",  # tokenizer dir; default: the one in init_from or next to the data
    init_from="scratch",  # scratch | a MODELDIR (its config.json decides the architecture)
    model_config="configs/tiny.py",  # model preset, used with init_from=scratch only
    resume="",  # "auto": continue from the newest complete OUT_DIR/ckpt-*
    strategy="seq",  # seq | sft | dpo | grpo (strategies.py)
    # schedule of work
    max_iters=1000,  # optimizer steps
    eval_interval=200,  # steps between val evaluations (0 = only at the end)
    eval_iters=20,  # val batches per evaluation
    log_interval=10,  # steps between log lines
    ckpt_interval=500,  # steps between checkpoints (0 = only at the end)
    keep_checkpoints=2,  # the newest K ckpt-* directories are kept
    # batch: tokens per optimizer step = batch_size * block_size * grad_accum * world size
    batch_size=16,  # micro-batch per process
    block_size=256,  # tokens per row
    grad_accum=1,  # micro-batches per optimizer step
    # optimizer: AdamW, weight decay on matrices only
    lr=1e-3,
    min_lr=1e-4,  # floor of the cosine
    warmup_iters=100,
    lr_schedule="cosine",  # cosine | sgdr (cosine with warm restarts) | constant
    sgdr_cycle=500,  # first SGDR cycle length in steps
    sgdr_mult=2.0,  # each SGDR cycle is this much longer than the last
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 = off
    label_smoothing=0.0,
    # strategy settings (strategies.py)
    beta=0.1,  # dpo: strength of the implicit KL to the reference
    rpo_alpha=0.0,  # dpo: weight of the chosen replies' next-token loss added to DPO's (RPO; 0 = plain DPO)
    group_size=8,  # grpo: completions per prompt
    ppo_epochs=2,  # grpo: updates per rollout
    clip_eps=0.2,  # grpo: PPO ratio clip
    kl_coef=0.04,  # grpo: k3 KL to the reference
    sync_interval=0,  # grpo: copy the policy into the reference every N steps (0 = never)
    reward="exact_answer",  # grpo: built-in name or module:function(prompt, completion, record) -> float
    max_new_tokens=32,  # grpo: rollout length
    rollout_temperature=1.0,  # grpo: sampling temperature of rollouts
    # system
    device="auto",  # auto | cpu | cuda | cuda:N
    dtype="auto",  # auto (bfloat16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    compile=False,  # torch.compile the model
    grad_checkpointing=False,  # recompute activations in backward to save memory
    parallel="ddp",  # ddp | fsdp (with torchrun)
    seed=1337,
)


def load_config(argv):
    """DEFAULTS <- config files (argv entries ending in .py) <- --key=value overrides."""
    cfg = dict(DEFAULTS)
    files = [a for a in argv if not a.startswith("--")]
    for path in files:
        if not os.path.isfile(path):
            sys.exit(f"train.py: config file {path} not found")
        values = dict(cfg)
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), values)
        for key, value in values.items():
            if key.startswith("_") or (key in cfg and value is cfg[key]):
                continue
            if key not in DEFAULTS:
                sys.exit(f"train.py: {path}: unknown setting {key!r}")
            if not isinstance(value, type(DEFAULTS[key])) and not (type(value) is int and isinstance(DEFAULTS[key], float)):
                sys.exit(f"train.py: {path}: {key} = {value!r} should be a {type(DEFAULTS[key]).__name__}")
            cfg[key] = float(value) if isinstance(DEFAULTS[key], float) else value
    return parse_args(cfg, [a for a in argv if a.startswith("--")])


# -----------------------------------------------------------------------------
# small pieces of the loop


def learning_rate(step, cfg):
    if step < cfg["warmup_iters"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_iters"]
    if cfg["lr_schedule"] == "constant":
        return cfg["lr"]
    t = step - cfg["warmup_iters"]
    if cfg["lr_schedule"] == "sgdr":  # find where t falls in cycles of growing length
        cycle = cfg["sgdr_cycle"]
        while t >= cycle:
            t, cycle = t - cycle, cycle * cfg["sgdr_mult"]
        progress = t / cycle
    else:
        progress = min(t / max(1, cfg["max_iters"] - cfg["warmup_iters"]), 1.0)
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])


def make_optimizer(model, cfg, device_type):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), fused=device_type == "cuda")


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()[1].tolist()}
    state["numpy_pos"] = int(np.random.get_state()[2])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_loss_svg(path, train_points, val_points):
    """Train and val loss curves as a self-contained SVG (no plotting dependency)."""
    w, h, pad = 640, 360, 40
    points = train_points + val_points
    if len(points) < 2:
        return
    x_max = max(s for s, _ in points) or 1
    y_min, y_max = min(v for _, v in points), max(v for _, v in points)
    y_span = (y_max - y_min) or 1.0

    def poly(pts, color):
        xy = " ".join(f"{pad + s / x_max * (w - 2 * pad):.1f},{h - pad - (v - y_min) / y_span * (h - 2 * pad):.1f}" for s, v in pts)
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{xy}"/>'

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{pad}" y="{pad - 8}">{y_max:.3f}</text><text x="{pad}" y="{h - pad + 16}">{y_min:.3f}</text>',
           f'<text x="{w - pad}" y="{h - pad + 16}" text-anchor="end">step {x_max}</text>',
           poly(train_points, "#1f77b4"), poly(val_points, "#d62728"),
           f'<text x="{w - pad}" y="{pad}" text-anchor="end"><tspan fill="#1f77b4">train</tspan> <tspan fill="#d62728">val</tspan></text>',
           "</svg>"]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(svg))
    os.replace(path + ".tmp", path)


def find_tokenizer(cfg):
    candidates = [cfg["tokenizer"]] if cfg["tokenizer"] else []
    if cfg["init_from"] != "scratch":
        candidates.append(cfg["init_from"])
    data_dir = cfg["data"] if os.path.isdir(cfg["data"]) else os.path.dirname(cfg["data"])
    candidates += [os.path.join(data_dir, "tokenizer"), data_dir]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return Tokenizer.load(path)
    if cfg["tokenizer"]:
        sys.exit(f"train.py: --tokenizer={cfg['tokenizer']}: no tokenizer.json there")
    sys.exit(f"train.py: no tokenizer found (looked in {candidates}); pass --tokenizer=DIR")


def latest_checkpoint(out_dir):
    """Newest complete checkpoint; a checkpoint is complete once its temp dir was renamed to ckpt-STEP."""
    ckpts = [p for p in glob.glob(os.path.join(out_dir, "ckpt-*")) if p.rsplit("-", 1)[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.rsplit("-", 1)[-1])) if ckpts else None


# -----------------------------------------------------------------------------
# the loop


def train(cfg):
    # --- distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world_size = 0, 1
    if distributed:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    log = print if master else (lambda *a, **k: None)

    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    # --- strategy, data, tokenizer: check everything before any training starts
    if cfg["strategy"] not in STRATEGIES:
        sys.exit(f"train.py: unknown strategy {cfg['strategy']!r}; choose from {', '.join(STRATEGIES)}")
    strategy_cls = STRATEGIES[cfg["strategy"]]
    try:
        train_data = load_dataset(cfg["data"], "train", cfg["block_size"], stage=strategy_cls.data_stage)
        val_data = load_dataset(cfg["data"], "val", cfg["block_size"], stage=strategy_cls.data_stage)
    except (OSError, ValueError) as e:
        sys.exit(f"train.py: --data: {e}")
    tokenizer = find_tokenizer(cfg)
    if train_data.tokenizer_hash != tokenizer.hash:
        sys.exit(f"train.py: {cfg['data']} was prepared with a different tokenizer than the one in use "
                 f"(hash {train_data.tokenizer_hash[:12]} vs {tokenizer.hash[:12]}); prepare it again or pass --tokenizer")

    # --- model
    if cfg["init_from"] == "scratch":
        model = Transformer(ModelConfig.from_file(cfg["model_config"]))
    else:
        model = Transformer.from_pretrained(cfg["init_from"])
    if model.config.vocab_size < tokenizer.vocab_size:
        sys.exit(f"train.py: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                 f"{model.config.vocab_size}; the model's vocab must be at least the tokenizer's")
    if cfg["block_size"] > model.config.max_len:
        sys.exit(f"train.py: block_size={cfg['block_size']} exceeds the model's max_len={model.config.max_len}")
    model.to(device)
    model.grad_checkpointing = cfg["grad_checkpointing"]
    raw_model = model
    try:
        strategy = strategy_cls(cfg, raw_model)
    except ValueError as e:
        sys.exit(f"train.py: --strategy={cfg['strategy']}: {e}")
    if cfg["compile"]:
        model = torch.compile(model)
    if distributed and cfg["parallel"] == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in raw_model.layers:
            fully_shard(block)
        fully_shard(raw_model)
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device] if device_type == "cuda" else None)
    optimizer = make_optimizer(raw_model, cfg, device_type)
    sampler = ResumableSampler(len(train_data), cfg["batch_size"], cfg["grad_accum"], rank, world_size, cfg["seed"])

    # --- resume
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    step, train_points, val_points = 0, [], []
    if cfg["resume"] not in ("", "auto"):
        sys.exit(f"train.py: --resume={cfg['resume']!r}: use --resume=auto")
    ckpt = latest_checkpoint(cfg["out_dir"]) if cfg["resume"] == "auto" else None
    if ckpt:
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        saved = Transformer.from_pretrained(ckpt)  # validates names and shapes against config.json
        set_model_state_dict(raw_model, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
        optim_state = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
        set_optimizer_state_dict(raw_model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        sampler.load_state_dict(state["sampler"])
        set_rng_state(torch.load(os.path.join(ckpt, f"rng-{rank}.pt"), weights_only=True))
        if hasattr(strategy, "load_state_dict"):
            strategy.load_state_dict(torch.load(os.path.join(ckpt, f"strategy-{rank}.pt"), weights_only=True))
        step, train_points, val_points = state["step"], state["train_points"], state["val_points"]
        log(f"resumed from {ckpt} at step {step}")
    elif cfg["resume"] == "auto":
        log(f"no checkpoint in {cfg['out_dir']}: starting from step 0")

    def save(path):
        """A MODELDIR plus what resuming needs, written to a temp dir and renamed: never half a checkpoint."""
        model_state = get_model_state_dict(raw_model, options=full)
        optim_state = get_optimizer_state_dict(raw_model, optimizer, options=full) if "ckpt-" in path else None
        # every rank's RNG states and strategy state (GRPO's cached rollouts), gathered to the master
        rank_state = (rng_state(), strategy.state_dict() if hasattr(strategy, "state_dict") else None)
        rank_states = [None] * world_size
        if distributed:
            dist.all_gather_object(rank_states, rank_state)
        else:
            rank_states = [rank_state]
        if master:
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            raw_model.save_pretrained(tmp, state_dict=model_state, token_ids=tokenizer.token_ids())
            tokenizer.save(tmp)
            if optim_state is not None:
                torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
                for r, (rng, strategy_state) in enumerate(rank_states):
                    torch.save(rng, os.path.join(tmp, f"rng-{r}.pt"))
                    if strategy_state is not None:
                        torch.save(strategy_state, os.path.join(tmp, f"strategy-{r}.pt"))
                state = {"step": step, "sampler": sampler.state_dict(), "config": cfg,
                         "train_points": train_points, "val_points": val_points}
                with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                    json.dump(state, f)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            if "ckpt-" in path:  # keep the newest K
                ckpts = sorted(glob.glob(os.path.join(cfg["out_dir"], "ckpt-*[0-9]")), key=lambda p: int(p.rsplit("-", 1)[-1]))
                for old in ckpts[: -cfg["keep_checkpoints"]]:
                    shutil.rmtree(old, ignore_errors=True)
            log(f"saved {path}")
        if distributed:
            dist.barrier()

    # --- stop cleanly on SIGINT/SIGTERM: finish the step, checkpoint, exit
    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))

    @torch.no_grad()
    def evaluate():
        """{"val_loss": ..., "val_" + each strategy metric (DPO's pref_accuracy, ...)}, means over the first
        eval_iters batches of the val split (the same on every process)."""
        model.eval()
        n = min(cfg["eval_iters"] * cfg["batch_size"], len(val_data))
        sums, batches = {}, 0
        for start in range(0, n, cfg["batch_size"]):
            batch = to_device(val_data.get_batch(list(range(start, min(start + cfg["batch_size"], n)))))
            with autocast:
                loss, metrics_batch = strategy.loss(model, batch, step)
            for k, v in {"loss": loss.item(), **metrics_batch}.items():
                if k != "tokens":
                    sums["val_" + k] = sums.get("val_" + k, 0.0) + v
            batches += 1
        model.train()
        return {k: v / max(1, batches) for k, v in sums.items()}

    def to_device(batch):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
        kept = []
        if ckpt and os.path.exists(metrics_path):  # drop lines a killed run wrote after its last checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
        metrics = open(metrics_path, "w")
        metrics.writelines(kept)
    flops_per_token = raw_model.flops_per_token(cfg["block_size"])
    peak = measure_peak_flops(device) if master else 1.0
    log(f"{raw_model.num_params() / 1e6:.2f}M parameters, strategy {cfg['strategy']}, {len(train_data)} train items, "
        f"{world_size} process(es), {device}, {dtype}")

    model.train()
    t_last, tokens_since = time.time(), 0
    t_start, first_step = time.time(), step
    while step < cfg["max_iters"]:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = sampler.next_step()
        loss_sum, metric_sums = 0.0, {}
        for i, indices in enumerate(micro_batches):
            batch = to_device(train_data.get_batch(indices))
            last = i == len(micro_batches) - 1
            # gradients are averaged across processes only on the last micro-step
            if distributed and cfg["parallel"] == "fsdp":
                raw_model.set_requires_gradient_sync(last)
                sync = nullcontext()
            else:
                sync = model.no_sync() if distributed and not last else nullcontext()
            with sync:
                with autocast:
                    loss, metrics_step = strategy.loss(model, batch, step)
                (loss / len(micro_batches)).backward()
            loss_sum += loss.item()
            for k, v in metrics_step.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
            tokens_since += metrics_step.get("tokens", sum(v.numel() for k, v in batch.items() if k.endswith("ids") and torch.is_tensor(v)))
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"] or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # the logged loss is the mean over micro-steps and processes
        stats = torch.tensor([loss_sum / len(micro_batches), float(bool(stop_requested))] +
                             [v / len(micro_batches) for v in metric_sums.values()], dtype=torch.float64)
        if distributed:
            dist.all_reduce(stats)
            stats /= world_size
        train_loss = stats[0].item()
        stop = stats[1].item() > 0
        train_points.append((step, train_loss))
        if step % cfg["log_interval"] == 0 or step == 1 or step == cfg["max_iters"]:
            now = time.time()
            tokens_per_s = tokens_since * world_size / (now - t_last)
            mfu = flops_per_token * tokens_per_s / (peak * world_size)
            left = (cfg["max_iters"] - step) * (now - t_start) / (step - first_step)
            extra = {k: round(stats[2 + j].item(), 5) for j, k in enumerate(metric_sums)}
            extra_text = "".join(f" | {k} {v:.4f}" for k, v in extra.items() if k != "tokens")
            log(f"step {step:5d} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | "
                f"{tokens_per_s:,.0f} tok/s | MFU {mfu:.1%}{extra_text} | {left / 60:.1f} min left")
            if master:
                line = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s, **extra}
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
            t_last, tokens_since = time.time(), 0
        last_step = step == cfg["max_iters"]
        if len(val_data) and ((cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or last_step):
            val = evaluate()
            val_points.append((step, val["val_loss"]))
            log(f"step {step:5d} | val loss {val['val_loss']:.4f}" + "".join(f" | {k} {v:.4f}" for k, v in val.items() if k != "val_loss"))
            if master:
                metrics.write(json.dumps({"step": step, **val}) + "\n")
                metrics.flush()
                write_loss_svg(os.path.join(cfg["out_dir"], "loss.svg"), train_points, val_points)
        if stop or (cfg["ckpt_interval"] and step % cfg["ckpt_interval"] == 0) or last_step:
            save(os.path.join(cfg["out_dir"], f"ckpt-{step}"))
        if stop:
            log(f"stopped by signal at step {step}; resume with --resume=auto")
            break
    if step == cfg["max_iters"]:
        save(os.path.join(cfg["out_dir"], "final"))
    if master:
        metrics.close()
    if distributed:
        dist.destroy_process_group()


def measure_peak_flops(device, n=1024):
    """Measured matmul FLOP/s on this device: the denominator of MFU."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, reps = time.time(), 5
    for _ in range(reps):
        a @ a
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.time() - t0)


if __name__ == "__main__":
    train(load_config(sys.argv[1:]))
