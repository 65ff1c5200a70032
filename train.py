"""
The training loop: one CPU/GPU, or many with torchrun (DDP, or FSDP2 with --parallel=fsdp).

    python train.py configs/demo.py
    python train.py configs/sft.py --init_from=out/demo/final --max_iters=200
    torchrun --nproc_per_node=4 train.py configs/pretrain.py

Settings: the defaults below, the chosen strategy's own (its `settings` in strategies.py) and any ModelConfig field
(model.py: --dim=64 changes the preset's), then config files (plain Python assignments) in order, then --key=value
overrides (settings.py). An unknown key, a setting of another strategy or a value of the wrong type is an error that
names it; `python train.py --help` lists them all.
Writes OUT_DIR/metrics.jsonl, OUT_DIR/loss.svg, OUT_DIR/ckpt-STEP/ and OUT_DIR/final/ (README.md).
"""
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields, replace
from types import SimpleNamespace

import torch
import torch.distributed as dist

from checkpoint import checkpoint_steps, load_checkpoint, save_checkpoint
from data import ResumableSampler, load_dataset
from lora import TrainingAdapter
from model import ModelConfig, Transformer
from settings import Settings, exit_torchrun, load_settings, pick_device
from strategies import STRATEGIES
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# settings
DEFAULTS = dict(
    # I/O
    out_dir="out",  # metrics, checkpoints and the final model go here
    data="data/demo/pretrain.h5",  # an .h5 from `data.py prepare`, or a directory of .h5 shards
    tokenizer="",  # tokenizer dir; default: the one in init_from or next to the data
    init_from="scratch",  # scratch | a MODELDIR or .gguf file (its config decides the architecture)
    model_config="configs/tiny.py",  # model preset, used with init_from=scratch only
    resume="",  # "auto": continue from the newest complete OUT_DIR/ckpt-*
    log_to="",  # also log metrics.jsonl's figures to: tensorboard,wandb,swanlab (a comma list; loggers.py)
    project="astrai-nano",  # the wandb / SwanLab project
    run_name="",  # the wandb / SwanLab run; default: OUT_DIR's name
    strategy="seq",  # seq | sft | dpo | grpo | distill (strategies.py; each has settings of its own, --help lists them)
    # schedule of work
    max_iters=1000,  # optimizer steps
    eval_interval=200,  # steps between val evaluations (0 = only at the end)
    eval_iters=20,  # val batches per evaluation
    log_interval=10,  # steps between log lines
    ckpt_interval=500,  # steps between checkpoints (0 = only at the end)
    keep_checkpoints=2,  # the newest K ckpt-* directories are kept (K >= 1)
    # batch: tokens per optimizer step = batch_size * block_size * grad_accum * world size
    batch_size=16,  # micro-batch per process
    block_size=256,  # tokens per row
    pack=False,  # seq and sft: several documents per row, attention and positions within each (README.md)
    grad_accum=1,  # micro-batches per optimizer step
    # optimizer: AdamW (weight decay on matrices only), or Muon on the blocks' matrices (README)
    optimizer="adamw",  # adamw | muon (torch.optim.Muon on attention and MLP matrices, AdamW on the rest, one lr)
    lr=1e-3,
    min_lr=1e-4,  # floor of the cosine; where wsd's decay ends
    warmup_iters=100,
    lr_schedule="cosine",  # cosine | sgdr (cosine with warm restarts) | constant | wsd (warmup, stable, decay)
    decay_fraction=0.2,  # wsd: the last round(decay_fraction * max_iters) steps decay from lr to min_lr
    decay_shape="linear",  # wsd: linear | 1-sqrt (lr - (lr - min_lr) * sqrt(progress))
    sgdr_cycle=500,  # first SGDR cycle length in steps
    sgdr_mult=2.0,  # each SGDR cycle is this much longer than the last
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 = off
    # LoRA (lora.py): train low-rank adapters on a frozen --init_from model; checkpoints and final/ hold the adapter
    lora_rank=0,  # rank r of each adapter; 0 = train every weight
    lora_alpha=16.0,  # the update is scaled by lora_alpha / lora_rank
    lora_dropout=0.0,  # dropout on the adapters' input
    lora_targets="attention,mlp",  # the projections of attention and/or MLP, or layer names (q_proj,v_proj,...)
    lora_tokens="",  # also train these tokens' embedding rows: "<|im_start|>,<|im_end|>" or ids (see README)
    merge_lora=False,  # final/ a plain MODELDIR with the adapter merged in, instead of the adapter
    # mixture of experts (a model with n_experts > 0; moe.py's Balancing)
    moe_balance="auto",  # auto (bias for a sigmoid router, else aux) | bias (DeepSeek-V3, no loss term) | aux | none
    moe_aux_coef=0.01,  # aux: weight of the Switch Transformer loss (1.0 when balanced, n_experts at worst)
    moe_bias_rate=0.001,  # bias: each step's move of a router's correction bias toward balance (DeepSeek-V3's gamma)
    # system
    device="auto",  # auto | cpu | cuda | cuda:N
    dtype="auto",  # auto (bfloat16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    compile=False,  # torch.compile the model
    grad_checkpointing=False,  # recompute activations in backward to save memory
    parallel="ddp",  # ddp | fsdp (with torchrun): how the dp copies of the model share the work
    tp=1,  # tensor parallel: split each block's heads and MLP over tp processes (parallel.py); with torchrun,
    # world size = dp x tp, and dp > 1 copies of a split model need parallel=fsdp (a 2-D dp x tp mesh)
    mfu_peak_tflops=0.0,  # MFU's denominator per device; 0 = auto (a table of GPUs' bf16 peaks, else measured)
    seed=1337,
)
# the model's fields (model.py): set in a config file or on the command line, each overrides the preset
# (model_config) with init_from=scratch; with init_from=DIR, only one that changes no weight is allowed (build_model)
MODEL_FIELDS = {f.name: f.default for f in fields(ModelConfig)}


