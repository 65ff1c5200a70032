"""train.py as a user runs it: exact resume after SIGKILL, DDP/FSDP == grad accumulation, learning, bad input."""
import json
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


MOE = ["--n_experts=4", "--n_active_experts=2", "--moe_dim_ffn=32"]  # mixture-of-experts layers on the demo preset


@pytest.mark.parametrize("parallel, model", [("ddp", []), ("fsdp", []), ("ddp", MOE),  # MoE: the auxiliary loss
                                             ("fsdp", [*MOE, "--router=sigmoid"])])  # the bias balancing
def test_distributed_equals_grad_accumulation(demo, tmp_path, parallel, model):
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["--max_iters=6", "--ckpt_interval=0", "--weight_decay=0.1", *model]
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


def test_moe_resume_is_exact_with_the_balancing_biases(demo, tmp_path):
    """DeepSeek-V3's bias balancing: the biases move every step, are saved with the model and resume exactly; the log
    has each MoE layer's expert load (max / mean)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*MOE, "--router=sigmoid", "--first_dense_layers=1", "--n_layers=3", "--moe_bias_rate=0.01",
            "--ckpt_interval=3"]
    run(*common(demo, full, *args, "--max_iters=6"))
    run(*common(demo, resumed, *args, "--max_iters=3"))
    assert "resumed from" in run(*common(demo, resumed, *args, "--max_iters=6", "--resume=auto")).stdout
    a, b = losses(full), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a)
    wa, wb = weights(full / "final"), weights(resumed / "final")
    assert max_difference(wa, wb) == 0
    biases = [k for k in wa if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(wa[k].abs().max() > 0 for k in biases)  # layers 1 and 2, moved from 0
    rows = [json.loads(line) for line in open(full / "metrics.jsonl")]
    loads = [r["expert_load"] for r in rows if "expert_load" in r]
    assert len(loads) == 6 and all(len(v) == 2 and all(x >= 1.0 for x in v) for v in loads)


def torchrun(*args, nproc=2):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sft_loss_weighs_every_reply_token_alike_however_the_batch_is_split(demo, tmp_path):
    # replies of 1 to 90 tokens: one optimizer step of 4 conversations taken as 1 process x 4 rows, 1 x 2 rows x
    # grad_accum 2, and 2 processes x 2 rows must give the same loss and weights (the mean over every reply token)
    sys.path.insert(0, ROOT)
    from data import prepare
    from tokenizer import Tokenizer

    tokenizer = Tokenizer.load(str(demo / "tokenizer"))
    replies, lengths = [1, 90, 3, 40, 7, 65, 2, 20], []
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i, n in enumerate(replies * 2):
            words = " ".join(str((i * 7 + k) % 10) for k in range(n))
            ids = tokenizer.encode(words)
            lengths.append(len(ids))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count {i}"},
                                             {"role": "assistant", "content": tokenizer.decode(ids[:n])}]}) + "\n")
    prepare("sft", [str(tmp_path / "sft.jsonl")], str(demo / "tokenizer"), str(tmp_path / "sft.h5"),
            val_fraction=0.0, progress=False)
    (tmp_path / "model.py").write_text("vocab_size = 512\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\n"
                                       "dim_ffn = 128\nmax_len = 128\n")

    def args(out, batch_size, grad_accum):
        return ["train.py", "--strategy=sft", f"--data={tmp_path}/sft.h5", f"--tokenizer={demo}/tokenizer",
                f"--model_config={tmp_path}/model.py", f"--out_dir={out}", f"--batch_size={batch_size}",
                f"--grad_accum={grad_accum}", "--block_size=128", "--lr=1e-2", "--warmup_iters=1", "--max_iters=2",
                "--eval_interval=0", "--log_interval=1", "--ckpt_interval=0", "--weight_decay=0"]

    run(*args(tmp_path / "one", 4, 1))
    run(*args(tmp_path / "accum", 2, 2))
    torchrun(*args(tmp_path / "ddp", 2, 1))
    one = weights(tmp_path / "one" / "final")
    for other in ("accum", "ddp"):
        assert max_difference(one, weights(tmp_path / other / "final")) < 1e-5, other
        assert all(abs(losses(tmp_path / "one")[s] - losses(tmp_path / other)[s]) < 1e-5 for s in (1, 2))


def test_elastic_resume_on_fewer_processes_continues_at_the_same_sample(demo, tmp_path):
    # 2 processes to step 10, then 1 process x grad_accum 2 to step 20 == 2 processes straight to step 20
    # a constant schedule: the first leg's max_iters=10 changes nothing before step 10
    args = ["--max_iters=20", "--ckpt_interval=10", "--lr_schedule=constant", "--weight_decay=0.1"]
    torchrun(*common(demo, tmp_path / "straight", *args))
    torchrun(*common(demo, tmp_path / "elastic", *args[1:], "--max_iters=10"))
    out = run(*common(demo, tmp_path / "elastic", *args, "--grad_accum=2", "--resume=auto")).stdout
    assert "resumed from" in out
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "elastic")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    assert max_difference(weights(tmp_path / "straight" / "final"), weights(tmp_path / "elastic" / "final")) < 1e-5
    # another number of rows a step cannot continue at the same sample: a clear error, no training
    p = run(*common(demo, tmp_path / "elastic", *args, "--max_iters=30", "--resume=auto"), check=False)
    assert p.returncode != 0 and "8 rows a step (batch_size 4 x grad_accum 2 x 1 processes)" in p.stdout + p.stderr
    assert "this run takes 4" in p.stdout + p.stderr and "Traceback" not in p.stdout + p.stderr


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
    fails("--lr_schedule=linear", expect="lr_schedule='linear'")  # was: silently cosine
    fails("--lr_schedule=sgdr", "--sgdr_cycle=0", expect="sgdr_cycle=0")  # was: a loop that never ends
    fails("--lr_schedule=sgdr", "--sgdr_mult=0.5", expect="sgdr_mult=0.5")
    fails("--keep_checkpoints=0", expect="keep_checkpoints=0: must be >= 1")  # was: every checkpoint kept
    fails("--merge_lora=true", expect="merge_lora=true needs lora_rank > 0")  # was: silently a full-weight run
    fails("--lora_tokens=<|im_end|>", expect="needs lora_rank > 0")
    fails("--max_iters=abc", expect="max_iters")
    bad_config = tmp_path / "typo.py"
    bad_config.write_text("max_iter = 10\n")
    p = run("train.py", str(bad_config), check=False)
    assert p.returncode != 0 and "max_iter" in p.stdout + p.stderr


def test_sgdr_restarts_where_its_cycles_end():
    sys.path.insert(0, ROOT)
    from settings import Settings
    from train import DEFAULTS, learning_rate

    cfg = Settings(DEFAULTS, lr=1.0, min_lr=0.0, warmup_iters=0, lr_schedule="sgdr", sgdr_cycle=4, sgdr_mult=2.0)
    starts = [s for s in range(30) if learning_rate(s, cfg) == 1.0]
    assert starts == [0, 4, 12, 28]  # cycles of 4, 8, 16
    assert learning_rate(2, cfg) == pytest.approx(0.5) and learning_rate(8, cfg) == pytest.approx(0.5)
    cfg.sgdr_mult = 1.0  # equal cycles, computed without walking them
    assert [s for s in range(10**6, 10**6 + 12) if learning_rate(s, cfg) == 1.0] == [10**6, 10**6 + 4, 10**6 + 8]


def test_rng_state_round_trips_numpys_cached_gaussian():
    sys.path.insert(0, ROOT)
    from checkpoint import rng_state, set_rng_state

    np.random.seed(3)
    np.random.standard_normal()  # the legacy Gaussian draws two numbers and caches the second
    state = torch.load(save_to_bytes(rng_state()), weights_only=True)
    expected = np.random.standard_normal(3)
    set_rng_state(state)
    assert np.random.standard_normal(3).tolist() == expected.tolist()


def save_to_bytes(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_replacing_a_directory_leaves_the_new_one_and_nothing_else(tmp_path):
    sys.path.insert(0, ROOT)
    from checkpoint import replace_dir

    for version in ("old", "new"):
        (tmp_path / "final.tmp").mkdir()
        (tmp_path / "final.tmp" / "model.safetensors").write_text(version)
        replace_dir(str(tmp_path / "final.tmp"), str(tmp_path / "final"))
        assert (tmp_path / "final" / "model.safetensors").read_text() == version
        assert sorted(os.listdir(tmp_path)) == ["final"]


# -----------------------------------------------------------------------------
# model fields on the command line, vocab_size from the tokenizer


def model_config(out):
    sys.path.insert(0, ROOT)
    from model import Transformer

    return Transformer.from_pretrained(str(out)).config


def test_model_fields_on_the_command_line_reach_the_model(demo, tmp_path):
    # scratch: over the preset; the demo config as the README runs it, with --dim (the preset is configs/tiny.py)
    steps = ["--max_iters=2", "--batch_size=2", "--block_size=32", "--eval_iters=1", "--log_interval=1"]
    run("train.py", "configs/demo.py", f"--data={demo}/pretrain.h5", f"--tokenizer={demo}/tokenizer",
        f"--out_dir={tmp_path}/demo", "--dim=64", "--n_heads=2", *steps)
    config = model_config(tmp_path / "demo" / "final")
    assert (config.dim, config.n_heads, config.head_dim, config.n_layers) == (64, 2, 32, 4)  # n_layers: tiny.py's
    assert config.vocab_size == 2048  # configs/demo.py's (the measured demo runs'); test_vocab_size_... has the default

    # init_from: a field that changes a weight's shape is refused, naming it; one that changes none is applied
    base = tmp_path / "base"
    run(*common(demo, base, "--max_iters=1", "--ckpt_interval=0", "--dim=96"))
    assert model_config(base / "final").dim == 96
    for field in ("--dim=64", "--vocab_size=1024", "--tie_weight=false"):  # an untied head: a weight of its own
        p = run(*common(demo, tmp_path / "refused", "--max_iters=1", f"--init_from={base}/final", field), check=False)
        message = p.stdout + p.stderr
        assert p.returncode != 0 and field[2:].replace("false", "False") in message, message[-2000:]
        assert "would change the shape of its weights" in message and "Traceback" not in message
        assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    # max_len 64 -> 128: block_size 96 (> the saved max_len) trains, and final/ keeps the new max_len
    out = run(*common(demo, tmp_path / "longer", "--max_iters=1", "--ckpt_interval=0", f"--init_from={base}/final",
                      "--max_len=128", "--rope_theta=500000", "--dim=96", "--block_size=96")).stdout
    applied = next(line for line in out.splitlines() if line.startswith("init_from="))
    assert "max_len 64 -> 128" in applied and "rope_theta 10000.0 -> 500000.0" in applied and "dim" not in applied
    longer = model_config(tmp_path / "longer" / "final")
    assert (longer.max_len, longer.rope_theta, longer.dim) == (128, 500000.0, 96)


def test_resume_builds_the_same_model(demo, tmp_path):
    args = ["--max_iters=2", "--ckpt_interval=1", "--dim=96"]
    run(*common(demo, tmp_path / "run", *args[1:], "--max_iters=1"))
    assert "resumed from" in run(*common(demo, tmp_path / "run", *args, "--resume=auto")).stdout
    assert model_config(tmp_path / "run" / "final").dim == 96
    p = run(*common(demo, tmp_path / "run", "--max_iters=3", "--resume=auto"), check=False)  # without --dim=96
    message = p.stdout + p.stderr
    assert p.returncode != 0 and "dim=96 there, 64 in this run" in message and "Traceback" not in message


def test_vocab_size_is_the_tokenizers_rounded_up_to_64(demo, tmp_path):
    # a user's own tokenizer of 300 tokens with the default preset: a 320-token model; an explicit vocab_size wins,
    # and one below the tokenizer's is an error
    sys.path.insert(0, ROOT)
    from tokenizer import Tokenizer

    run("data.py", "tokenizer", f"--input={demo}/pretrain.txt", "--vocab_size=300", f"--out={tmp_path}/tokenizer")
    run("data.py", "prepare", "--stage=seq", f"--input={demo}/pretrain.txt", f"--tokenizer={tmp_path}/tokenizer",
        f"--out={tmp_path}/pretrain.h5")
    n_tokens = Tokenizer.load(str(tmp_path / "tokenizer")).vocab_size
    assert 256 < n_tokens <= 320

    def args(out, *extra):
        return ["train.py", f"--data={tmp_path}/pretrain.h5", f"--out_dir={tmp_path}/{out}", "--max_iters=1",
                "--batch_size=2", "--block_size=32", "--eval_iters=1", "--dim=32", "--n_layers=1", *extra]

    run(*args("own"))  # the tokenizer found beside the data, the preset configs/tiny.py
    assert model_config(tmp_path / "own" / "final").vocab_size == 320
    run(*args("explicit", "--vocab_size=400"))
    assert model_config(tmp_path / "explicit" / "final").vocab_size == 400
    p = run(*args("small", "--vocab_size=256"), check=False)
    assert p.returncode != 0 and f"the tokenizer has {n_tokens} tokens but the model's vocab_size is 256" in p.stderr
