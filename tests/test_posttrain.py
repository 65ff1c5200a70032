"""Post-training on a user's task: the final-answer check, GRPO's rollout plumbing (train mode, truncation, dynamic
sampling, loss normalization, rollout length from the data, the one eval length), on-policy DPO pairs, where SFT
and DPO data are cut, and distillation's KL against a direct torch computation. Tiny models and data, made here."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import strategies
from model import ModelConfig, Transformer
from settings import Settings
from sample import strip_stop
from strategies import grpo_loss, overlong_rewards
from tasks import answer_is_correct, final_answer
from tokenizer import Tokenizer, train_tokenizer
from train import DEFAULTS

from test_strategies import tokenizer_dir  # noqa: F401 (a fixture: a tiny tokenizer directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_model(vocab_size, seed=0, dim=32, n_layers=2):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                                   dim_ffn=64, max_len=64))


# -----------------------------------------------------------------------------
# the final answer


@pytest.mark.parametrize("completion, answer, expected", [
    ("The answer is 8 (5 + 3).", "8", True), ("The answer is 8 (5 + 3).", "3", False),
    ("Answer: 12 apples left after 3 days.", "12", True), ("Answer: 12 apples left after 3 days.", "3", False),
    ("So she ate 3/4 of it.", "0.75", True), ("It is 0.75.", "3/4", True), ("3/4", "0.7", False),
    ("There are 1 234 stars.", "1234", True), ("1 234 567 in all", "1234567", True), ("1,234,567.", "1234567", True),
    ("Step 5 gives \\boxed{42}, checked with 7.", "42", True), ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{x^{2}} then 5", "x^{2}", True), ("答案是 15（10 + 5）。", "15", True), ("#### 72", "72", True),
    ("The final answer is Paris, of course.", "Paris", True), ("42 减 35 等于 7。", "7", True),
    ("Tom has 14 - 6 = 8. The answer is 8.", "8", True), ("The answer is 9, not 8", "8", False)])
def test_final_answer_cases(completion, answer, expected):
    assert answer_is_correct(completion, answer) is expected


def test_final_answer_text():
    assert final_answer("so \\boxed{\\frac{1}{2}} and more") == "1/2"
    assert final_answer("The answer is 8 (5 + 3).") == "8 (5 + 3)."
    assert final_answer("no marker 1 234") == "no marker 1234"


# -----------------------------------------------------------------------------
# GRPO's loss normalizations and rewards, by hand


def test_grpo_loss_norms_by_hand():
    # ratio 1 and no KL: each token's loss is -advantage. Completion 0: 1 token, A = 1; completion 1: 3 tokens, A = -1
    logprobs = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    args = (logprobs, logprobs, logprobs, advantages, mask, 0.2, 0.0)
    assert grpo_loss(*args, norm="sequence")[0].item() == pytest.approx((-1 + 1) / 2)  # per completion, then mean
    assert grpo_loss(*args, norm="token")[0].item() == pytest.approx((-1 + 3) / 4)  # over the 4 tokens
    assert grpo_loss(*args, norm="constant", max_tokens=5)[0].item() == pytest.approx((-1 + 3) / (2 * 5))
    with pytest.raises(ValueError, match="norm='mean'"):
        grpo_loss(*args, norm="mean")


def test_truncated_and_overlong_rewards_by_hand():
    rewards, finished = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([True, True, True, False])
    lengths = torch.tensor([4.0, 8.0, 9.0, 10.0])  # max_tokens 10, buffer 4: the penalty starts after 6 tokens
    assert overlong_rewards(rewards, lengths, finished, 10, "zero", 0, 1.0).tolist() == [1, 1, 1, 0]
    assert overlong_rewards(rewards, lengths, finished, 10, "grade", 0, 1.0).tolist() == [1, 1, 1, 1]
    shaped = overlong_rewards(rewards, lengths, finished, 10, "zero", 4, 0.5)
    assert shaped.tolist() == pytest.approx([1, 1 - 0.5 * 2 / 4, 1 - 0.5 * 3 / 4, 0 - 0.5])


# -----------------------------------------------------------------------------
# GRPO's rollouts


def grpo(tokenizer_dir, tmp_path, monkeypatch, reward_source, **settings):
    module = "reward_" + "".join(c for c in tmp_path.name if c.isalnum())  # a module of its own for each test
    (tmp_path / f"{module}.py").write_text(reward_source)
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tokenizer.vocab_size)
    cfg = Settings({**DEFAULTS, **strategies.GRPO.settings}, reward=f"{module}:reward",
                   **{"truncated": "grade", "max_new_tokens": 6, "group_size": 4, **settings})
    prompts = [tokenizer.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in ("Hello", "fox")]
    return model, strategies.GRPO(cfg, model, tokenizer), prompts


def test_grpo_backward_checkpoints_after_a_rollout(tokenizer_dir, tmp_path, monkeypatch):
    """Engine puts the model in eval mode; the loss after a rollout must run in train mode, so gradient
    checkpointing recomputes each block in backward."""
    model, strategy, prompts = grpo(tokenizer_dir, tmp_path, monkeypatch,
                                    "def reward(prompt, completion, record):\n    return float(len(completion) % 2)\n")
    model.grad_checkpointing = True
    model.train()
    calls = []
    # a pre-hook: checkpoint stops recomputing a block once it has what backward needs, before forward hooks run
    model.layers[0].register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    batch = {"prompt_ids": prompts, "answers": ["", ""], "records": [{}, {}]}
    loss, _ = strategy.loss(model, batch, step=0)
    assert model.training
    forward_calls = len(calls)
    loss.backward()
    assert len(calls) > forward_calls, str(calls)  # the block ran again in backward: recomputed, not stored


def test_grpo_truncated_rollouts_score_zero(tokenizer_dir, tmp_path, monkeypatch):
    # an untrained model never samples <|im_end|> in 6 tokens: every completion is unfinished
    model, strategy, prompts = grpo(tokenizer_dir, tmp_path, monkeypatch,
                                    "def reward(prompt, completion, record):\n    return 1.0\n", truncated="zero",
                                    dynamic_sampling=False)
    rollout = strategy.rollout({"prompt_ids": prompts, "answers": ["", ""], "records": [{}, {}]}, 0, 0)
    assert rollout["reward_mean"] == 0 and rollout["metrics"]["finished"] == 0


class Prompts:
    """A stand-in train split for refills: get_batch of the "fox" prompt (varied rewards)."""

    def __init__(self, prompt):
        self.prompt, self.files, self.asked = prompt, ["prompts"], []

    def __len__(self):
        return 10

    def get_batch(self, indices):
        self.asked.append(list(indices))
        return {"prompt_ids": [self.prompt] * len(indices), "answers": [""] * len(indices),
                "records": [{"vary": True}] * len(indices)}


def test_grpo_dynamic_sampling_drops_equal_groups_and_refills(tokenizer_dir, tmp_path, monkeypatch):
    source = ("def reward(prompt, completion, record):\n"
              "    return float(len(completion) % 2) if record.get('vary') else 1.0\n")
    model, strategy, prompts = grpo(tokenizer_dir, tmp_path, monkeypatch, source, group_size=8)
    strategy.dataset = Prompts(prompts[1])
    # both prompts all-equal (reward 1 whatever the text): every group dropped, refilled from the train split
    batch = {"prompt_ids": prompts, "answers": ["", ""], "records": [{}, {}]}
    rollout = strategy.rollout(batch, 0, 0)
    metrics = rollout["metrics"]
    assert metrics["refills"] >= 1 and strategy.dataset.asked[0] and len(strategy.dataset.asked[0]) == 2
    assert rollout["advantages"].numel() == 2 * 8  # as many groups as the batch has prompts
    groups = rollout["advantages"].view(2, 8)
    assert (groups.abs().sum(-1) > 0).all()  # each kept group has a reward that differs
    assert metrics["kept_groups"] < 1
    # without dynamic sampling the all-equal groups stay (advantage 0)
    strategy.cfg.dynamic_sampling = False
    rollout = strategy.rollout(batch, 0, 0)
    assert rollout["advantages"].abs().sum() == 0 and "refills" in rollout["metrics"]


def test_grpo_rollout_length_from_the_data(tokenizer_dir, tmp_path, monkeypatch):
    from data import load_dataset, prepare

    task = tmp_path / "grpo.jsonl"
    task.write_text("".join(json.dumps({"prompt": q, "answer": "1"}) + "\n" for q in ("Hi", "The quick brown fox")))
    prepare("grpo", [str(task)], tokenizer_dir, str(tmp_path / "grpo.h5"), val_fraction=0)
    dataset = load_dataset(str(tmp_path / "grpo.h5"), "train", 48, stage="grpo")
    model, strategy, _ = grpo(tokenizer_dir, tmp_path, monkeypatch,
                              "def reward(prompt, completion, record):\n    return 1.0\n", max_new_tokens=0,
                              block_size=48)
    tokenizer = strategy.tokenizer
    longest = max(len(tokenizer.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0])
                  for q in ("Hi", "The quick brown fox"))
    strategy.check_data(dataset)
    assert strategy.max_new_tokens == 48 - longest


def test_one_eval_length(tokenizer_dir, tmp_path, monkeypatch):
    """sample.py --eval's default, task_accuracy's and GRPO's val reward generate EVAL_MAX_NEW_TOKENS tokens."""
    import sample
    import tasks

    assert sample.DEFAULTS["max_new_tokens"] == sample.EVAL_MAX_NEW_TOKENS
    assert tasks.task_results.__defaults__[1] == tasks.task_accuracy.__defaults__[1] == sample.EVAL_MAX_NEW_TOKENS
    lengths = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, prompts, n, *a, **k: lengths.append(n) or
                        real(model, prompts, 2, *a, **k))
    model, strategy, prompts = grpo(tokenizer_dir, tmp_path, monkeypatch,
                                    "def reward(prompt, completion, record):\n    return 1.0\n")
    strategy.loss(model, {"prompt_ids": prompts, "answers": ["", ""], "records": [{}, {}]}, 0, evaluating=True)
    assert lengths == [sample.EVAL_MAX_NEW_TOKENS]


