"""strategies.py: each loss against hand-computed values, GRPO learning a toy reward, DPO/GRPO through train.py
(single process and DDP), and bad settings stopping before training."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import strategies
from model import ChunkedCrossEntropy, ChunkedTargetLogprobs, CrossEntropy, ModelConfig, TokenLogprobs, Transformer
from settings import Settings
from strategies import clipped_policy_loss, dpo_loss, group_advantages, grpo_loss, k3_kl
from data import load_dataset
from tokenizer import Tokenizer, train_tokenizer
from train import DEFAULTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_settings(strategy, **values):
    """train.py's settings of a run with this strategy (its own defaults), with values set."""
    return Settings({**DEFAULTS, **strategy.settings}, **values)


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, dim_ffn=64, max_len=64))


# -----------------------------------------------------------------------------
# the formulas, on numbers small enough to check by hand


def test_masked_cross_entropy_by_hand():
    # the chunked head with an identity weight: hidden rows are the logits
    logits = torch.tensor([[1.0, 2.0, 3.0], [5.0, -5.0, 0.0], [0.0, 0.0, math.log(2)]])  # (3 positions, 3)
    targets = torch.tensor([2, -100, 0])
    # position 0: -log(e^3 / (e + e^2 + e^3)); position 1 is masked; position 2: -log(1 / (1 + 1 + 2))
    expected = [-math.log(1 + math.exp(-1) + math.exp(-2)), 0.0, -math.log(4)]
    assert ChunkedTargetLogprobs.apply(logits, torch.eye(3), targets, 1.0, 2).tolist() == pytest.approx(expected)
    assert ChunkedCrossEntropy.apply(logits, torch.eye(3), targets, 0.0, 2).item() == pytest.approx(-sum(expected))
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum", label_smoothing=0.1)
    assert ChunkedCrossEntropy.apply(logits, torch.eye(3), targets, 0.1, 2).item() == pytest.approx(reference.item())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_equals_full_logits(temperature, monkeypatch):
    # model(ids, TokenLogprobs(targets)) runs the head 5 rows at a time; the reference is the full logits' log_softmax.
    # Log-probs and gradients of every weight agree, for a loss that weighs each token's log-prob differently
    monkeypatch.setattr("model.head_chunk_rows", lambda vocab_size: 5)
    model = tiny_model(50)
    ids = torch.randint(0, 50, (3, 11))
    targets = ids.roll(-1, 1)
    targets[0, :4] = -100
    targets[2, 7:] = -100
    weights = torch.randn(3, 11)

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    chunked = (weights * model(ids, TokenLogprobs(targets, temperature))).sum()
    log_probs = torch.log_softmax(model(ids) / temperature, -1)  # (3, 11, 50)
    full = (weights * log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)).sum()
    assert chunked.item() == pytest.approx(full.item(), abs=1e-5)
    a, b = gradients(chunked), gradients(full)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # the summed cross-entropy (sft's loss, gradients computed in the forward pass) is F.cross_entropy's
    for smoothing in (0.0, 0.1):
        chunked = model(ids, CrossEntropy(targets, smoothing)) * 0.37
        full = F.cross_entropy(model(ids).view(-1, 50), targets.view(-1), reduction="sum",
                               label_smoothing=smoothing) * 0.37
        assert chunked.item() == pytest.approx(full.item(), abs=1e-5)
        a, b = gradients(chunked), gradients(full)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_dpo_loss_by_hand():
    # policy prefers chosen by 2 nats more than the reference does: margin = 0.5 * ((-1 + 2) - (-3 + 2)) = 1
    losses, margins = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert margins.item() == pytest.approx(1.0)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    same = torch.tensor([-4.0, -7.5])
    losses, margins = dpo_loss(same, same - 1, same, same - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2))) and torch.all(margins == 0)


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 3.0, 0.0, 0.0]])
    advantages = group_advantages(rewards)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected: sum of squared deviations / (G - 1)
    a = 0.5 / (std + 1e-4)
    assert advantages[0].tolist() == pytest.approx([a, -a, -a, a], abs=1e-6)
    assert advantages[1].tolist() == [0.0] * 4  # all alike: nothing to learn
    std = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    assert advantages[2].tolist() == pytest.approx([-0.75 / (std + 1e-4), 2.25 / (std + 1e-4), -0.75 / (std + 1e-4), -0.75 / (std + 1e-4)], abs=1e-6)


