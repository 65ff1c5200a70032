# A model as people download it, through every command: a Hugging Face directory built the way published ones are
# (a byte-level vocab lacking 21 control bytes, a chat template that inserts a default system prompt, eos ids as a
# list in generation_config.json, tied embeddings, sharded safetensors with model.safetensors.index.json), and the
# same model as a .gguf file made by llama.cpp's converter. Each command a user types runs on both: sample.py --chat,
# serve.py's chat completion, data.py prepare + LoRA SFT + merge, export to a Hugging Face dir and to GGUF.
import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import TEXT, randomize  # noqa: E402
from model import Transformer  # noqa: E402
from sample import generate, strip_stop  # noqa: E402
from tokenizer import BYTE_TO_CHAR, Tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("gguf")
from test_gguf import CONVERTER, convert  # noqa: E402
from tokenizers import decoders, models, trainers  # noqa: E402
from tokenizers import pre_tokenizers as pre  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MISSING = [*range(0, 9), *range(14, 26)]  # 21 control bytes, as SmolLM's and others' vocabularies lack them
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            "<|im_end|>\n' }}"
            "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTION = "What is 2 + 3? 你好\x04!"  # \x04 has no token: dropped, as the tokenizers library drops it


def run(*args, stdin=None):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, input=stdin, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"{args}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """{"dir": the Hugging Face directory, "gguf": the same model as llama.cpp's converter writes it}."""
    root = tmp_path_factory.mktemp("published")
    path = root / "SmolLM-tiny-Instruct"
    hf_tok = tokenizers.Tokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)])
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                                             initial_alphabet=pre.ByteLevel.alphabet(),
                                                             show_progress=False))
    spec = json.loads(hf_tok.to_str())
    for b in MISSING:  # the bytes' tokens gone, ids of the rest unchanged (a hole each)
        assert spec["model"]["vocab"].pop(BYTE_TO_CHAR[b]) is not None
    path.mkdir()
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    config = transformers.LlamaConfig(vocab_size=432, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
                                      rope_theta=100000.0)
    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(config), seed=3).eval()
    model.save_pretrained(str(path), max_shard_size="100KB")
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    assert (path / "model.safetensors.index.json").exists()
    out = {"dir": str(path), "reference": model}
    if os.path.isfile(CONVERTER):
        out["gguf"] = convert(path, root / "smollm-tiny-f32.gguf", "smollm")
    return out


def kinds(published):
    return ["dir", "gguf"] if "gguf" in published else ["dir"]


def greedy_reply(model_path, messages, n=12):
    """generate()'s greedy reply, the reference every command's reply is checked against."""
    model, tokenizer = Transformer.from_pretrained(model_path).eval(), Tokenizer.load(model_path)
    stop_ids = tokenizer.stop_ids
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    tokens = generate(model, [ids], n, temperature=0.0, stop_ids=stop_ids)[0]
    return tokenizer.decode(strip_stop(tokens, stop_ids))


def test_loads_like_transformers(published):
    """The directory's logits are transformers'; the tokenizer is the tokenizers library's; eos from the list."""
    model = Transformer.from_pretrained(published["dir"]).eval()
    x = torch.randint(0, 432, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - published["reference"](x).logits).abs().max().item() < 1e-4
    ours, theirs = Tokenizer.load(published["dir"]), transformers.AutoTokenizer.from_pretrained(published["dir"])
    messages = [{"role": "user", "content": QUESTION}]
    assert ours.render_chat(messages, add_generation_prompt=True)[0] == \
        theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ours.stop_ids[:2] == [2, 0]
    for kind in kinds(published)[1:]:  # the .gguf: the same ids, the same model
        assert Tokenizer.load(published[kind]).render_chat(messages)[0] == ours.render_chat(messages)[0]
        with torch.no_grad():
            assert (Transformer.from_pretrained(published[kind]).eval()(x) - model(x)).abs().max().item() < 1e-4


def test_sample_chat_and_serve_give_generates_reply(published):
    messages = [{"role": "user", "content": QUESTION}]
    for kind in kinds(published):
        path, want = published[kind], greedy_reply(published[kind], messages)
        out = run("sample.py", f"--model={path}", "--chat", "--temperature=0", "--max_new_tokens=12",
                  "--compile=false", stdin=QUESTION + "\n/exit\n")
        assert want and out.split("> ")[1].rstrip("\n") == want, (kind, out)
        server = subprocess.Popen([sys.executable, "serve.py", f"--model={path}", "--port=0", "--compile=false"],
                                  cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
        try:
            found = None
            while found is None:  # warnings (the missing bytes) come before the address
                line = server.stderr.readline()
                assert line, "serve.py exited before serving"
                found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1))
            body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": 12}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                             {"Content-Type": "application/json"})
            reply = json.load(urllib.request.urlopen(request, timeout=60))
            assert reply["choices"][0]["message"]["content"] == want, kind
        finally:
            server.terminate()
            server.wait(timeout=10)


def test_lora_sft_then_merge(published, tmp_path):
    with open(tmp_path / "sft.jsonl", "w") as f:
        for a in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                             {"role": "assistant", "content": f"{a + 1}"}]}) + "\n")
    for kind in kinds(published):
        path, out = published[kind], tmp_path / kind
        run("data.py", "prepare", "--stage=sft", f"--input={tmp_path / 'sft.jsonl'}", f"--tokenizer={path}",
            f"--out={tmp_path / kind}.h5")
        log = run("train.py", "--strategy=sft", f"--data={tmp_path / kind}.h5", f"--init_from={path}",
                  f"--out_dir={out}", "--batch_size=4", "--block_size=128", "--max_iters=4", "--eval_interval=0",
                  "--lora_rank=4", "--lora_alpha=8", "--lr=1e-2", "--merge_lora=true", "--compile=false")
        assert "LoRA rank 4" in log
        merged = Transformer.from_pretrained(str(out / "final")).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float32).eval()
        base = Transformer.from_pretrained(path)
        x = torch.randint(0, 432, (1, 20), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert (merged(x) - hf(x).logits).abs().max().item() < 1e-4
            assert (merged(x) - base(x)).abs().max().item() > 1e-3, kind  # the adapter trained and merged in
        assert Tokenizer.load(str(out / "final")).encode(QUESTION) == Tokenizer.load(path).encode(QUESTION)


def test_export_round_trips(published, tmp_path):
    x = torch.randint(0, 432, (1, 40), generator=torch.Generator().manual_seed(2))
    for kind in kinds(published):
        path = published[kind]
        model = Transformer.from_pretrained(path).eval()
        run("export.py", f"--model={path}", f"--hf_dir={tmp_path / kind}", "--outtype=f32")
        back = Transformer.from_pretrained(str(tmp_path / kind)).eval()
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / kind), dtype=torch.float32).eval()
        with torch.no_grad():
            assert (hf(x).logits - model(x)).abs().max().item() < 1e-4
        assert Tokenizer.load(str(tmp_path / kind)).encode(QUESTION) == Tokenizer.load(path).encode(QUESTION)
        run("export.py", f"--model={path}", f"--gguf={tmp_path / kind}.gguf", "--outtype=f32")
        again = Transformer.from_pretrained(f"{tmp_path / kind}.gguf")
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
        assert greedy_reply(f"{tmp_path / kind}.gguf", [{"role": "user", "content": QUESTION}]) == \
            greedy_reply(path, [{"role": "user", "content": QUESTION}])
