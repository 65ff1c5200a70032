"""
Tensor parallelism with torch's own DTensor plans (torch.distributed.tensor.parallel): each block's attention heads
and MLP hidden units are split over `tp` processes, Megatron-style. q/k/v (and the output gate), gate and up are
ColwiseParallel (each process computes its heads' or hidden units' share of the outputs), o and down are
RowwiseParallel (partial sums added by one all-reduce, which DTensor does). Imported only when tp > 1.

    torchrun --nproc_per_node=2 train.py configs/demo.py --tp=2                       # 2 processes, one model
    torchrun --nproc_per_node=4 train.py configs/demo.py --tp=2 --parallel=fsdp       # 2 (dp) x 2 (tp)
    torchrun --nproc_per_node=2 sample.py --model=out/demo/final --tp=2 --prompt="..."

In training the norms are sequence parallel too (torch's SequenceParallel): between blocks the residual stream is a
DTensor split along the sequence. Inference keeps it whole, an ordinary tensor alike on every process, since a
decode step has one token a row. The embedding and the output head are whole on every process. Checkpoints hold
whole tensors (train.py gathers them with torch.distributed.checkpoint's full state dicts), so a tp run's MODELDIR
loads at any tp and the reverse.
"""
import itertools
import os
import random
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from sample import Engine, Sequence


def tp_problems(config, tp, world_size, training=False):
    """What stops a model of this config from splitting over tp processes of world_size, each naming its field.
    MLA splits for inference only: its RoPE key is one for all heads, and its gradient (a sum over every process's
    heads) is not one the plan below expresses."""
    problems = []
    if tp < 1 or world_size % tp:
        problems.append(f"tp={tp}: the number of processes ({world_size}) must be a multiple of tp")
        return problems
    if config.n_experts:
        problems.append(f"n_experts={config.n_experts} with tp={tp}: mixture-of-experts layers are not split "
                        "(moe.py's experts have no tensor-parallel plan)")
    if training and config.attn == "mla":
        problems.append(f"attn='mla' with tp={tp}: training a split MLA is not supported (the shared RoPE key's "
                        "gradient would miss the other processes' heads); sample.py and serve.py split it")
    sizes = {"n_heads": config.n_heads, "dim_ffn": config.dim_ffn}
    if config.attn == "gqa":
        sizes["n_kv_heads"] = config.n_kv_heads
    problems += [f"{name}={value} is not a multiple of tp={tp}" for name, value in sizes.items() if value % tp]
    return problems


def device_mesh(device_type, world_size, tp):
    """The ("dp", "tp") mesh of all processes: tp neighbouring ranks share a model, world_size // tp copies of it
    train on different data (rank = dp_rank * tp + tp_rank)."""
    return init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def block_plan(block, sequence_parallel=False):
    """The DTensor plan of one block: colwise into the heads and hidden units, rowwise out of them. Sequence
    parallel: the block's input and output are this process's share of the sequence (B, T / tp, dim), its norms
    run on that share, attention and the MLP gather the whole sequence, and o/down's all-reduce becomes a
    reduce-scatter back to the share."""
    attn = block.self_attn
    colwise = ["k_proj", "v_proj"] if hasattr(attn, "k_proj") else ["kv_b_proj"]  # MLA: the latent is whole
    colwise += [n for n in ("q_proj", "q_b_proj", "output_gate") if hasattr(attn, n)]  # MLA's q_a_proj is whole
    plan = {f"self_attn.{n}": ColwiseParallel() for n in colwise}
    for norm in ("q_norm", "k_norm"):  # per-head norms see this process's heads: (B, T, heads, head_dim), split on 2
        if hasattr(attn, norm):  # their weight's gradient is then summed over the processes' heads
            plan[f"self_attn.{norm}"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel()})
    if not sequence_parallel:
        return {**plan, "self_attn.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    return {**plan, "input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
            # attention's inputs: x, cos, sin, mask, index, kv (the other five as they are)
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * 5,
                                            desired_input_layouts=(Replicate(),) + (None,) * 5, use_local_output=True),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=True),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}


def parallelize(model, tp_mesh, sequence_parallel=False):
    """Split model's blocks over tp_mesh in place (tp_problems must be empty). Each attention then counts its own
    heads: q/k/v's outputs are its share, and the KV cache holds its share (model.tp_size). sequence_parallel
    (training, uncached forwards only): the embedding's output is cut into each process's share of the sequence,
    the blocks and the final norm work on shares, and the final norm's output is gathered whole for the head."""
    tp = tp_mesh.size()
    problems = tp_problems(model.config, tp, tp)
    if problems:
        raise ValueError("tensor parallelism: " + "; ".join(problems))
    for block in model.layers:
        if not isinstance(block.self_attn.o_proj, torch.nn.Linear):
            raise ValueError("tensor parallelism splits nn.Linear layers: a LoRA or int8 model is not split")
        parallelize_module(block, tp_mesh, block_plan(block, sequence_parallel))
        block.self_attn.n_heads //= tp
        if hasattr(block.self_attn, "n_kv_heads"):
            block.self_attn.n_kv_heads //= tp
    if sequence_parallel:
        parallelize_module(model, tp_mesh, {
            "embed_tokens": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                use_local_output=False),
            "norm": SequenceParallel()})
        parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1),
                                                                    desired_output_layouts=Replicate()))
    model.tp_size = tp
    return model


def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ for a model whose parameters are DTensors on different meshes (the split
    blocks; FSDP's dp shards) beside ordinary tensors: each mesh's norm is DTensor's own, made whole by full_tensor;
    the total norm (a float tensor) and the same clip coefficient as clip_grad_norm_'s."""
    groups = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=False)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coefficient = min(1.0, max_norm / (total.item() + 1e-6))
    for grads in groups.values():
        for g in grads:
            g.mul_(coefficient)
    return total