def test_ppo_clip_by_hand():
    eps = 0.2
    # ratios 1.5, 1.5, 0.5, 0.5, 1.1 against advantages +1, -1, +1, -1, +2
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2])
    logprobs = (old + ratios.log()).requires_grad_()
    loss, clipped = clipped_policy_loss(logprobs, old, advantages, eps)
    # -min(r A, clip(r) A): 1.5 -> 1.2 caps a gain; 0.5 -> 0.8 caps a loss-reduction; a loss never gets clipped away
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8, -2.2], abs=1e-6)
    assert clipped.tolist() == [True, False, False, True, False]
    loss.sum().backward()
    # d/dlogp of -r A is -r A where not clipped, 0 where the clip holds
    assert logprobs.grad.tolist() == pytest.approx([0.0, 1.5, -0.5, 0.0, -2.2], abs=1e-6)


def test_k3_kl_by_hand_and_its_expectation_is_the_kl():
    assert k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert k3_kl(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(7), 0), torch.softmax(torch.randn(7), 0)
    expectation = (p * k3_kl(p.log(), q.log())).sum()  # over tokens drawn from the policy p
    reference = torch.distributions.kl_divergence(torch.distributions.Categorical(p), torch.distributions.Categorical(q))
    assert expectation.item() == pytest.approx(reference.item(), abs=1e-6)


def test_grpo_loss_by_hand():
    # two completions (3 and 1 tokens), ratio 1 (first epoch): per token -A + kl_coef * k3
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.1], [-0.2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([0.8, -0.8])
    kl_coef = 0.1

    def k3(lp, r):
        return math.exp(r - lp) - (r - lp) - 1

    row0 = sum(-0.8 + kl_coef * k3(lp, r) for lp, r in [(-1.0, -1.5), (-2.0, -2.0), (-0.5, -0.1)]) / 3
    row1 = 0.8 + kl_coef * k3(-0.7, -0.2)
    loss, kl, clipped = grpo_loss(logprobs, logprobs, ref, advantages, mask, clip_eps=0.2, kl_coef=kl_coef)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert not clipped.any()
    assert kl[0, 0].item() == pytest.approx(k3(-1.0, -1.5), abs=1e-6)


# -----------------------------------------------------------------------------
# the strategies on a tiny model


def test_sft_rows_do_not_see_each_other():
    # two conversations padded into one batch: the loss is the token-weighted mean of each one's loss alone
    model = tiny_model(50)
    a, b = torch.randint(0, 50, (1, 12)), torch.randint(0, 50, (1, 7))
    ta, tb = a.roll(-1, 1), b.roll(-1, 1)
    ta[0, :5] = -100  # the prompt
    tb[0, :3] = -100
    batch_ids = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], 1)])
    batch_targets = torch.cat([ta, torch.cat([tb, torch.full((1, 5), -100)], 1)])
    sft = strategies.SFT(run_settings(strategies.SFT), model, None)
    with torch.no_grad():
        together, _ = sft.loss(model, {"input_ids": batch_ids, "targets": batch_targets}, 0)
        alone_a, _ = sft.loss(model, {"input_ids": a, "targets": ta}, 0)
        alone_b, _ = sft.loss(model, {"input_ids": b, "targets": tb}, 0)
    assert together.item() == pytest.approx((7 * alone_a.item() + 4 * alone_b.item()) / 11, abs=1e-5)