# -----------------------------------------------------------------------------
# on-policy pairs


def test_pairs_sampled_in_the_chat_dpo_trains_on(tokenizer_dir, tmp_path, monkeypatch):
    """tasks.py pairs samples each reply after the prompt as DPO's data renders it: a "prompt" string as the user's
    message with the generation prompt (transformers' apply_chat_template), not the plain text continued."""
    import transformers

    import tasks

    tokenizer = Tokenizer.load(tokenizer_dir)
    tiny_model(tokenizer.vocab_size).save_pretrained(str(tmp_path / "model"))
    tokenizer.save(str(tmp_path / "model"))
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "Hello", "answer": "x"}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "fox"}], "answer": "y"}) + "\n")
    rows, real_generate = [], tasks.generate
    monkeypatch.setattr(tasks, "generate", lambda model, prompts, *a, **kw: rows.extend(prompts) or
                        real_generate(model, prompts, *a, **kw))
    tasks.pairs_main([f"--model={tmp_path}/model", f"--data={task}", f"--out={tmp_path}/pairs.jsonl", "--k=2",
                      "--max_new_tokens=4", "--device=cpu"])
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    expected = [auto.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False) for text in ("Hello", "fox")]
    assert rows == [expected[0]] * 2 + [expected[1]] * 2


