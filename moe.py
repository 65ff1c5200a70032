"""
Mixture-of-experts layers (model.py imports this file only for a config with n_experts > 0): the router (softmax
top-k as Qwen-MoE and Mixtral, or DeepSeek-V3's sigmoid with its correction bias, expert groups and scaling
factor), the routed experts computed grouped by expert, shared experts (plain, or behind a sigmoid gate as
Qwen2-MoE), and what training needs: the auxiliary loss, the experts' load and the bias balancing.

    moe = MoE(config)                 # config.n_experts > 0
    y = moe(x)                        # x (B, T, dim) -> (B, T, dim)

Parameter names are transformers' (model.layers.N.mlp.gate.weight, mlp.experts.gate_up_proj (E, 2 * I, dim),
mlp.experts.down_proj (E, dim, I)); files hold one tensor per expert, as published checkpoints do
(mlp.experts.N.gate_proj.weight, Mixtral's block_sparse_moe.experts.N.w1.weight): fuse_expert_tensors and
split_expert_tensors convert on load and save.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the config's MoE fields


def moe_problems(c):
    """What is wrong with ModelConfig c's MoE fields (ModelConfig.__post_init__ reports it)."""
    problems = []
    if c.router not in ("softmax", "sigmoid"):
        problems.append(f"router={c.router!r} (expected 'softmax' or 'sigmoid')")
    if not 1 <= c.n_active_experts <= c.n_experts:
        problems.append(f"n_active_experts={c.n_active_experts} must lie in 1 .. n_experts={c.n_experts}")
    if c.n_expert_groups < 1 or c.n_experts % c.n_expert_groups:
        problems.append(f"n_experts={c.n_experts} is not a multiple of n_expert_groups={c.n_expert_groups}")
    elif c.n_expert_groups > 1:
        per_group = c.n_experts // c.n_expert_groups
        if per_group < 2:  # a group's score is the sum of its best two experts' (DeepSeek-V3)
            problems.append(f"n_expert_groups={c.n_expert_groups} leaves {per_group} expert a group (2 at least)")
        if not 1 <= c.topk_groups <= c.n_expert_groups or c.topk_groups * per_group < c.n_active_experts:
            problems.append(f"topk_groups={c.topk_groups}: 1 .. n_expert_groups, holding n_active_experts")
    elif c.topk_groups != 1:
        problems.append(f"topk_groups={c.topk_groups} needs n_expert_groups > 1")
    if c.shared_expert_gate and not c.shared_dim_ffn:
        problems.append("shared_expert_gate needs a shared expert (shared_dim_ffn > 0)")
    if not 0 <= c.first_dense_layers <= c.n_layers:
        problems.append(f"first_dense_layers={c.first_dense_layers} must lie in 0 .. n_layers={c.n_layers}")
    return problems


def is_moe_layer(c, layer):
    return c.n_experts > 0 and layer >= c.first_dense_layers


def inactive_params(c):
    """Expert weights a token does not use (the unchosen experts of every MoE layer): total minus active params."""
    n_moe = sum(is_moe_layer(c, i) for i in range(c.n_layers))
    return n_moe * (c.n_experts - c.n_active_experts) * 3 * c.dim * c.moe_dim_ffn


# -----------------------------------------------------------------------------
# the layer


