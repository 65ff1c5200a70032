"""
Hugging Face model directories: config.json to and from a ModelConfig (transformers reads what save_pretrained
writes; a Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Mixtral or DeepseekV3 config.json reads back), and the
safetensors files, read one tensor at a time (Transformer.from_pretrained fills the model from them).
"""
import functools
import json
import os
from dataclasses import asdict, fields

from safetensors import SafetensorError, safe_open

from rope import ROPE_SCALINGS

# -----------------------------------------------------------------------------
# config.json

SUPPORTED = ("LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, "
             "MixtralForCausalLM, DeepseekV3ForCausalLM or this project's own")

# -----------------------------------------------------------------------------
# which published architecture expresses a ModelConfig: the one place for Hugging Face (config_to_hf) and llama.cpp
# (export.py). Every architecture expresses COMMON; each also the fields listed with it. Any other field at a value
# other than its default (a new field, gated attention) rules an architecture out, naming the field: the model is
# then saved as this project's own and export.py refuses it, never saved as a plain Llama that runs differently.

COMMON = {"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "dim_ffn", "norm_eps", "rope_theta",
          "rope_scaling", "max_len", "tie_weight"}
MLA = {"attn", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}
MOE = {"n_experts", "n_active_experts", "moe_dim_ffn"}  # every MoE family's; the rest as each has them
ARCHITECTURES = [  # (HF model_type, HF class, llama.cpp architecture, when it applies, the fields it expresses)
    ("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek2", lambda c: c.attn == "mla",
     MLA | MOE | {"shared_dim_ffn", "router", "norm_topk_prob", "n_expert_groups", "topk_groups",
                  "routed_scaling_factor", "first_dense_layers"}),
    ("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe", lambda c: c.n_experts and c.use_qk_norm,
     {"use_qk_norm", "norm_topk_prob", "first_dense_layers"} | MOE | MLA - {"attn"}),
    ("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2moe", lambda c: c.n_experts and c.shared_expert_gate,
     {"attention_bias", "norm_topk_prob", "first_dense_layers", "shared_dim_ffn", "shared_expert_gate"} | MOE
     | MLA - {"attn"}),
    ("mixtral", "MixtralForCausalLM", "llama", lambda c: c.n_experts, MOE | MLA - {"attn"}),
    ("qwen3", "Qwen3ForCausalLM", "qwen3", lambda c: c.use_qk_norm, {"use_qk_norm"} | MLA - {"attn"}),
    ("qwen2", "Qwen2ForCausalLM", "qwen2", lambda c: c.attention_bias, {"attention_bias"} | MLA - {"attn"}),
    ("llama", "LlamaForCausalLM", "llama", lambda c: True, MLA - {"attn"}),  # MLA's sizes are unused under GQA
]


def architecture(c):
    """-> (HF model_type, HF class, llama.cpp architecture) expressing every field of ModelConfig c, or a ValueError
    naming the fields no published architecture expresses."""
    from model import ModelConfig

    name, hf_class, gguf, _, expressed = next(a for a in ARCHITECTURES if a[3](c))
    lost = [f"{f.name}={getattr(c, f.name)!r}" for f in fields(ModelConfig)
            if f.name not in COMMON | expressed and getattr(c, f.name) != f.default]
    if name == "deepseek_v3" and c.n_experts and c.router != "sigmoid":  # its router is the sigmoid one
        lost.append(f"router={c.router!r}")
    if name == "deepseek_v3" and c.shared_dim_ffn % (c.moe_dim_ffn or 1):  # shared experts of the routed size
        lost.append(f"shared_dim_ffn={c.shared_dim_ffn!r} (not a multiple of moe_dim_ffn={c.moe_dim_ffn})")
    if lost:
        raise ValueError(f"{', '.join(lost)}: no published architecture has this ({hf_class} and llama.cpp's "
                         f"{gguf} would run the model without it)")
    return name, hf_class, gguf


