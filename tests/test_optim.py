"""optimizer=muon, lr_schedule=wsd and MFU: which weights Muon takes, its step against torch's own Newton-Schulz,
the WSD curve by hand, exact resume mid-decay, a decay branched from a stable checkpoint, MFU never above 100%."""
import json
import math
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from test_train import ROOT, common, demo, losses, max_difference, run, torchrun, weights  # noqa: F401 (demo)

sys.path.insert(0, ROOT)
import train  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from settings import Settings  # noqa: E402


def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64,
                                   max_len=16, attention_bias=True, tie_weight=False))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    muon, adamw = train.make_optimizer(model, Settings(train.DEFAULTS, optimizer="muon"), "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    name = {id(p): n for n, p in model.named_parameters()}
    in_muon = {name[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = {name[id(p)] for group in adamw.param_groups for p in group["params"]}
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj"]
    assert in_muon == {f"layers.{i}.{p}.weight" for i in range(2) for p in projections}
    assert in_adamw == set(name.values()) - in_muon
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.self_attn.q_proj.bias",
            "layers.0.input_layernorm.weight"} <= in_adamw
    decayed = {name[id(p)] for p in adamw.param_groups[0]["params"]}
    assert decayed == {"embed_tokens.weight", "lm_head.weight"}  # matrices decay, norms and biases do not
    assert isinstance(train.make_optimizer(model, Settings(train.DEFAULTS), "cpu"), torch.optim.AdamW)


def test_a_muon_step_is_newton_schulz_of_the_gradient_scaled_to_match_adamw():
    """One step, by the formula of torch.optim.Muon's docstring with torch's own Newton-Schulz: momentum 0.95 as an
    average, so the first Nesterov input is g.lerp(0.05 g, 0.95) (its scale matters in bf16), the update is scaled by
    0.2 * sqrt(max(A, B)) (match_rms_adamw) and the weight decays by lr * weight_decay. AdamW's share equals a
    torch.optim.AdamW of its own."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    model, reference = tiny_model(), tiny_model()
    cfg = Settings(train.DEFAULTS, optimizer="muon", lr=0.01, weight_decay=0.1)
    optimizer = train.make_optimizer(model, cfg, "cpu")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for m in (model, reference):
        m(ids).float().logsumexp(-1).mean().backward()
    for group in optimizer.param_groups:  # the loop sets every group's lr (here half of lr, as in a warmup)
        group["lr"] = 0.005
    others = [p for n, p in reference.named_parameters() if not train.is_muon_param(n, p)]
    adamw = torch.optim.AdamW([{"params": [p for p in others if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}],
                              lr=0.005, betas=(cfg.beta1, cfg.beta2))
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    optimizer.step()
    adamw.step()
    checked = 0
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if train.is_muon_param(n, p):
            nesterov = q.grad.lerp(torch.zeros_like(q.grad).lerp(q.grad, 0.05), 0.95)
            update = _zeropower_via_newtonschulz(nesterov, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS)
            expected = before[n] * (1 - 0.005 * 0.1) - 0.005 * 0.2 * math.sqrt(max(q.shape)) * update
            assert (p.detach() - expected).abs().max() < 2e-5, n  # updates of ~3e-3; bf16 Newton-Schulz
            assert (p.detach() - before[n]).abs().max() > 1e-4  # it moved
            checked += 1
        else:
            assert torch.equal(p.detach(), q.detach()), n
    assert checked == 14


def test_wsd_learning_rates_by_hand():
    cfg = Settings(train.DEFAULTS, lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_schedule="wsd",
                   decay_fraction=0.2)  # 20 decay steps: 80..99, min_lr on step 99
    lr = lambda step: train.learning_rate(step, cfg)  # noqa: E731
    assert [lr(0), lr(4), lr(9)] == pytest.approx([0.1, 0.5, 1.0])  # warmup
    assert [lr(10), lr(50), lr(79)] == [1.0, 1.0, 1.0]  # stable
    assert [lr(80), lr(89), lr(99), lr(150)] == pytest.approx([1 - 0.05 * 0.9, 1 - 0.5 * 0.9, 0.1, 0.1])
    cfg.decay_shape = "1-sqrt"
    assert [lr(79), lr(80), lr(89), lr(94), lr(99)] == pytest.approx(
        [1.0, 1 - math.sqrt(0.05) * 0.9, 1 - math.sqrt(0.5) * 0.9, 1 - math.sqrt(0.75) * 0.9, 0.1])
    cfg.decay_fraction = 0.0
    assert lr(99) == 1.0  # no decay: stable to the end


def lrs(out):
    return {r["step"]: r["lr"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "lr" in r}


MUON_WSD = ["--optimizer=muon", "--lr_schedule=wsd", "--decay_fraction=0.5", "--min_lr=3e-4", "--weight_decay=0.1"]


def test_muon_wsd_resumed_mid_decay_is_exact_and_a_decay_branches_from_a_stable_checkpoint(demo, tmp_path):
    straight, resumed, branch = tmp_path / "straight", tmp_path / "resumed", tmp_path / "branch"
    args = [*MUON_WSD, "--max_iters=12", "--ckpt_interval=4", "--keep_checkpoints=3"]  # decay: steps 6..11
    run(*common(demo, straight, *args))
    # a run killed after ckpt-8 (mid-decay) and resumed: its checkpoint is the straight run's
    shutil.copytree(straight / "ckpt-8", resumed / "ckpt-8")
    assert "resumed from" in run(*common(demo, resumed, *args, "--resume=auto")).stdout
    assert max_difference(weights(straight / "final"), weights(resumed / "final")) == 0  # bitwise
    a, b = losses(straight), losses(resumed)
    assert all(a[s] == b[s] for s in range(9, 13))
    assert lrs(straight)[6] == 3e-3 and lrs(straight)[7] < 3e-3  # metrics' step 7 trained at learning_rate(6)
    # branch: ckpt-4 (stable) into a new out_dir, max_iters 10 with decay_fraction 0.5: steps 5..9 decay
    shutil.copytree(straight / "ckpt-4", branch / "ckpt-4")
    run(*common(demo, branch, *MUON_WSD, "--max_iters=10", "--resume=auto"))
    got = lrs(branch)
    assert sorted(got) == [5, 6, 7, 8, 9, 10]
    assert [got[s] for s in range(5, 11)] == pytest.approx([3e-3] + [3e-3 - f * 2.7e-3 for f in (.2, .4, .6, .8, 1)])
    assert max_difference(weights(straight / "ckpt-4"), weights(branch / "ckpt-4")) == 0


def test_muon_under_ddp_equals_grad_accumulation(demo, tmp_path):
    """Under DDP every process holds whole matrices and the averaged gradient: Muon's step is the one-process one."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = [*MUON_WSD, "--max_iters=6", "--ckpt_interval=0"]
    run(*common(demo, single, *args, "--grad_accum=2"))
    torchrun(*common(demo, multi, *args, "--grad_accum=1"))
    assert max_difference(weights(single / "final"), weights(multi / "final")) < 1e-5


@pytest.mark.parametrize("extra, expect", [
    (["--parallel=fsdp"], "optimizer=muon with parallel=fsdp"),
    (["--lora_rank=4"], "optimizer=muon with lora_rank=4"),
])
def test_muon_refuses_fsdp_and_lora_by_name(demo, tmp_path, extra, expect):
    p = run(*common(demo, tmp_path / "out", "--optimizer=muon", "--max_iters=2", *extra), check=False)
    assert p.returncode != 0 and expect in p.stdout + p.stderr
    p = run(*common(demo, tmp_path / "out", "--optimizer=sgd", "--max_iters=2"), check=False)
    assert p.returncode != 0 and "optimizer='sgd'" in p.stdout + p.stderr


def test_mfu_never_shows_above_100_percent(monkeypatch):
    env = SimpleNamespace(world_size=1, dp_size=1, device="cpu", master=True)
    meter = train.Throughput(flops_per_token=1e6, env=env, step=0, peak_tflops=0.001)  # a peak of 1 GFLOP/s, by hand
    assert meter.source == "set (mfu_peak_tflops)" and meter.peak == 1e9
    assert meter.mfu(500) == pytest.approx(0.5)
    assert meter.mfu(10**4) == 1.0 and meter.peak == 1e10  # 10 GFLOP/s achieved: the peak rises to it
    measured = train.Throughput(flops_per_token=1e6, env=env, step=0)
    assert measured.source == "measured" and measured.peak > 1e8  # any CPU does 0.1 GFLOP/s
    measured.peak = 1.0  # a peak measured while another process held the cores
    assert measured.mfu(1e5) <= 1.0 and measured.peak > 1e8  # measured again
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert train.peak_flops("cuda:0") == (989e12, "NVIDIA H100 80GB HBM3 bf16")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert train.peak_flops("cuda:0")[0] == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert train.peak_flops("cuda", 100.0)[0] == 100e12  # mfu_peak_tflops wins over the table
    assert train.peak_flops("cuda")[0] == 312e12