class Router(nn.Module):
    """x (N, dim) -> each token's top-k experts and their weights. softmax: over all experts, the top k taken
    (renormalized to sum 1 with norm_topk_prob). sigmoid (DeepSeek-V3): each expert's own score; the choice adds
    e_score_correction_bias (the balancing bias, a buffer: saved, never trained by gradients), the weights do not.
    With expert groups, only the topk_groups groups with the best two-expert sums are chosen from."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.n_experts, c.dim))
        nn.init.normal_(self.weight, std=0.02)
        if c.router == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_experts))

    def forward(self, x):
        c = self.c
        if c.router == "sigmoid":  # in float32, as DeepSeek-V3's reference does
            scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
            choice = scores + self.e_score_correction_bias.float()
        else:
            scores = F.linear(x, self.weight).softmax(-1, dtype=torch.float32)  # (N, E)
            choice = scores
        if c.n_expert_groups > 1:
            N, G = x.shape[0], c.n_expert_groups
            group_scores = choice.view(N, G, -1).topk(2, dim=-1)[0].sum(-1)  # (N, G)
            chosen = group_scores.topk(c.topk_groups, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
            choice = choice.masked_fill(~keep.repeat_interleave(c.n_experts // G, dim=1), float("-inf"))
        experts = choice.topk(c.n_active_experts, dim=-1, sorted=False)[1]  # (N, k)
        weights = scores.gather(1, experts)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return (weights * c.routed_scaling_factor).to(x.dtype), experts, scores


class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: gate_up_proj (E, 2 * I, dim), down_proj (E, dim, I)."""

    def __init__(self, c):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(c.n_experts, 2 * c.moe_dim_ffn, c.dim))
        self.down_proj = nn.Parameter(torch.empty(c.n_experts, c.dim, c.moe_dim_ffn))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02 / math.sqrt(2 * c.n_layers))  # a residual projection

    def forward(self, x, weights, experts):
        """x (N, dim), weights and experts (N, k) -> sum over k of weight * expert(x), (N, dim)."""
        E, (N, k) = self.gate_up_proj.shape[0], experts.shape
        if N * k <= E:  # a few tokens (a decode step): each assignment reads its expert's weights
            return self.gathered(x, weights, experts)
        if torch.compiler.is_compiling():  # a compiled step of many rows: static shapes, so every expert
            return self.every_expert(x, weights, experts)
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # (N * k,) assignments grouped by expert
        tokens = order // k
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        xs = x.index_select(0, tokens)  # (N * k, dim), expert 0's rows first
        if grouped_mm_fits(xs, self.down_proj):
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
            ys = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        else:  # a loop over experts, each on its contiguous run of rows
            parts, start = [], 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    gate, up = F.linear(xs[start:start + n], self.gate_up_proj[e]).chunk(2, dim=-1)
                    parts.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
                start += n
            ys = torch.cat(parts)
        ys = ys * weights.flatten().index_select(0, order)[:, None]
        return torch.zeros_like(x).index_add_(0, tokens, ys)

    def gathered(self, x, weights, experts):
        flat = experts.flatten()  # (N * k,)
        xs = x.repeat_interleave(experts.shape[1], dim=0)[:, :, None]  # (N * k, dim, 1)
        gate, up = torch.bmm(self.gate_up_proj[flat], xs).chunk(2, dim=1)  # (N * k, I, 1)
        ys = torch.bmm(self.down_proj[flat], F.silu(gate) * up)[:, :, 0]  # (N * k, dim)
        return (ys.view(*experts.shape, -1) * weights[..., None]).sum(1)

    def every_expert(self, x, weights, experts):
        gate, up = torch.einsum("nd,efd->enf", x, self.gate_up_proj).chunk(2, dim=-1)  # (E, N, I)
        ys = torch.einsum("enf,edf->end", F.silu(gate) * up, self.down_proj)  # (E, N, dim)
        dense = torch.zeros(x.shape[0], ys.shape[0], dtype=x.dtype, device=x.device).scatter_(1, experts, weights)
        return torch.einsum("end,ne->nd", ys, dense)