def config_to_hf(c, dtype="float32", token_ids=None):
    """config.json for transformers, as the architecture that expresses every field (see architecture), or as this
    project's own ("astrai", which transformers refuses to load) with a note naming what none expresses. Our own
    fields go under "astrai" so nothing is lost on the way back."""
    hf = {
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.dim_ffn,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})},
        "tie_word_embeddings": c.tie_weight, "attention_bias": False, "dtype": dtype,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {}),
    }
    try:
        name, hf_class, _ = architecture(c)
    except ValueError as e:
        name, hf_class = "astrai", "AstrAIForCausalLM"
        hf["note"] = f"{e}: load with model.py"
    hf.update(model_type=name, architectures=[hf_class])
    if name == "deepseek_v3":
        hf.update(q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank,
                  qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                  v_head_dim=c.v_head_dim, num_key_value_heads=c.n_heads, head_dim=c.qk_rope_head_dim,
                  first_k_dense_replace=c.n_layers, moe_intermediate_size=c.dim_ffn, rope_interleave=False)
        if c.n_experts:
            hf.update(n_routed_experts=c.n_experts, num_experts_per_tok=c.n_active_experts,
                      moe_intermediate_size=c.moe_dim_ffn, n_shared_experts=c.shared_dim_ffn // c.moe_dim_ffn,
                      n_group=c.n_expert_groups, topk_group=c.topk_groups, norm_topk_prob=c.norm_topk_prob,
                      routed_scaling_factor=c.routed_scaling_factor, first_k_dense_replace=c.first_dense_layers,
                      scoring_func="sigmoid", topk_method="noaux_tc")
    elif name in ("qwen3_moe", "qwen2_moe"):
        hf.update(num_experts=c.n_experts, num_experts_per_tok=c.n_active_experts, norm_topk_prob=c.norm_topk_prob,
                  moe_intermediate_size=c.moe_dim_ffn, decoder_sparse_step=1,
                  mlp_only_layers=list(range(c.first_dense_layers)))
        if name == "qwen2_moe":
            del hf["attention_bias"]
            hf.update(qkv_bias=c.attention_bias, shared_expert_intermediate_size=c.shared_dim_ffn)
    elif name == "mixtral":
        hf.update(num_local_experts=c.n_experts, num_experts_per_tok=c.n_active_experts,
                  intermediate_size=c.moe_dim_ffn, sliding_window=None, router_jitter_noise=0.0)
    elif name == "qwen2":
        del hf["attention_bias"]  # Qwen2's q/k/v biases are not a setting
    elif name == "llama":
        hf["mlp_bias"] = False
    hf["astrai"] = asdict(c)
    return hf