def test_pairs_train_on_the_tokens_sampled(tokenizer_dir, tmp_path, monkeypatch):
    """DPO's prepared pairs hold, after the prompt, the very ids the model sampled (an untrained model's samples are
    full of words in pieces, which decode and encode again to other ids: those replies are left out)."""
    from data import load_dataset, prepare

    import tasks

    tokenizer = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tokenizer.vocab_size).eval()
    records = [{"prompt": "Hello", "answer": "x"}, {"messages": [{"role": "user", "content": "fox"}], "answer": "y"}]
    prompts = tasks.dpo_prompts(tokenizer, records)
    monkeypatch.setattr(tokenizer, "stop_ids", list(range(0, tokenizer.vocab_size, 10)))
    sampled, real_generate = {}, tasks.generate

    def recording_generate(model, rows, *args, **kwargs):
        outputs = real_generate(model, rows, *args, **kwargs)
        for row, tokens in zip(rows, outputs):
            reply_ids = strip_stop(tokens, tokenizer.stop_ids)
            sampled.setdefault((tuple(row), tokenizer.decode(reply_ids)), reply_ids)
        return outputs

    monkeypatch.setattr(tasks, "generate", recording_generate)
    pairs, counts = tasks.make_pairs(model, tokenizer, records, prompts, lambda p, c, r: float(len(c) % 3), k=16,
                                     max_new_tokens=12)
    assert counts["prompts"] == 2 and counts["pairs"] == len(pairs) >= 1
    assert counts["not_round_trip"] >= 1  # some samples do not tokenize back to themselves
    for pair in pairs:
        assert len(pair["chosen"]) % 3 > len(pair["rejected"]) % 3
        assert pair["prompt"] in ("Hello", [{"role": "user", "content": "fox"}])
    out = tmp_path / "pairs.jsonl"
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    prepare("dpo", [str(out)], tokenizer_dir, str(tmp_path / "pairs.h5"), val_fraction=0)
    dataset = load_dataset(str(tmp_path / "pairs.h5"), "train", 64, stage="dpo")
    batch = dataset.get_batch(list(range(len(pairs))))
    prompt_of = {json.dumps(tasks.dpo_messages(record)): prompt for record, prompt in zip(records, prompts)}
    for n, pair in enumerate(pairs):
        prompt = prompt_of[json.dumps(tasks.dpo_messages({"prompt": pair["prompt"]}))]
        for side in ("chosen", "rejected"):
            targets = batch[f"{side}_targets"][n]
            scored = targets[targets != -100].tolist()  # the reply tokens DPO scores, the end of message last
            assert scored[:-1] == sampled[(tuple(prompt), pair[side])]
            assert batch[f"{side}_ids"][n, :len(prompt)].tolist() == prompt


