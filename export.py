"""
GGUF export: a MODELDIR (ours, or a Hugging Face Llama / Qwen2 / Qwen3 / DeepseekV3 one, or a MoE one) as a GGUF file
for llama.cpp and Ollama, written with llama.cpp's own Python writer (`pip install gguf`); and any model this project
loads (a .gguf file included) as a Hugging Face MODELDIR that transformers loads.

    python export.py --model=out/demo/final --gguf=demo.gguf [--outtype=f32|f16|bf16|q8_0]
    python export.py --model=smollm2-135m-q4_k_m.gguf --hf_dir=smollm2 [--outtype=f32|f16|bf16]

What goes in: llama.cpp's architecture for the model (llama: GQA; qwen2: q/k/v biases; qwen3: qk-norm;
deepseek2: MLA; with experts llama (Mixtral), qwen3moe, qwen2moe, deepseek2) and its sizes; every weight under
llama.cpp's name, in its layout; the tokenizer as llama.cpp's `gpt2` BPE: the byte-level vocab, our merges and
`tokenizer.ggml.pre`, the name of the split regex llama.cpp hard-codes that equals ours (it runs no regex from the
file); BOS, stop and padding ids; the chat template. llama.cpp's own converter names the pre-tokenizer by hashing
the ids of a test string, so it refuses every tokenizer it has not seen, which is every one `data.py tokenizer`
trains.
"""
import dataclasses
import importlib.util
import math
import os
import shutil
import sys

import torch

from hf import architecture as hf_architecture
from model import Transformer
from rope import mla_softmax_scale, rope_frequencies, yarn_mscale
from settings import load_settings
from tokenizer import KNOWN_SPLITS, Tokenizer

DEFAULTS = {
    "model": "",  # MODELDIR (config.json + model.safetensors + tokenizer.json) or a .gguf file
    "gguf": "",  # the GGUF file to write
    "hf_dir": "",  # or the Hugging Face MODELDIR to write: config.json, model.safetensors, tokenizer files
    "outtype": "f16",  # f32 | f16 | bf16 | q8_0: the 2-D weights; norms and biases stay f32, as llama.cpp expects
}
OUTTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}

# -----------------------------------------------------------------------------
# architecture, names and layout

LAYER_NAMES = {  # ours (Hugging Face's) -> llama.cpp's, inside blk.N.
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # mixture of experts (moe.py): the router, its balancing bias, the stacked experts, the shared expert
    "mlp.gate": "ffn_gate_inp", "mlp.experts.down_proj": "ffn_down_exps",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    **{f"mlp.{shared}.{proj}_proj": f"ffn_{proj}_shexp" for shared in ("shared_expert", "shared_experts")
       for proj in ("gate", "up", "down")},
}
MOE_RUNS = {  # llama.cpp's MoE architectures: whether they renormalize the top-k weights, and allow dense layers
    "llama": (True, False), "qwen3moe": (True, False), "qwen2moe": (False, False), "deepseek2": (None, True)}
GLOBAL_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}


def architecture(c):
    """llama.cpp's architecture for a ModelConfig (hf.architecture's table), or a ValueError naming what it lacks."""
    arch = hf_architecture(c)[2]
    if c.n_experts:
        renormalizes, dense_layers = MOE_RUNS[arch]
        if renormalizes is not None and c.norm_topk_prob != renormalizes:
            raise ValueError(f"norm_topk_prob={c.norm_topk_prob}: llama.cpp's {arch} always "
                             f"{'renormalizes' if renormalizes else 'keeps'} the chosen experts' weights")
        if c.first_dense_layers and not dense_layers:
            raise ValueError(f"first_dense_layers={c.first_dense_layers}: llama.cpp's {arch} has experts in every "
                             "layer")
    return arch


