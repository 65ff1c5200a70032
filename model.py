"""
The transformer: GQA or MLA attention, RoPE, RMSNorm, SwiGLU (or mixture-of-experts layers, moe.py), the one
attention-mask rule, a forward pass per purpose (logits, per-token log-probs, the training loss) over one shared
body, and loading/saving Hugging Face style directories (config.json + model.safetensors).

    model = Transformer(ModelConfig(dim=256, n_layers=4))
    logits = model(ids)                                               # (B, T, vocab_size)
    logprobs = model(ids, output=TokenLogprobs(targets))              # (B, T): DPO, GRPO
    loss = model(ids, output=CrossEntropy(targets)) / n_scored        # pretraining, SFT
    loss = model(ids, CrossEntropy(targets), documents=doc_ids)       # packed rows: (B, T) ids, one per document

This file runs on its own (torch only). Other files are imported where a feature needs them: kv_cache.py for
cached decoding, moe.py for experts, rope.py for a scaled RoPE, quant.py for int8/int4 weights, hf.py and
safetensors for checkpoints, lora.py for an adapter, gguf_in.py for a .gguf file. Parameter names are Hugging
Face's (model.layers.0.self_attn.q_proj.weight, ...), so a Llama, Qwen2, Qwen3, Qwen2/Qwen3-MoE, Mixtral or
DeepseekV3 checkpoint loads (experts stacked on load: moe.py), and ours load in transformers.
"""
import ctypes
import json
import math
import os
import platform
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZED = ("int8", "int4")  # weight-only dtypes from_pretrained takes (quant.py)

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8  # < n_heads: grouped-query attention
    head_dim: int = 0  # 0: dim // n_heads
    dim_ffn: int = 1536  # SwiGLU hidden size
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or a published scaling as HF writes it (rope.py's ROPE_SCALINGS)
    max_len: int = 2048  # longest sequence: RoPE tables and the default KV cache size
    tie_weight: bool = True  # output head shares the token embedding
    attention_bias: bool = False  # biases on q/k/v (Qwen2)
    use_qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    use_gated_attention: bool = False  # sigmoid gate from the block input on the attention output
    attn: str = "gqa"  # "gqa" | "mla"
    # MLA (DeepSeek-V2/V3) sizes, used when attn == "mla"
    q_lora_rank: int = 0  # 0: no query compression
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # mixture of experts (moe.py), used when n_experts > 0: each layer from first_dense_layers on routes each token
    # to n_active_experts of n_experts SwiGLU experts of moe_dim_ffn, beside an optional shared expert
    n_experts: int = 0  # routed experts a layer; 0: every layer is a dense MLP of dim_ffn
    n_active_experts: int = 2  # experts each token goes to (top-k)
    moe_dim_ffn: int = 0  # each expert's hidden size (0: dim_ffn)
    shared_dim_ffn: int = 0  # hidden size of the shared expert every token also goes through (0: none)
    shared_expert_gate: bool = False  # the shared expert's output scaled by a sigmoid gate (Qwen2-MoE)
    router: str = "softmax"  # "softmax" (Qwen-MoE, Mixtral), or "sigmoid" with a balancing bias (DeepSeek-V3)
    norm_topk_prob: bool = True  # the chosen experts' weights renormalized to sum 1
    n_expert_groups: int = 1  # DeepSeek-V3's group-limited routing: experts in groups, ...
    topk_groups: int = 1  # ... tokens choose only within the topk_groups best groups
    routed_scaling_factor: float = 1.0  # the routed experts' weights multiplied by this (DeepSeek-V3)
    first_dense_layers: int = 0  # layers 0 .. first_dense_layers - 1 keep a dense MLP (DeepSeek-V3, Qwen-MoE)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        problems = []
        if self.attn not in ("gqa", "mla"):
            problems.append(f"attn={self.attn!r} (expected 'gqa' or 'mla')")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        rope_dim = self.qk_rope_head_dim if self.attn == "mla" else self.head_dim
        if rope_dim % 2:
            problems.append(f"the RoPE dimension {rope_dim} must be even")
        if self.attn == "mla" and (self.attention_bias or self.use_qk_norm or self.use_gated_attention):
            problems.append("attention_bias, use_qk_norm and use_gated_attention apply to attn='gqa' only")
        if self.rope_scaling is not None:
            from rope import rope_scaling_problems

            problems += rope_scaling_problems(self.rope_scaling)
        if self.n_experts > 0:
            from moe import moe_problems

            self.moe_dim_ffn = self.moe_dim_ffn or self.dim_ffn
            problems += moe_problems(self)
        else:  # the MoE fields (n_experts and those after it) keep their defaults on a dense model
            moe = fields(self)[[f.name for f in fields(self)].index("n_experts"):]
            changed = [f"{f.name}={getattr(self, f.name)!r}" for f in moe if getattr(self, f.name) != f.default]
            if changed:
                problems.append(f"{', '.join(changed)}: MoE settings on a dense model (n_experts > 0 makes one)")
        if problems:
            raise ValueError("ModelConfig: " + "; ".join(problems))

    @classmethod
    def from_file(cls, path, overrides=()):
        """A preset: a Python file of plain assignments (configs/tiny.py), then "--key=value" overrides."""
        from settings import load_settings

        defaults = {f.name: f.default for f in fields(cls)}
        return cls(**load_settings(defaults, [path, *overrides], where=path))

    @classmethod
    def from_dict(cls, d, where="config"):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown model config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 like the reference implementations, then scale in the input dtype
        if x.dtype == torch.float32:  # no casts: a decode step is ~200 tiny ops, each costing microseconds
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.dim_ffn, bias=False)
        self.up_proj = nn.Linear(config.dim, config.dim_ffn, bias=False)
        self.down_proj = nn.Linear(config.dim_ffn, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(c, rope_dim, device=None):
    """cos and sin (max_len, rope_dim) for positions 0 .. max_len - 1, in apply_rope's layout: the sign of
    rotate_half folded into sin's first half. A scaled RoPE's frequencies (linear, llama3, yarn) come from rope.py."""
    if c.rope_scaling is None:
        exponents = torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim
        inv_freq, attention_factor = 1.0 / c.rope_theta ** exponents, 1.0
    else:
        from rope import rope_frequencies

        inv_freq, attention_factor = rope_frequencies(c, rope_dim, device)
    freqs = torch.outer(torch.arange(c.max_len, device=device).float(), inv_freq)
    cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    """Hugging Face's rotate_half convention, x * cos + cat(-x2, x1) * sin, as x * cos + roll(x) * sin with
    the sign folded into sin's first half (rope_tables): 3 kernels instead of 6. x (B, nh, T, d);
    cos/sin (T, d) or (B, 1, T, d)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def attention_mask(config, query_positions, n_keys, cached=True, aligned=False, documents=None):
    """Which keys each query attends to: the one place that decides it, for training, cached prefill and decode,
    ragged batches and the compiled step. Returns keyword arguments for F.scaled_dot_product_attention.
    query_positions (b, T): each new token's position in its row (training: None, or a packed row's positions);
    key j of a row (0 .. n_keys - 1) is its token at position j, and the query at position p sees it when j <= p
    (causal). Keys past a row's end lie past all its
    queries. Two shortcuts where causality is the only rule: not cached (training: the queries are the keys,
    positions 0 .. T - 1) is SDPA's own is_causal; aligned (one new token per row, each row exactly n_keys long)
    hides nothing, so no mask. A rule added here (a window, document boundaries) must also bypass those two.
    documents (b, T), training only (packed rows): the query at index i sees key j when j <= i and both lie in one
    document, a run of equal ids (document_runs); the positions are then each token's place in its document."""
    if documents is not None:
        if cached:
            raise ValueError("attention_mask: documents (packed rows) are for training only, not a cached pass")
        runs = document_runs(documents)
        keys = torch.arange(n_keys, device=documents.device)
        causal = keys[None, :] <= keys[:, None]  # (T, T) by index in the row, whatever the positions
        return {"attn_mask": (causal & (runs[:, :, None] == runs[:, None, :]))[:, None]}  # (b, 1, T, T)
    if not cached:
        return {"is_causal": True}
    if aligned:
        return {}
    keys = torch.arange(n_keys, device=query_positions.device)
    return {"attn_mask": (keys <= query_positions[:, :, None])[:, None]}  # (b, 1, T, n_keys)


