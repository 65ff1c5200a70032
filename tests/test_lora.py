"""LoRA (lora.py) against peft on the transformers model, and train.py --lora_rank as a user runs it: frozen base,
exact resume, a different base refused, DDP/FSDP == grad accumulation, dpo/grpo against the adapters-off base,
sample.py --adapter."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TEXT, randomize
from safetensors.torch import load_file

import lora
from model import ModelConfig, TokenLogprobs, Transformer
from settings import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
GQA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128, max_len=64)


def run(*args, check=True, torchrun=False):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    p = subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def formula_count(c, rank, targets=("q", "k", "v", "o", "gate", "up", "down")):
    """r * (in + out) per adapted layer, from the config alone."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    sizes = {"q": (c.dim, q), "k": (c.dim, kv), "v": (c.dim, kv), "o": (q, c.dim), "gate": (c.dim, c.dim_ffn),
             "up": (c.dim, c.dim_ffn), "down": (c.dim_ffn, c.dim)}
    return c.n_layers * sum(rank * sum(sizes[t]) for t in targets)


def base_dir(tmp_path_factory, name, seed, vocab_size=300, **config):
    """A random model with larger-than-init weights (so adapters and wrong scalings show), saved as a MODELDIR."""
    from tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp(name)
    tokenizer = train_tokenizer([TEXT], vocab_size=vocab_size, progress=False)
    torch.manual_seed(seed)
    model = randomize(Transformer(ModelConfig(**{**GQA, "vocab_size": tokenizer.vocab_size, **config})), seed)
    model.save_pretrained(path, token_ids=tokenizer.token_ids())
    tokenizer.save(path)
    return str(path)


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def with_random_adapters(model, rank=4, alpha=8.0, targets="attention,mlp", seed=1, tokens=()):
    """Adapters with B != 0 (B starts at zero, which would hide every mistake), and new rows for these tokens."""
    names = lora.target_names(model, targets)
    lora.add_adapters(model, names, rank, alpha / rank)
    if tokens:
        lora.add_token_rows(model, tokens)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.adapter_layers(model):
            layer.lora_B.weight.copy_(0.2 * torch.randn(layer.lora_B.weight.shape, generator=g))
        if tokens:
            rows = model.embed_tokens.token_adapter.rows
            rows.copy_(torch.randn(rows.shape, generator=g))
    return model, names


# -----------------------------------------------------------------------------
# the format: peft on transformers' model reads ours, ours reads peft's


@pytest.mark.parametrize("arch, targets, tokens", [("llama", "attention,mlp", [5, 250]), ("qwen3", "attention,mlp", []),
                                                   ("qwen3", "layers.1.mlp.down_proj,v_proj,lm_head", [7])])
def test_peft_loads_our_adapter(tmp_path_factory, tmp_path, arch, targets, tokens):
    """Token rows (trainable_token_indices) on a tied head (llama here) and on an untied one (the embedding only)."""
    peft = pytest.importorskip("peft")
    base = base_dir(tmp_path_factory, arch, 0, use_qk_norm=arch == "qwen3", tie_weight=arch == "llama")
    ours, names = with_random_adapters(Transformer.from_pretrained(base), targets=targets, tokens=tokens)
    state = {k: v for k, v in ours.state_dict().items() if ".lora_" in k or k == lora.TOKEN_ROWS}
    config = lora.peft_config(names, 4, 8.0, 0.0, base, n_layers=2, tokens=tokens)
    lora.save_adapter(tmp_path, state, config)
    assert len(config["target_modules"]) == (7 if targets == "attention,mlp" else 4)
    theirs = peft.PeftModel.from_pretrained(hf_model(base), str(tmp_path)).eval()
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    x[:, 3:3 + len(tokens)] = torch.tensor(tokens)  # the trained rows are read
    with torch.no_grad():
        expected = theirs(x).logits
        assert (expected - hf_model(base)(x).logits).abs().max() > 0.1  # the adapter changes the output
        assert (ours(x) - expected).abs().max().item() < 1e-4
        targets = x.roll(-1, 1)  # the training head (chunked; TokenHead.head_weight) scores the trained rows too
        targets[:, :len(tokens)] = torch.tensor(tokens)
        picked = expected.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        assert (ours(x, TokenLogprobs(targets)) - picked).abs().max().item() < 1e-4
        # merged == unmerged, in float64: in float32 each differs from the exact result by rounding (~5e-6 here)
        merged = lora.merge_adapter(Transformer.from_pretrained(base).double(), str(tmp_path), base)
        assert (merged(x) - ours.double()(x)).abs().max().item() < 1e-5