def grouped_mm_fits(xs, weight):
    """Whether torch._grouped_mm takes these operands: a build that has it, rows 16-byte aligned, and on a GPU
    bfloat16 (CPU takes float32 too)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all(n * xs.element_size() % 16 == 0 for n in weight.shape[1:])
    return aligned and (xs.device.type == "cpu" or xs.dtype == torch.bfloat16) and xs.dtype == weight.dtype


class SharedMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts plus optional shared experts. The shared MLP is `shared_experts` (DeepSeek-V3's name) or, behind
    a sigmoid gate, `shared_expert` + `shared_expert_gate` (Qwen2-MoE's), so that both load without renaming.
    Each training forward (train mode, with gradients) leaves, for train.py, `tokens_per_expert` (E,) and `aux_loss`
    (Switch Transformer's: E * sum_e (share of assignments to e) * (mean router probability of e), 1 if balanced)."""

    def __init__(self, c):
        super().__init__()
        self.gate = Router(c)
        self.experts = Experts(c)
        if c.shared_expert_gate:
            self.shared_expert = SharedMLP(c.dim, c.shared_dim_ffn)
            self.shared_expert_gate = nn.Linear(c.dim, 1, bias=False)
        elif c.shared_dim_ffn:
            self.shared_experts = SharedMLP(c.dim, c.shared_dim_ffn)
        self.tokens_per_expert = self.aux_loss = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        weights, experts, scores = self.gate(x)
        y = self.experts(x, weights, experts)
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        if self.training and torch.is_grad_enabled():  # train.py's; a checkpointed block's recompute sets them again
            E = scores.shape[1]
            counts = torch.zeros(E, device=x.device).index_add_(0, experts.flatten().detach(),
                                                                 torch.ones(experts.numel(), device=x.device))
            self.tokens_per_expert = counts
            probs = scores / scores.sum(-1, keepdim=True)  # the sigmoid router's too
            self.aux_loss = E * (counts / experts.numel() * probs.mean(0)).sum()
        return y.view(shape)


# -----------------------------------------------------------------------------
# training: the auxiliary loss, the load and the bias balancing (train.py)


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_loss(model):
    """The mean over MoE layers of their last training forward's auxiliary loss."""
    layers = moe_layers(model)
    return sum(m.aux_loss for m in layers) / len(layers)


def tokens_per_expert(model):
    """(n_moe_layers, E) assignments of the last training forward."""
    return torch.stack([m.tokens_per_expert for m in moe_layers(model)])


def update_biases(model, load, rate):
    """DeepSeek-V3's auxiliary-loss-free balancing: each expert's correction bias moves by `rate` toward balance,
    down when it took more than the mean load of its layer, up when less. load (n_moe_layers, E), the step's
    assignments summed over micro-steps and processes, so every process makes the same change."""
    with torch.no_grad():
        for m, counts in zip(moe_layers(model), load):
            bias = m.gate.e_score_correction_bias
            bias += rate * torch.sign(counts.mean() - counts).to(bias.device, bias.dtype)


def load_metrics(load):
    """load (n_moe_layers, E) -> {"expert_load": [max / mean load of each MoE layer]} (1.0 is perfectly even)."""
    ratio = load.max(1).values / load.mean(1).clamp(min=1e-9)
    return {"expert_load": [round(v, 3) for v in ratio.tolist()]}


# -----------------------------------------------------------------------------
# files: one tensor per expert, as published


EXPERT_FILE_KEY = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                             r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def fuse_expert_tensors(tensors, c, where):
    """[(name, shape, read)] as a file holds them -> the model's names: each layer's per-expert tensors stacked into
    experts.gate_up_proj and experts.down_proj (read when the stacked tensor is), Mixtral's block_sparse_moe.* as
    mlp.*. Tensors already stacked pass as they are."""
    out, experts = [], {}
    for name, shape, read in tensors:
        match = EXPERT_FILE_KEY.search(name)
        if match is None:
            out.append((name.replace(".block_sparse_moe.gate.", ".mlp.gate."), shape, read))
            continue
        layer, e, kind = int(match[1]), int(match[2]), MIXTRAL_NAMES.get(match[3], match[3])
        experts.setdefault(layer, {}).setdefault(kind, {})[e] = (shape, read)
    for layer, kinds in sorted(experts.items()):
        for kind in ("gate_proj", "up_proj", "down_proj"):
            have = kinds.get(kind, {})
            if sorted(have) != list(range(c.n_experts)):
                raise ValueError(f"{where}: layer {layer} has {kind} for experts {sorted(have)}, expected 0 .. "
                                 f"{c.n_experts - 1} (n_experts={c.n_experts})")
        prefix = f"layers.{layer}.mlp.experts."
        gate, up, down = ([kinds[kind][e] for e in range(c.n_experts)] for kind in ("gate_proj", "up_proj",
                                                                                    "down_proj"))
        (I, D), E = gate[0][0], c.n_experts
        out.append((prefix + "gate_up_proj", (E, 2 * I, D),
                    lambda g=gate, u=up: torch.stack([torch.cat([a(), b()]) for (_, a), (_, b) in zip(g, u)])))
        out.append((prefix + "down_proj", (E, D, I), lambda d=down: torch.stack([r() for _, r in d])))
    return out