def config_from_hf(hf, where):
    """ModelConfig from a config.json dict; returns (config, rope_interleave)."""
    from model import ModelConfig  # model.py imports this file: the class is there once both are loaded

    if "astrai" in hf:
        return ModelConfig.from_dict(hf["astrai"], where), False
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2", "qwen3", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral"):
        arch = hf.get("architectures") or model_type
        raise ValueError(f"{where}: unsupported architecture {arch!r}; supported: {SUPPORTED}")

    def need(cond, what):
        if not cond:
            raise ValueError(f"{where}: {model_type} with {what} is not supported")

    need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} (only silu)")
    rope, rope_scaling = rope_from_hf(hf)
    need(rope.get("rope_type") in ("default", *ROPE_SCALINGS), f"RoPE scaling type {rope.get('rope_type')!r} "
         f"in {rope} (supported: default, {', '.join(ROPE_SCALINGS)})")
    need(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) == 1.0, "partial_rotary_factor")
    need(not hf.get("mlp_bias"), "mlp_bias")
    need(not hf.get("use_sliding_window"), "sliding window attention")
    n_heads = hf["num_attention_heads"]
    c = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        dim_ffn=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_scaling=rope_scaling,
        max_len=hf.get("max_position_embeddings", 2048), tie_weight=bool(hf.get("tie_word_embeddings", False)),
    )
    if model_type == "llama":
        need(not hf.get("attention_bias"), "attention_bias (biases on o_proj too)")
    elif model_type == "qwen2":
        c["attention_bias"] = True
    elif model_type in ("qwen3", "qwen3_moe"):
        need(not hf.get("attention_bias"), "attention_bias (biases on o_proj too)")
        c["use_qk_norm"] = True
    elif model_type == "qwen2_moe":
        c.update(attention_bias=bool(hf.get("qkv_bias", True)), shared_dim_ffn=hf["shared_expert_intermediate_size"],
                 shared_expert_gate=True)
    elif model_type == "mixtral":
        need(hf.get("sliding_window") is None, f"sliding_window={hf.get('sliding_window')} (sliding window attention)")
        c.update(n_experts=hf["num_local_experts"], n_active_experts=hf.get("num_experts_per_tok", 2),
                 moe_dim_ffn=hf["intermediate_size"])
    n_experts = hf.get("num_experts") or hf.get("num_local_experts")  # transformers 5 writes Qwen3-MoE's as the latter
    if model_type in ("qwen2_moe", "qwen3_moe") and n_experts:
        dense = list(hf.get("mlp_only_layers") or [])
        need(hf.get("decoder_sparse_step", 1) == 1, f"decoder_sparse_step={hf.get('decoder_sparse_step')} (only 1)")
        need(dense == list(range(len(dense))), f"mlp_only_layers={dense} (only the first layers, 0 .. k - 1)")
        c.update(n_experts=n_experts, n_active_experts=hf.get("num_experts_per_tok", 2),
                 moe_dim_ffn=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                 first_dense_layers=len(dense))
    if model_type == "deepseek_v3":
        need(not hf.get("attention_bias"), "attention_bias")
        n_routed, first_dense = hf.get("n_routed_experts") or 0, hf.get("first_k_dense_replace", 0)
        if n_routed and first_dense < hf["num_hidden_layers"]:
            moe_dim = hf["moe_intermediate_size"]
            c.update(n_experts=n_routed, n_active_experts=hf.get("num_experts_per_tok", 8), moe_dim_ffn=moe_dim,
                     shared_dim_ffn=(hf.get("n_shared_experts") or 0) * moe_dim, router="sigmoid",
                     norm_topk_prob=bool(hf.get("norm_topk_prob", True)), n_expert_groups=hf.get("n_group") or 1,
                     topk_groups=hf.get("topk_group") or 1, first_dense_layers=first_dense,
                     routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
        c.update(attn="mla", n_kv_heads=n_heads, head_dim=0, q_lora_rank=hf.get("q_lora_rank") or 0,
                 kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                 qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
    try:
        return ModelConfig(**c), model_type == "deepseek_v3" and bool(hf.get("rope_interleave", True))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def rope_from_hf(hf):
    """config.json's RoPE dict, and the rope_scaling it gives ModelConfig (None unscaled), read as transformers reads
    it: rope_scaling before rope_parameters, "type" for "rope_type", a missing original_max_position_embeddings
    from the top level or max_position_embeddings (its standardize_rope_params)."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in ROPE_SCALINGS:
        return rope, None
    scaling = {k: v for k, v in rope.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    if rope["rope_type"] in ("llama3", "yarn"):
        original = hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = original or hf.get("max_position_embeddings", 2048)
    return rope, scaling


# -----------------------------------------------------------------------------
# the weights


def safetensors_tensors(path):
    """[(name, shape, read)] of a model directory's safetensors files; read() gives one tensor as stored, memory-
    mapped. Each read maps its file afresh: the pages of a tensor converted on load leave memory with the tensor,
    and a tensor kept as it is stays the file's pages (read from disk as used, shared with other processes)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = []
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {others}: pickled weights are not loaded; convert them to safetensors)" if others else ""
            raise FileNotFoundError(f"{file}: missing{hint}")
        try:
            with safe_open(file, framework="pt") as f:
                tensors += [(k, f.get_slice(k).get_shape(), functools.partial(read_safetensor, file, k))
                            for k in f.keys()]
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{file}: cannot read safetensors ({e}); the file is truncated or corrupt") from None
    return tensors


def read_safetensor(file, name):
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name)