def test_our_model_loads_peft_adapter(tmp_path_factory, tmp_path):
    """An adapter peft made on the transformers model (rsLoRA scaling, some layers only) loads into ours."""
    peft = pytest.importorskip("peft")
    base = base_dir(tmp_path_factory, "peft_base", 3, n_layers=3)
    config = peft.LoraConfig(r=6, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             init_lora_weights=False, layers_to_transform=[0, 2], task_type="CAUSAL_LM",
                             trainable_token_indices=[9, 2])
    torch.manual_seed(0)
    theirs = peft.get_peft_model(hf_model(base), config).eval()
    with torch.no_grad():  # the token rows start as the base's (whatever init_lora_weights says): new values
        theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].normal_()
    theirs.save_pretrained(str(tmp_path))
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    x[:, 5:7] = torch.tensor([2, 9])
    with torch.no_grad():
        expected = theirs(x).logits
        assert (expected - hf_model(base)(x).logits).abs().max() > 0.1
        unmerged = lora.load_adapter(Transformer.from_pretrained(base), str(tmp_path))
        assert len(lora.adapter_layers(unmerged)) == 2 * 3
        assert (unmerged(x) - expected).abs().max().item() < 1e-4
        merged = lora.merge_adapter(Transformer.from_pretrained(base).double(), str(tmp_path))
        assert (merged(x) - unmerged.double()(x)).abs().max().item() < 1e-5  # in float64, as above


def test_trainable_count_matches_formula_and_peft(tmp_path_factory):
    peft = pytest.importorskip("peft")
    base = base_dir(tmp_path_factory, "count", 0)
    model = Transformer.from_pretrained(base)
    cfg = Settings(init_from=base, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="attention,mlp",
                   lora_tokens="")
    adapter = lora.TrainingAdapter(model, cfg, tokenizer=None)
    assert adapter.trainable == formula_count(model.config, 8)
    assert adapter.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    theirs = peft.get_peft_model(hf_model(base), peft.LoraConfig(r=8, target_modules=adapter.config["target_modules"]))
    assert theirs.get_nb_trainable_parameters()[0] == adapter.trainable
    only_qv = lora.target_names(Transformer.from_pretrained(base), "q_proj,v_proj")
    assert only_qv == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.self_attn.q_proj",
                       "layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="'qq_proj' matches no linear layer"):
        lora.target_names(model, "qq_proj")
    mla = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, attn="mla",
                                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, dim_ffn=64))
    assert "layers.0.self_attn.kv_b_proj" not in lora.target_names(mla, "attention")
    with pytest.raises(ValueError, match="kv_b_proj cannot be adapted"):
        lora.target_names(mla, "kv_b_proj")


def test_reference_is_the_base_with_adapters_off(tmp_path_factory):
    """DPO's and GRPO's reference under LoRA: the base model's logits, from the policy's own weights."""
    import strategies
    from train import DEFAULTS

    base = base_dir(tmp_path_factory, "reference", 0)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = Transformer.from_pretrained(base)(x)
        policy, _ = with_random_adapters(Transformer.from_pretrained(base), tokens=[int(x[0, 0]), 3])
        dpo = strategies.DPO(Settings({**DEFAULTS, **strategies.DPO.settings}, lora_rank=4), policy, None)
        policy_logits = policy(x)
        assert (policy_logits - base_logits).abs().max() > 0.1
        assert torch.equal(dpo.ref_model(x), base_logits)
        assert torch.equal(policy(x), policy_logits)  # adapters back on
    assert dpo.ref_model.model is policy  # no second copy of the weights