def dpo_batch():
    torch.manual_seed(1)
    rows = {}
    for side, length in (("chosen", 10), ("rejected", 8)):
        ids = torch.randint(0, 50, (2, 10))
        targets = ids.roll(-1, 1)
        targets[:, :4] = -100  # the prompt
        targets[:, length - 1:] = -100  # the last input predicts nothing, then padding
        ids[:, length:] = 0
        rows[f"{side}_ids"], rows[f"{side}_targets"] = ids, targets
    return rows


def reply_logprob(model, ids, targets):
    """Sum of log p(target) over scored positions, one prefix forward each: no batching, no padding."""
    total = 0.0
    for t in range(ids.size(0)):
        if targets[t] != -100:
            total += torch.log_softmax(model(ids[None, : t + 1])[0, -1], -1)[targets[t]].item()
    return total


def test_dpo_is_log_2_at_the_start_and_sums_reply_logprobs():
    model, batch = tiny_model(50), dpo_batch()
    dpo = strategies.DPO(run_settings(strategies.DPO, beta=0.1), model, None)
    loss, metrics = dpo.loss(model, batch, 0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert metrics["margin"] == 0 and metrics["pref_accuracy"] == 0

    policy = tiny_model(50, seed=1)  # any other policy: the margin is beta * the log-ratio differences
    with torch.no_grad():
        loss, metrics = dpo.loss(policy, batch, 0)
        margins = []
        for i in range(2):
            logp = {side: reply_logprob(policy, batch[f"{side}_ids"][i], batch[f"{side}_targets"][i])
                    - reply_logprob(model, batch[f"{side}_ids"][i], batch[f"{side}_targets"][i]) for side in ("chosen", "rejected")}
            margins.append(0.1 * (logp["chosen"] - logp["rejected"]))
    assert metrics["margin"] == pytest.approx(sum(margins) / 2, abs=1e-5)
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-m)) for m in margins) / 2, abs=1e-5)
    assert metrics["pref_accuracy"] == sum(m > 0 for m in margins) / 2
    assert not any(p.requires_grad for p in dpo.ref_model.parameters())

    # rpo_alpha adds the chosen replies' mean next-token loss; dpo_loss still shows the DPO part
    rpo = strategies.DPO(run_settings(strategies.DPO, beta=0.1, rpo_alpha=0.5), model, None)
    with torch.no_grad():
        rpo_loss, rpo_metrics = rpo.loss(policy, batch, 0)
        chosen = [reply_logprob(policy, batch["chosen_ids"][i], batch["chosen_targets"][i]) for i in range(2)]
    n_tokens = (batch["chosen_targets"] != -100).sum().item()
    assert rpo_metrics["dpo_loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert rpo_loss.item() == pytest.approx(loss.item() - 0.5 * sum(chosen) / n_tokens, abs=1e-5)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    text = "The quick brown fox jumps over the lazy dog. 23 + 45 = 68. 你好，世界！Hello, world!\n" * 20
    train_tokenizer([text], vocab_size=300, progress=False).save(path)
    return str(path)


def grpo_setup(tokenizer_dir, tmp_path, monkeypatch, reward_source, **settings):
    if reward_source:
        (tmp_path / "toy_reward.py").write_text(reward_source)
        monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tokenizer.vocab_size)
    reward = "toy_reward:reward" if reward_source else "exact_answer"
    # an untrained model never samples <|im_end|>: its completions are graded as they stand (truncated="grade")
    cfg = run_settings(strategies.GRPO, reward=reward, **{"truncated": "grade", **settings})
    prompts = [tokenizer.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in ("Hello", "23 + 45", "fox", "你好")]
    batch = {"prompt_ids": prompts, "answers": [""] * 4, "records": [{}] * 4}
    return model, strategies.GRPO(cfg, model, tokenizer), batch