def test_pairs_command_refuses_bad_options(tmp_path):
    p = subprocess.run([sys.executable, "tasks.py", "pairs", "--model=x", "--data=y", f"--out={tmp_path}/p.jsonl",
                        "--k=1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--k=1" in p.stderr


def test_passk_counts_what_the_samples_hold(tokenizer_dir, tmp_path, monkeypatch, capsys):
    """tasks.py passk: pass@1 from the greedy replies, pass@k and "partly right" from k samples a prompt, each graded
    by answer_is_correct (here: right when the text's length is even), counted again from the replies recorded."""
    import tasks

    tokenizer = Tokenizer.load(tokenizer_dir)
    tiny_model(tokenizer.vocab_size).save_pretrained(str(tmp_path / "model"))
    tokenizer.save(str(tmp_path / "model"))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": word, "answer": "x"}) + "\n" for word in ("Hello", "fox", "cat")))
    replies, real_generate = [], tasks.generate

    def recording_generate(model, rows, max_new_tokens, params, *args, **kwargs):
        outputs = real_generate(model, rows, max_new_tokens, params, *args, **kwargs)
        replies.append((params.temperature, [tokenizer.decode(strip_stop(t, tokenizer.stop_ids)) for t in outputs]))
        return outputs

    monkeypatch.setattr(tasks, "generate", recording_generate)
    monkeypatch.setattr(tasks, "answer_is_correct", lambda completion, _: len(completion) % 2 == 0)
    monkeypatch.setattr(tokenizer, "stop_ids", list(range(0, tokenizer.vocab_size, 7)))
    monkeypatch.setattr(Tokenizer, "load", lambda *a, **kw: tokenizer)
    tasks.passk_main([f"--model={tmp_path}/model", f"--data={task}", "--k=4", "--max_new_tokens=9", "--device=cpu"])
    greedy = [len(text) % 2 == 0 for t, texts in replies if t == 0 for text in texts]
    sampled = [len(text) % 2 == 0 for t, texts in replies if t > 0 for text in texts]
    groups = [sampled[i:i + 4] for i in range(0, 12, 4)]
    assert len(greedy) == 3 and len(sampled) == 12
    partly = sum(any(g) and not all(g) for g in groups) / 3
    expected = (f"greedy pass@1 {sum(greedy) / 3:.3f}, sampled accuracy {sum(sampled) / 12:.3f}, pass@4 "
                f"{sum(any(g) for g in groups) / 3:.3f}, partly right {partly:.3f}")
    assert expected in capsys.readouterr().out


def test_teacher_replies_as_sft_data(tokenizer_dir, tmp_path, monkeypatch):
    """tasks.make_replies: each SFT prompt with the model's greedy reply (transformers' generate on the saved model as
    the reference), which SFT's data then scores token for token; replies that do not end are left out."""
    import transformers

    import tasks
    from data import load_dataset, prepare

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(1)  # untied: a tied untrained model repeats the prompt's last token ("\n") for ever
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                    dim_ffn=64, max_len=64, tie_weight=False)).eval()
    model.save_pretrained(str(tmp_path / "model"))
    stop_ids = list(range(0, tokenizer.vocab_size, 5))  # an untrained model's replies end early enough
    monkeypatch.setattr(tokenizer, "stop_ids", stop_ids)
    conversations = [[{"role": "user", "content": text}, {"role": "assistant", "content": "68"}]
                     for text in ("Hello", "fox", "23 + 45", "Hello")] + [[{"role": "user", "content": "dog"}]]
    written, counts = tasks.make_replies(model, tokenizer, conversations, max_new_tokens=6)
    assert counts["conversations"] == 5 and counts["written"] == len(written) >= 1 and counts["unfinished"] >= 1
    assert counts["written"] + counts["unfinished"] + counts["not_round_trip"] == 5
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    (tmp_path / "replies.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written))
    prepare("sft", [str(tmp_path / "replies.jsonl")], tokenizer_dir, str(tmp_path / "replies.h5"), val_fraction=0)
    data = load_dataset(str(tmp_path / "replies.h5"), "train", 64, stage="sft")
    for n, record in enumerate(written):
        prompt = record["messages"][:-1]
        assert prompt in [tasks.sft_prompt(c) for c in conversations]
        ids = tokenizer.render_chat(prompt, add_generation_prompt=True)[0]
        out = reference.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=0)[0, len(ids):].tolist()
        assert out[-1] in stop_ids  # it ended: a written reply is a finished one
        targets = data.get_batch([n])["targets"][0]
        assert targets[targets != -100].tolist()[:-1] == out[:-1]  # SFT scores the ids generated, then <|im_end|>
    hello = [r["messages"][-1]["content"] for r in written if r["messages"][0]["content"] == "Hello"]
    assert len(set(hello)) <= 1  # a repeated prompt gets the one greedy reply