def split_expert_tensors(state, mixtral=False):
    """A state dict by the model's names -> one tensor per expert, as published checkpoints hold them (Mixtral's
    names with mixtral)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, I = name.removesuffix("gate_up_proj"), tensor.shape[1] // 2
            for e, w in enumerate(tensor):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = w[:I], w[I:]
        elif name.endswith("mlp.experts.down_proj"):
            for e, w in enumerate(tensor):
                out[f"{name.removesuffix('down_proj')}{e}.down_proj.weight"] = w
        else:
            out[name] = tensor
    if mixtral:  # every layer is MoE: mlp.* -> block_sparse_moe.*, the experts' w1, w3, w2
        renames = {f".{ours}.": f".{theirs}." for theirs, ours in MIXTRAL_NAMES.items()}
        out = {re.sub(r"\.(gate_proj|up_proj|down_proj)\.", lambda m: renames[m[0]],
                      k.replace(".mlp.", ".block_sparse_moe.")): v for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


class Balancing:
    """train.py's side of a mixture-of-experts model. moe_balance: "aux" adds moe_aux_coef times the layers' mean
    auxiliary loss to each micro-step's loss; "bias" (DeepSeek-V3's auxiliary-loss-free balancing, sigmoid router
    only) moves each router's correction bias by moe_bias_rate after every optimizer step; "auto" is bias for a
    sigmoid router, else aux. Either way each step's expert load (summed over micro-steps and processes) is logged."""

    def __init__(self, model, cfg):
        self.model, self.mode, self.load = model, cfg.moe_balance, None
        if self.mode == "auto":
            self.mode = "bias" if model.config.router == "sigmoid" else "aux"
        if self.mode not in ("bias", "aux", "none"):
            raise ValueError(f"moe_balance={cfg.moe_balance!r}: choose auto, bias, aux or none")
        if self.mode == "bias" and model.config.router != "sigmoid":
            raise ValueError("moe_balance=bias needs router='sigmoid' (the router with a correction bias); "
                             f"this model's is {model.config.router!r}: use moe_balance=aux")
        if cfg.moe_aux_coef < 0 or cfg.moe_bias_rate < 0:
            raise ValueError(f"moe_aux_coef={cfg.moe_aux_coef}, moe_bias_rate={cfg.moe_bias_rate}: must be >= 0")
        self.aux_coef, self.bias_rate = cfg.moe_aux_coef, cfg.moe_bias_rate

    def aux_share(self, n_micro_steps, world_size):
        """The auxiliary loss's share of this micro-step (0.0 unless mode aux), after its forward."""
        if self.mode != "aux":
            return 0.0
        return self.aux_coef * aux_loss(self.model) / (n_micro_steps * world_size)

    def count(self):
        """After each micro-step's forward: add its assignments to the step's load."""
        load = tokens_per_expert(self.model)
        self.load = load if self.load is None else self.load + load

    def step(self, distributed):
        """After the optimizer step (every process): the step's load over all processes, the biases moved by it
        (mode bias), and its metrics."""
        load, self.load = self.load, None
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(load)
        if self.mode == "bias":
            update_biases(self.model, load, self.bias_rate)
        return load_metrics(load)