def test_grpo_learns_a_toy_reward(tokenizer_dir, tmp_path, monkeypatch):
    # reward 1 when the completion's text contains an "o" (the token "o" or one holding it): 1 in 3 at the start
    model, grpo, batch = grpo_setup(tokenizer_dir, tmp_path, monkeypatch,
                                    "def reward(prompt, completion, record):\n    return float('o' in completion)\n",
                                    group_size=8, max_new_tokens=16, ppo_epochs=2, kl_coef=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    history = []
    for step in range(24):
        loss, metrics = grpo.loss(model, batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(metrics)
    rewards = [m["reward_mean"] for m in history]
    assert sum(rewards[:4]) / 4 < 0.5 and sum(rewards[-4:]) / 4 > 0.8, rewards
    # the second epoch trains on the first's rollout: same rewards, a policy that moved, so the clip bites
    assert all(history[s]["reward_mean"] == history[s - 1]["reward_mean"] for s in range(1, 24, 2))
    assert all(history[s]["clip_fraction"] == 0 for s in range(0, 24, 2))  # ratio 1 on a fresh rollout
    assert max(history[s]["clip_fraction"] for s in range(1, 24, 2)) > 0


def test_grpo_reference_resyncs_every_sync_interval_steps(tokenizer_dir, tmp_path, monkeypatch):
    model, grpo, batch = grpo_setup(tokenizer_dir, tmp_path, monkeypatch,
                                    "def reward(prompt, completion, record):\n    return float('o' in completion)\n",
                                    group_size=4, max_new_tokens=8, sync_interval=3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(4):
        loss, metrics = grpo.loss(model, batch, step)
        reference = grpo.ref_model.state_dict()
        same_as = initial if step < 3 else model.state_dict()  # synced before step 3's loss
        assert all(torch.equal(reference[k], same_as[k]) for k in reference), step
        if step == 3:
            assert metrics["kl"] == 0  # the rollout of step 3 is scored against the fresh reference
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = grpo.state_dict()
    assert state["synced_at"] == 3 and list(state["rollouts"]) == [0]  # keyed by global micro-batch
    assert grpo.reference_to_save() is grpo.ref_model


def test_grpo_offline_moves_toward_rewarded_responses(tokenizer_dir, tmp_path, monkeypatch):
    # loss_norm="sequence": each completion's mean, so at step 0 the advantages' zero sum makes the loss 0
    model, grpo, batch = grpo_setup(tokenizer_dir, tmp_path, monkeypatch, None, ppo_epochs=2, kl_coef=0.04,
                                    loss_norm="sequence")
    tok = grpo.tokenizer
    prompts = batch["prompt_ids"][:2]
    responses = [[tok.encode(text) + [tok.im_end_id] for text in ("the lazy dog", "Hello, world!", "68")] for _ in prompts]
    offline = {"prompt_ids": prompts, "answers": ["", ""], "records": [{}, {}], "responses": responses,
               "rewards": [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]}

    def logprob(prompt, response):
        ids = torch.tensor(prompt + response)
        targets = torch.full_like(ids, -100)
        targets[len(prompt) - 1 : -1] = ids[len(prompt):]
        return reply_logprob(model, ids, targets)

    with torch.no_grad():
        before = [[logprob(p, r) for r in group] for p, group in zip(prompts, responses)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(6):
        loss, metrics = grpo.loss(model, offline, step)
        if step == 0:  # ratio 1, policy == reference, advantages sum to 0 in each group
            assert loss.item() == pytest.approx(0.0, abs=1e-6) and metrics["kl"] == 0
            assert metrics["reward_mean"] == pytest.approx(1 / 3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = [[logprob(p, r) for r in group] for p, group in zip(prompts, responses)]
    change = [[a - b for a, b in zip(ga, gb)] for ga, gb in zip(after, before)]
    assert change[0][0] > 0 and change[1][2] > 0  # the rewarded ones rise
    assert change[0][0] > max(change[0][1:]) and change[1][2] > max(change[1][:2])


# -----------------------------------------------------------------------------
# through train.py, as a user runs it


def run(*args, check=True, env=None):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small slice of the demo data, its tokenizer, sft/dpo/grpo .h5 files and a model preset of seconds
    (the functions behind `pipeline.py demo`, `data.py tokenizer` and `data.py prepare`)."""
    from data import prepare
    from pipeline import make_demo

    d = tmp_path_factory.mktemp("demo")
    make_demo(d, pretrain_docs=300, sft=100, dpo=200, grpo=200, n_eval=20)
    train_tokenizer([(d / "pretrain.txt").read_text()], vocab_size=400, progress=False).save(d / "tokenizer")
    for stage in ("sft", "dpo", "grpo"):
        prepare(stage, [f"{d}/{stage}.jsonl"], f"{d}/tokenizer", f"{d}/{stage}.h5", val_fraction=0.1, progress=False)
    (d / "model.py").write_text("vocab_size = 512\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\ndim_ffn = 128\nmax_len = 64\n")
    return d


def train_args(demo, out, strategy, *extra):
    return ["train.py", f"--strategy={strategy}", f"--data={demo}/{strategy}.h5", f"--tokenizer={demo}/tokenizer",
            f"--model_config={demo}/model.py", f"--out_dir={out}", "--batch_size=4", "--block_size=64", "--lr=1e-3",
            "--warmup_iters=1", "--eval_interval=0", "--eval_iters=1", "--log_interval=1", "--ckpt_interval=0", *extra]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_dpo_through_train_py(demo, tmp_path):
    run(*train_args(demo, tmp_path, "dpo", "--max_iters=3"))
    rows = metrics(tmp_path)
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert rows[0]["margin"] == 0 and rows[0]["pref_accuracy"] == 0
    assert {"margin", "pref_accuracy", "chosen_reward"} <= set(rows[2]) and rows[2]["loss"] != rows[0]["loss"]
    assert "val_loss" in rows[-1] and 0 <= rows[-1]["val_pref_accuracy"] <= 1  # strategy metrics on the val split too
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_dpo_under_fsdp_equals_grad_accumulation(demo, tmp_path):
    # the policy and the reference sharded over 2 processes; rpo_alpha's token mean spans both processes
    args = ["--max_iters=3", "--rpo_alpha=1.0", "--batch_size=2"]
    run(*train_args(demo, tmp_path / "single", "dpo", *args, "--grad_accum=2"))
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        *train_args(demo, tmp_path / "fsdp", "dpo", *args, "--parallel=fsdp"))
    single, fsdp = metrics(tmp_path / "single"), metrics(tmp_path / "fsdp")
    assert [r["step"] for r in single] == [r["step"] for r in fsdp]
    for a, b in zip(single, fsdp):
        for key in ("loss", "dpo_loss", "margin", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / out / "final" / "model.safetensors") for out in ("single", "fsdp"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_fsdp_shards_the_reference_and_keeps_it_sharded_after_its_forward(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(f"""import sys, torch, torch.distributed as dist
sys.path.insert(0, {ROOT!r})
from types import SimpleNamespace
from model import ModelConfig, TokenLogprobs, Transformer
from settings import Settings
from strategies import reference_model
from train import DEFAULTS, wrap_model
dist.init_process_group("gloo")
model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, dim_ffn=64, max_len=32))
reference = reference_model(model)
env = SimpleNamespace(distributed=True, device_type="cpu", tp=1, dp_size=2, mesh=None)
wrap_model(model, Settings(DEFAULTS, parallel="fsdp"), env, reference)
ids = torch.randint(0, 64, (2, 8))
with torch.no_grad():
    reference(ids, TokenLogprobs(ids))
rows = {{tuple(p.to_local().shape) for p in reference.parameters() if p.dim() == 2 and p.size(0) == 64}}
sys.stdout.write(f"local rows {{rows}}\\n")  # one write: the two processes' lines never interleave
dist.destroy_process_group()
""")
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)).stdout
    assert out.count("local rows {(32, 32)}") == 2, out  # each process holds half of the 64-row embedding


def test_grpo_through_train_py(demo, tmp_path):
    run(*train_args(demo, tmp_path, "grpo", "--max_iters=2", "--batch_size=2", "--group_size=4", "--max_new_tokens=8"))
    rows = metrics(tmp_path)
    assert {"reward_mean", "reward_std", "kl", "clip_fraction"} <= set(rows[0])
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6) and rows[0]["clip_fraction"] == 0  # fresh rollout, ratio 1
    assert -1 <= rows[-1]["val_loss"] <= 0  # minus the mean exact-answer reward of greedy completions


def test_grpo_resume_mid_rollout_and_after_a_reference_sync_is_exact(demo, tmp_path):
    # checkpoint at step 3: the rollout of step 3 still has its second update (step 4) to serve, and the
    # reference was synced at step 2, so the checkpoint must carry both
    args = ["--batch_size=2", "--group_size=4", "--max_new_tokens=8", "--ppo_epochs=2", "--sync_interval=2",
            "--kl_coef=0.5", "--lr_schedule=constant", "--ckpt_interval=3"]
    run(*train_args(demo, tmp_path / "full", "grpo", *args, "--max_iters=6"))
    run(*train_args(demo, tmp_path / "resumed", "grpo", *args, "--max_iters=3"))
    assert (tmp_path / "resumed" / "ckpt-3" / "strategy-0.pt").exists()
    assert "resumed from" in run(*train_args(demo, tmp_path / "resumed", "grpo", *args, "--max_iters=6", "--resume=auto")).stdout
    full = {r["step"]: r for r in metrics(tmp_path / "full") if "loss" in r}
    resumed = {r["step"]: r for r in metrics(tmp_path / "resumed") if "loss" in r}
    assert sorted(full) == sorted(resumed) == list(range(1, 7))
    assert full[4]["kl"] > 0  # the reference synced at step 2 differs from the policy at step 4
    for step in range(4, 7):
        for key in ("loss", "reward_mean", "kl", "clip_fraction"):
            assert full[step][key] == resumed[step][key], (step, key, full[step], resumed[step])  # bitwise


def test_grpo_ddp_equals_grad_accumulation(demo, tmp_path):
    # every rank rolls out its own prompts, seeded by global micro-batch: the same rollouts as one process
    args = ["--max_iters=4", "--batch_size=2", "--group_size=4", "--max_new_tokens=8", "--ppo_epochs=2"]
    run(*train_args(demo, tmp_path / "single", "grpo", *args, "--grad_accum=2"))
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        *train_args(demo, tmp_path / "multi", "grpo", *args, "--grad_accum=1"))
    single, multi = metrics(tmp_path / "single"), metrics(tmp_path / "multi")
    assert [r["step"] for r in single] == [r["step"] for r in multi]
    for a, b in zip(single, multi):
        for key in ("loss", "reward_mean", "kl", "clip_fraction", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)


def test_bad_settings_stop_before_training(demo, tmp_path, monkeypatch):
    # through train.py: a clean message and no training
    def fails(strategy, *extra, expect):
        out = tmp_path / "out"
        p = run(*train_args(demo, out, strategy, "--max_iters=2", *extra), check=False)
        message = p.stdout + p.stderr
        assert p.returncode != 0 and all(e in message for e in expect), message[-2000:]
        assert "Traceback" not in message and not (out / "metrics.jsonl").exists()

    fails("dpo", f"--data={demo}/sft.h5", expect=["stage 'sft'", "--stage=dpo"])
    fails("grpo", "--group_size=1", expect=["--strategy=grpo", "group_size=1"])
    # a setting of another strategy, on the command line or in a config file: was silently ignored
    fails("sft", f"--data={demo}/sft.h5", "--beta=0.2", expect=["--beta (from the command line) is a setting of dpo",
                                                               "--strategy=sft has: label_smoothing"])
    (tmp_path / "smooth.py").write_text("label_smoothing = 0.1\n")
    fails("dpo", str(tmp_path / "smooth.py"), expect=[f"--label_smoothing (from {tmp_path / 'smooth.py'}) is a "
                                                      "setting of seq and sft", "--strategy=dpo has: beta, rpo_alpha"])

    # the ValueErrors train.py turns into such messages, one per kind of mistake
    (tmp_path / "rewards.py").write_text("def wordy(prompt, completion, record):\n    return 'high'\n\n"
                                         "def strict(prompt, completion, record):\n    return float(record['tests'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, tokenizer = tiny_model(512), Tokenizer.load(f"{demo}/tokenizer")
    dataset = load_dataset(f"{demo}/grpo.h5", "train", 64, stage="grpo")
    for settings, expect in [
        (dict(reward="no_such_module:score"), "cannot import module 'no_such_module'"),
        (dict(reward="rewards:missing"), "has no function 'missing'"),
        (dict(reward="exact"), "expected a built-in (exact_answer) or module:function"),
        (dict(reward="rewards:wordy"), "returned 'high' (a str)"),
        (dict(reward="rewards:strict"), "raised KeyError"),
        (dict(group_size=1), "group_size=1 must be >= 2"),
        (dict(rollout_temperature=0.0), "rollout_temperature=0.0 must be > 0"),
    ]:
        with pytest.raises(ValueError, match=re.escape(expect)):
            strategies.GRPO(run_settings(strategies.GRPO, **settings), model, tokenizer).check_data(dataset)
    with pytest.raises(ValueError, match="beta=0"):
        strategies.DPO(run_settings(strategies.DPO, beta=0.0), model, tokenizer)


def test_each_strategy_has_its_own_settings_and_help_lists_them(demo, tmp_path):
    # a new strategy registered beside the built-in ones, as a user would add one: its beta default is its own,
    # not DPO's, its gamma is its own, and DPO's runs keep theirs
    (tmp_path / "simpo_train.py").write_text(f"""import sys
sys.path.insert(0, {ROOT!r})
import strategies, train


class SimPO(strategies.DPO):
    \"\"\"SimPO-like (Meng et al. 2024): here DPO's loss; what is tested is where its settings come from.\"\"\"
    settings = dict(beta=2.0, rpo_alpha=0.0, gamma=0.5)  # gamma: the target reward margin


strategies.STRATEGIES["simpo"] = SimPO
train.train(train.read_settings(sys.argv[1:]))
""")

    def saved_settings(strategy, *extra):
        out = tmp_path / strategy
        run(str(tmp_path / "simpo_train.py"), *train_args(demo, out, strategy, f"--data={demo}/dpo.h5", "--max_iters=1",
                                                         *extra)[1:])
        return json.loads((out / "ckpt-1" / "trainer_state.json").read_text())["config"]

    simpo, dpo = saved_settings("simpo"), saved_settings("dpo")
    assert (simpo["beta"], simpo["gamma"]) == (2.0, 0.5) and (dpo["beta"], "gamma" in dpo) == (0.1, False)
    assert saved_settings("simpo", "--beta=3", "--gamma=1")["gamma"] == 1.0
    p = run(str(tmp_path / "simpo_train.py"), *train_args(demo, tmp_path / "x", "dpo", "--gamma=1")[1:], check=False)
    assert p.returncode != 0 and "--gamma (from the command line) is a setting of simpo" in p.stderr
    assert "group_size" not in dpo and "label_smoothing" not in dpo  # only the chosen strategy's settings

    help_text = run("train.py", "--help").stdout
    for line in ("--strategy=dpo:\n  --beta=0.1\n  --rpo_alpha=0.0", "--strategy=sft:\n  --label_smoothing=0.0",
                 "  --group_size=8", "  --max_iters=1000", "--dim", "--vocab_size"):
        assert line in help_text, help_text
