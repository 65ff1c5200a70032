# settings.py's command-line options and config files; tokenizer.py (checked against the tokenizers library and
# transformers) and its chat rendering; data.py's HDF5 preparation, datasets and sampler; sample.py's exact-answer
# check and pipeline.py's demo data. Tiny data, made here.
import json
import os
import random
import re
import sys

import h5py
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from pipeline import main as pipeline_main  # noqa: E402
from tasks import answer_is_correct  # noqa: E402
from settings import load_settings  # noqa: E402
import tokenizer  # noqa: E402
from tokenizer import Tokenizer, train_tokenizer  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["Hello world, 23 + 45 = 68.", "23 加 45 等于 68。你好，世界！", "The cat sat on the mat; 猫在垫子上睡觉。",
         "emoji 😀🎉 tabs\t\tnew\n\n\nlines   trailing  ", "don't YOU'LL we've 1234567 3.14159", "  leading spaces\r\n",
         "unseen zebra quokka 量子计算机", "a<|im_end|>b<|endoftext|>c <|im_start|>user\n", ""]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    pipeline_main(["demo", f"--out={out}", "--pretrain_docs=300", "--sft=60", "--dpo=40", "--grpo=30", "--n_eval=20"])
    return out


@pytest.fixture(scope="module")
def tok_dir(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    data.main(["tokenizer", f"--input={demo / 'pretrain.txt'},{demo / 'sft.jsonl'}", "--vocab_size=400", f"--out={out}"])
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(str(tok_dir))


# ----------------------------------------------------------------------------- options

def test_settings_forms_and_types():
    defaults = {"a": 0, "b": 1.5, "name": "x", "flag": False}
    args = load_settings(defaults, ["--a=1", "--b", "2", "--flag"])
    assert args == {"a": 1, "b": 2.0, "name": "x", "flag": True} and args.a == 1 and args.flag is True
    assert type(args.b) is float and defaults["a"] == 0  # a new dict
    assert load_settings(defaults, ["--flag", "false", "--name=y=z"]) == defaults | {"name": "y=z"}
    assert load_settings(defaults, ["--flag=0", "--a", "-3"]).a == -3


def test_settings_errors_name_the_key():
    defaults = {"lr": 0.1, "steps": 10, "flag": True}
    with pytest.raises(SystemExit, match="--lrate"):
        load_settings(defaults, ["--lrate=1"])
    with pytest.raises(SystemExit, match="--steps='ten'.*int"):
        load_settings(defaults, ["--steps=ten"])
    with pytest.raises(SystemExit, match="--steps=.*int"):
        load_settings(defaults, ["--steps=1.5"])
    with pytest.raises(SystemExit, match="--flag='maybe'"):
        load_settings(defaults, ["--flag=maybe"])
    with pytest.raises(SystemExit, match="--lr needs a value"):
        load_settings(defaults, ["--lr"])
    with pytest.raises(SystemExit, match="unexpected argument"):
        load_settings(defaults, ["stray"])
    with pytest.raises(AttributeError, match="no setting 'lrate'"):
        load_settings(defaults, []).lrate


def test_config_files_apply_in_order_then_the_command_line(tmp_path):
    defaults = {"lr": 0.1, "steps": 10, "name": "x"}
    (tmp_path / "a.py").write_text("import math\nlr = 1  # an int where a float is expected\nsteps = 20\n_private = 3\n")
    (tmp_path / "b.py").write_text("steps = 30\nname = 'b'\n")
    cfg = load_settings(defaults, [str(tmp_path / "a.py"), str(tmp_path / "b.py"), "--name=cli"])
    assert cfg == {"lr": 1.0, "steps": 30, "name": "cli"} and type(cfg.lr) is float
    (tmp_path / "typo.py").write_text("stpes = 3\n")
    with pytest.raises(SystemExit, match="typo.py: unknown setting 'stpes'"):
        load_settings(defaults, [str(tmp_path / "typo.py")])
    (tmp_path / "wrong.py").write_text("steps = '3'\n")
    with pytest.raises(SystemExit, match="wrong.py: steps = '3' should be a int"):
        load_settings(defaults, [str(tmp_path / "wrong.py")])
    (tmp_path / "tuple.py").write_text("name = ('a', 'b')\n")
    with pytest.raises(SystemExit, match="name = .* should be a str"):
        load_settings(defaults, [str(tmp_path / "tuple.py")])
    with pytest.raises(SystemExit, match="missing.py not found"):
        load_settings(defaults, [str(tmp_path / "missing.py")])


# ----------------------------------------------------------------------------- tokenizer

def test_roundtrip_arbitrary_text(tok):
    rng = random.Random(0)
    alphabet = ("abcXYZ019 .,!?'\"\t\n\r\x00\x01\x1b\x7f" + "你好世界汉字中文。，！？「」" + "😀🎉👍🏽\u200d❤️"
                + "éüñçß\u0301\u00a0\u3000ｆｕｌｌ１２" + "".join(chr(rng.randrange(0x80, 0xD7FF)) for _ in range(50)))
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    texts += ["".join(chr(rng.choice([rng.randrange(1, 0xD800), rng.randrange(0xE000, 0x110000)]))
                      for _ in range(40)) for _ in range(100)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode()
        assert all(0 <= i < tok.vocab_size for i in ids)
    # special-token strings typed in plain text stay text; the with-special path makes them tokens
    assert tok.im_end_id not in tok.encode("x<|im_end|>")
    assert tok.encode_with_special("x<|im_end|>")[-1] == tok.im_end_id


def test_trained_tokenizer_attributes(tok, tok_dir):
    assert tok.vocab_size == 400 and (tok.eot_id, tok.im_start_id, tok.im_end_id) == (397, 398, 399)
    assert tok.stop_ids == [399, 397]
    assert tok.hash == Tokenizer.load(str(tok_dir)).hash and len(tok.hash) == 64
    other = train_tokenizer(["some other text"] * 3, 300, progress=False)
    assert other.hash != tok.hash


def _train_hf(texts, vocab_size):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tokenizer.SPLIT_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def _check_same_ids(ours, hf, texts):
    for text in texts:
        assert ours.encode_with_special(text) == hf.encode(text).ids, text
        if not any(s in text for s in SPECIALS):
            assert ours.encode(text) == hf.encode(text).ids, text
        assert ours.decode(hf.encode(text).ids) == text


def test_import_hf_tokenizer_matches_tokenizers_library(demo, tmp_path):
    texts = (demo / "pretrain.txt").read_text().split("\n\n") + ["quick brown fox jumps over lazy dogs"] * 5
    hf = _train_hf(texts, 500)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.load(str(tmp_path))
    assert ours._rank_to_id is None  # HF trainer ids are in merge order: rank == id
    assert (ours.eot_id, ours.im_start_id, ours.im_end_id) == (0, 1, 2) and ours.vocab_size == hf.get_vocab_size()
    _check_same_ids(ours, hf, TEXTS + texts[:50])

    # ids out of merge order (a shuffled vocab) take the rank -> id translation path; still the same ids
    spec = json.loads(hf.to_str())
    new_id = list(range(hf.get_vocab_size()))
    random.Random(1).shuffle(new_id)
    spec["model"]["vocab"] = {text: new_id[i] for text, i in spec["model"]["vocab"].items()}
    for token in spec["added_tokens"]:
        token["id"] = new_id[token["id"]]
    shuffled_hf, shuffled = tokenizers.Tokenizer.from_str(json.dumps(spec)), Tokenizer(spec)
    assert shuffled._rank_to_id is not None
    _check_same_ids(shuffled, shuffled_hf, TEXTS + texts[:50])


def test_gpt2_style_and_nfc_tokenizers_match(tmp_path):
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own split regex
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(TEXTS * 20 + ["café cafe\u0301 naïve"] * 20, trainers.BpeTrainer(
        vocab_size=350, special_tokens=SPECIALS[:1], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.load(str(tmp_path))
    assert ours.im_start_id is None and ours.stop_ids == [0]
    _check_same_ids(ours, hf, [t for t in TEXTS if "<|im" not in t])
    assert ours.encode("cafe\u0301") == hf.encode("cafe\u0301").ids == ours.encode("café")
    with pytest.raises(ValueError, match="no <\\|im_start\\|>"):
        ours.render_chat([{"role": "user", "content": "hi"}])


def test_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import models, pre_tokenizers
    wordpiece = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer.json.*byte-level BPE.*WordPiece"):
        Tokenizer.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(str(tmp_path / "missing"))


def test_saved_tokenizer_loads_in_tokenizers_and_transformers(tok, tok_dir, demo):
    transformers = pytest.importorskip("transformers")
    hf = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    texts = TEXTS + (demo / "pretrain.txt").read_text().split("\n\n")[:30]
    _check_same_ids(tok, hf, texts)
    for text in texts:
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode_with_special(text)
        assert auto.decode(tok.encode(text)) == text
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"

    conversation = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 3?"},
                    {"role": "assistant", "content": "2 + 3 = 5"}, {"role": "user", "content": "计算 4 减 1。"}]
    for generation_prompt in (False, True):
        ids, mask = tok.render_chat(conversation, add_generation_prompt=generation_prompt)
        text = auto.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        assert tok.decode(ids) == text
        assert auto(text, add_special_tokens=False)["input_ids"] == ids


# ----------------------------------------------------------------------------- chat rendering

def test_render_chat_ids_and_mask_by_hand(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "再来"}, {"role": "assistant", "content": "6 + 1 = 7"}]
    ids, mask = tok.render_chat(messages)
    s, e, nl = tok.im_start_id, tok.im_end_id, tok.encode("\n")
    expected = ([s] + tok.encode("user\nHi") + [e] + nl + [s] + tok.encode("assistant\n4") + [e] + nl
                + [s] + tok.encode("user\n再来") + [e] + nl + [s] + tok.encode("assistant\n6 + 1 = 7") + [e] + nl)
    assert ids == expected and len(mask) == len(ids)
    assert nl == [10]  # the byte "\n": our ids 0..255 are the bytes
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == "4<|im_end|>6 + 1 = 7<|im_end|>"
    assert learned == tok.encode("4") + [e] + tok.encode("6 + 1 = 7") + [e]
    # the <|im_end|> of each assistant turn is learned, the "\n" after it and "<|im_start|>assistant\n" are not
    ends = [i for i, t in enumerate(ids) if t == e]
    assert [mask[i] for i in ends] == [0, 1, 0, 1] and [mask[i + 1] for i in ends] == [0, 0, 0, 0]

    prompt_ids, prompt_mask = tok.render_chat(messages[:1], add_generation_prompt=True)
    assert prompt_ids == [s] + tok.encode("user\nHi") + [e] + nl + [s] + tok.encode("assistant\n")
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n") and not any(prompt_mask)


def test_render_chat_errors(tok):
    with pytest.raises(ValueError, match="role 'tool'"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content must be a string, got NoneType"):
        tok.render_chat([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.render_chat([])


# ----------------------------------------------------------------------------- exact answers

@pytest.mark.parametrize("completion, answer, expected", [
    ("23 + 45 = 68", "68", True), ("23 加 45 等于 68。", "68", True), ("The answer is 68.", "68", True),
    ("２３ 加 ４５ 等于 ６８。", "68", True), ("68", " 68 ", True), ("= 68.0", "68", True), ("1,234", "1234", True),
    ("23 - 45 = -22", "-22", True), ("45-3=42", "42", True), ("45-3", "-3", False), ("23 + 45 = 69", "68", False),
    ("68 or maybe 67", "68", False), ("no number", "68", False), ("", "68", False), ("168", "68", False),
    ("The capital is Paris.", "Paris", True), ("答案是北京。", "北京", True), ("Comparis", "Paris", False),
    ("the answer: PARIS!", "paris", True)])
def test_answer_is_correct(completion, answer, expected):
    assert answer_is_correct(completion, answer) is expected


# ----------------------------------------------------------------------------- HDF5 preparation and datasets

def _prepare(stage, inputs, tok_dir, out, val_fraction=0.0, seed=0):
    data.main(["prepare", f"--stage={stage}", "--input=" + ",".join(map(str, inputs)), f"--tokenizer={tok_dir}",
               f"--out={out}", f"--val_fraction={val_fraction}", f"--seed={seed}"])
    return out


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_seq_windows(tok, tok_dir, demo, tmp_path):
    h5 = _prepare("seq", [demo / "pretrain.txt"], tok_dir, tmp_path / "seq.h5")
    with h5py.File(h5) as f:
        assert dict(f.attrs) == {"stage": "seq", "vocab_size": 400, "tokenizer_hash": tok.hash, "eot_id": 397,
                                 "format_version": 1}
        assert f["train/tokens"].dtype == np.uint32 and len(f["val/tokens"]) == 0
    documents = (demo / "pretrain.txt").read_text().split("\n\n")
    stream = [t for doc in documents if doc.strip() for t in tok.encode(doc.strip("\n")) + [tok.eot_id]]
    dataset = data.load_dataset(str(h5), block_size=16, stage="seq")
    assert len(dataset) == (len(stream) - 17) // 16 + 1 and dataset.vocab_size == 400
    assert dataset.tokenizer_hash == tok.hash
    batch = dataset.get_batch([0, 5, len(dataset) - 1])
    assert batch["input_ids"].shape == batch["targets"].shape == (3, 16) and batch["input_ids"].dtype == torch.long
    for row, i in enumerate([0, 5, len(dataset) - 1]):
        assert batch["input_ids"][row].tolist() == stream[i * 16:i * 16 + 16]
        assert batch["targets"][row].tolist() == stream[i * 16 + 1:i * 16 + 17]


def test_sft_targets_and_truncation(tok, tok_dir, tmp_path):
    conversations = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 加 1 等于多少？"},
                      {"role": "assistant", "content": "1 加 1 等于 2。"}, {"role": "user", "content": "2?"},
                      {"role": "assistant", "content": "2 + 2 = 4"}]]
    h5 = _prepare("sft", [_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in conversations])], tok_dir, tmp_path / "sft.h5")
    dataset = data.load_dataset(str(h5), block_size=64, stage="sft")
    assert len(dataset) == 2
    batch = dataset.get_batch([1, 0])
    rendered = [tok.render_chat(c) for c in conversations]
    width = min(64, max(len(ids) for ids, _ in rendered) - 1)
    assert batch["input_ids"].shape == batch["targets"].shape == (2, width)
    for row, (ids, mask) in zip(range(2), [rendered[1], rendered[0]]):
        ids, mask = ids[:65], mask[:65]
        n = len(ids) - 1
        assert batch["input_ids"][row, :n].tolist() == ids[:-1]
        assert batch["targets"][row, :n].tolist() == [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        assert (batch["targets"][row, n:] == -100).all()
    # the learned targets spell the assistant replies
    learned = batch["targets"][1][batch["targets"][1] != -100].tolist()
    assert tok.decode(learned) == "2 + 3 = 5<|im_end|>"
    short = data.load_dataset(str(h5), block_size=8).get_batch([1])  # truncated: the first 9 tokens kept
    assert short["input_ids"][0].tolist() == rendered[1][0][:8]


def test_dpo_batches(tok, tok_dir, demo, tmp_path):
    h5 = _prepare("dpo", [demo / "dpo.jsonl"], tok_dir, tmp_path / "dpo.h5")
    records = [json.loads(line) for line in (demo / "dpo.jsonl").read_text().splitlines()]
    dataset = data.load_dataset(str(h5), block_size=256, stage="dpo")
    assert len(dataset) == len(records)
    batch = dataset.get_batch([0, 3])
    assert set(batch) == {"chosen_ids", "chosen_targets", "rejected_ids", "rejected_targets"}
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape == batch["chosen_targets"].shape
    for row, i in enumerate([0, 3]):
        prompt = [{"role": "user", "content": records[i]["prompt"]}]
        for side in ("chosen", "rejected"):
            ids, _ = tok.render_chat(prompt + [{"role": "assistant", "content": records[i][side]}])
            targets = batch[f"{side}_targets"][row]
            assert batch[f"{side}_ids"][row, :len(ids) - 1].tolist() == ids[:-1]
            assert tok.decode(targets[targets != -100].tolist()) == records[i][side] + "<|im_end|>"
    with h5py.File(h5) as f:
        prompt_ids, _ = tok.render_chat([{"role": "user", "content": records[0]["prompt"]}], add_generation_prompt=True)
        assert f["train/prompt_lengths"][0] == len(prompt_ids)


def test_dpo_cuts_the_prompt_from_the_left_and_drops_pairs_whose_reply_does_not_fit(tok, tok_dir, tmp_path, capsys):
    long_prompt = "Read this first. " * 6 + "What is 2 + 3?"
    records = [{"prompt": long_prompt, "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 6, or maybe 7"},
               {"prompt": "1 + 1?", "chosen": "2", "rejected": "3"},
               {"prompt": "1 + 2?", "chosen": "3", "rejected": "one plus two is three, " * 6 + "3"}]
    h5 = _prepare("dpo", [_jsonl(tmp_path / "dpo.jsonl", records)], tok_dir, tmp_path / "dpo.h5")
    block_size = 24
    rendered = [{side: tok.render_chat([{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r[side]}])[0]
                 for side in ("chosen", "rejected")} for r in records]
    n_prompt = [len(tok.render_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0])
                for r in records]
    longer_reply = [max(len(ids) for ids in sides.values()) - n for sides, n in zip(rendered, n_prompt)]
    assert len(rendered[0]["rejected"]) > block_size + 1 and longer_reply[0] <= block_size  # cut, kept
    assert len(rendered[1]["rejected"]) <= block_size + 1 and longer_reply[2] > block_size  # whole; dropped
    dataset = data.load_dataset(str(h5), block_size=block_size, stage="dpo")
    assert "dropped 1 of 3 DPO pairs whose reply alone is longer than block_size=24" in capsys.readouterr().err
    assert len(dataset) == 2
    batch = dataset.get_batch([0, 1])
    for row, i in enumerate([0, 1]):
        start = max(0, max(len(ids) for ids in rendered[i].values()) - (block_size + 1))  # the longer side's last
        for side in ("chosen", "rejected"):  # block_size + 1 tokens; both sides lose the same prompt tokens
            ids, targets = rendered[i][side][start:], batch[f"{side}_targets"][row]
            assert batch[f"{side}_ids"][row, :len(ids) - 1].tolist() == ids[:-1]
            assert tok.decode(targets[targets != -100].tolist()) == records[i][side] + "<|im_end|>"
        assert (start > 0) == (i == 0)  # pair 0 lost the start of its prompt, pair 1 nothing
    with pytest.raises(IndexError):
        dataset.get_batch([2])
    with pytest.raises(ValueError, match="every DPO pair has a reply longer than block_size=2"):
        data.load_dataset(str(h5), block_size=2, stage="dpo")


def test_grpo_online_and_offline(tok, tok_dir, demo, tmp_path):
    h5 = _prepare("grpo", [demo / "grpo.jsonl", demo / "eval.jsonl"], tok_dir, tmp_path / "grpo.h5")
    records = [json.loads(line) for name in ("grpo.jsonl", "eval.jsonl") for line in (demo / name).read_text().splitlines()]
    dataset = data.load_dataset(str(h5), stage="grpo")
    assert len(dataset) == len(records)
    last = len(records) - 1
    batch = dataset.get_batch([0, last])
    assert batch["answers"] == [records[0]["answer"], records[last]["answer"]]
    assert batch["records"] == [records[0], records[last]] and "responses" not in batch
    assert batch["prompt_ids"][0] == tok.render_chat([{"role": "user", "content": records[0]["prompt"]}], True)[0]
    assert batch["prompt_ids"][1] == tok.render_chat(records[last]["messages"], True)[0]

    offline = [{"prompt": "1 + 1?", "answer": "2", "responses": ["1 + 1 = 2", "3", "二"], "rewards": [1.0, 0.0, 0.5]},
               {"messages": [{"role": "user", "content": "2 + 2?"}], "answer": 4, "responses": ["4"], "rewards": [1]}]
    h5 = _prepare("grpo", [_jsonl(tmp_path / "offline.jsonl", offline)], tok_dir, tmp_path / "offline.h5")
    batch = data.load_dataset(str(h5), stage="grpo").get_batch([1, 0])
    assert batch["answers"] == ["4", "2"] and batch["rewards"] == [[1.0], [1.0, 0.0, 0.5]]
    assert [[tok.decode(r) for r in group] for group in batch["responses"]] == [
        ["4<|im_end|>"], ["1 + 1 = 2<|im_end|>", "3<|im_end|>", "二<|im_end|>"]]


def test_val_split_is_disjoint_deterministic_and_shards_concatenate(tok, tok_dir, tmp_path):
    documents = [f"document number {i} 文档 {i}" for i in range(200)]
    (tmp_path / "docs.txt").write_text("\n\n".join(documents) + "\n")

    def split_documents(h5, split):
        with h5py.File(h5) as f:
            text = tok.decode(f[f"{split}/tokens"][:].tolist())
        return text.split("<|endoftext|>")[:-1]

    h5 = _prepare("seq", [tmp_path / "docs.txt"], tok_dir, tmp_path / "split.h5", val_fraction=0.1, seed=3)
    train, val = split_documents(h5, "train"), split_documents(h5, "val")
    assert 15 <= len(val) <= 25 and not set(train) & set(val) and sorted(train + val) == sorted(documents)
    again = _prepare("seq", [tmp_path / "docs.txt"], tok_dir, tmp_path / "again.h5", val_fraction=0.1, seed=3)
    other = _prepare("seq", [tmp_path / "docs.txt"], tok_dir, tmp_path / "other.h5", val_fraction=0.1, seed=4)
    assert split_documents(again, "val") == val and split_documents(other, "val") != val
    assert len(data.load_dataset(str(h5), split="val", block_size=4)) > 0

    shards = tmp_path / "shards"
    shards.mkdir()
    _prepare("seq", [tmp_path / "docs.txt"], tok_dir, shards / "b.h5")
    (tmp_path / "few.txt").write_text("\n\n".join(documents[:7]))
    _prepare("seq", [tmp_path / "few.txt"], tok_dir, shards / "a.h5")
    stream = []
    for name in ("a.h5", "b.h5"):  # sorted name order
        with h5py.File(shards / name) as f:
            stream += f["train/tokens"][:].tolist()
    dataset = data.load_dataset(str(shards), block_size=32, stage="seq")
    assert len(dataset) == (len(stream) - 33) // 32 + 1
    for i in range(len(dataset)):  # windows that cross from a.h5 into b.h5 included
        assert dataset.get_batch([i])["input_ids"][0].tolist() == stream[i * 32:i * 32 + 32]


def test_sft_shards_count_records_across_files(tok_dir, demo, tmp_path):
    lines = (demo / "sft.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "one.jsonl").write_text("".join(lines[:25]))
    (tmp_path / "two.jsonl").write_text("".join(lines[25:]))
    shards = tmp_path / "shards"
    shards.mkdir()
    _prepare("sft", [tmp_path / "one.jsonl"], tok_dir, shards / "0.h5")
    _prepare("sft", [tmp_path / "two.jsonl"], tok_dir, shards / "1.h5")
    whole = data.load_dataset(str(_prepare("sft", [demo / "sft.jsonl"], tok_dir, tmp_path / "all.h5")), block_size=64)
    sharded = data.load_dataset(str(shards), block_size=64)
    assert len(sharded) == len(whole) == len(lines)
    for i in (0, 24, 25, len(lines) - 1):
        for key in ("input_ids", "targets"):
            assert torch.equal(sharded.get_batch([i])[key], whole.get_batch([i])[key])


def test_bad_inputs_name_the_problem(tok_dir, demo, tmp_path):
    seq = _prepare("seq", [demo / "pretrain.txt"], tok_dir, tmp_path / "seq.h5")
    with pytest.raises(ValueError, match=r"seq.h5: holds stage 'seq' data, expected 'sft'"):
        data.load_dataset(str(seq), stage="sft")
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        data.load_dataset(str(tmp_path / "nope.h5"))
    (tmp_path / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(ValueError, match="corrupt.h5: not a readable HDF5"):
        data.load_dataset(str(tmp_path / "corrupt.h5"))
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f.attrs.update(stage="sft", vocab_size=400, tokenizer_hash="x", eot_id=0, format_version=1)
        f.create_group("train").create_dataset("tokens", data=np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match=r"partial.h5: 'train' group lacks datasets \['loss_mask', 'offsets'\]"):
        data.load_dataset(str(tmp_path / "partial.h5"))
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(ValueError, match="foreign.h5: missing the stage"):
        data.load_dataset(str(tmp_path / "foreign.h5"))

    bad_lines = {'{"messages": [{"role": "user", "content": "hi"}]\n': "bad.jsonl:2: invalid JSON",
                 '{"text": "no messages"}\n': "bad.jsonl:2: missing key 'messages'",
                 '{"messages": "hello"}\n': "bad.jsonl:2: key 'messages' must be list, got str",
                 '{"messages": [{"role": "bot", "content": "x"}]}\n': "bad.jsonl:2: key 'messages': message 0: role 'bot'"}
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    for line, message in bad_lines.items():
        (tmp_path / "bad.jsonl").write_text(good + line)
        with pytest.raises(SystemExit, match=message):
            _prepare("sft", [tmp_path / "bad.jsonl"], tok_dir, tmp_path / "bad.h5")
        assert not os.path.exists(tmp_path / "bad.h5") and not os.path.exists(tmp_path / "bad.h5.tmp")
    (tmp_path / "dpo.jsonl").write_text('{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(SystemExit, match="dpo.jsonl:1: missing key 'rejected'"):
        _prepare("dpo", [tmp_path / "dpo.jsonl"], tok_dir, tmp_path / "bad.h5")
    (tmp_path / "grpo.jsonl").write_text('{"prompt": "q", "answer": "1", "responses": ["a"], "rewards": [1]}\n'
                                         '{"prompt": "q", "answer": "1"}\n')
    with pytest.raises(SystemExit, match="grpo.jsonl:2: every record of an offline GRPO file"):
        _prepare("grpo", [tmp_path / "grpo.jsonl"], tok_dir, tmp_path / "bad.h5")
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        _prepare("sft", [tmp_path / "missing.jsonl"], tok_dir, tmp_path / "bad.h5")
    with pytest.raises(SystemExit, match="--stage='pretrain'"):
        _prepare("pretrain", [demo / "pretrain.txt"], tok_dir, tmp_path / "bad.h5")


# ----------------------------------------------------------------------------- prepare: worker processes, memory

def _h5_content(path):
    with h5py.File(path) as f:
        return dict(f.attrs), {f"{s}/{k}": f[s][k][:].tolist() for s in f for k in f[s]}


def test_prepare_workers_write_the_same_file(tok, tok_dir, demo, tmp_path):
    grpo = [json.loads(line) for line in (demo / "grpo.jsonl").read_text().splitlines()]
    offline = [r | {"responses": [r["answer"], "no idea", "二"][:1 + i % 3], "rewards": [1.0, 0.0, 0.5][:1 + i % 3]}
               for i, r in enumerate(grpo)]
    texts = _jsonl(tmp_path / "texts.jsonl", [{"text": f"document {i}: 文档 {i}\n\nnext"} for i in range(40)])
    crlf = tmp_path / "crlf.txt"  # CRLF lines, blank lines of spaces, a document longer than a batch
    crlf.write_bytes("\r\n".join(["one", "two", " \t", "three", "", "", "\u3000", "four " * 900, "", "five"]).encode())
    inputs = {"seq": [demo / "pretrain.txt", texts, crlf], "sft": [demo / "sft.jsonl"], "dpo": [demo / "dpo.jsonl"],
              "grpo": [demo / "grpo.jsonl", demo / "eval.jsonl"], "offline": [_jsonl(tmp_path / "off.jsonl", offline)]}
    for name, paths in inputs.items():
        stage, paths = "grpo" if name == "offline" else name, [str(p) for p in paths]
        assert len(list(data._read_batches(paths, batch_bytes=400))) >= 6  # more batches than workers
        files = {}
        for workers, batch_bytes in ((1, 400), (3, 400), (2, 1 << 20)):
            files[workers] = tmp_path / f"{name}-{workers}.h5"
            data.prepare(stage, paths, str(tok_dir), str(files[workers]), val_fraction=0.2, progress=False,
                         workers=workers, batch_bytes=batch_bytes)
        assert files[1].read_bytes() == files[3].read_bytes(), name
        assert _h5_content(files[1]) == _h5_content(files[2]), name
    with h5py.File(tmp_path / "seq-3.h5") as f:
        documents = tok.decode(f["train/tokens"][:].tolist() + f["val/tokens"][:].tolist()).split("<|endoftext|>")
    assert {"one\ntwo", "three", ("four " * 900).rstrip("\r\n"), "five"} <= set(documents)
    # the records of each split, in input order, as the tokenizer renders them
    records = [json.loads(line)["messages"] for line in (demo / "sft.jsonl").read_text().splitlines()]
    expected = [tuple(map(tuple, tok.render_chat(messages))) for messages in records]
    stored = {}
    with h5py.File(tmp_path / "sft-3.h5") as f:
        for split in ("train", "val"):
            tokens, mask, offsets = (f[split][k][:].tolist() for k in ("tokens", "loss_mask", "offsets"))
            stored[split] = [(tuple(tokens[a:b]), tuple(mask[a:b])) for a, b in zip(offsets, offsets[1:])]
    assert len(stored["val"]) == len(records) // 5 and sorted(stored["train"] + stored["val"]) == sorted(expected)
    for split in stored.values():
        assert split == [e for e in expected if e in split]


def test_prepare_error_in_a_worker_names_the_line(tok_dir, demo, tmp_path):
    lines = (demo / "sft.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "bad.jsonl").write_text("".join(lines[:50]) + '{"messages": [}\n' + "".join(lines[50:]))
    for workers in (1, 2):
        with pytest.raises(ValueError, match="bad.jsonl:51: invalid JSON"):
            data.prepare("sft", [str(tmp_path / "bad.jsonl")], str(tok_dir), str(tmp_path / "bad.h5"), progress=False,
                         workers=workers, batch_bytes=500)
        assert not os.path.exists(tmp_path / "bad.h5") and not os.path.exists(tmp_path / "bad.h5.tmp")
    (tmp_path / "latin1.jsonl").write_bytes("".join(lines[:30]).encode() + '{"messages": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.jsonl:31: not UTF-8"):
        data.prepare("sft", [str(tmp_path / "latin1.jsonl")], str(tok_dir), str(tmp_path / "bad.h5"), progress=False,
                     workers=2, batch_bytes=500)
    with pytest.raises(SystemExit, match="--workers=-1"):
        _prepare_args = ["prepare", "--stage=sft", f"--input={demo / 'sft.jsonl'}", f"--tokenizer={tok_dir}",
                         f"--out={tmp_path / 'x.h5'}", "--workers=-1"]
        data.main(_prepare_args)


def _big_input(stage, demo, path, megabytes):
    """About `megabytes` of input for `stage` made of the demo's records, with long texts as real data has:
    GRPO records carry a long `source` field that only the `record` column keeps."""
    documents = [d for d in (demo / "pretrain.txt").read_text().split("\n\n") if d.strip()]
    if stage == "seq":
        block = "\n\n".join(documents) + "\n\n"
    else:
        block = ""
        for i, line in enumerate((demo / f"{stage}.jsonl").read_text().splitlines()):
            record, context = json.loads(line), "\n".join(documents[(i + k) % len(documents)] for k in range(20))
            if stage == "sft":
                record["messages"][0]["content"] = context + "\n" + record["messages"][0]["content"]
            elif stage == "dpo":
                record["prompt"] = context + "\n" + record["prompt"]
            else:
                record["source"] = context * 3
            block += json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(int(megabytes * 1e6 / len(block.encode())) + 1):
            f.write(block)
    return path


# peak RSS in KiB: VmHWM, as ru_maxrss of a process started by exec counts the parent's (pytest's) RSS at the
# fork; the workers, forked and never exec'd, by RUSAGE_CHILDREN (the largest one)
PEAK_RSS = """import re, resource, sys
import data
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = peak()  # the interpreter's own, data.py imported
data.main(sys.argv[1:])
print(before, peak(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


# GRPO at 200 MB: the old flush by entry counts held its `record` column whole (+508 MB). The other stages are
# smaller here (2 CPU cores tokenize them at ~1 MB/s); PREPARE_RSS_MB=200 runs every stage at 200 MB.
@pytest.mark.parametrize("stage, megabytes", [("seq", 8), ("sft", 4), ("dpo", 2), ("grpo", 200)])
def test_prepare_memory_is_bounded_by_bytes(stage, megabytes, tok_dir, demo, tmp_path):
    import subprocess
    megabytes = float(os.environ.get("PREPARE_RSS_MB", megabytes))
    path = _big_input(stage, demo, tmp_path / ("big.txt" if stage == "seq" else "big.jsonl"), megabytes)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, "prepare", f"--stage={stage}", f"--input={path}",
                          f"--tokenizer={tok_dir}", f"--out={tmp_path / 'big.h5'}", "--workers=2"],
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    before, main, workers = (int(kib) / 1024 for kib in out.stdout.split()[-3:])
    n_records = sum(1 for line in open(path, encoding="utf-8") if line.strip())
    if stage == "seq":
        n_records = len([d for d in path.read_text().split("\n\n") if d.strip()])
    os.remove(path)
    with h5py.File(tmp_path / "big.h5") as f:
        key = {"seq": None, "sft": "offsets", "dpo": "chosen_offsets", "grpo": "prompt_offsets"}[stage]
        stored = sum(len(f[s][key]) - 1 for s in ("train", "val")) if key else \
            sum(int((f[s]["tokens"][:] == 397).sum()) for s in ("train", "val"))  # <|endoftext|> ends each document
    assert stored == n_records
    print(f"{stage} {megabytes:.0f} MB: peak RSS {main - before:.0f} MB above the interpreter's {before:.0f} MB, "
          f"workers {workers - before:.0f} MB")
    assert main - before < 300 and workers - before < 300


# ----------------------------------------------------------------------------- sampler

def _steps(sampler, n):
    return [sampler.next_step() for _ in range(n)]


def test_sampler_is_deterministic_and_covers_each_epoch():
    steps = _steps(data.ResumableSampler(50, batch_size=4, grad_accum=2, seed=7), 12)
    assert steps == _steps(data.ResumableSampler(50, batch_size=4, grad_accum=2, seed=7), 12)
    assert steps != _steps(data.ResumableSampler(50, batch_size=4, grad_accum=2, seed=8), 12)
    assert all(len(step) == 2 and all(len(micro) == 4 for micro in step) for step in steps)
    first_epoch = [i for step in steps[:6] for micro in step for i in micro]  # 6 steps of 8 = 48 of 50 items
    assert len(set(first_epoch)) == 48 and first_epoch != sorted(first_epoch)
    sampler = data.ResumableSampler(50, batch_size=4, grad_accum=2, seed=7)
    _steps(sampler, 6)
    assert sampler.epoch == 0 and (sampler.next_step(), sampler.epoch) == (steps[6], 1)
    two_per_epoch = _steps(data.ResumableSampler(10, batch_size=5, seed=3), 4)
    assert sorted(i for step in two_per_epoch[:2] for i in step[0]) == list(range(10))  # an epoch covers all
    assert sorted(i for step in two_per_epoch[2:] for i in step[0]) == list(range(10)) and two_per_epoch[:2] != \
        two_per_epoch[2:]  # the next epoch: a new order


def test_sampler_resumes_mid_epoch_exactly():
    uninterrupted = _steps(data.ResumableSampler(37, batch_size=3, grad_accum=2, seed=1), 20)
    first = data.ResumableSampler(37, batch_size=3, grad_accum=2, seed=1)
    head = _steps(first, 9)  # 9 steps of 6: mid second epoch
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = data.ResumableSampler(37, batch_size=3, grad_accum=2, seed=1)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and head + _steps(resumed, 11) == uninterrupted
    with pytest.raises(ValueError, match="40 items"):
        data.ResumableSampler(40, batch_size=3, grad_accum=2, seed=1).load_state_dict(state)


def test_sampler_ranks_match_grad_accum_and_are_disjoint():
    single = _steps(data.ResumableSampler(100, batch_size=4, grad_accum=2, seed=3), 30)
    ranks = [_steps(data.ResumableSampler(100, batch_size=4, grad_accum=1, rank=r, world_size=2, seed=3), 30) for r in (0, 1)]
    for step in range(30):
        assert [ranks[0][step][0], ranks[1][step][0]] == single[step]  # same samples per optimizer step
        assert not set(ranks[0][step][0]) & set(ranks[1][step][0])
    four = [_steps(data.ResumableSampler(100, batch_size=2, grad_accum=3, rank=r, world_size=4, seed=0), 4) for r in range(4)]
    for step in range(4):
        seen = [i for r in range(4) for micro in four[r][step] for i in micro]
        assert len(seen) == len(set(seen)) == 24
    with pytest.raises(ValueError, match="10 items are fewer than one step needs: batch_size 4 x grad_accum 2 x world_size 2 = 16"):
        data.ResumableSampler(10, batch_size=4, grad_accum=2, world_size=2)


# ----------------------------------------------------------------------------- demo data

def test_demo_files_are_consistent_and_held_out(demo):
    def records(name):
        return [json.loads(line) for line in (demo / name).read_text().splitlines()]

    def problem(text):
        numbers = [int(x) for x in re.findall(r"\d+", text)]
        return tuple(numbers[:2]) + (("-" in text or "减" in text),)

    sft, dpo, grpo, evals, dpo_eval = map(records, ["sft.jsonl", "dpo.jsonl", "grpo.jsonl", "eval.jsonl", "dpo_eval.jsonl"])
    assert (len(sft), len(dpo), len(grpo), len(evals), len(dpo_eval)) == (60, 40, 30, 20, 20)
    for record in sft:
        question, reply = record["messages"][0]["content"], record["messages"][1]["content"]
        a, b, minus = problem(question)
        assert answer_is_correct(reply, str(a - b if minus else a + b))
    for record in dpo + dpo_eval:
        a, b, minus = problem(record["prompt"])
        right = str(a - b if minus else a + b)
        assert answer_is_correct(record["chosen"], right) and not answer_is_correct(record["rejected"], right)
    for record in grpo:
        a, b, minus = problem(record["prompt"])
        assert record["answer"] == str(a - b if minus else a + b)
    held_out = {problem(r["messages"][0]["content"]) for r in evals}
    trained = {problem(r["messages"][0]["content"]) for r in sft} | {problem(r["prompt"]) for r in dpo + grpo}
    assert len(held_out) == 20 and not held_out & trained
    assert held_out == {problem(r["prompt"]) for r in dpo_eval}
    text = (demo / "pretrain.txt").read_text()
    assert "加" in text and " + " in text and text.count("\n\n") == 300
    facts = {(int(a), int(b), op in ("-", "减", "minus")) for a, op, b in re.findall(r"(\d+) (\+|-|加|减|plus|minus) (\d+)", text)}
    assert len(facts) > 100 and not held_out & facts  # the held-out problems never appear in the pretraining text