# -----------------------------------------------------------------------------
# train.py --lora_rank


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Small demo data for every stage, its tokenizer, and two different base models of the same shape."""
    d = tmp_path_factory.mktemp("lora_demo")
    run("pipeline.py", "demo", f"--out={d}", "--pretrain_docs=300", "--sft=300", "--dpo=200", "--grpo=100",
        "--n_eval=20")
    run("data.py", "tokenizer", f"--input={d}/pretrain.txt", "--vocab_size=512", f"--out={d}/tokenizer")
    for stage, source in [("sft", "sft.jsonl"), ("dpo", "dpo.jsonl"), ("grpo", "grpo.jsonl")]:
        run("data.py", "prepare", f"--stage={stage}", f"--input={d}/{source}", f"--tokenizer={d}/tokenizer",
            f"--out={d}/{stage}.h5")
    from tokenizer import Tokenizer

    tokenizer = Tokenizer.load(str(d / "tokenizer"))
    for name, seed in [("base", 0), ("other_base", 1)]:
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(**{**GQA, "vocab_size": 512}))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.1)
        model.save_pretrained(d / name, token_ids=tokenizer.token_ids())
        tokenizer.save(d / name)
    return d


def lora_args(demo, out, *extra, strategy="sft"):
    return ["train.py", f"--strategy={strategy}", f"--data={demo}/{strategy}.h5", f"--init_from={demo}/base",
            f"--out_dir={out}", "--batch_size=4", "--block_size=48", "--lr=1e-2", "--warmup_iters=2", "--seed=7",
            "--eval_interval=0", "--log_interval=1", "--lora_rank=4", "--lora_alpha=8", *extra]


def losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def sft_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_lora")
    log = run(*lora_args(demo, out, "--max_iters=8", "--ckpt_interval=4", "--merge_lora=true",
                         "--lora_dropout=0.1")).stdout
    return out, log


def test_lora_training_freezes_the_base_and_keeps_the_adapter(demo, sft_run):
    out, log = sft_run
    config = ModelConfig(**{**GQA, "vocab_size": 512})
    assert f"LoRA rank 4: {formula_count(config, 4):,} trainable parameters" in log
    ckpt = out / "ckpt-8"
    assert sorted(os.listdir(ckpt)) >= ["adapter_config.json", "adapter_model.safetensors", "base_model.json"]
    assert not (ckpt / "model.safetensors").exists()
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * config.n_layers
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapter)  # the optimizer holds the adapters only
    assert json.load(open(ckpt / "base_model.json"))["sha256"] == lora.weights_hash(str(demo / "base"))
    # final/ (--merge_lora): every weight the adapter does not touch is the base's, bitwise; the adapted ones
    # are the base's plus (alpha / r) * B @ A of the last checkpoint
    base, merged = load_file(demo / "base" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert base.keys() == merged.keys()
    for key, weight in base.items():
        a = adapter.get("base_model.model." + key.replace(".weight", ".lora_A.weight"))
        if a is None:
            assert torch.equal(merged[key], weight), key
        else:
            b = adapter["base_model.model." + key.replace(".weight", ".lora_B.weight")]
            assert (merged[key] - (weight + 2.0 * b @ a)).abs().max() < 1e-6, key
            assert (merged[key] - weight).abs().max() > 1e-4, key  # trained


def test_peft_loads_a_trained_adapter(demo, sft_run):
    peft = pytest.importorskip("peft")
    out, _ = sft_run
    theirs = peft.PeftModel.from_pretrained(hf_model(str(demo / "base")), str(out / "ckpt-8")).eval()
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (Transformer.from_pretrained(str(out / "final"))(x) - theirs(x).logits).abs().max().item() < 1e-4


def test_lora_resume_is_exact_and_needs_the_same_base(demo, sft_run, tmp_path):
    out, _ = sft_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "ckpt-4", resumed / "ckpt-4")
    args = ["--max_iters=8", "--ckpt_interval=4", "--merge_lora=true", "--lora_dropout=0.1", "--resume=auto"]
    log = run(*lora_args(demo, resumed, *args)).stdout
    assert "resumed from" in log
    a, b = losses(out), losses(resumed)
    assert sorted(b) == [5, 6, 7, 8] and all(a[s] == b[s] for s in b), (a, b)  # bitwise
    first, again = load_file(out / "ckpt-8" / "adapter_model.safetensors"), load_file(resumed / "ckpt-8" /
                                                                                      "adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)

    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(out / "ckpt-4", other / "ckpt-4")
    p = run(*lora_args(demo, other, *args, f"--init_from={demo}/other_base"), check=False)
    assert p.returncode != 0
    assert "different weights" in p.stderr and "other_base" in p.stderr, p.stderr[-2000:]
    no_lora = [a for a in lora_args(demo, other, *args) if not a.startswith(("--lora_", "--merge_lora"))]
    p = run(*no_lora, check=False)
    assert p.returncode != 0 and "holds a LoRA adapter" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_distributed_equals_grad_accumulation(demo, tmp_path, parallel):
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["--max_iters=4", "--ckpt_interval=0", "--weight_decay=0.1", "--lora_tokens=<|im_end|>,<|im_start|>"]
    run(*lora_args(demo, single, *args, "--grad_accum=2"))
    run(*lora_args(demo, multi, *args, "--grad_accum=1", f"--parallel={parallel}", "--merge_lora=true"),
        torchrun=True)
    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    wa = load_file(single / "final" / "adapter_model.safetensors")
    wb = load_file(multi / "ckpt-4" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) == 28 + 1  # 2 per adapted layer, and the token rows
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    # final/ merged from the sharded model: the base plus (alpha / r) * B @ A
    base, merged = load_file(demo / "base" / "model.safetensors"), load_file(multi / "final" / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    b_, a_ = (wb["base_model.model." + key.replace(".weight", f".lora_{x}.weight")] for x in "BA")
    assert (merged[key] - (base[key] + 2.0 * b_ @ a_)).abs().max() < 1e-6
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    # the token rows: their trained values in the merged embedding (and so in the tied head), every other row the base's
    from tokenizer import Tokenizer

    tokenizer, key = Tokenizer.load(str(demo / "tokenizer")), "model.embed_tokens.weight"
    ids = sorted([tokenizer.im_start_id, tokenizer.im_end_id])
    rows = wb["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert torch.equal(merged[key][ids], rows) and (rows - base[key][ids]).abs().max() > 1e-4
    others = torch.ones(len(base[key]), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(merged[key][others], base[key][others])


def test_dpo_and_grpo_with_lora(demo, tmp_path):
    log = run(*lora_args(demo, tmp_path / "dpo", "--max_iters=2", "--ckpt_interval=0", "--beta=0.1",
                         strategy="dpo")).stdout
    assert losses(tmp_path / "dpo")[1] == pytest.approx(0.6931, abs=1e-4), log  # policy == reference at the start
    run(*lora_args(demo, tmp_path / "grpo", "--max_iters=2", "--ckpt_interval=0", "--group_size=2",
                   "--max_new_tokens=6", "--ppo_epochs=1", strategy="grpo"))
    assert (tmp_path / "grpo" / "final" / "adapter_model.safetensors").exists()
    p = run(*lora_args(demo, tmp_path / "bad", "--max_iters=2", "--sync_interval=5", strategy="grpo"), check=False)
    assert p.returncode != 0 and "sync_interval=5 with LoRA" in p.stderr


def test_bad_lora_settings_stop_before_training(demo, tmp_path):
    for extra, expect in [(["--init_from=scratch"], "--init_from=MODELDIR"), (["--lora_targets=qv"], "'qv'"),
                          (["--lora_dropout=1.5"], "lora_dropout=1.5"),
                          (["--lora_tokens=<|im_end|>,<|no such token|>"], "'<|no such token|>' is")]:
        p = run(*lora_args(demo, tmp_path, "--max_iters=1", f"--tokenizer={demo}/tokenizer", *extra), check=False)
        assert p.returncode != 0 and expect in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / "metrics.jsonl").exists()


def test_sample_with_adapter_equals_merged_model(demo, sft_run, tmp_path):
    out, _ = sft_run
    common = ["sample.py", "--prompt=12 + 7 =", "--temperature=0", "--max_new_tokens=12", "--compile=false"]
    with_adapter = run(*common, f"--model={demo}/base", f"--adapter={out}/ckpt-8").stdout
    merged = run(*common, f"--model={out}/final").stdout
    plain = run(*common, f"--model={demo}/base").stdout
    assert with_adapter == merged and with_adapter != plain
    p = run(*common, f"--model={demo}/other_base", f"--adapter={out}/ckpt-8", check=False)
    assert p.returncode != 0 and "different weights" in p.stderr
    p = run("serve.py", f"--model={demo}/other_base", f"--adapter={out}/ckpt-8", "--port=0", check=False)
    assert p.returncode != 0 and "different weights" in p.stderr


def test_adapter_is_merged_before_int8_quantization(demo, sft_run):
    from sample import load

    out, _ = sft_run
    x = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        merged = Transformer.from_pretrained(str(out / "final"))(x)
        plain = load(str(demo / "base"), dtype="int8")[0](x)
        adapted = load(str(demo / "base"), dtype="int8", adapter=str(out / "ckpt-8"))[0](x)
    assert (adapted - merged).abs().max() < 0.2 * (plain - merged).abs().max()