def document_starts(documents):
    """documents (b, T) ids -> (b, T) bool, True at each document's first token. A document is a run of equal ids,
    so an id that comes back later in a row starts another document (data.py never reuses one in a row)."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return starts


def document_runs(documents):
    """documents (b, T) -> (b, T) run numbers 1, 2, ...: the document each token belongs to, for the mask."""
    return document_starts(documents).long().cumsum(1)


def document_positions(documents):
    """documents (b, T) -> each token's position in its document (its index minus its document's first index):
    RoPE restarts at every document of a packed row."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    return index - torch.where(document_starts(documents), index, 0).cummax(1).values


class Attention(nn.Module):
    """Grouped-query attention, optionally with q/k RMSNorm (Qwen3) and a sigmoid output gate."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        if c.use_qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)
        if c.use_gated_attention:
            self.output_gate = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)

    def forward(self, x, cos, sin, mask, index=None, kv=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if index is not None:
            k_pool, v_pool = kv  # (slots, n_kv, hd) each
            index.write(k_pool, k.transpose(1, 2))
            index.write(v_pool, v.transpose(1, 2))
            k, v = index.read(k_pool), index.read(v_pool)  # (b, n_kv, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, **mask, enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if hasattr(self, "output_gate"):
            y = y * torch.sigmoid(self.output_gate(x))
        return self.o_proj(y)


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3). The cache holds, per token, the normalised KV latent
    and the shared RoPE key: kv_lora_rank + qk_rope_head_dim numbers a layer, whatever the head count."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.n_heads, self.kv_lora_rank = c.n_heads, c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        q_out = c.n_heads * (self.nope_dim + self.rope_dim)
        if c.q_lora_rank:
            self.q_a_proj = nn.Linear(c.dim, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(c.dim, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.dim, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(c.n_heads * self.v_dim, c.dim, bias=False)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        if c.rope_scaling is not None:  # YaRN may sharpen every dimension
            from rope import mla_softmax_scale

            self.scale = mla_softmax_scale(c)

    def forward(self, x, cos, sin, mask, index=None, kv=None):
        B, T, _ = x.shape
        H, r = self.n_heads, self.kv_lora_rank
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q = q.view(B, T, H, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, H, T, .)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([r, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, r)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope[:, None], cos, sin)  # (B, 1, T, rope)
        if index is None:
            # training: expand the latent into per-head keys and values
            kv = self.kv_b_proj(latent).view(B, T, H, self.nope_dim + self.v_dim).transpose(1, 2)
            k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)
            y = F.scaled_dot_product_attention(torch.cat([q_nope, q_rope], -1), k, v, **mask, scale=self.scale)
        else:
            # decoding: absorb kv_b_proj into the query and the output, attend over the cached latent
            # like multi-query attention with one (r + rope)-wide key and an r-wide value
            w = self.kv_b_proj.weight
            w = w.to_local() if hasattr(w, "to_local") else w  # tensor parallel: this process's heads (a DTensor)
            w = w.view(H, self.nope_dim + self.v_dim, r)
            w_k, w_v = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, nope, r), (H, v, r)
            pool = kv[0]  # (slots, 1, r + rope)
            index.write(pool, torch.cat([latent, k_rope[:, 0]], dim=-1)[:, :, None])  # (B, T, 1, r + rope)
            keys = index.read(pool)  # (b, 1, L, r + rope)
            q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_k)
            y = F.scaled_dot_product_attention(
                torch.cat([q_latent, q_rope], -1), keys, keys[..., :r], **mask, scale=self.scale,
                enable_gqa=True)  # (B, H, T, r)
            y = torch.einsum("bhtr,hvr->bhtv", y, w_v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))


# -----------------------------------------------------------------------------
# the output head for training: log-probs of the targets, computed in row chunks


class ChunkedTargetLogprobs(torch.autograd.Function):
    """hidden (N, D) @ weight (V, D).T / temperature -> log p(target) (N,), 0 where the target is -100, without
    (N, V) logits: rows go through the head `chunk` at a time, and backward recomputes each chunk's logits (a 4th
    head matmul instead of keeping N x V floats). For DPO's and GRPO's log-probs, whose loss is not linear in them.
    Matmuls run in autocast's dtype when it is on (as nn.Linear would), softmax in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        dtype = matmul_dtype(hidden)
        w, picked_ids = weight.to(dtype), targets.clamp(min=0)
        logprobs, lse = torch.zeros(2, hidden.size(0), device=hidden.device)
        for i in range(0, hidden.size(0), chunk):
            logits = (hidden[i:i + chunk].to(dtype) @ w.T).float() / temperature  # (chunk, V)
            lse[i:i + chunk] = logits.logsumexp(-1)
            logprobs[i:i + chunk] = logits.gather(-1, picked_ids[i:i + chunk, None])[:, 0] - lse[i:i + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return logprobs * (targets != -100)

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, lse = ctx.saved_tensors
        w, grad_logprobs = weight.to(ctx.dtype), grad_logprobs * (targets != -100)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for i in range(0, hidden.size(0), ctx.chunk):
            h, g = hidden[i:i + ctx.chunk].to(ctx.dtype), grad_logprobs[i:i + ctx.chunk]
            probs = ((h @ w.T).float() / ctx.temperature - lse[i:i + ctx.chunk, None]).exp()  # (chunk, V)
            grad_logits = probs.mul_(-g[:, None])  # d log p_t / d logits = onehot(t) - p
            grad_logits[torch.arange(h.size(0), device=h.device), targets[i:i + ctx.chunk].clamp(min=0)] += g
            grad_logits = (grad_logits / ctx.temperature).to(ctx.dtype)
            grad_hidden[i:i + ctx.chunk] = grad_logits @ w
            grad_weight += (grad_logits.T @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of hidden (N, D) @ weight (V, D).T against targets (N,) (-100: not scored), with
    F.cross_entropy's label smoothing, in row chunks. The loss is linear in each token's log-probs, so the
    gradients are computed in the forward pass, chunk by chunk, and backward only scales them: three head
    matmuls, as without chunks, and never (N, V) logits (Liger's fused linear cross-entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, label_smoothing, chunk):
        dtype, eps = matmul_dtype(hidden), label_smoothing
        w, needs_grad = weight.to(dtype), any(ctx.needs_input_grad[:2])
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        total = torch.zeros((), device=hidden.device)
        for i in range(0, hidden.size(0), chunk):
            h, t = hidden[i:i + chunk].to(dtype), targets[i:i + chunk]
            scored, picked_ids = (t != -100).float(), t.clamp(min=0)
            logits = (h @ w.T).float()  # (chunk, V)
            lse = logits.logsumexp(-1)
            picked = logits.gather(-1, picked_ids[:, None])[:, 0]
            total += (((1 - eps) * (lse - picked) + eps * (lse - logits.mean(-1))) * scored).sum()
            if needs_grad:  # d loss / d logits = p - (1 - eps) onehot(t) - eps / V on scored rows
                grad_logits = logits.sub_(lse[:, None]).exp_().sub_(eps / logits.size(1)).mul_(scored[:, None])
                grad_logits[torch.arange(h.size(0), device=h.device), picked_ids] -= (1 - eps) * scored
                grad_logits = grad_logits.to(dtype)
                grad_hidden[i:i + chunk] = grad_logits @ w
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled in place (no second weight-sized buffer): once
        return grad_hidden.mul_(grad_total), grad_weight.mul_(grad_total).to(ctx.weight_dtype), None, None, None


def matmul_dtype(x):
    """The dtype nn.Linear would multiply x in: autocast's when it is on, else x's."""
    on = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


def head_chunk_rows(vocab_size):
    """Rows per chunk of the output head in training: about 32M logits (128 MB in float32) at a time."""
    return max(16, 2**25 // vocab_size)


# -----------------------------------------------------------------------------
# what a forward pass gives: forward(ids, output=...) hands the last hidden states (B, T, dim) to one of these


class Logits:
    """float32 logits (B, T, vocab_size); last_only: (B, 1, vocab_size) at each row's last valid token only, the
    one that predicts the next token (a prefill then skips the output head everywhere else)."""

    def __init__(self, last_only=False):
        self.last_only = last_only

    def __call__(self, model, hidden, index):
        if self.last_only and (index is None or index.last is None):
            hidden = hidden[:, -1:]
        elif self.last_only:  # a right-padded batch: each row's last valid token
            hidden = hidden.flatten(0, 1).index_select(0, index.last)[:, None]
        return model.lm_head(model.norm(hidden)).float()


class TokenLogprobs:
    """log p(target) (B, T) under softmax(logits / temperature), 0 where the target is -100 (not scored): DPO's and
    GRPO's per-token log-probs, the output head in row chunks, never (B, T, vocab_size) logits."""

    def __init__(self, targets, temperature=1.0):
        self.targets, self.temperature = targets, temperature

    def __call__(self, model, hidden, index):
        hidden, targets = model.norm(hidden).flatten(0, 1), self.targets.flatten()
        weight = head_weight(model)
        if weight is None:  # an adapted head (LoRA on lm_head): full logits, through its forward
            logprobs = (model.lm_head(hidden).float() / self.temperature).log_softmax(-1)
            picked = logprobs.gather(-1, targets.clamp(min=0)[:, None])[:, 0] * (targets != -100)
        else:
            picked = ChunkedTargetLogprobs.apply(hidden, weight, targets, self.temperature,
                                                 head_chunk_rows(model.config.vocab_size))
        return picked.view(self.targets.shape)


class CrossEntropy:
    """The summed next-token cross-entropy of the scored targets (-100: not scored) with F.cross_entropy's label
    smoothing, a scalar (divide by the scored tokens for the mean): the pretraining and SFT loss, in row chunks."""

    def __init__(self, targets, label_smoothing=0.0):
        self.targets, self.label_smoothing = targets, label_smoothing

    def __call__(self, model, hidden, index):
        hidden, targets = model.norm(hidden).flatten(0, 1), self.targets.flatten()
        weight = head_weight(model)
        if weight is None:
            return F.cross_entropy(model.lm_head(hidden).float(), targets, reduction="sum",
                                   label_smoothing=self.label_smoothing)
        return ChunkedCrossEntropy.apply(hidden, weight, targets, self.label_smoothing,
                                         head_chunk_rows(model.config.vocab_size))


def head_weight(model):
    """The output head's weight for the chunked head: a plain head's, or the one a head with trained token rows gives
    (lora.py's TokenHead); None for an adapted head (LoRA on lm_head), which only its forward computes."""
    head = model.lm_head
    if hasattr(head, "head_weight"):
        return head.head_weight()
    return head.weight if type(head) is nn.Linear else None


# -----------------------------------------------------------------------------
# the model


class Block(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = MLAttention(config) if config.attn == "mla" else Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        if config.n_experts and layer >= config.first_dense_layers:
            from moe import MoE  # only a mixture-of-experts model needs it

            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, index=None, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, index, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_weight:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False  # recompute block activations in backward (train.py sets it)
        self.tp_size = 1  # processes the blocks' heads are split over (parallel.py sets it): the KV cache holds a share
        self.init_rope()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_rope(self, device=None):
        c = self.config
        rope_dim = c.qk_rope_head_dim if c.attn == "mla" else c.head_dim
        cos, sin = rope_tables(c, rope_dim, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, output=None, cache=None, rows=None, input_lengths=None, documents=None):
        """input_ids (B, T) -> what `output` makes of the last hidden states: Logits() (the default), TokenLogprobs or
        CrossEntropy (below). Without a cache: causal attention over input_ids; documents (B, T), packed rows: ids
        (a document is a run of equal ids) that attention never crosses and at which positions restart. With a cache
        (kv_cache.KVCache): input_ids are appended to cache rows `rows` (default all) at each row's own length;
        input_lengths (B,) counts the valid tokens of a right-padded batch."""
        output = output or Logits()
        B, T = input_ids.shape
        if cache is None:
            if T > self.config.max_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_len={self.config.max_len}")
            if documents is not None and documents.shape != input_ids.shape:
                raise ValueError(f"documents {tuple(documents.shape)} must have input_ids' shape {(B, T)}")
            return output(self, self.hidden_states(input_ids, documents=documents), None)
        if documents is not None:
            raise ValueError("documents (packed rows) are for training: a cached pass holds one sequence a row")
        from kv_cache import CacheIndex  # only cached decoding needs the cache

        if rows is None and B != cache.batch_size:
            rows = range(B)
        n_new = None if input_lengths is None else torch.as_tensor(input_lengths).tolist()
        index = CacheIndex(cache, T, rows, n_new, input_ids.device)
        result = output(self, self.hidden_states(input_ids, cache.layers, index), index)
        index.advance(cache)
        return result

    def hidden_states(self, input_ids, cache_layers=None, index=None, documents=None):
        """The body every purpose shares: input_ids (B, T) -> the last block's output (B, T, dim), before the final
        norm, over a cache's layers at the places `index` (kv_cache.CacheIndex) says, or none (training, where
        documents (B, T) ids, when given, restart positions and bound attention at each document)."""
        B, T = input_ids.shape
        if index is None:  # training: positions 0 .. T - 1, or restarting at each document of a packed row
            positions = None if documents is None else document_positions(documents)  # (B, T)
            mask = attention_mask(self.config, positions, T, cached=False, documents=documents)
        else:
            positions = index.positions.clamp(max=self.config.max_len - 1)  # padding may run past the end
            mask = attention_mask(self.config, index.positions, index.read_slots.shape[1], aligned=index.aligned)
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, d)
        x = self.embed_tokens(input_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            kv = None if index is None else cache_layers[i]
            if self.grad_checkpointing and self.training and index is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, index, kv)
        return x

    def run(self, input_ids, cache_layers, index):
        """Logits (B, T, vocab_size) over a cache's layers: the decode step sample.Engine compiles."""
        return Logits()(self, self.hidden_states(input_ids, cache_layers, index), index)

    # --- sizes --------------------------------------------------------------

    def num_params(self, embedding=True):
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once
        n += sum(m.in_features * m.out_features for name, m in self.named_modules()  # quant.py's layers hold buffers
                 if getattr(m, "reformatted", False) and not (name == "lm_head" and self.config.tie_weight))
        return n if embedding else n - self.embed_tokens.weight.numel()

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per non-embedding weight plus attention; with frozen
        weights (LoRA's base) 4 per weight, as they take no weight-gradient matmul, and 2 more per trainable one."""
        c = self.config
        if c.attn == "mla":
            qk_dim, v_dim = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        else:
            qk_dim = v_dim = c.head_dim
        # the output head multiplies even when it shares the embedding's weight
        weights = self.num_params(embedding=False) + (c.vocab_size * c.dim if c.tie_weight else 0)
        trainable = min(weights, sum(p.numel() for p in self.parameters() if p.requires_grad))
        if c.n_experts:  # a token multiplies by its chosen experts' weights only
            from moe import inactive_params

            weights, trainable = weights - inactive_params(c), trainable - inactive_params(c)
        return 4 * weights + 2 * trainable + 6 * c.n_layers * c.n_heads * (qk_dim + v_dim) * seq_len

    # --- checkpoints ----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, adapter=""):
        """Load a directory of config.json + model.safetensors (or sharded safetensors with an index): ours, or
        Hugging Face Llama/Qwen2/Qwen3/Qwen2-MoE/Qwen3-MoE/Mixtral/DeepseekV3; or a .gguf file (gguf_in.py). Nothing
        is unpickled.
        dtype: a torch dtype (default float32), or "int8" or "int4" (weight-only: quant.py); adapter: a LoRA
        adapter directory (lora.py) trained on this model, merged into each weight as it loads, before any
        quantization."""
        if str(path).endswith(".gguf"):
            from gguf_in import read_model  # only a GGUF reader needs the gguf package

            read = torch.bfloat16 if dtype in QUANTIZED else dtype  # the dtype int8/int4 is quantized from
            return cls.from_tensors(*read_model(str(path), read), path, device, dtype, adapter)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such model directory")
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path}: missing (a model directory needs config.json and "
                                    "model.safetensors)")
        try:
            with open(config_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        from hf import config_from_hf, safetensors_tensors

        config, rope_interleave = config_from_hf(hf, config_path)
        tensors = safetensors_tensors(path)
        if config.n_experts:  # files hold one tensor per expert; the model stacks them
            from moe import fuse_expert_tensors

            tensors = fuse_expert_tensors(tensors, config, path)
        if rope_interleave:
            from rope import deinterleave_rope

            tensors = [(k, shape, lambda k=k, read=read: deinterleave_rope(k, read(), config))
                       for k, shape, read in tensors]
        return cls.from_tensors(config, tensors, path, device, dtype, adapter)

    @classmethod
    def from_state_dict(cls, config, state, where, device=None, dtype=None):
        """A model from a config and its weights by Hugging Face name (see from_tensors)."""
        return cls.from_tensors(config, [(k, v.shape, lambda v=v: v) for k, v in state.items()], where, device, dtype)

    @classmethod
    def from_tensors(cls, config, tensors, where, device=None, dtype=None, adapter=""):
        """A model from a config and [(Hugging Face name, shape, read)], names and shapes checked first. The model
        is built on the meta device; each read() tensor is then converted (or quantized: quant.py) into place and
        dropped before the next is read: loading takes the final weights plus one tensor, never a float32 copy."""
        if not (dtype is None or dtype in QUANTIZED or isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{where}: dtype={dtype!r}: expected a floating torch dtype, 'int8' or 'int4'")
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        tensors = [(k.removeprefix("model."), shape, read) for k, shape, read in tensors]
        if config.tie_weight:  # the head is the embedding (a file may hold both)
            tensors = [t for t in tensors if t[0] != "lm_head.weight"]
            expected.pop("lm_head.weight")
        names = {k for k, _, _ in tensors}
        problems = [f"missing {k}" for k in expected if k not in names]
        problems += [f"unexpected {k}" for k in names if k not in expected]
        problems += [f"{k}: shape {tuple(shape)} in the file, {tuple(expected[k])} from the config"
                     for k, shape, _ in tensors if k in expected and tuple(shape) != tuple(expected[k])]
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
            raise ValueError(f"{where}: weights do not match its config: {shown}")
        if adapter:
            from lora import merging

            merge = merging(adapter, where, expected)
        quantized = dtype in QUANTIZED
        if quantized:
            from quant import quantize

            quantize(model, dtype)
        dtype = torch.bfloat16 if quantized else dtype or torch.float32
        for key, _, read in tensors:
            tensor = read()
            if adapter:
                tensor = merge(key, tensor)
            place(model, key, tensor, device, dtype)
            if quantized and config.tie_weight and key == "embed_tokens.weight":  # the head quantized, not the table
                place(model, "lm_head.weight", tensor, device, dtype)
            del tensor  # the source (a converted copy's file pages) goes before the next one is read
            release_freed_memory()
        if config.tie_weight and not quantized:
            model.lm_head.weight = model.embed_tokens.weight
        model.init_rope(device)
        return model

    def save_pretrained(self, path, state_dict=None, token_ids=None):
        """Write config.json (readable by transformers where an HF architecture expresses the model) and
        model.safetensors. state_dict: a full one gathered elsewhere (FSDP), default this module's.
        token_ids: {"eos_token_id": ..., "bos_token_id": ..., "pad_token_id": ...} from the tokenizer; they
        are written as null when not given, since transformers would otherwise assume Llama's 1 and 2.
        Writes into `path` directly; callers wanting atomicity write a temp dir and rename."""
        from safetensors.torch import save_file

        from hf import config_to_hf

        os.makedirs(path, exist_ok=True)
        state = {}
        for k, v in (state_dict or self.state_dict()).items():
            if self.config.tie_weight and k == "lm_head.weight":
                continue
            state[k if k.startswith("lm_head") else "model." + k] = v.detach().contiguous().cpu()
        hf = config_to_hf(self.config, str(next(iter(state.values())).dtype).removeprefix("torch."), token_ids)
        if self.config.n_experts:  # one tensor per expert, as published checkpoints hold them
            from moe import split_expert_tensors

            state = split_expert_tensors(state, mixtral=hf["model_type"] == "mixtral")
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)


def release_freed_memory():
    """Hand memory freed on the C heap back to the system. glibc keeps it, and the temporaries of converting or
    quantizing one weight would otherwise stay resident between the weights loaded after it (tens of MB for an
    int8 load). A no-op where the C library is not glibc."""
    if _libc is not None:
        _libc.malloc_trim(0)


_libc = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


def place(model, key, tensor, device, dtype):
    """Put a loaded tensor in the model (on the meta device until then) as `key`, in dtype (integer tensors as they
    are), or quantized where the model has a quantized layer (quant.py's load_weight). A tensor already in dtype on
    the device is kept, not copied."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if hasattr(module, "load_weight") and attr == "weight":
        module.load_weight(tensor, device)
        return
    old = getattr(module, attr)
    new = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    setattr(module, attr, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