# -----------------------------------------------------------------------------
# where SFT data is cut


def test_sft_cut_report(tokenizer_dir, tmp_path, capsys):
    from data import load_dataset, prepare

    tokenizer = Tokenizer.load(tokenizer_dir)
    long_reply = "The quick brown fox jumps over the lazy dog. " * 3
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             [{"role": "user", "content": "fox"}, {"role": "assistant", "content": long_reply}]]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    prepare("sft", [str(tmp_path / "sft.jsonl")], tokenizer_dir, str(tmp_path / "sft.h5"), val_fraction=0)
    block_size = 24
    load_dataset(str(tmp_path / "sft.h5"), "train", block_size, stage="sft")
    ids, mask = tokenizer.render_chat(chats[1])
    lost, scored = sum(mask[block_size + 1:]), sum(mask)
    assert len(ids) > block_size + 1 and 0 < lost < scored
    err = capsys.readouterr().err
    assert "1 of 2 conversations" in err and "records 1 " in err
    assert f"lose {lost:,} of their {scored:,} reply tokens" in err


# -----------------------------------------------------------------------------
# distillation


def direct_kl(student_logits, teacher_logits, kind, temperature):
    """torch's own KL (F.kl_div) on whole logits: the reference distill.token_kl is checked against."""
    log_q = F.log_softmax(student_logits / temperature, -1)
    log_p = F.log_softmax(teacher_logits / temperature, -1)
    if kind == "forward":  # KL(p || q): kl_div(input=log q, target=log p)
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * temperature ** 2
    return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1) * temperature ** 2


