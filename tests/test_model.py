"""model.py against Hugging Face transformers: logits both ways, the KV cache, presets, bad input."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize

from kv_cache import KVCache
from model import Logits, ModelConfig, Transformer
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

transformers = pytest.importorskip("transformers")

torch.manual_seed(0)
TOL = 1e-4


def hf_config(family, **kw):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    common.update(kw)
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(num_key_value_heads=1, head_dim=24, **common)
    mla = dict(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4,
               first_k_dense_replace=common["num_hidden_layers"], n_routed_experts=4)
    return transformers.DeepseekV3Config(**{**mla, **common})


FAMILIES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
    ("deepseek_v3", {"q_lora_rank": None}),
    ("deepseek_v3", {"q_lora_rank": 32}),
    ("deepseek_v3", {"q_lora_rank": 32, "rope_interleave": False}),
]


def batch(vocab, B=3, T=11, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,kw", FAMILIES)
def test_hf_to_ours_logits(tmp_path, family, kw):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(family, **kw), attn_implementation="eager").eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    x = batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() < TOL
    assert ref.std().item() > 0.5  # the comparison is not between two near-zero tensors


OUR_CONFIGS = {
    "llama": dict(n_kv_heads=2),
    "llama_tied": dict(n_kv_heads=1, tie_weight=True),
    "qwen2": dict(n_kv_heads=2, attention_bias=True),
    "qwen3": dict(n_kv_heads=2, use_qk_norm=True, head_dim=24),
    "deepseek_v3": dict(attn="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12),
    "deepseek_v3_q_lora": dict(attn="mla", q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=12, tie_weight=True),
}


def tiny(**kw):
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, dim_ffn=96, max_len=64, tie_weight=False)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", sorted(OUR_CONFIGS))
def test_ours_to_hf_logits(tmp_path, name):
    ours = randomize(Transformer(tiny(**OUR_CONFIGS[name]))).eval()
    ours.save_pretrained(tmp_path)
    expected_type = name.removesuffix("_tied").removesuffix("_q_lora")
    assert json.load(open(tmp_path / "config.json"))["model_type"] == expected_type
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = batch(97)
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff < TOL
    # and back: our own directory reloads bit for bit
    again = Transformer.from_pretrained(tmp_path)
    assert again.config == ours.config
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_gated_attention_is_marked_not_hf(tmp_path):
    ours = Transformer(tiny(use_gated_attention=True, n_kv_heads=2))
    ours.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    assert config["model_type"] == "astrai" and "use_gated_attention=True: no published architecture" in config["note"]
    with pytest.raises(Exception):
        transformers.AutoConfig.from_pretrained(tmp_path)
    again = Transformer.from_pretrained(tmp_path)
    x = batch(97)
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


# -----------------------------------------------------------------------------
# KV cache: ragged prefill + decode == a full forward of each row alone


@pytest.mark.parametrize("kw", [
    dict(n_kv_heads=2),
    dict(n_kv_heads=2, use_qk_norm=True, use_gated_attention=True, attention_bias=True),
    dict(attn="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12),
    dict(attn="mla", q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12),
])
def test_kv_cache_ragged_matches_full_forward(kw):
    model = randomize(Transformer(tiny(**kw))).eval()
    g = torch.Generator().manual_seed(3)
    prompt_lengths = [5, 9, 2]
    n_steps = 6
    seqs = [torch.randint(0, 97, (n + n_steps + 4,), generator=g) for n in prompt_lengths]
    cache = KVCache(model.config, batch_size=3, max_len=40)
    got = [[] for _ in seqs]  # logits per row, per position, from the cached path
    with torch.no_grad():
        # rows 0 and 1: one right-padded batched prefill; row 2 joins 3 decode steps later
        T = max(prompt_lengths[:2])
        x = torch.zeros(2, T, dtype=torch.long)
        for r in range(2):
            x[r, : prompt_lengths[r]] = seqs[r][: prompt_lengths[r]]
        logits = model(x, cache=cache, rows=torch.tensor([0, 1]), input_lengths=torch.tensor(prompt_lengths[:2]))
        for r in range(2):
            got[r] += list(logits[r, : prompt_lengths[r]])
        pos = prompt_lengths[:]
        for step in range(n_steps + 3):
            rows = [0, 1] if step < 3 else [0, 1, 2]
            if step == 3:
                logits = model(seqs[2][None, : pos[2]], cache=cache, rows=torch.tensor([2]))
                got[2] += list(logits[0])
            x = torch.stack([seqs[r][pos[r] : pos[r] + 1] for r in rows])
            logits = model(x, cache=cache, rows=torch.tensor(rows))
            for i, r in enumerate(rows):
                got[r].append(logits[i, 0])
                pos[r] += 1
        assert cache.lengths == pos
        for r, seq in enumerate(seqs):
            full = model(seq[None, : pos[r]])[0]
            assert len(got[r]) == pos[r]
            assert (torch.stack(got[r]) - full).abs().max().item() < TOL, f"row {r}"


@pytest.mark.parametrize("kw", [dict(n_kv_heads=2), dict(attn="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)])
def test_last_only_prefill_and_aligned_decode(kw):
    """last_only gives each row's logits at its last valid token; decode steps with every row at one length
    (attention without a mask) and at different lengths (with one) both match a full forward."""
    model = randomize(Transformer(tiny(**kw))).eval()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 97, (12,), generator=g) for _ in range(3)]
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]
        for lengths in ([4, 4, 4], [4, 7, 2]):  # aligned rows, then ragged ones
            cache = KVCache(model.config, batch_size=3, max_len=16)
            x = torch.stack(seqs)[:, : max(lengths)]
            logits = model(x, Logits(last_only=True), cache, input_lengths=torch.tensor(lengths))
            assert logits.shape == (3, 1, 97)
            for r, n in enumerate(lengths):
                assert (logits[r, 0] - full[r][n - 1]).abs().max().item() < TOL
            for step in range(3):
                x = torch.stack([s[n + step : n + step + 1] for s, n in zip(seqs, lengths)])
                logits = model(x, cache=cache)
                for r, n in enumerate(lengths):
                    assert (logits[r, 0] - full[r][n + step]).abs().max().item() < TOL, f"lengths {lengths} step {step}"
        assert (model(torch.stack(seqs), Logits(last_only=True))[:, 0] - torch.stack(full)[:, -1]).abs().max().item() < TOL


def test_kv_cache_decode_all_rows_and_overflow():
    model = Transformer(tiny(n_kv_heads=2)).eval()
    cache = KVCache(model.config, batch_size=2, max_len=8)
    x = batch(97, B=2, T=6)
    with torch.no_grad():
        model(x, cache=cache)
        assert cache.lengths == [6, 6]
        with pytest.raises(ValueError, match="overflow"):
            model(x[:, :3], cache=cache)
    cache.reset([0])
    assert cache.lengths == [0, 6]


def test_mla_cache_bytes_per_token():
    c = tiny(attn="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    cache = KVCache(c, batch_size=2, max_len=16, dtype=torch.bfloat16)
    assert cache.bytes_per_token() == c.n_layers * (24 + 8) * 2
    g = tiny(n_kv_heads=2)
    assert KVCache(g, 1, 16).bytes_per_token() == g.n_layers * 2 * 2 * 16 * 4


# -----------------------------------------------------------------------------
# presets, sizes, bad input


def test_presets_parameter_counts():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sizes = {}
    for name in ("astrai_1b", "astrai_1b_mla", "tiny"):
        overrides = ["--vocab_size=2048"] if name == "tiny" else []  # tiny takes the tokenizer's: the demo's 2,048
        config = ModelConfig.from_file(os.path.join(here, "configs", f"{name}.py"), overrides)
        with torch.device("meta"):
            sizes[name] = Transformer(config).num_params()
    c = ModelConfig.from_file(os.path.join(here, "configs", "astrai_1b.py"))
    per_layer = 1536 * 1536 * 2 + 1536 * 256 * 2 + 3 * 1536 * 6912 + 2 * 1536
    assert sizes["astrai_1b"] == 24 * per_layer + 2 * 100000 * 1536 + 1536
    assert 1.15e9 < sizes["astrai_1b"] < 1.25e9 and 1.15e9 < sizes["astrai_1b_mla"] < 1.3e9
    assert c.n_kv_heads == 4 and not c.tie_weight
    assert sizes["tiny"] == 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384 + 2 * 128) + 2048 * 128 + 128


def test_flops_per_token():
    c = tiny()
    m = Transformer(c)
    n = sum(p.numel() for p in m.parameters()) - 97 * 64  # untied: head counted, embedding not
    assert m.flops_per_token(32) == 6 * n + 6 * 2 * 4 * (16 + 16) * 32
    m.requires_grad_(False)  # LoRA's frozen base: forward (2) and the input gradient (2), no weight gradient
    m.layers[0].mlp.down_proj.weight.requires_grad_(True)
    assert m.flops_per_token(32) == 4 * n + 2 * 64 * c.dim_ffn + 6 * 2 * 4 * (16 + 16) * 32


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        Transformer.from_pretrained(tmp_path / "nope")
    d = tmp_path / "m"
    Transformer(tiny()).save_pretrained(d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        Transformer.from_pretrained(d)
    weights.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: missing.*pickled weights are not loaded"):
        Transformer.from_pretrained(d)
    # weights whose shapes do not match config.json
    Transformer(tiny()).save_pretrained(d)
    config = json.load(open(d / "config.json"))
    config["astrai"]["dim_ffn"] = 128
    json.dump(config, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight: shape \(96, 64\) in the file, \(128, 64\)"):
        Transformer.from_pretrained(d)
    # unsupported architectures; an MoE config read, the dense weights beside it refused
    json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        Transformer.from_pretrained(d)
    moe = hf_config("deepseek_v3", first_k_dense_replace=1, num_experts_per_tok=2, n_group=2, topk_group=1).to_dict()
    json.dump(moe, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="weights do not match its config"):
        Transformer.from_pretrained(d)
    with pytest.raises(ValueError, match="unknown model config keys.*'dimm'"):
        ModelConfig.from_dict({"dimm": 3})


@pytest.mark.parametrize("file_dtype", ["float32", "bfloat16"])
def test_loading_stays_within_the_weights_size(tmp_path, file_dtype):
    """Loading as float32, bfloat16, int8 and int4 from float32 and bfloat16 files takes at most the final weights, the
    largest tensor of the file and 10%: no float32 copy of the whole model on the way (peak resident memory of a
    fresh process, tests/load_memory.py). ~110 MB of float32 weights, so that Python's own noise is small."""
    config = ModelConfig(vocab_size=16384, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, dim_ffn=1536, max_len=256)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu").to(getattr(torch, file_dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(tmp_path)
    del model
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load_memory.py")
    for dtype in ("float32", "bfloat16", "int8", "int4"):
        p = subprocess.run([sys.executable, script, str(tmp_path), dtype], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        m = json.loads(p.stdout)
        assert m["peak"] <= 1.1 * m["weights"] + m["largest"], (file_dtype, dtype, m)


# -----------------------------------------------------------------------------
# RoPE scaling as published: 48 tokens in a model of 64 positions whose RoPE was trained on 16

ORIGINAL = 16
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIGINAL}
LINEAR = {"rope_type": "linear", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
YARN_TUNED = {**YARN, "factor": 3.0, "beta_fast": 8.0, "beta_slow": 2.0, "truncate": False, "attention_factor": 1.25}
YARN_DEEPSEEK = {**YARN, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # V3's keys
YARN_MSCALES = {**YARN, "mscale": 0.9, "mscale_all_dim": 0.7}  # cos/sin by 0.9's mscale / 0.7's; softmax by 0.7's^2
SCALINGS = [  # (family, rope parameters, written the old way: "rope_scaling" with "type", rope_theta beside it)
    ("llama", LLAMA3, False), ("llama", LLAMA3, True), ("llama", LINEAR, False), ("llama", LINEAR, True),
    ("qwen2", YARN, False), ("qwen3", YARN, True), ("qwen3", YARN_TUNED, False),
    ("deepseek_v3", YARN_DEEPSEEK, True), ("deepseek_v3", YARN_MSCALES, False),
]


def unscaled_logits(model, x):
    plain = Transformer(dataclasses.replace(model.config, rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        return plain(x)


@pytest.mark.parametrize("family,rope,legacy", SCALINGS)
def test_rope_scaling_hf_to_ours(tmp_path, family, rope, legacy):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(family, rope_parameters=dict(rope)),
                                                       attn_implementation="eager").eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    if legacy:  # as Llama 3.1's or DeepSeek-V3's config.json: transformers must read it as we do
        config = json.load(open(tmp_path / "config.json"))
        parameters = config.pop("rope_parameters")
        config["rope_theta"] = parameters.pop("rope_theta")
        config["rope_scaling"] = {"type" if family == "deepseek_v3" else "rope_type": parameters.pop("rope_type"),
                                  **parameters}
        json.dump(config, open(tmp_path / "config.json", "w"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.config.rope_scaling == rope
    x = batch(97, B=2, T=48)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert (got - ref).abs().max().item() < TOL
    assert (unscaled_logits(ours, x) - ref).abs().max().item() > 0.05  # the scaling shows: this test can fail


OURS_SCALED = [("llama", LLAMA3), ("llama_tied", LINEAR), ("qwen2", YARN), ("qwen3", YARN_TUNED),
               ("deepseek_v3", YARN_DEEPSEEK), ("deepseek_v3_q_lora", YARN_MSCALES)]


@pytest.mark.parametrize("name,rope", OURS_SCALED)
def test_rope_scaling_ours_to_hf(tmp_path, name, rope):
    ours = randomize(Transformer(tiny(**OUR_CONFIGS[name], rope_scaling=rope))).eval()
    ours.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    assert config["rope_parameters"] == {**rope, "rope_theta": 10000.0}
    del config["astrai"]  # read back from what transformers reads
    json.dump(config, open(tmp_path / "config.json", "w"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = batch(97, B=2, T=48)
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max().item() < TOL
    assert (unscaled_logits(ours, x) - ref).abs().max().item() > 0.05
    assert Transformer.from_pretrained(tmp_path).config.rope_scaling == rope


@pytest.mark.parametrize("name,rope", [("llama", LLAMA3), ("qwen3", YARN_TUNED), ("deepseek_v3", YARN_MSCALES)])
def test_rope_scaling_cached_decode(name, rope):
    """Prefill 5 tokens, then decode one at a time past original_max_position_embeddings: the full forward's logits."""
    model = randomize(Transformer(tiny(**OUR_CONFIGS[name], rope_scaling=rope))).eval()
    x = batch(97, B=2, T=40)
    cache = KVCache(model.config, batch_size=2)
    with torch.no_grad():
        full = model(x)
        got = [model(x[:, :5], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(5, 40)]
    assert (torch.cat(got, dim=1) - full).abs().max().item() < TOL


def test_rope_scaling_refused(tmp_path):
    for scaling, error in [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic' is not supported"),
        ({"type": "linear", "factor": 2.0}, "rope_type=None is not supported"),
        ("yarn", "rope_scaling='yarn'"),
        ({**LLAMA3, "beta_fast": 32}, r"rope_scaling \(llama3\) has unknown keys \['beta_fast'\]"),
        ({"rope_type": "yarn", "factor": 4.0}, r"lacks \['original_max_position_embeddings'\]"),
        ({**YARN, "factor": "4", "truncate": None}, r"factor='4', truncate=None"),
    ]:
        with pytest.raises(ValueError, match=error):
            tiny(rope_scaling=scaling)
    config = hf_config("llama").to_dict()
    for kind, rope in [("longrope", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}),
                       ("dynamic", {"type": "dynamic", "factor": 2.0})]:
        config["rope_parameters"] = rope
        json.dump(config, open(tmp_path / "config.json", "w"))
        with pytest.raises(ValueError, match=rf"config\.json: llama with RoPE scaling type '{kind}'"):
            Transformer.from_pretrained(tmp_path)
    config["rope_parameters"] = {**LLAMA3, "factor": None}
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"config\.json: ModelConfig: rope_scaling \(llama3\): factor=None"):
        Transformer.from_pretrained(tmp_path)


def test_rope_scaling_in_presets(tmp_path):
    """A preset file and the command line give rope_scaling as a dict (JSON on the command line)."""
    preset = tmp_path / "long.py"
    preset.write_text(f"dim = 64\nn_heads = 4\nn_kv_heads = 4\nrope_scaling = {LLAMA3!r}\n")
    assert ModelConfig.from_file(str(preset)).rope_scaling == LLAMA3
    override = ModelConfig.from_file(str(preset), ['--rope_scaling={"rope_type": "linear", "factor": 4.0}'])
    assert override.rope_scaling == LINEAR
    assert ModelConfig.from_file(str(preset), ["--rope_scaling=null"]).rope_scaling is None
    with pytest.raises(SystemExit, match="rope_scaling = 'linear' should be None or a dict"):
        preset.write_text("rope_scaling = 'linear'\n")
        ModelConfig.from_file(str(preset))


def test_model_py_runs_alone(tmp_path):
    """model.py copied into an empty directory: a model trains (the chunked loss and its gradients) and gives logits
    with nothing but torch; rope.py, kv_cache.py and hf.py are imported only by the features that need them."""
    import shutil

    shutil.copy(os.path.join(ROOT, "model.py"), tmp_path)
    script = """import sys, torch
sys.path = [p for p in sys.path if p != %r]
from model import CrossEntropy, ModelConfig, TokenLogprobs, Transformer
model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64, max_len=16))
ids = torch.randint(0, 50, (2, 16))
loss = model(ids, CrossEntropy(ids)) / ids.numel()
loss.backward()
assert model(ids).shape == (2, 16, 50) and model(ids, TokenLogprobs(ids)).shape == (2, 16)
print("modules", sorted(m for m in sys.modules if m in ('rope', 'kv_cache', 'hf', 'settings', 'lora', 'tokenizer',
                                                      'moe')))
""" % ROOT
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "modules []" in p.stdout
