"""train.py as a user runs it: exact resume after SIGKILL, DDP/FSDP == grad accumulation, learning, bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(*args, check=True, timeout=600):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data, a small tokenizer and the seq/sft .h5 files, made the way README.md says."""
    d = tmp_path_factory.mktemp("demo")
    run("pipeline.py", "demo", f"--out={d}")
    run("data.py", "tokenizer", f"--input={d}/pretrain.txt", "--vocab_size=512", f"--out={d}/tokenizer")
    run("data.py", "prepare", "--stage=seq", f"--input={d}/pretrain.txt", f"--tokenizer={d}/tokenizer", f"--out={d}/pretrain.h5")
    run("data.py", "prepare", "--stage=sft", f"--input={d}/sft.jsonl", f"--tokenizer={d}/tokenizer", f"--out={d}/sft.h5")
    with open(d / "model.py", "w") as f:  # a model preset small enough for seconds of training
        f.write("vocab_size = 512\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\ndim_ffn = 128\nmax_len = 64\n")
    return d


def common(demo, out, *extra):
    return ["train.py", f"--data={demo}/pretrain.h5", f"--tokenizer={demo}/tokenizer", f"--model_config={demo}/model.py",
            f"--out_dir={out}", "--batch_size=4", "--block_size=32", "--lr=3e-3", "--warmup_iters=5", "--seed=7",
            "--eval_interval=0", "--log_interval=1", *extra]


def losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_after_sigkill_is_exact(demo, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--max_iters=60", "--ckpt_interval=5", "--keep_checkpoints=2"]
    run(*common(demo, full, *args))
    p = subprocess.Popen([sys.executable, *common(demo, killed, *args)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "ckpt-20").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    # old checkpoints are pruned only after the new one is renamed into place, so a kill in between leaves K + 1
    complete = [k for k in os.listdir(killed) if k.startswith("ckpt-") and k[5:].isdigit()]
    assert 1 <= len(complete) <= 3
    out = run(*common(demo, killed, *args, "--resume=auto")).stdout
    assert "resumed from" in out
    a, b = losses(full), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:5]  # bitwise
    assert sorted(k for k in os.listdir(killed) if k.startswith("ckpt-") and k[5:].isdigit()) == ["ckpt-55", "ckpt-60"]
    assert os.path.isfile(killed / "final" / "model.safetensors")
    assert os.path.isfile(killed / "final" / "tokenizer.json")


def test_sigterm_saves_a_checkpoint_and_exits(demo, tmp_path):
    out = tmp_path / "term"
    p = subprocess.Popen([sys.executable, *common(demo, out, "--max_iters=100000", "--ckpt_interval=0")], cwd=ROOT,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log
    assert "stopped by signal" in log
    step = int(log.split("stopped by signal at step ")[1].split(";")[0])
    assert (out / f"ckpt-{step}" / "optimizer.pt").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_distributed_equals_grad_accumulation(demo, tmp_path, parallel):
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["--max_iters=6", "--ckpt_interval=0", "--weight_decay=0.1"]
    run(*common(demo, single, *args, "--grad_accum=2"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        *common(demo, multi, *args, "--grad_accum=1", f"--parallel={parallel}")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    from safetensors.torch import load_file

    wa, wb = load_file(single / "final" / "model.safetensors"), load_file(multi / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert max((wa[k] - load_file(single / "ckpt-6" / "model.safetensors")[k]).abs().max().item() for k in wa) == 0


def unigram_entropy(h5_path):
    with h5py.File(h5_path) as f:
        tokens = f["train/tokens"][:]
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_pretraining_beats_unigram_entropy(demo, tmp_path):
    out = tmp_path / "learn"
    log = run(*common(demo, out, "--max_iters=300", "--eval_interval=100", "--eval_iters=10", "--ckpt_interval=0",
                      "--batch_size=8", "--block_size=64", "--lr=1e-2", "--min_lr=1e-3", "--warmup_iters=20")).stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    entropy = unigram_entropy(demo / "pretrain.h5")
    assert len(val) == 3 and val[-1] < val[0]
    assert val[-1] < 0.6 * entropy, (val, entropy)
    assert "tok/s" in log and "MFU" in log and "min left" in log
    svg = open(out / "loss.svg").read()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    train_rows = [r for r in rows if "loss" in r]
    assert set(train_rows[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    exported_model_works_in_transformers(out / "final")


def exported_model_works_in_transformers(final):
    """final/ as transformers sees it: same logits as model.py, the tokenizer's stop tokens as eos (not
    Llama's default 2), and greedy generate() stopping where ours does."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, ROOT)
    from tokenizer import Tokenizer
    from model import Transformer
    from sample import generate

    ours, tok = Transformer.from_pretrained(str(final)).eval(), Tokenizer.load(str(final))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(final))
    assert hf.generation_config.eos_token_id == tok.stop_ids and hf.generation_config.bos_token_id is None
    text = "12 + 7 = 19\n\n30 + 4 ="
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4
        stop = tok.eot_id  # the demo text's documents end in <|endoftext|>: a trained model emits it
        theirs = hf.generate(x, do_sample=False, max_new_tokens=40, eos_token_id=stop, pad_token_id=stop)[0, len(ids):]
    assert generate(ours, [ids], 40, temperature=0.0, stop_ids=[stop])[0] == theirs.tolist()


def test_bad_input_stops_before_training(demo, tmp_path):
    def fails(*extra, expect):
        p = run(*common(demo, tmp_path / "bad", "--max_iters=2", *extra), check=False)
        assert p.returncode != 0
        message = p.stdout + p.stderr
        assert expect in message, message[-2000:]
        assert not (tmp_path / "bad" / "metrics.jsonl").exists()

    fails(f"--data={tmp_path}/missing.h5", expect="missing.h5")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"this is not an hdf5 file" * 10)
    fails(f"--data={corrupt}", expect="corrupt.h5")
    fails(f"--data={demo}/sft.h5", expect="sft")  # wrong stage for --strategy=seq
    small = tmp_path / "small.py"
    small.write_text("vocab_size = 100\ndim = 32\nn_layers = 1\nn_heads = 2\nn_kv_heads = 2\ndim_ffn = 64\nmax_len = 64\n")
    fails(f"--model_config={small}", expect="vocab_size is 100")
    fails("--no_such_key=1", expect="no_such_key")
    fails("--max_iters=abc", expect="max_iters")
    bad_config = tmp_path / "typo.py"
    bad_config.write_text("max_iter = 10\n")
    p = run("train.py", str(bad_config), check=False)
    assert p.returncode != 0 and "max_iter" in p.stdout + p.stderr