def distill_setup(tokenizer_dir, tmp_path, **settings):
    tokenizer = Tokenizer.load(tokenizer_dir)
    teacher = tiny_model(tokenizer.vocab_size, seed=1, dim=48, n_layers=3)  # another width and depth
    teacher.save_pretrained(str(tmp_path / "teacher"))
    tokenizer.save(str(tmp_path / "teacher"))
    student = tiny_model(tokenizer.vocab_size, seed=2)
    cfg = Settings({**DEFAULTS, **strategies.Distill.settings}, teacher=str(tmp_path / "teacher"), **settings)
    return tokenizer, teacher, student, strategies.Distill(cfg, student, tokenizer)


@pytest.mark.parametrize("kind, temperature, ce_weight", [("forward", 1.0, 0.0), ("reverse", 2.0, 0.0),
                                                          ("forward", 2.0, 0.5)])
def test_distill_loss_equals_direct_torch(tokenizer_dir, tmp_path, monkeypatch, kind, temperature, ce_weight):
    monkeypatch.setattr("distill.head_chunk_rows", lambda vocab_size: 3)  # many chunks: 3 positions at a time
    tokenizer, teacher, student, strategy = distill_setup(tokenizer_dir, tmp_path, kl=kind,
                                                          distill_temperature=temperature, ce_weight=ce_weight)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9))
    targets = ids.roll(-1, 1)
    targets[0, :3] = -100
    targets[1, 7:] = -100
    loss, metrics = strategy.loss(student, {"input_ids": ids, "targets": targets}, step=0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    scored = targets != -100
    student_logits, teacher_logits = student(ids)[scored], teacher(ids)[scored].detach()
    kl = direct_kl(student_logits, teacher_logits, kind, temperature)
    ce = F.cross_entropy(student_logits, targets[scored], reduction="none")
    expected = (kl + ce_weight * ce).mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in strategy.teacher.parameters())


def test_distill_refuses_another_tokenizer(tokenizer_dir, tmp_path):
    tokenizer = Tokenizer.load(tokenizer_dir)
    other = train_tokenizer(["completely different text 987 654 " * 30], vocab_size=280, progress=False)
    teacher = tiny_model(tokenizer.vocab_size, seed=1)
    teacher.save_pretrained(str(tmp_path / "teacher"))
    other.save(str(tmp_path / "teacher"))
    cfg = Settings({**DEFAULTS, **strategies.Distill.settings}, teacher=str(tmp_path / "teacher"))
    with pytest.raises(ValueError, match="is not the student's"):
        strategies.Distill(cfg, tiny_model(tokenizer.vocab_size), tokenizer)
    with pytest.raises(ValueError, match="teacher= is required"):
        strategies.Distill(Settings({**DEFAULTS, **strategies.Distill.settings}), teacher, tokenizer)


# -----------------------------------------------------------------------------
# pipeline.py's other tasks and the intervals it prints


