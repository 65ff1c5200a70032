"""
GGUF in: a .gguf file (llama.cpp's converter, llama-quantize, Ollama's blobs, or export.py) as a model and a
tokenizer, read with llama.cpp's own Python reader (`pip install gguf`, needed by this file only). Wherever a
MODELDIR is taken, a .gguf file is too: model.py and tokenizer.py hand such paths to the functions here.

    model = Transformer.from_pretrained("smollm2-135m-q4_k_m.gguf")   # read_model(): config + weights
    tokenizer = Tokenizer.load("smollm2-135m-q4_k_m.gguf")            # read_tokenizer(): vocab, merges, template

What is read: the architectures model.py runs (llama, qwen2, qwen3, deepseek2; with experts llama (Mixtral), qwen2moe,
qwen3moe, deepseek2 with its sigmoid router); tensors of types
F32, F16, BF16 (converted as they are) and every quantized type the `gguf` package dequantizes (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q2_K..Q6_K, ...: llama.cpp's own dequantization, none written here), into the requested dtype one
tensor at a time, in blocks of rows; llama's Q/K rows put back from llama.cpp's adjacent-pair RoPE order to Hugging
Face's; RoPE scaling (linear and yarn from the metadata, llama3 from the rope_freqs tensor). The tokenizer:
tokenizer.ggml.tokens / merges / token_type rebuilt as a Hugging Face tokenizer.json, the pre-tokenizer name
(tokenizer.ggml.pre) mapped to its split rules, control tokens as special added tokens, user-defined ones as plain
added tokens, bos/eos and the chat template.
"""
import functools
import math
import mmap
import os
import types

import numpy as np
import torch

from rope import rope_frequencies
from tokenizer import DEEPSEEK3_SPLIT_PATTERNS, LLAMA3_SPLIT_PATTERN, SPLIT_PATTERN, Tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3", "deepseek2", "qwen2moe", "qwen3moe")
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5  # gguf.TokenType


def _split(pattern):
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}


# tokenizer.ggml.pre -> the pre-tokenizer steps of the tokenizer.json it names (llama.cpp hard-codes each one's
# regexes in llama-vocab.cpp; these are the Hugging Face originals that llama.cpp's copies follow)
PRE_TOKENIZERS = {
    "gpt-2": [_byte_level(True)],
    "smollm": [{"type": "Digits", "individual_digits": True}, _byte_level(True)],
    "llama-bpe": [_split(LLAMA3_SPLIT_PATTERN), _byte_level(False)],
    "qwen2": [_split(SPLIT_PATTERN), _byte_level(False)],
    "deepseek-v3": [*map(_split, DEEPSEEK3_SPLIT_PATTERNS), _byte_level(False)],
}
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "deepseek-r1-qwen": "qwen2", "phi-2": "gpt-2"}


# -----------------------------------------------------------------------------
# the file


def open_gguf(path):
    """(gguf.GGUFReader, {key: value}) of a .gguf file; a truncated or corrupt file is a ValueError saying so.
    The last file opened is kept: the model, its tokenizer and its stop ids are read from one parse (gguf's reader
    takes seconds over a vocabulary of 150k strings)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    stat = os.stat(path)
    return _open_gguf(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_gguf(path, size, mtime):
    import gguf  # llama.cpp's own reader and dequantizers: pip install gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise ValueError(f"{path}: the GGUF file is truncated or corrupt ({type(e).__name__}: {e})") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path}: the GGUF file is truncated: its tensors end at byte {end:,}, the file at {size:,}")
    return reader, metadata


# -----------------------------------------------------------------------------
# the model


def rope_scaling(metadata, arch, rope_freqs, head_dim, theta):
    """Hugging Face's rope_scaling dict for the file's RoPE scaling, or None. llama.cpp's converter writes linear and
    yarn as metadata and Llama 3's scaling as the per-frequency divisors in rope_freqs.weight; those are turned back
    into Llama 3's four numbers, and the numbers are checked to give back every divisor."""
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    key = lambda name: metadata.get(f"{arch}.rope.scaling.{name}")  # noqa: E731
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float(key("factor"))}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _float(key("factor")),
                   "original_max_position_embeddings": int(key("original_context_length"))}
        for ours, theirs in (("attention_factor", "yarn_attn_factor"), ("beta_fast", "yarn_beta_fast"),
                             ("beta_slow", "yarn_beta_slow")):
            if key(theirs) is not None:
                scaling[ours] = _float(key(theirs))
        if key("yarn_log_multiplier") is not None:  # deepseek2: 0.1 * mscale_all_dim; cos/sin then unscaled
            scaling["mscale"] = scaling["mscale_all_dim"] = _float(key("yarn_log_multiplier") / 0.1)
        elif arch == "deepseek2":
            raise ValueError("deepseek2 with yarn and no rope.scaling.yarn_log_multiplier: llama.cpp's attention "
                             "scale then differs from transformers'; not supported")
        return scaling
    if kind not in ("none", None):
        raise ValueError(f"RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not supported; supported: linear, yarn "
                         "and llama3 (rope_freqs.weight)")
    if rope_freqs is None:
        return None
    return llama3_scaling(rope_freqs.double(), head_dim, theta)


