"""
Rotary position embedding, scaled: the published ways of stretching it past the context a model was trained on
(linear, Llama 3.1's llama3, YaRN), computed as transformers computes them.

A scaling is a ModelConfig's `rope_scaling`: None, or a dict the way Hugging Face writes it in config.json's
`rope_parameters` (older files: `rope_scaling`), e.g. {"rope_type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 32768}. model.rope_tables takes a scaled model's frequencies from here (an
unscaled one needs nothing of this file); training, the cached decode and the compiled decode step all read those
tables, so all follow it.
"""
import math

import torch

# rope_type -> (required keys, optional keys), as transformers' modeling_rope_utils reads them. Other types
# (dynamic, longrope, ...) are refused rather than run unscaled.
ROPE_SCALINGS = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
}


def rope_scaling_problems(scaling):
    """What is wrong with a ModelConfig.rope_scaling (a list of sentences, empty when nothing is)."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [f"rope_scaling={scaling!r} (expected None or a dict with a rope_type)"]
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        return [f"rope_scaling rope_type={kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})"]
    required, optional = ROPE_SCALINGS[kind]
    problems = []
    if missing := sorted(required - set(scaling)):
        problems.append(f"rope_scaling ({kind}) lacks {missing}")
    if unknown := sorted(set(scaling) - required - optional - {"rope_type"}):
        problems.append(f"rope_scaling ({kind}) has unknown keys {unknown}; known: {sorted(required | optional)}")
    # None stands for transformers' default where a key is optional; truncate is a bool (None would mean False)
    wrong = [f"{k}={v!r}" for k, v in scaling.items() if k != "rope_type" and not (
        type(v) is bool if k == "truncate" else type(v) in (int, float) or (v is None and k in optional))]
    if wrong:
        problems.append(f"rope_scaling ({kind}): {', '.join(wrong)} (expected numbers; truncate true or false)")
    return problems


def yarn_mscale(factor, mscale=1.0):
    """YaRN's attention temperature (the paper's eq. 21), as transformers' yarn_get_mscale."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(c, rope_dim, device=None):
    """(inv_freq (rope_dim / 2,), the factor on cos and sin) for ModelConfig c, in the float32 operations of
    transformers' _compute_*_parameters, so that a scaled model gives its logits."""
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim
    pos_freqs = c.rope_theta ** exponents
    inv_freq, s = 1.0 / pos_freqs, c.rope_scaling or {"rope_type": None}
    factor = s.get("factor")
    if s["rope_type"] == "linear":  # positions divided by factor
        return inv_freq / factor, 1.0
    if s["rope_type"] == "llama3":  # long wavelengths divided by factor, short ones kept, a smooth ramp between
        original, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    if s["rope_type"] != "yarn":
        return inv_freq, 1.0
    # yarn: dimensions that turn fewer than beta_slow times over the original context are divided by factor, those
    # that turn more than beta_fast times are kept, a linear ramp between; cos and sin scaled by attention_factor
    attention_factor, mscale, mscale_all_dim = s.get("attention_factor"), s.get("mscale"), s.get("mscale_all_dim")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    original, log_base = s["original_max_position_embeddings"], 2 * math.log(c.rope_theta)
    low, high = (rope_dim * math.log(original / (turns * 2 * math.pi)) / log_base  # the dim turning `turns` times
                 for turns in (s.get("beta_fast") or 32, s.get("beta_slow") or 1))
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against dividing by zero
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    kept = 1 - ramp
    return 1.0 / (factor * pos_freqs) * (1 - kept) + inv_freq * kept, float(attention_factor)


def mla_softmax_scale(c):
    """DeepSeek's 1 / sqrt(query width), times yarn_mscale(factor, mscale_all_dim)^2 under YaRN: its attention
    sharpens every dimension, not only the rotary ones (transformers' yarn_apply_mscale)."""
    scale, s = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5, c.rope_scaling or {}
    if s.get("mscale_all_dim"):
        scale *= yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2
    return scale


def deinterleave_rope(name, w, c):
    """A weight with DeepseekV3's rope_interleave=True rows put in rotate_half's order: it rotates (x0, x1),
    (x2, x3), ... pairs; permuting the rows that produce the RoPE part of q and k to (x0, x2, ..., x1, x3, ...)
    gives the same attention under rotate_half."""
    perm = torch.cat([torch.arange(0, c.qk_rope_head_dim, 2), torch.arange(1, c.qk_rope_head_dim, 2)])
    nope, rope = c.qk_nope_head_dim, c.qk_rope_head_dim
    if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        w = w.view(c.n_heads, nope + rope, -1)
        return torch.cat([w[:, :nope], w[:, nope:][:, perm]], dim=1).reshape(c.n_heads * (nope + rope), -1)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return torch.cat([w[: c.kv_lora_rank], w[c.kv_lora_rank :][perm]], dim=0)
    return w