def broadcast_object(obj, group=None):
    """obj from rank 0 on every process (sample.py: the seed; serve.py: each step's new work)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# -----------------------------------------------------------------------------
# inference: sample.py and serve.py under torchrun, every process running the same engine steps


def start_inference(tp, device, where):
    """The process group of `torchrun --nproc_per_node=tp`, before the model loads -> (this process's device, the
    tp mesh). Every process holds a share of one model: there are no model copies to split requests over."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size != tp:
        raise ValueError(f"tp={tp}: run {where} under torchrun --nproc_per_node={tp} (this is {world_size} "
                         "process(es)); each process holds a share of the one model")
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    return device, init_device_mesh("cuda" if cuda else "cpu", (tp,), mesh_dim_names=("tp",))


def split_for_inference(model, mesh, seed, kv_memory, device):
    """The loaded model split over the mesh -> (model, seed, kv_memory) alike on every process: the engines must
    take the same steps, so the sampling seed (drawn on rank 0 when none is set) and the KV cache budget (a share
    of memory measured on rank 0) come from rank 0. The other ranks print nothing."""
    from kv_cache import kv_budget_bytes

    parallelize(model, mesh)
    seed = broadcast_object(random.randrange(2**31) if seed is None else seed)
    kv_memory = broadcast_object(f"{kv_budget_bytes(kv_memory, device) / 1e9!r}")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return model, seed, kv_memory


class SplitEngine(Engine):
    """serve.py's engine on every process of a split model. Rank 0 (the leader) serves HTTP: its add, cancel and
    fail are logged, not applied, and each step() starts by broadcasting the log, which every process then applies
    in the same order; each emit broadcasts rank 0's tokens and how each row finished (a stop string is found in
    rank 0's text alone). So every process admits, preempts and batches alike, and the collectives inside the
    model match. The other ranks call follow(), stepping until rank 0's close()."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.leader = dist.get_rank() == 0
        self.log, self.stepping, self.ids = [], False, itertools.count()
        self.mirrors, self.finishes = {}, {}  # the other ranks: rank 0's sequences by id, this step's finishes

    # --- rank 0: requests come and go between steps, on other threads

    def add(self, seqs):
        self.check(seqs)
        with self.lock:
            for seq in seqs:
                seq.split_id = next(self.ids)
            self.log.append(("add", list(seqs)))

    def cancel(self, seqs):
        with self.lock:
            self.log.append(("cancel", list(seqs)))

    def fail(self, seqs=None, reason="error"):
        if self.stepping or not self.leader:  # inside a step: every process fails the same rows itself
            return super().fail(seqs, reason)
        if seqs is None:  # the server closes: no step follows, rank 0 ends every sequence it has
            self.replay(self.take_log())
            return super().fail(None, reason)
        with self.lock:
            self.log.append(("fail", list(seqs)))

    def has_work(self):
        return bool(self.log) or super().has_work()

    def take_log(self):
        with self.lock:
            log, self.log = self.log, []
        return log

    def close(self):
        """Rank 0, after its last step: the other ranks' follow() returns."""
        broadcast_object(None)

    # --- every rank

    def step(self):
        """-> False when rank 0 has closed. Rank 0's log, then Engine.step on every process."""
        if self.leader:
            log = self.take_log()
            broadcast_object([(op, [(s.split_id, s.prompt, s.max_tokens, s.params, s.prompt_logprobs) if op == "add"
                                    else s.split_id
                                    for s in seqs]) for op, seqs in log])
        else:
            log = broadcast_object(None)
            if log is None:
                return False
            log = [(op, [self.mirror(*item) if op == "add" else self.mirrors.get(item) for item in items])
                   for op, items in log]
        self.replay(log)
        self.stepping = True
        try:
            super().step()
        finally:
            self.stepping = False
            if not self.leader:  # those neither running nor waiting are done
                self.mirrors = {i: s for i, s in self.mirrors.items() if s in self.running or s in self.waiting}
        return True

    def replay(self, log):
        for op, seqs in log:
            seqs = [s for s in seqs if s is not None]  # a sequence the other ranks have already ended
            {"add": Engine.add, "cancel": Engine.cancel, "fail": Engine.fail}[op](self, seqs)

    def mirror(self, split_id, prompt, max_tokens, params, prompt_logprobs):
        """The other ranks' copy of one of rank 0's sequences: its tokens and finish come from rank 0; a prompt that
        is scored (echo) never reuses a cached prefix, on every rank alike. A grammar's mask is rank 0's alone: its
        tokens are the ones every rank keeps."""
        seq = Sequence(prompt, max_tokens, params, on_token=lambda seq, token, entry: self.finishes.get(seq) == "stop",
                       prompt_logprobs=prompt_logprobs)
        self.mirrors[split_id] = seq
        return seq

    def emit(self, batch, tokens, entries):
        if self.leader:
            try:
                super().emit(batch, tokens, entries)
            finally:
                broadcast_object((tokens, [seq.finish for seq in batch]))
            return
        tokens, finishes = broadcast_object(None)
        self.finishes = dict(zip(batch, finishes))
        super().emit(batch, tokens, entries)

    def follow(self):
        """The other ranks' serve loop: rank 0's steps, until it closes. A step that fails is reported and the next
        one taken, as rank 0's engine thread does."""
        with torch.inference_mode():
            while True:
                try:
                    if not self.step():
                        return
                except Exception:
                    traceback.print_exc()