def pair_rope_rows(w, n_heads, rope_dim):
    """llama.cpp's llama and deepseek2 rotate adjacent pairs (x0, x1), (x2, x3), ... ("normal" RoPE); we rotate x_i
    with x_{i+d/2} (Hugging Face's rotate_half). Reordering the rows that make each head's last rope_dim outputs
    (i, i + d/2 -> 2i, 2i + 1) gives the same attention scores under theirs."""
    w = w.reshape(n_heads, -1, w.shape[-1])
    head_dim = w.shape[1]
    rope = w[:, head_dim - rope_dim:].reshape(n_heads, 2, rope_dim // 2, -1).transpose(1, 2)
    return torch.cat([w[:, : head_dim - rope_dim], rope.reshape(n_heads, rope_dim, -1)], 1).reshape(-1, w.shape[-1])


def gguf_tensors(model):
    """(llama.cpp name, float32 tensor in llama.cpp's layout) for every weight of the model."""
    c, arch = model.config, architecture(model.config)
    for key, w in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_weight and arch != "qwen2moe":
            continue  # llama.cpp reuses token_embd when output is absent (its qwen2moe needs output written)
        w, parts = w.detach().float().cpu(), key.split(".")
        if parts[0] != "layers":
            yield f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}", w
            continue
        block, inner, kind = f"blk.{parts[1]}", ".".join(parts[2:-1]), parts[-1]
        if arch == "llama" and inner in ("self_attn.q_proj", "self_attn.k_proj"):
            w = pair_rope_rows(w, c.n_heads if inner == "self_attn.q_proj" else c.n_kv_heads, c.head_dim)
        elif arch == "deepseek2" and inner in ("self_attn.q_proj", "self_attn.q_b_proj"):
            w = pair_rope_rows(w, c.n_heads, c.qk_rope_head_dim)
        elif arch == "deepseek2" and inner == "self_attn.kv_a_proj_with_mqa":  # the shared RoPE key comes last
            w = pair_rope_rows(w, 1, c.qk_rope_head_dim)
        elif inner == "self_attn.kv_b_proj":  # llama.cpp absorbs it as two per-head matrices, as our decode does
            kv = w.view(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
            yield f"{block}.attn_k_b.weight", kv[:, : c.qk_nope_head_dim].transpose(1, 2).contiguous()  # (H, r, nope)
            yield f"{block}.attn_v_b.weight", kv[:, c.qk_nope_head_dim :].contiguous()  # (H, v, r)
            continue
        elif inner == "mlp.experts" and kind == "gate_up_proj":  # (E, 2 * I, dim): gate's rows, then up's
            gate, up = w.chunk(2, dim=1)
            yield f"{block}.ffn_gate_exps.weight", gate.contiguous()
            yield f"{block}.ffn_up_exps.weight", up.contiguous()
            continue
        elif key.endswith("e_score_correction_bias"):
            yield f"{block}.exp_probs_b.bias", w
            continue
        elif inner == "mlp.shared_expert_gate":  # llama.cpp's is a vector
            w = w[0]
        if inner == "mlp.experts":
            inner, kind = "mlp.experts.down_proj", "weight"
        yield f"{block}.{LAYER_NAMES[inner]}.{kind}", w


def rope_scaling_gguf(c, arch):
    """c.rope_scaling the way llama.cpp's convert_hf_to_gguf.py writes it: ({GGUFWriter method: value}, {tensor
    name: float32 tensor}), in one place so that a GGUF reader can invert it.
      linear: {arch}.rope.scaling.type "linear" and .factor.
      llama3 (llama only): no scaling keys; a tensor rope_freqs.weight (head_dim / 2,) that llama.cpp divides each
        frequency by: the unscaled inv_freq over the scaled one.
      yarn: .type "yarn", .factor, .original_context_length, and .yarn_beta_fast, .yarn_beta_slow, .yarn_attn_factor
        where the config has beta_fast, beta_slow, attention_factor; deepseek2 also .yarn_log_multiplier =
        0.1 * mscale_all_dim (llama.cpp divides it by 0.1 again).
    What llama.cpp would run differently is a ValueError naming it: it reads no yarn beta keys for these
    architectures (it uses 32 and 1), always truncates the YaRN ramp, and derives the cos/sin and softmax scales
    from factor and mscale_all_dim alone."""
    import gguf

    s = c.rope_scaling
    if s is None:
        return {}, {}
    kind, rope_dim = s["rope_type"], c.qk_rope_head_dim if c.attn == "mla" else c.head_dim
    if kind == "llama3" and arch == "llama":
        unscaled = rope_frequencies(dataclasses.replace(c, rope_scaling=None), rope_dim)[0]
        return {}, {"rope_freqs.weight": unscaled / rope_frequencies(c, rope_dim)[0]}
    if kind == "llama3":
        raise ValueError(f"rope_scaling llama3 on {arch}: llama.cpp reads its factors (rope_freqs) only for llama")
    if kind == "linear" and arch == "deepseek2":
        raise ValueError("rope_scaling linear on deepseek2: llama.cpp's deepseek2 would also multiply the attention "
                         "logits by (1 + 0.1 ln factor)^2")
    keys = {"add_rope_scaling_type": gguf.RopeScalingType(kind), "add_rope_scaling_factor": s["factor"]}
    if kind == "linear":
        return keys, {}
    for key, default in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True)):
        if s.get(key) not in (None, default):
            raise ValueError(f"rope_scaling yarn {key}={s[key]!r}: llama.cpp's {arch} runs YaRN with {default}")
    # the factor on cos/sin and on the attention logits: transformers' and llama.cpp's (llama-context.cpp and
    # models/deepseek2.cpp: with yarn_log_multiplier its cos/sin factor is 1, without it its softmax takes
    # yarn_mscale(factor)^2 too)
    factor, mscale_all_dim = s["factor"], s.get("mscale_all_dim") if arch == "deepseek2" else None
    softmax = mla_softmax_scale(c) * (c.qk_nope_head_dim + rope_dim) ** 0.5 if arch == "deepseek2" else 1.0
    ours = (rope_frequencies(c, rope_dim)[1], softmax)
    theirs = ((1.0, yarn_mscale(factor, mscale_all_dim) ** 2) if mscale_all_dim else
              (yarn_mscale(factor), yarn_mscale(factor) ** 2 if arch == "deepseek2" else 1.0))
    if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ours, theirs)):
        raise ValueError(f"rope_scaling {s} on {arch}: transformers scales cos/sin by {ours[0]:.6g} and attention "
                         f"logits by {ours[1]:.6g}, llama.cpp would by {theirs[0]:.6g} and {theirs[1]:.6g} (it "
                         "derives them from factor and, on deepseek2, mscale_all_dim, not attention_factor or mscale)")
    keys["add_rope_scaling_orig_ctx_len"] = s["original_max_position_embeddings"]
    for key, method in (("attention_factor", "attn_factor"), ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
        if s.get(key) is not None:
            keys[f"add_rope_scaling_yarn_{method}"] = s[key]
    if arch == "deepseek2" and s.get("mscale_all_dim") is not None:
        keys["add_rope_scaling_yarn_log_mul"] = 0.1 * s["mscale_all_dim"]
    return keys, {}


# -----------------------------------------------------------------------------
# writing the file


def add_hyperparameters(writer, c, arch):
    writer.add_context_length(c.max_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.moe_dim_ffn if arch == "llama" and c.n_experts else c.dim_ffn)  # Mixtral's
    if c.n_experts:
        writer.add_expert_count(c.n_experts)
        writer.add_expert_used_count(c.n_active_experts)
        writer.add_expert_feed_forward_length(c.moe_dim_ffn)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(c.shared_dim_ffn)
    writer.add_head_count(c.n_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if arch != "deepseek2":
        writer.add_head_count_kv(c.n_kv_heads)
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        writer.add_rope_dimension_count(c.head_dim)
        return
    # MLA as llama.cpp runs it: one shared (latent + RoPE key) "head", values read from the latent
    writer.add_head_count_kv(1)
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    writer.add_q_lora_rank(c.q_lora_rank)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    if not c.n_experts:
        writer.add_leading_dense_block_count(c.n_layers)  # every layer dense: no experts
        writer.add_expert_feed_forward_length(c.dim_ffn)
        writer.add_expert_shared_count(0)
        return
    import gguf

    writer.add_leading_dense_block_count(c.first_dense_layers)
    writer.add_expert_shared_count(c.shared_dim_ffn // c.moe_dim_ffn)
    writer.add_expert_weights_scale(c.routed_scaling_factor)
    writer.add_expert_weights_norm(c.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_group_count(c.n_expert_groups)
    writer.add_expert_group_used_count(c.topk_groups)


def add_tokenizer(writer, tokenizer, vocab_size):
    import gguf

    patterns = tuple(pattern for pattern, _, _ in tokenizer.splits)
    pre = KNOWN_SPLITS.get(patterns) if all(b == "Isolated" and not inv for _, b, inv in tokenizer.splits) else None
    if pre is None:
        known = "; ".join(f"{name}: {list(p)}" for p, name in KNOWN_SPLITS.items())
        raise ValueError(f"{tokenizer.source}: llama.cpp has no pre-tokenizer equal to this tokenizer's splits "
                         f"{tokenizer.splits}; it has these ({known})")
    normalizer = tokenizer.hf_json.get("normalizer") or {}
    if normalizer.get("type") not in (None, "NFC") and normalizer != {"type": "Sequence", "normalizers": []}:
        raise ValueError(f"{tokenizer.source}: normalizer {normalizer.get('type')!r}: llama.cpp normalizes nothing")
    model = tokenizer.hf_json["model"]
    names = {i: text for text, i in model["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.hf_json.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):  # the model's vocab may be larger than the tokenizer's: padding ids
        token = added.get(i)
        tokens.append(token["content"] if token else names.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.NORMAL if not token and i in names else gguf.TokenType.UNUSED if not token
                     else gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_add_bos_token(tokenizer.bos_id is not None)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.stop_ids:
        writer.add_eos_token_id(tokenizer.stop_ids[0])
    if tokenizer.eot_id is not None:
        writer.add_pad_token_id(tokenizer.eot_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export(model_dir, path, outtype="f16"):
    """Write MODELDIR as the GGUF file `path` (via path.tmp, renamed when complete)."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype={outtype!r}: choose from {', '.join(OUTTYPES)}")
    model, tokenizer = Transformer.from_pretrained(model_dir).eval(), Tokenizer.load(model_dir)
    arch = architecture(model.config)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    rope_keys, rope_tensors = rope_scaling_gguf(model.config, arch)
    writer = gguf.GGUFWriter(path + ".tmp", arch)
    writer.add_name(os.path.basename(os.path.normpath(model_dir)))
    writer.add_file_type(getattr(gguf.LlamaFileType, OUTTYPES[outtype]))
    add_hyperparameters(writer, model.config, arch)
    for method, value in rope_keys.items():
        getattr(writer, method)(value)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    for name, w in [*gguf_tensors(model), *rope_tensors.items()]:
        data, kind = w.numpy(), qtype
        if data.ndim == 1 or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else gguf.GGMLQuantizationType.F16  # q8_0 blocks: 32
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".tmp", path)
    return arch


def export_hf(model_path, directory, outtype="bf16"):
    """Write a MODELDIR or .gguf file as a Hugging Face MODELDIR in outtype's dtype (via directory.tmp, renamed when
    complete); its config.json lists every stop id (Tokenizer.load's: a .gguf file's eot and eom too)."""
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(outtype)
    if dtype is None:
        raise ValueError(f"--outtype={outtype!r}: a Hugging Face directory takes f32, f16 or bf16")
    if os.path.exists(directory) and os.listdir(directory):
        raise ValueError(f"--hf_dir={directory}: exists and is not empty; nothing is overwritten")
    model, tokenizer = Transformer.from_pretrained(model_path, dtype=dtype), Tokenizer.load(model_path)
    token_ids = tokenizer.token_ids()  # eos_token_id: tokenizer.stop_ids
    tmp = os.path.normpath(directory) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
    model.save_pretrained(tmp, token_ids=token_ids)
    tokenizer.save(tmp)
    os.replace(tmp, directory)


if __name__ == "__main__":
    cfg = load_settings(DEFAULTS, sys.argv[1:], where="export.py")
    if not cfg.model or bool(cfg.gguf) == bool(cfg.hf_dir):
        raise SystemExit("export.py: --model=MODELDIR|FILE.gguf and one of --gguf=FILE or --hf_dir=DIR are needed")
    if importlib.util.find_spec("gguf") is None and (cfg.gguf or cfg.model.endswith(".gguf")):
        raise SystemExit("export.py needs llama.cpp's reader and writer: pip install gguf")
    try:
        if cfg.hf_dir:
            export_hf(cfg.model, cfg.hf_dir, cfg.outtype)
        else:
            arch = export(cfg.model, cfg.gguf, cfg.outtype)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"export.py: {e}") from None
    if cfg.hf_dir:
        print(f"wrote {cfg.hf_dir} ({cfg.outtype}): python sample.py --model={cfg.hf_dir} --chat")
    else:
        print(f"wrote {cfg.gguf} ({arch}, {cfg.outtype}, {os.path.getsize(cfg.gguf) / 2**20:.1f} MiB): "
              f"llama-server -m {cfg.gguf}")
