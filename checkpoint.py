"""
Checkpoints of a training run: a MODELDIR (or a LoRA adapter) plus what --resume=auto needs, the optimizer state,
every process's RNG and strategy state, a strategy's reference weights and trainer_state.json, written to
PATH.tmp and swapped into place whole (README: Model directories and checkpoints). train.py calls
save_checkpoint and load_checkpoint; every process calls both, as gathering sharded state is collective.
"""
import ctypes
import json
import os
import random
import shutil
import sys
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from model import ModelConfig, Transformer

MODEL_FIELDS = [f.name for f in fields(ModelConfig)]


def rng_state():
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": keys.tolist(),
             "numpy_pos": int(pos), "numpy_gauss": (int(has_gauss), float(cached_gaussian))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    has_gauss, cached_gaussian = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], has_gauss,
                         cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derive_rng_state(seed, step, rank):
    """RNG states for a process that has none saved (resuming on more processes): derived from (seed, step,
    rank), so the same resume gives the same run."""
    derived = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(derived)  # the CPU generator and every CUDA one
    random.seed(derived)
    np.random.seed(derived)


def checkpoint_steps(out_dir):
    """[(step, path)] of the complete checkpoints OUT_DIR/ckpt-STEP, oldest first (a temp dir is not one)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    steps = [int(n[5:]) for n in names if n.startswith("ckpt-") and n[5:].isdigit()]
    return [(s, os.path.join(out_dir, f"ckpt-{s}")) for s in sorted(steps)]


def to_cpu(obj):
    """obj with every tensor in it (in dicts, lists, tuples) moved to the CPU."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_to_master(obj, env):
    """[obj of each process] on the master, None elsewhere. obj must hold CPU tensors only: NCCL's object gather
    pickles into a tensor on the current CUDA device (bound in setup_distributed), and a CUDA tensor of rank r
    would be unpickled onto GPU r in rank 0's process."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size if env.master else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def fsync_tree(path):
    """Flush every file under path, then the directories, to disk: a rename must not land before the data."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp, path):
    """Put directory tmp at path; path is at every moment either the old directory or the new one. Linux swaps
    the two with renameat2(RENAME_EXCHANGE); elsewhere the old is renamed aside first (a moment without it)."""
    fsync_tree(tmp)
    if os.path.exists(path):
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 and renameat2(at_fdcwd, os.fsencode(tmp), at_fdcwd, os.fsencode(path), rename_exchange) == 0:
            shutil.rmtree(tmp)  # now the old directory
            fsync_dir(os.path.dirname(os.path.abspath(path)))
            return
        shutil.rmtree(path + ".old", ignore_errors=True)
        os.replace(path, path + ".old")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old")
    else:
        os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(path, raw_model, tokenizer, env, resume_state=None, adapter=None, merge=False):
    """Write a MODELDIR to `path`, atomically. resume_state (optimizer, sampler, strategy, trainer state)
    adds what --resume=auto needs: optimizer.pt, rng-RANK.pt and strategy-RANK.pt of every process, reference/
    (a strategy's reference weights, when they changed) and trainer_state.json. Every process calls this:
    gathering FSDP state dicts is collective (all-gathers of the shards on the training device, the full state
    landing on rank 0's CPU), and so is gathering the per-process states (CPU objects, to rank 0 only).
    adapter (LoRA): the adapter instead of a MODELDIR, or with merge a MODELDIR with the adapter merged in."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    adapter_only = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state = get_model_state_dict(raw_model, options=adapter_only if adapter and not merge else full)
    if resume_state:
        optim_state = get_optimizer_state_dict(raw_model, resume_state["optimizer"], options=full)
        strategy = resume_state["strategy"]
        rank_states = gather_to_master(to_cpu((rng_state(), strategy.state_dict())), env)
    if env.master:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if adapter:
            adapter.save(tmp, model_state, merge, raw_model, tokenizer.token_ids())
        else:
            raw_model.save_pretrained(tmp, state_dict=model_state, token_ids=tokenizer.token_ids())
        tokenizer.save(tmp)
        if resume_state:
            torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
            for r, (rng, strategy_state) in enumerate(rank_states):
                torch.save(rng, os.path.join(tmp, f"rng-{r}.pt"))
                torch.save(strategy_state, os.path.join(tmp, f"strategy-{r}.pt"))
            reference = strategy.reference_to_save()  # alike on every process: written once
            if reference is not None:
                reference.save_pretrained(os.path.join(tmp, "reference"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(resume_state["trainer"], f)
        replace_dir(tmp, path)
    if env.distributed:
        dist.barrier()  # NCCL: on the device bound in setup_distributed


def check_global_batch(state, cfg, env, path):
    """Resuming on another number of processes continues at the same sample only with the same rows per step."""
    saved = state["config"]
    saved_world = state.get("world_size") or len([n for n in os.listdir(path) if n.startswith("rng-")])
    before = saved["batch_size"] * saved["grad_accum"] * saved_world
    now = cfg.batch_size * cfg.grad_accum * env.dp_size  # processes counted as model copies: tp ranks share rows
    if before != now:
        sys.exit(f"train.py: --resume=auto: {path} was trained with {before} rows a step (batch_size "
                 f"{saved['batch_size']} x grad_accum {saved['grad_accum']} x {saved_world} processes), this run "
                 f"takes {now} (batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {env.dp_size} "
                 f"processes); set grad_accum (or batch_size) so that the product is {before} again")


def load_checkpoint(path, raw_model, optimizer, sampler, strategy, cfg, env, adapter=None):
    """Restore what save_checkpoint wrote into the live objects; returns the trainer state. The number of
    processes may differ from the saved run's if rows per step do not: a process without a saved RNG state
    gets one derived from (seed, step, rank), and the strategy sees every saved process's state."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    check_global_batch(state, cfg, env, path)
    if adapter:  # LoRA: the adapter weights, refused if the checkpoint's base model is not --init_from
        set_model_state_dict(raw_model, adapter.load(path), options=StateDictOptions(full_state_dict=True,
                                                                                     strict=False))
    elif os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"{path} holds a LoRA adapter: resume with the --lora_rank it was trained with")
    else:
        saved = Transformer.from_pretrained(path)  # validates names and shapes against config.json
        differ = [f"{k}={getattr(saved.config, k)!r} there, {getattr(raw_model.config, k)!r} in this run"
                  for k in MODEL_FIELDS if getattr(saved.config, k) != getattr(raw_model.config, k)]
        if differ:
            raise ValueError(f"{path} holds another model ({'; '.join(differ)}): resume with its model settings")
        set_model_state_dict(raw_model, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    optim_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    set_optimizer_state_dict(raw_model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    sampler.load_state_dict(state["sampler"])
    rng_file = os.path.join(path, f"rng-{env.rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        derive_rng_state(cfg.seed, state["step"], env.rank)
    saved_ranks = sorted(int(n[9:-3]) for n in os.listdir(path) if n.startswith("strategy-") and n.endswith(".pt"))
    strategy.load_state_dict([torch.load(os.path.join(path, f"strategy-{r}.pt"), weights_only=True)
                              for r in saved_ranks])
    if os.path.isdir(os.path.join(path, "reference")):
        strategy.load_reference(Transformer.from_pretrained(os.path.join(path, "reference")))
    return state