def read_settings(argv):
    """train.py's settings from argv: DEFAULTS, the chosen strategy's own and the model fields set (only those). Two
    passes: the first, over every table, finds --strategy (a config file may set it) and the keys set; the second
    reads argv against the chosen strategy's table, so that its defaults are its own. A setting of another strategy
    is an error naming the strategy; so is a name in two of train.py, the model and the strategies."""
    tables = {"train.py": DEFAULTS, "the model": MODEL_FIELDS, **{n: s.settings for n, s in STRATEGIES.items()}}
    owners = {}
    for owner, table in tables.items():
        for key, value in table.items():
            owners.setdefault(key, {})[owner] = type(value).__name__
    for key, who in owners.items():  # strategies may share a name (and its type); nothing else may
        if len(who) > 1 and ({"train.py", "the model"} & set(who) or len(set(who.values())) > 1):
            sys.exit(f"train.py: the setting {key!r} belongs to {who}: rename one")
    if "-h" in argv or "--help" in argv:
        print("python train.py [CONFIG.py ...] [--key=value ...]: defaults (train.py and strategies.py say why)")
        for title, table in [("train.py", DEFAULTS)] + [(f"--strategy={n}", s.settings) for n, s in STRATEGIES.items()]:
            print(f"{title}:\n" + ("\n".join(f"  --{k}={v!r}" for k, v in table.items()) or "  (none of its own)"))
        print("model fields (model.py's ModelConfig; over the preset with init_from=scratch, else only those that "
              "change no weight):\n  " + " ".join(f"--{k}" for k in MODEL_FIELDS))
        raise SystemExit(0)
    given = {}
    strategy = load_settings({k: v for t in tables.values() for k, v in t.items()}, argv, "train.py", given).strategy
    if strategy not in STRATEGIES:
        sys.exit(f"train.py: unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    own = STRATEGIES[strategy].settings
    for key, source in given.items():
        if key not in {**own, **DEFAULTS, **MODEL_FIELDS}:
            sys.exit(f"train.py: --{key} (from {source}) is a setting of {' and '.join(owners[key])}; "
                     f"--strategy={strategy} has: {', '.join(own) or 'no settings of its own'}")
    cfg = load_settings({**DEFAULTS, **own, **MODEL_FIELDS}, argv, "train.py")
    return Settings({k: v for k, v in cfg.items() if k not in MODEL_FIELDS or k in given})


# -----------------------------------------------------------------------------
# setting up: processes, tokenizer, data, model


def setup_distributed(cfg):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; one process without them. Each process trains on its
    own device; the process group is NCCL on CUDA (every tensor handed to a collective lives on the device)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if cfg.tp < 1 or world_size % cfg.tp:
        sys.exit(f"train.py: tp={cfg.tp}: the number of processes ({world_size}) must be a multiple of tp "
                 f"(torchrun --nproc_per_node=N with N = dp x tp)")
    device, dtype = pick_device(cfg.device, cfg.dtype)
    if world_size > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world_size > 1:  # device_id binds NCCL to this process's GPU: barriers and object collectives use it
        cuda = device.startswith("cuda")
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    mesh = None
    if cfg.tp > 1:  # tp neighbouring ranks hold one model; dp_rank and dp_size count the copies (the data's split)
        from parallel import device_mesh

        mesh = device_mesh(device_type, world_size, cfg.tp)
    return SimpleNamespace(device=device, device_type=device_type, dtype=dtype, autocast=autocast, rank=rank,
                           world_size=world_size, distributed=world_size > 1, master=rank == 0, tp=cfg.tp,
                           mesh=mesh, dp_rank=rank // cfg.tp, dp_size=world_size // cfg.tp)


def print0(*args, **kwargs):
    """print on the master process only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def find_tokenizer(cfg):
    """--tokenizer, else the one in --init_from, else one beside the data (DIR/tokenizer or DIR itself)."""
    candidates = [cfg.tokenizer] if cfg.tokenizer else []
    if cfg.init_from != "scratch":
        candidates.append(cfg.init_from)
    data_dir = cfg.data if os.path.isdir(cfg.data) else os.path.dirname(cfg.data)
    candidates += [os.path.join(data_dir, "tokenizer"), data_dir]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "tokenizer.json")) or path.endswith(".gguf") and os.path.isfile(path):
            return Tokenizer.load(path)
    if cfg.tokenizer:
        sys.exit(f"train.py: --tokenizer={cfg.tokenizer}: no tokenizer.json there")
    sys.exit(f"train.py: no tokenizer found (looked in {candidates}); pass --tokenizer=DIR")


def load_data(cfg, stage, tokenizer):
    """(train split, val split) of --data, checked against the strategy's stage and the tokenizer."""
    if cfg.pack and stage not in ("seq", "sft"):
        sys.exit(f"train.py: pack=true packs seq and sft rows; --strategy={cfg.strategy} has one {stage} item a row")
    try:
        train_data = load_dataset(cfg.data, "train", cfg.block_size, stage=stage, pack=cfg.pack)
        val_data = load_dataset(cfg.data, "val", cfg.block_size, stage=stage, pack=cfg.pack)
    except (OSError, ValueError) as e:
        sys.exit(f"train.py: --data: {e}")
    if train_data.tokenizer_hash != tokenizer.hash:
        sys.exit(f"train.py: {cfg.data} was prepared with a different tokenizer than the one in use (hash "
                 f"{train_data.tokenizer_hash[:12]} vs {tokenizer.hash[:12]}); prepare it again or pass --tokenizer")
    return train_data, val_data


def scratch_config(preset, model_fields, tokenizer):
    """The preset (a file of ModelConfig fields), then the model fields set in config files or on the command line.
    vocab_size, when neither sets it, is the tokenizer's rounded up to a multiple of 64 (friendlier to matmuls)."""
    in_preset = {}
    values = {**load_settings(MODEL_FIELDS, [preset], preset, in_preset), **model_fields}
    if "vocab_size" not in in_preset and "vocab_size" not in model_fields:
        values["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
    try:
        return ModelConfig(**values)
    except ValueError as e:
        sys.exit(f"train.py: model_config={preset} with {model_fields}: {e}")


def weight_layout(config):
    """{name: (shape, a parameter of its own)} of a model of this config, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    own = {name for name, _ in model.named_parameters()}  # a tied head is not a parameter of its own
    return {name: (tuple(t.shape), name in own) for name, t in model.state_dict().items()}


def apply_model_fields(model, model_fields, where):
    """A loaded model with the model fields set in config files or on the command line. One that would change a
    weight's name or shape (dim, n_layers, vocab_size, tie_weight, ...) is an error naming it: the weights are what
    they are. The others (max_len, rope_theta, rope_scaling, norm_eps) are applied: the model is rebuilt around the
    same weight tensors, its RoPE tables and norms from the new config."""
    changed = {k: v for k, v in model_fields.items() if getattr(model.config, k) != v}
    if not changed:
        return model
    loaded, reshaping = weight_layout(model.config), []
    for key, value in changed.items():
        try:
            reshaping += [key] if weight_layout(replace(model.config, **{key: value})) != loaded else []
        except ValueError:  # an architecture the loaded config cannot take with this field alone
            reshaping.append(key)
    try:
        config = replace(model.config, **changed)
    except ValueError as e:
        sys.exit(f"train.py: init_from={where} with {changed}: {e}")
    if reshaping or weight_layout(config) != loaded:
        shown = ", ".join(f"{k}={changed[k]!r} (the model has {getattr(model.config, k)!r})"
                          for k in reshaping or changed)
        sys.exit(f"train.py: init_from={where}: {shown} would change the shape of its weights; a model field that "
                 "changes a weight applies to init_from=scratch only")
    print0(f"init_from={where}: " + ", ".join(f"{k} {getattr(model.config, k)!r} -> {v!r}" for k, v in
                                              changed.items()))
    return Transformer.from_state_dict(config, model.state_dict(), where)


def build_model(cfg, tokenizer, device):
    """A new model from the preset and the model fields set (--init_from=scratch), or the weights of a MODELDIR with
    the model fields set that change no weight; on the device."""
    model_fields = {k: cfg[k] for k in MODEL_FIELDS if k in cfg}
    if cfg.init_from == "scratch":
        model = Transformer(scratch_config(cfg.model_config, model_fields, tokenizer))
    else:
        model = apply_model_fields(Transformer.from_pretrained(cfg.init_from), model_fields, cfg.init_from)
    if model.config.vocab_size < tokenizer.vocab_size:
        sys.exit(f"train.py: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                 f"{model.config.vocab_size}; the model's vocab must be at least the tokenizer's")
    if cfg.block_size > model.config.max_len:
        sys.exit(f"train.py: block_size={cfg.block_size} exceeds the model's max_len={model.config.max_len}")
    model.grad_checkpointing = cfg.grad_checkpointing
    return model.to(device)


def wrap_model(raw_model, cfg, env, reference=None):
    """What the loop calls: compiled and/or DDP-wrapped; FSDP2 shards raw_model in place, and the strategy's
    frozen reference (DPO's) the same way, so no process holds a whole copy of either. (A LoRA reference is the
    policy itself with its adapters off, not a module of its own.)"""
    if env.tp > 1:  # each block split over the tp ranks first; FSDP2 then shards that over the dp ranks
        from parallel import parallelize

        parallelize(raw_model, env.mesh["tp"], sequence_parallel=True)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    reference = reference if isinstance(reference, torch.nn.Module) else None
    if env.dp_size > 1 and cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = env.mesh["dp"] if env.mesh is not None else None
        for module in [raw_model] + ([reference] if reference is not None else []):
            for block in module.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(module, mesh=mesh)
        if reference is not None:  # the root stays gathered after forward, for a backward the reference never has
            reference.register_forward_hook(lambda module, args, output: module.reshard())
    elif env.dp_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # no buffer broadcast before each forward: the RoPE tables are computed alike everywhere, and the MoE
        # routers' biases change by the load summed over all processes (moe.Balancing), alike everywhere too
        model = DistributedDataParallel(model, device_ids=[env.device] if env.device_type == "cuda" else None,
                                        broadcast_buffers=False)
    return model


class Optimizers(list):
    """Muon and AdamW stepped together as one: the loop sets param_groups' lr, steps and zeroes it;
    torch.distributed.checkpoint's get/set_optimizer_state_dict take the list (one optimizer.pt for both)."""

    @property
    def param_groups(self):
        return [group for optimizer in self for group in optimizer.param_groups]

    def step(self):
        for optimizer in self:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self:
            optimizer.zero_grad(set_to_none=set_to_none)


def is_muon_param(name, param):
    """Muon takes the blocks' matrices (attention and MLP projections); embeddings, the head, norms and biases
    are AdamW's."""
    return name.startswith("layers.") and param.dim() == 2


def make_optimizer(model, cfg, device_type):
    """AdamW with weight decay on matrices only; with optimizer=muon, torch.optim.Muon on the blocks' matrices and
    AdamW on the rest. Muon's adjust_lr_fn="match_rms_adamw" scales each orthogonalized update to an RMS of
    0.2 * lr (Moonshot's rule), AdamW's typical update size, so both take the same lr and weight_decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if cfg.optimizer == "muon" and is_muon_param(n, p)]
    decay = [p for n, p in named if p.dim() >= 2 and not (cfg.optimizer == "muon" and is_muon_param(n, p))]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # tensor parallel: split blocks (DTensors) beside whole weights, which foreach and fused kernels do not mix
    fast = {"fused": device_type == "cuda"} if cfg.tp == 1 else {"foreach": False}
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fast)
    if cfg.optimizer != "muon":
        return adamw
    return Optimizers([torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        adjust_lr_fn="match_rms_adamw"), adamw])


SCHEDULES = ("cosine", "sgdr", "constant", "wsd")


def setting_problems(cfg):
    """What is wrong with the optimizer, schedule, checkpoint, LoRA and MFU settings, each naming its key (an empty
    list: nothing)."""
    checks = [
        (cfg.optimizer in ("adamw", "muon"), f"optimizer={cfg.optimizer!r}: choose adamw or muon"),
        (cfg.optimizer != "muon" or not cfg.lora_rank, f"optimizer=muon with lora_rank={cfg.lora_rank}: LoRA "
                                                       "adapters train with optimizer=adamw (Muon on them is untried)"),
        (cfg.optimizer != "muon" or cfg.parallel != "fsdp", "optimizer=muon with parallel=fsdp: torch.optim.Muon "
                                                            "works on whole matrices, not FSDP2's row shards; use "
                                                            "parallel=ddp"),
        (cfg.lr_schedule in SCHEDULES, f"lr_schedule={cfg.lr_schedule!r}: choose from {', '.join(SCHEDULES)}"),
        (cfg.lr_schedule != "sgdr" or cfg.sgdr_cycle >= 1, f"sgdr_cycle={cfg.sgdr_cycle}: must be >= 1 step"),
        (cfg.lr_schedule != "sgdr" or cfg.sgdr_mult >= 1, f"sgdr_mult={cfg.sgdr_mult}: must be >= 1 (each cycle "
                                                           "as long as the last or longer)"),
        (0 <= cfg.decay_fraction <= 1, f"decay_fraction={cfg.decay_fraction}: must be in [0, 1]"),
        (cfg.decay_shape in ("linear", "1-sqrt"), f"decay_shape={cfg.decay_shape!r}: choose linear or 1-sqrt"),
        (cfg.mfu_peak_tflops >= 0, f"mfu_peak_tflops={cfg.mfu_peak_tflops}: must be >= 0 (0 = auto)"),
        (cfg.keep_checkpoints >= 1, f"keep_checkpoints={cfg.keep_checkpoints}: must be >= 1 (the newest "
                                    "checkpoint is the one --resume=auto continues from)"),
        (cfg.lora_rank > 0 or not cfg.merge_lora, "merge_lora=true needs lora_rank > 0: without an adapter there "
                                                  "is nothing to merge"),
        (cfg.tp == 1 or not cfg.lora_rank, f"tp={cfg.tp} with lora_rank={cfg.lora_rank}: tensor parallelism splits "
                                           "plain weights; train LoRA adapters with tp=1"),
        (cfg.tp == 1 or cfg.optimizer != "muon", f"optimizer=muon with tp={cfg.tp}: torch.optim.Muon works on "
                                                 "whole matrices, not tensor-parallel shards; use optimizer=adamw"),
        (cfg.tp == 1 or cfg.strategy in ("seq", "sft", "dpo"), f"strategy={cfg.strategy} with tp={cfg.tp}: only seq, "
         "sft and dpo run on a split model (grpo's rollouts, distill's teacher and embed's pooling are untried)"),
        (cfg.lora_rank > 0 or not cfg.lora_tokens, f"lora_tokens={cfg.lora_tokens!r} needs lora_rank > 0 (without "
                                                   "LoRA every embedding row trains)"),
    ]
    return [message for ok, message in checks if not ok]


def learning_rate(step, cfg):
    """The lr of a step: a pure function of the step and the settings, so a resumed run continues on the curve.
    wsd: warmup, lr until the last decay_iters = round(decay_fraction * max_iters) steps, which fall to min_lr
    (reached on the last step)."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay_iters = round(cfg.decay_fraction * cfg.max_iters)
        progress = min(max(0, step + 1 - (cfg.max_iters - decay_iters)) / max(1, decay_iters), 1.0)
        fall = math.sqrt(progress) if cfg.decay_shape == "1-sqrt" else progress
        return cfg.lr - fall * (cfg.lr - cfg.min_lr)
    t = step - cfg.warmup_iters
    if cfg.lr_schedule == "sgdr":  # find where t falls in cycles of growing length
        cycle = cfg.sgdr_cycle
        if cfg.sgdr_mult == 1:
            t = t % cycle
        while t >= cycle:  # sgdr_mult > 1: cycles grow geometrically, so few turns
            t, cycle = t - cycle, cycle * cfg.sgdr_mult
        progress = t / cycle
    else:
        progress = min(t / max(1, cfg.max_iters - cfg.warmup_iters), 1.0)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def gradient_sync(model, raw_model, cfg, env, last):
    """Gradients are averaged across processes on the last micro-step of a step only."""
    if env.dp_size > 1 and cfg.parallel == "fsdp":
        raw_model.set_requires_gradient_sync(last)
        return nullcontext()
    return model.no_sync() if env.dp_size > 1 and not last else nullcontext()


def clip_gradients(raw_model, cfg, env):
    """Clip the gradients' total norm to grad_clip (0: measure only) -> the norm before clipping, a tensor."""
    max_norm = cfg.grad_clip or float("inf")
    if env.tp > 1:  # the split blocks' DTensors beside whole weights, which clip_grad_norm_ does not mix
        from parallel import clip_grad_norm

        return clip_grad_norm(raw_model.parameters(), max_norm)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor


def step_totals(strategy, micro_batches, env):
    """The strategy's normalizers (scored tokens, pairs, ...) summed over the step's micro-batches and processes:
    one all-reduce of a float64 tensor on the training device (NCCL takes CUDA tensors only). The tp ranks of a
    model copy see the same rows: counted once."""
    counts = [strategy.normalizers(batch) for batch in micro_batches]
    sums = torch.tensor([[float(c[k]) for k in counts[0]] for c in counts], dtype=torch.float64,
                        device=env.device).sum(0)
    if env.distributed:
        dist.all_reduce(sums)
    return dict(zip(counts[0], (sums / env.tp).tolist()))


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# -----------------------------------------------------------------------------
# evaluation and logging


@torch.no_grad()
def validate(model, strategy, val_data, cfg, env, step):
    """{"val_loss": ..., "val_" + each strategy metric (DPO's pref_accuracy, ...)}, means over the first
    eval_iters batches of the val split (the same on every process)."""
    model.eval()
    n = min(cfg.eval_iters * cfg.batch_size, len(val_data))
    sums, batches = {}, 0
    for start in range(0, n, cfg.batch_size):
        batch = to_device(val_data.get_batch(list(range(start, min(start + cfg.batch_size, n)))), env.device)
        with env.autocast:
            loss, metrics = strategy.loss(model, batch, step, evaluating=True)
        for k, v in {"loss": loss.item(), **metrics}.items():
            if k != "tokens":
                sums["val_" + k] = sums.get("val_" + k, 0.0) + v
        batches += 1
    model.train()
    return {k: v / max(1, batches) for k, v in sums.items()}


def open_metrics(cfg, step, master):
    """OUT_DIR/metrics.jsonl for appending and the --log_to trackers (loggers.py) beside it (None off the master);
    after a resume, the lines a killed run wrote past its last checkpoint are dropped."""
    if not master:
        return None
    os.makedirs(cfg.out_dir, exist_ok=True)
    path, kept = os.path.join(cfg.out_dir, "metrics.jsonl"), []
    if step and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
    metrics = open(path, "w")
    metrics.writelines(kept)
    if not cfg.log_to:
        return SimpleNamespace(file=metrics, trackers=None)
    from loggers import Trackers
    try:
        return SimpleNamespace(file=metrics, trackers=Trackers(cfg, step))
    except ValueError as e:
        sys.exit(f"train.py: {e}")


def log_metrics(metrics, line, text=None):
    """Print a metrics line (by default "step N | key value | ...") and append it to metrics.jsonl (and send it to
    the --log_to trackers)."""
    print0(text or " | ".join([f"step {line['step']:5d}"] + [f"{k.replace('_', ' ', 1)} {v:.4f}"
                                                             for k, v in line.items() if k != "step"]))
    if metrics is not None:
        metrics.file.write(json.dumps(line) + "\n")
        metrics.file.flush()
        if metrics.trackers:
            metrics.trackers.log(line)


class Throughput:
    """Tokens per second and MFU since the last log line. MFU = model.flops_per_token * tokens/s over the peak
    (peak_flops: mfu_peak_tflops, a GPU's bf16 dense peak from PEAK_TFLOPS, else measured). It never shows above
    100%: a throughput above the peak re-measures a measured peak, and the peak rises to what was achieved."""

    def __init__(self, flops_per_token, env, step, peak_tflops=0.0):
        self.flops_per_token, self.world_size, self.device = flops_per_token, env.world_size, env.device
        self.dp_size = env.dp_size  # the model copies: tp ranks of one copy share its tokens
        # only the master prints MFU: the others measure nothing (an infinite peak never re-measures)
        self.peak, self.source = peak_flops(env.device, peak_tflops) if env.master else (math.inf, "unused")
        self.t_start, self.first_step = time.time(), step
        self.t_last, self.tokens = time.time(), 0

    def mfu(self, tokens_per_s):
        """The fraction of the peak that tokens_per_s (over all processes) achieves, at most 1."""
        achieved = self.flops_per_token * tokens_per_s / self.world_size  # per device
        if achieved > self.peak:
            again = peak_flops(self.device, 0.0)[0] if self.source == "measured" else 0.0
            print0(f"MFU: {achieved / 1e12:.3g} TFLOP/s achieved beats the {self.source} peak "
                   f"{self.peak / 1e12:.3g} TFLOP/s; the peak is now {max(again, achieved) / 1e12:.3g} TFLOP/s"
                   + (" (measured again)" if self.source == "measured" else ""))
            self.peak = max(again, achieved)
        return achieved / self.peak

    def log(self, metrics, step, max_iters, lr, grad_norm, means):
        """Log a train step: metrics.jsonl gets step, loss, lr, grad_norm, tokens_per_s and the strategy's means."""
        now = time.time()
        tokens_per_s = self.tokens * self.dp_size / (now - self.t_last)
        mfu = self.mfu(tokens_per_s)
        left = (max_iters - step) * (now - self.t_start) / (step - self.first_step)
        self.t_last, self.tokens = now, 0
        extra = "".join(f" | {k} {v:.4f}" if isinstance(v, float) else f" | {k} {v}"
                        for k, v in means.items() if k != "loss")
        log_metrics(metrics, {"step": step, "loss": means["loss"], "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_s, **means},
                    f"step {step:5d} | loss {means['loss']:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                    f"{tokens_per_s:,.0f} tok/s | MFU {mfu:.1%}{extra} | {left / 60:.1f} min left")


# -----------------------------------------------------------------------------
# the loop


def setup_run(cfg):
    """Processes, tokenizer, data, model, strategy, optimizer and sampler, every setting checked before any
    training starts; with --resume=auto, restored from the newest checkpoint."""
    env = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    if cfg.strategy not in STRATEGIES:
        sys.exit(f"train.py: unknown strategy {cfg.strategy!r}; choose from {', '.join(STRATEGIES)}")
    if cfg.resume not in ("", "auto"):
        sys.exit(f"train.py: --resume={cfg.resume!r}: use --resume=auto")
    if setting_problems(cfg):
        sys.exit("train.py: " + "; ".join(setting_problems(cfg)))
    if cfg.log_to:  # loggers.py and the tools it names only when asked for: an unknown or missing one stops here
        from loggers import tracker_problems
        if problems := tracker_problems(cfg.log_to):
            sys.exit("train.py: " + "; ".join(problems))
    tokenizer = find_tokenizer(cfg)
    train_data, val_data = load_data(cfg, STRATEGIES[cfg.strategy].data_stage, tokenizer)
    raw_model = build_model(cfg, tokenizer, env.device)
    if env.tp > 1:
        from parallel import tp_problems

        problems = tp_problems(raw_model.config, env.tp, env.world_size, training=True)
        problems += [f"tp={env.tp} on {env.world_size} processes makes {env.dp_size} model copies: they need "
                     f"parallel=fsdp (a 2-D dp x tp mesh), not parallel={cfg.parallel}"] \
            if env.dp_size > 1 and cfg.parallel != "fsdp" else []
        if problems:
            sys.exit("train.py: " + "; ".join(problems))
    try:
        # before the strategy copies a reference
        adapter = TrainingAdapter(raw_model, cfg, tokenizer) if cfg.lora_rank else None
    except (OSError, ValueError) as e:
        sys.exit(f"train.py: LoRA: {e}")
    try:
        strategy = STRATEGIES[cfg.strategy](cfg, raw_model, tokenizer, env.dp_rank, env.dp_size)
        strategy.check_data(train_data)
    except ValueError as e:
        sys.exit(f"train.py: --strategy={cfg.strategy}: {e}")
    run = SimpleNamespace(env=env, tokenizer=tokenizer, train_data=train_data, val_data=val_data, strategy=strategy,
                          adapter=adapter, raw_model=raw_model, step=0, moe=moe_balancing(raw_model, cfg),
                          model=wrap_model(raw_model, cfg, env, strategy.ref_model),
                          train_points=[], val_points=[], optimizer=make_optimizer(raw_model, cfg, env.device_type),
                          sampler=ResumableSampler(len(train_data), cfg.batch_size, cfg.grad_accum, env.dp_rank,
                                                   env.dp_size, cfg.seed))
    checkpoints = checkpoint_steps(cfg.out_dir) if cfg.resume == "auto" else []
    if checkpoints:
        try:
            state = load_checkpoint(checkpoints[-1][1], raw_model, run.optimizer, run.sampler, strategy, cfg, env,
                                    adapter)
        except ValueError as e:
            sys.exit(f"train.py: --resume=auto: {e}")
        run.step, run.train_points, run.val_points = state["step"], state["train_points"], state["val_points"]
        print0(f"resumed from {checkpoints[-1][1]} at step {run.step}")
    elif cfg.resume == "auto":
        print0(f"no checkpoint in {cfg.out_dir}: starting from step 0")
    run.metrics = open_metrics(cfg, run.step, env.master)
    print0(f"{raw_model.num_params() / 1e6:.2f}M parameters, strategy {cfg.strategy}, {len(train_data)} train "
           f"items, {env.world_size} process(es), {env.device}, {env.dtype}")
    if hasattr(train_data, "padding_share"):  # sft: rows padded to the batch's longest, or packed rows' ends
        order = run.sampler.order()[:len(train_data) // run.sampler.global_batch * run.sampler.global_batch]
        print0(f"padding: {train_data.padding_share(order, cfg.batch_size):.1%} of the row tokens of this epoch's "
               f"batches ({'packed' if cfg.pack else 'one conversation a row'}, block_size {cfg.block_size})")
    if adapter:
        print0(f"LoRA rank {cfg.lora_rank}: {adapter.trainable:,} trainable parameters, "
               f"{adapter.trainable / raw_model.num_params():.3%} of the model's")
    return run


def moe_balancing(raw_model, cfg):
    """moe.Balancing for a mixture-of-experts model; None for a dense one, where a moe_* setting is an error."""
    if raw_model.config.n_experts:
        from moe import Balancing

        try:
            return Balancing(raw_model, cfg)
        except ValueError as e:
            sys.exit(f"train.py: {e}")
    changed = [k for k in ("moe_balance", "moe_aux_coef", "moe_bias_rate") if cfg[k] != DEFAULTS[k]]
    if changed:
        sys.exit(f"train.py: {', '.join(changed)}: the model has no experts (n_experts=0)")
    return None


def checkpoint(run, cfg):
    """ckpt-STEP with everything --resume=auto needs; the newest keep_checkpoints are kept."""
    trainer = {"step": run.step, "sampler": run.sampler.state_dict(), "config": cfg, "train_points": run.train_points,
               "val_points": run.val_points, "world_size": run.env.dp_size}
    path = os.path.join(cfg.out_dir, f"ckpt-{run.step}")
    save_checkpoint(path, run.raw_model, run.tokenizer, run.env,
                    {"optimizer": run.optimizer, "strategy": run.strategy, "trainer": trainer}, run.adapter)
    if run.env.master:
        for _, old in checkpoint_steps(cfg.out_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    print0(f"saved {path}")


def train(cfg):
    run = setup_run(cfg)
    env, model, raw_model, strategy, optimizer = run.env, run.model, run.raw_model, run.strategy, run.optimizer
    stop_requested = []  # SIGINT/SIGTERM: finish the step, checkpoint, exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))
    meter = Throughput(raw_model.flops_per_token(cfg.block_size), env, run.step, cfg.mfu_peak_tflops)
    model.train()
    while run.step < cfg.max_iters:
        # --- set the learning rate
        lr = learning_rate(run.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # --- forward and backward over the micro-batches of this step; each loss is its share of the step's mean
        micro_batches = [run.train_data.get_batch(indices) for indices in run.sampler.next_step()]
        totals = step_totals(strategy, micro_batches, env)
        sums = {"loss": 0.0, "stop": float(bool(stop_requested))}  # summed over micro-steps
        for micro_step, batch in enumerate(micro_batches):
            batch = to_device(batch, env.device)
            with gradient_sync(model, raw_model, cfg, env, last=micro_step == len(micro_batches) - 1):
                with env.autocast:
                    loss, metrics = strategy.loss(model, batch, run.step, micro_step, totals=totals)
                aux = run.moe.aux_share(len(micro_batches), env.dp_size) if run.moe else 0.0
                ((loss + aux) * env.dp_size).backward()  # DDP and FSDP average gradients over model copies: undo it
            if run.moe:
                run.moe.count()
            meter.tokens += metrics.pop("tokens") if "tokens" in metrics else \
                sum(v.numel() for k, v in batch.items() if k.endswith("ids") and torch.is_tensor(v))
            for k, v in {"loss": loss.item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v

        # --- clip, step
        grad_norm = clip_gradients(raw_model, cfg, env)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1

        # --- the step's loss (the sum of the shares) and metrics (means over micro-steps and processes). The
        # stop flag rides on the same all-reduce: a signal may reach the processes at different steps, every
        # process must stop at the same one (checkpointing is collective), and this costs no collective of its own.
        stats = torch.tensor(list(sums.values()), dtype=torch.float64, device=env.device)  # NCCL: on the device
        if env.distributed:
            dist.all_reduce(stats)
        means = {k: v / (len(micro_batches) * env.world_size) for k, v in zip(sums, stats.tolist())}
        means["loss"] = stats[0].item() / env.tp  # the tp ranks of a model copy have the same loss
        stop = means.pop("stop") > 0
        if run.moe:  # the expert load (and, with moe_balance=bias, the routers' biases moved by it)
            means.update(run.moe.step(env.distributed))
        run.train_points.append((run.step, means["loss"]))
        if run.step % cfg.log_interval == 0 or run.step == 1 or run.step == cfg.max_iters:
            meter.log(run.metrics, run.step, cfg.max_iters, lr, grad_norm.item(), means)

        # --- evaluate, checkpoint, stop
        last_step = run.step == cfg.max_iters
        if len(run.val_data) and ((cfg.eval_interval and run.step % cfg.eval_interval == 0) or last_step):
            val = validate(model, strategy, run.val_data, cfg, env, run.step)
            run.val_points.append((run.step, val["val_loss"]))
            log_metrics(run.metrics, {"step": run.step, **val})
            if env.master:
                write_loss_svg(os.path.join(cfg.out_dir, "loss.svg"), run.train_points, run.val_points)
        if stop or (cfg.ckpt_interval and run.step % cfg.ckpt_interval == 0) or last_step:
            checkpoint(run, cfg)
        if stop:
            print0(f"stopped by signal at step {run.step}; resume with --resume=auto")
            break
    if run.step == cfg.max_iters:
        save_checkpoint(os.path.join(cfg.out_dir, "final"), raw_model, run.tokenizer, env, adapter=run.adapter,
                        merge=cfg.merge_lora)
        print0(f"saved {os.path.join(cfg.out_dir, 'final')}")
    if run.metrics is not None:  # after a signal stop too: the loop breaks to here
        run.metrics.file.close()
        if run.metrics.trackers:
            run.metrics.trackers.close()
    if env.distributed:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the loss curves, and the peak of MFU


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
        xy = " ".join(f"{pad + s / x_max * (w - 2 * pad):.1f},{h - pad - (v - y_min) / y_span * (h - 2 * pad):.1f}"
                      for s, v in pts)
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{xy}"/>'

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{pad}" y="{pad - 8}">{y_max:.3f}</text><text x="{pad}" y="{h - pad + 16}">{y_min:.3f}</text>',
           f'<text x="{w - pad}" y="{h - pad + 16}" text-anchor="end">step {x_max}</text>',
           poly(train_points, "#1f77b4"), poly(val_points, "#d62728"),
           f'<text x="{w - pad}" y="{pad}" text-anchor="end"><tspan fill="#1f77b4">train</tspan> '
           '<tspan fill="#d62728">val</tspan></text>', "</svg>"]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(svg))
    os.replace(path + ".tmp", path)


# bf16 dense (no sparsity) peak TFLOPS of one GPU, by a piece of torch.cuda.get_device_name(); first match wins
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("H800", 989), ("B200", 2250),
               ("A100", 312), ("A800", 312), ("L40S", 362), ("L4", 121), ("A10G", 70), ("RTX 4090", 165)]


def peak_flops(device, peak_tflops=0.0):
    """(FLOP/s, where it came from): mfu_peak_tflops when set, a known GPU's bf16 peak, else measured."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "set (mfu_peak_tflops)"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for piece, tflops in PEAK_TFLOPS:
            if piece in name:
                return tflops * 1e12, f"{name} bf16"
    return measure_peak_flops(device), "measured"


def measure_peak_flops(device, n=1024, rounds=5):
    """Measured matmul FLOP/s on this device (GPUs not in PEAK_TFLOPS, CPUs): the fastest of several rounds."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # its own generator: drawing from the global one would shift dropout's random numbers after a resume
    a = torch.randn(n, n, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    a @ a
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    best, reps = float("inf"), 5
    for _ in range(rounds):  # the fastest round: a slow one (another process, a cold core) would overstate MFU
        t0 = time.time()
        for _ in range(reps):
            a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.time() - t0)
    return 2 * n**3 * reps / best


if __name__ == "__main__":
    train(read_settings(sys.argv[1:]))
    exit_torchrun()  # settings.py says why