def llama3_scaling(divisors, head_dim, theta):
    """Llama 3's factor, low/high_freq_factor and original context from the divisor of each inverse frequency:
    the factor where wavelengths are long, 1 where short, 1 / ((1 - s) / factor + s) between, s linear in
    1 / wavelength (low_freq_factor is taken as 1, as every Llama 3 has it: only ratios to it are defined). The
    numbers are then checked to give back every divisor under rope.py's rule."""
    wavelen = 2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor = float(divisors.max())
    short, long = (divisors - 1).abs() <= 1e-6, (divisors - factor).abs() <= 1e-6
    between = ~short & ~long
    if factor <= 1 + 1e-6:
        return None  # every divisor 1: no scaling
    scaling = {"rope_type": "llama3", "factor": _float(factor), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    if between.sum() >= 2:  # s = original / ((high - 1) wavelen) - 1 / (high - 1): a line in 1 / wavelen
        s = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit((1 / wavelen[between]).numpy(), s.numpy(), 1)
        high = 1 - 1 / intercept
        scaling.update(high_freq_factor=_float(high), original_max_position_embeddings=round(slope * (high - 1)))
    elif not between.any():  # any original context just under the shortest long wavelength will do
        original = math.ceil(float(wavelen[long].min())) - 1
        high = (original / float(wavelen[short].max()) + 1) / 2 if short.any() else 4.0  # 1 < high < original/short
        scaling.update(high_freq_factor=high, original_max_position_embeddings=original)
    rule = types.SimpleNamespace(rope_theta=theta, rope_scaling=scaling)
    unscaled = rope_frequencies(types.SimpleNamespace(rope_theta=theta, rope_scaling=None), head_dim)[0]
    if not torch.allclose(unscaled / rope_frequencies(rule, head_dim)[0], divisors.float(), rtol=1e-5, atol=1e-6):
        raise ValueError("rope_freqs.weight does not follow Llama 3's RoPE scaling rule; no other is supported")
    return scaling


def model_config(metadata, tensors, path):
    """ModelConfig of the file (tensors: {name: ReaderTensor}); what model.py cannot run is refused, naming it."""
    from model import ModelConfig

    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    n_heads, dim = get("attention.head_count"), get("embedding_length")
    if isinstance(get("attention.head_count_kv", 1), list) or isinstance(get("feed_forward_length"), list):
        raise ValueError(f"{path}: head or feed-forward sizes that differ per layer are not supported")
    moe = moe_config(metadata, arch, get, path)
    if arch == "deepseek2":  # MLA: the sizes export.add_hyperparameters writes (and llama.cpp's converter)
        rope_dim, shape = get("rope.dimension_count"), dict(
            attn="mla", n_kv_heads=n_heads, q_lora_rank=get("attention.q_lora_rank", 0),
            kv_lora_rank=get("attention.kv_lora_rank"), qk_rope_head_dim=get("rope.dimension_count"),
            qk_nope_head_dim=get("attention.key_length_mla") - get("rope.dimension_count"),
            v_head_dim=get("attention.value_length_mla"))
    else:
        rope_dim = head_dim = get("attention.key_length", dim // n_heads)
        value_length = get("attention.value_length", head_dim)
        if value_length != head_dim or get("rope.dimension_count", head_dim) != head_dim:
            raise ValueError(f"{path}: value length {value_length} or RoPE dimension "
                             f"{get('rope.dimension_count', head_dim)} differs from the key length {head_dim}")
        shape = dict(n_kv_heads=get("attention.head_count_kv", n_heads), head_dim=head_dim,
                     attention_bias="blk.0.attn_q.bias" in tensors, use_qk_norm=arch in ("qwen3", "qwen3moe"))
    theta = _float(get("rope.freq_base", 10000.0))
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None:  # one row of divisors
        freqs = _dequantize(freqs.data.reshape(1, -1), freqs.tensor_type, path, freqs.name)[0]
        freqs = torch.from_numpy(np.array(freqs))
    scaling = rope_scaling(metadata, arch, freqs, rope_dim, theta)
    # export.py writes qwen2moe's tied head out (llama.cpp's qwen2moe needs one): equal to the embedding, it is tied
    tied = "output.weight" not in tensors or arch == "qwen2moe" and np.array_equal(tensors["output.weight"].data,
                                                                                    tensors["token_embd.weight"].data)
    return ModelConfig(vocab_size=int(tensors["token_embd.weight"].shape[1]), dim=dim, n_layers=get("block_count"),
                       n_heads=n_heads, dim_ffn=get("feed_forward_length"), rope_theta=theta, rope_scaling=scaling,
                       norm_eps=_float(get("attention.layer_norm_rms_epsilon")), max_len=get("context_length"),
                       tie_weight=tied, **shape, **moe)


def moe_config(metadata, arch, get, path):
    """The ModelConfig MoE fields of a file with experts (export.add_hyperparameters writes them), {} without."""
    n_experts = metadata.get(f"{arch}.expert_count", 0)
    if not n_experts or get("leading_dense_block_count", 0) >= get("block_count"):
        return {}
    moe_dim = get("feed_forward_length" if arch == "llama" else "expert_feed_forward_length")
    moe = dict(n_experts=n_experts, n_active_experts=get("expert_used_count"), moe_dim_ffn=moe_dim)
    if arch == "qwen2moe":
        moe.update(shared_dim_ffn=get("expert_shared_feed_forward_length"), shared_expert_gate=True,
                   norm_topk_prob=False)
    elif arch == "deepseek2":
        if get("expert_gating_func", 1) != 2:  # gguf.ExpertGatingFuncType.SIGMOID; softmax is DeepSeek-V2's
            raise ValueError(f"{path}: deepseek2 experts gated by {get('expert_gating_func', 1)} (only 2, sigmoid)")
        moe.update(shared_dim_ffn=get("expert_shared_count", 0) * moe_dim, router="sigmoid",
                   norm_topk_prob=bool(get("expert_weights_norm", False)),
                   routed_scaling_factor=_float(get("expert_weights_scale", 1.0)),
                   n_expert_groups=get("expert_group_count", 1), topk_groups=get("expert_group_used_count", 1),
                   first_dense_layers=get("leading_dense_block_count", 0))
    return moe


def _float(value):
    """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))


def _dequantize(rows, kind, path, name):
    """float32 numpy rows (n, columns) of a tensor's rows as stored (n, items or bytes per row): F32/F16 as they are,
    the rest by gguf's dequantize."""
    import gguf

    try:
        return gguf.dequantize(rows, kind).reshape(len(rows), -1)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {name} has type {kind.name}, which gguf cannot dequantize") from None


def _tensor(reader, tensor, dtype, path, chunk_rows=1024):
    """One tensor in dtype, never a view of the file, dequantized chunk_rows rows at a time: no float32 copy of a
    whole tensor exists beside it. BF16 is reinterpreted, not widened through float32."""
    import gguf

    shape = tuple(reversed([int(n) for n in tensor.shape]))
    weight = torch.empty(shape, dtype=dtype)
    out, stored = weight.view(-1, shape[-1]), tensor.data.reshape(-1, tensor.data.shape[-1])  # (rows, columns)
    for i in range(0, len(out), chunk_rows):
        rows = stored[i:i + chunk_rows]
        if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
            out[i:i + chunk_rows] = torch.from_numpy(rows.view(np.int16).copy()).view(torch.bfloat16)
        else:
            out[i:i + chunk_rows] = torch.from_numpy(np.array(_dequantize(rows, tensor.tensor_type, path, tensor.name)))
    release_pages(reader, tensor)
    if not torch.isfinite(weight.sum()):  # NaN and inf carry through a sum: 20x cheaper than isfinite per number
        raise ValueError(f"{path}: tensor {tensor.name} holds NaN or infinite values: the file is corrupt")
    return weight


def release_pages(reader, tensor):
    """Drop a tensor's pages of the memory-mapped file from this process (they stay in the page cache): the reader
    stays open for the tokenizer, and every page read would otherwise count in the process's memory."""
    memory_map = reader.data.base  # np.memmap's mmap.mmap
    if hasattr(mmap, "MADV_DONTNEED") and isinstance(memory_map, mmap.mmap):
        start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        memory_map.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


def unpair_rope_rows(w, n_heads, rope_dim):
    """The inverse of export.pair_rope_rows: llama.cpp's llama and deepseek2 rotate adjacent pairs (x0, x1), (x2,
    x3), ...; Hugging Face's rotate_half pairs x_i with x_{i+d/2}. Of each head's last rope_dim rows, rows 2i and
    2i+1 go to i and i+d/2."""
    heads = w.reshape(n_heads, -1, *w.shape[1:])
    keep, rest = heads.shape[1] - rope_dim, w.shape[1:]
    rope = heads[:, keep:].reshape(n_heads, rope_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads, rope_dim, *rest)
    return torch.cat([heads[:, :keep], rope], 1).reshape(w.shape)


def unpaired(weight, inner, arch, c):
    """A weight from llama.cpp's RoPE row order back to ours (others as they are)."""
    if arch == "llama" and inner in ("self_attn.q_proj", "self_attn.k_proj"):
        return unpair_rope_rows(weight, c.n_heads if inner == "self_attn.q_proj" else c.n_kv_heads, c.head_dim)
    if arch == "deepseek2" and inner in ("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa"):
        return unpair_rope_rows(weight, 1 if inner.endswith("mqa") else c.n_heads, c.qk_rope_head_dim)
    return weight


def read_model(path, dtype=None):
    """(ModelConfig, [(parameter name, shape, read)]) of a .gguf file, for Transformer.from_tensors: read() gives one
    tensor in dtype (default float32), nothing being read before."""
    import gguf

    from export import GLOBAL_NAMES, LAYER_NAMES

    reader, metadata = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor: not a language model file")
    config = model_config(metadata, tensors, path)
    names = {**LAYER_NAMES, **GLOBAL_NAMES, "self_attn.kv_b_proj": "attn_kv_b"}  # ours -> llama.cpp's
    ours = {theirs: name for name, theirs in names.items()}
    arch, dtype = metadata["general.architecture"], dtype or torch.float32
    shared = "mlp.shared_expert" if config.shared_expert_gate else "mlp.shared_experts"
    ours.update({f"ffn_{p}_shexp": f"{shared}.{p}_proj" for p in ("gate", "up", "down")},
                exp_probs_b="mlp.gate", ffn_down_exps="mlp.experts")  # the names export.py writes
    entries, absorbed, unknown = [], {}, []
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue  # read into the config's rope_scaling
        if tensor.tensor_type != gguf.GGMLQuantizationType.BF16:  # one row tried: a type gguf lacks fails now
            _dequantize(tensor.data.reshape(-1, tensor.data.shape[-1])[:1], tensor.tensor_type, path, name)
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in ("attn_k_b", "attn_v_b", "ffn_gate_exps",
                                                                  "ffn_up_exps"):
            absorbed[parts[1], parts[2]] = tensor  # MLA's kv_b_proj in llama.cpp's two parts
            continue
        inner = ours.get(parts[2] if parts[0] == "blk" and len(parts) == 4 else parts[0])
        if inner is None or parts[0] != "blk" and len(parts) != 2:
            unknown.append(name)
            continue
        key = f"layers.{parts[1]}.{inner}.{parts[3]}" if parts[0] == "blk" else f"{inner}.{parts[1]}"
        if parts[0] == "blk" and parts[2] in ("exp_probs_b", "ffn_down_exps"):  # a buffer's, a stacked weight's name
            key = f"layers.{parts[1]}.{inner}.{'e_score_correction_bias' if parts[2] == 'exp_probs_b' else 'down_proj'}"
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        shape = (1, *shape) if parts[-2] == "ffn_gate_inp_shexp" else shape  # llama.cpp's is a vector
        read = functools.partial(_read_unpaired, reader, tensor, dtype, path, inner, arch, config, shape)
        entries.append((key, shape, read))
    for (block, part), gate in absorbed.items():
        if part == "ffn_gate_exps":  # the experts' gate and up: gate_up_proj (E, 2 * I, dim)
            E, I, D = config.n_experts, config.moe_dim_ffn, config.dim
            read = functools.partial(_read_gate_up, reader, gate, absorbed[block, "ffn_up_exps"], dtype, path)
            entries.append((f"layers.{block}.mlp.experts.gate_up_proj", (E, 2 * I, D), read))
    for (block, part), k_b in absorbed.items():
        if part == "attn_k_b":
            v_b = absorbed.get((block, "attn_v_b"))
            if v_b is None:
                raise ValueError(f"{path}: blk.{block}.attn_k_b.weight without blk.{block}.attn_v_b.weight")
            shape = (config.n_heads * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank)
            read = functools.partial(_read_kv_b, reader, k_b, v_b, dtype, path, config.kv_lora_rank)
            entries.append((f"layers.{block}.self_attn.kv_b_proj.weight", shape, read))
    if unknown:
        raise ValueError(f"{path}: tensors this model cannot hold: {', '.join(unknown[:6])}"
                         f"{' ...' if len(unknown) > 6 else ''}")
    return config, entries


def _read_unpaired(reader, tensor, dtype, path, inner, arch, config, shape):
    return unpaired(_tensor(reader, tensor, dtype, path), inner, arch, config).reshape(shape)


def _read_gate_up(reader, gate, up, dtype, path):
    return torch.cat([_tensor(reader, gate, dtype, path), _tensor(reader, up, dtype, path)], 1)


def _read_kv_b(reader, k_b, v_b, dtype, path, kv_lora_rank):
    """kv_b_proj from llama.cpp's k_b (H, r, nope) and v_b (H, v, r): (H * (nope + v), r)."""
    k_b, v_b = _tensor(reader, k_b, dtype, path), _tensor(reader, v_b, dtype, path)
    return torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(-1, kv_lora_rank)


# -----------------------------------------------------------------------------
# the tokenizer


def tokenizer_json(metadata, path):
    """A Hugging Face tokenizer.json dict from tokenizer.ggml.*, and tokenizer_config.json's names and template."""
    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2': GPT-2, Llama 3, Qwen, "
                         "SmolLM, DeepSeek-V3) is supported; SentencePiece ('llama') vocabularies are not")
    steps = PRE_TOKENIZERS.get(PRE_ALIASES.get(pre, pre))
    if steps is None:
        raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not a pre-tokenizer this reader knows; known: "
                         f"{', '.join(sorted([*PRE_TOKENIZERS, *PRE_ALIASES]))}")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == CONTROL} for i, (t, kind) in enumerate(zip(tokens, types))
             if kind in (CONTROL, USER_DEFINED)]
    # added tokens in the vocab too, as the tokenizers library writes them: it keeps a file's added-token id only then
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != UNUSED}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": PRE_ALIASES.get(pre, pre) == "llama-bpe",  # Llama 3's tokenizer.json sets it
             "vocab": vocab, "merges": list(metadata.get("tokenizer.ggml.merges", []))}
    hf_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
               "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}, "post_processor": None,
               "decoder": _byte_level(True), "model": model}
    names = {f"{name}_token": tokens[i] for name in ("bos", "eos", "unk", "pad")
             if isinstance(i := metadata.get(f"tokenizer.ggml.{name if name != 'pad' else 'padding'}_token_id"), int)
             and 0 <= i < len(tokens)}
    template = metadata.get("tokenizer.chat_template")
    return hf_json, names | ({"chat_template": template} if template else {})


def read_tokenizer(path):
    reader, metadata = open_gguf(path)
    hf_json, config = tokenizer_json(metadata, path)
    return Tokenizer(hf_json, path, config)


def stop_ids(path):
    """The file's end-of-generation token ids: eos, eot (end of turn), eom (end of message)."""
    _, metadata = open_gguf(path)
    ids = [metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    return [i for i in ids if isinstance(i, int)]