@pytest.mark.parametrize("task", ["working", "bilingual"])
def test_task_data(tmp_path, task):
    from pipeline import TASKS, make_task

    paths = make_task(tmp_path, task, pretrain_docs=50, sft=300, grpo=300, n_eval=50)
    read = {name: [json.loads(line) for line in open(path, encoding="utf-8")] for name, path in paths.items()
            if name.endswith(".jsonl")}
    held_out = {r["messages"][0]["content"] for r in read["eval.jsonl"]}
    assert len(held_out) == 50
    assert not held_out & {r["messages"][0]["content"] for r in read["sft.jsonl"]}
    assert not held_out & {r["prompt"] for r in read["grpo.jsonl"]}
    pretrain = open(paths["pretrain.txt"], encoding="utf-8").read()
    assert not any(q in pretrain for q in held_out)
    prompts_only = {r["prompt"] for r in read["grpo.jsonl"]}  # no worked solution anywhere: new to the SFT model
    assert not prompts_only & {r["messages"][0]["content"] for r in read["sft.jsonl"]}
    assert not any(q in pretrain for q in prompts_only)
    answers = {q: answer for q, _, answer in TASKS[task]()}
    for record in read["sft.jsonl"]:  # each reply holds its answer, as the checker reads it
        question, reply = (m["content"] for m in record["messages"])
        assert answer_is_correct(reply, answers[question]), (reply, answers[question])
    assert all(answers[r["prompt"]] == r["answer"] for r in read["grpo.jsonl"])
    if task == "bilingual":
        assert any("星期" in q for q in held_out) and any("?" in q for q in held_out)


def test_task_data_refuses_no_prompts_only(tmp_path):
    from pipeline import make_task

    with pytest.raises(ValueError, match="demonstrated=1"):
        make_task(tmp_path, "working", demonstrated=1)


def test_interval95_against_statistics():
    import random
    import statistics

    from tasks import interval95

    rng = random.Random(0)
    after, before = [rng.random() < 0.7 for _ in range(200)], [rng.random() < 0.5 for _ in range(200)]
    assert interval95(after) == pytest.approx(1.96 * statistics.stdev(map(float, after)) / 200 ** 0.5)
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    assert interval95(after, before) == pytest.approx(1.96 * statistics.stdev(diffs) / 200 ** 0.5)


def test_distill_through_train_py_with_a_lora_student(tokenizer_dir, tmp_path):
    """train.py --strategy=distill, the student a LoRA-adapted model: the KL to the teacher falls."""
    from data import prepare

    tokenizer = Tokenizer.load(tokenizer_dir)
    for name, seed in (("teacher", 1), ("student", 2)):
        tiny_model(tokenizer.vocab_size, seed=seed).save_pretrained(str(tmp_path / name))
        tokenizer.save(str(tmp_path / name))
    chats = [[{"role": "user", "content": f"{a} + {b}"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
             for a in range(10) for b in range(10)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    prepare("sft", [str(tmp_path / "sft.jsonl")], tokenizer_dir, str(tmp_path / "sft.h5"), val_fraction=0.1)
    p = subprocess.run([sys.executable, "train.py", "--strategy=distill", f"--teacher={tmp_path}/teacher",
                        f"--init_from={tmp_path}/student", f"--data={tmp_path}/sft.h5", f"--out_dir={tmp_path}/out",
                        "--lora_rank=4", "--lr=1e-2", "--max_iters=12", "--batch_size=8", "--block_size=32",
                        "--warmup_iters=1", "--log_interval=1", "--eval_interval=0", "--ckpt_interval=0",
                        "--distill_temperature=2.0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    kl = [row["kl"] for row in rows if "kl" in row]
    assert len(kl) == 12 and sum(kl[-3:]) / 3 < 0.8 * sum(kl[:3]) / 3, kl
    assert os.path.exists(tmp_path / "out" / "final" / "adapter_config.json")


def test_dpo_cut_report(tokenizer_dir, tmp_path, capsys):
    from data import load_dataset, prepare

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3
    pairs = [{"prompt": "Hi", "chosen": "68", "rejected": "67"},
             {"prompt": long_prompt, "chosen": "68", "rejected": "6"}]
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    prepare("dpo", [str(tmp_path / "dpo.jsonl")], tokenizer_dir, str(tmp_path / "dpo.h5"), val_fraction=0)
    tokenizer = Tokenizer.load(tokenizer_dir)
    ids, _ = tokenizer.render_chat([{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "68"}])
    load_dataset(str(tmp_path / "dpo.h5"), "train", 24, stage="dpo")
    err = capsys.readouterr().err
    assert "1 of 2 DPO pairs" in err and f"up to {len(ids) - 25:,} tokens" in err and "pairs 1" in err
