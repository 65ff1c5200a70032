"""Packed rows (train.py --pack=true): the mask and positions against a hand-built reference, a packed row's logits
against each document run alone, the packed SFT loss and gradients against the unpacked ones, the seq documents,
too-long conversations reported, and train.py end to end (resume exact, dpo refused)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import randomize  # noqa: E402
from data import load_dataset, prepare  # noqa: E402
from model import ModelConfig, Transformer, attention_mask, document_positions  # noqa: E402
from strategies import STRATEGIES  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
GQA = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128, max_len=128)
MLA = dict(GQA, attn="mla", kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


def test_mask_and_positions_match_a_hand_built_reference():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5], [0, 1, 0, 0, 1, 1, 1, -1]])
    mask = attention_mask(None, None, 8, cached=False, documents=documents)["attn_mask"]
    assert mask.shape == (3, 1, 8, 8)
    for b, row in enumerate(documents.tolist()):
        run = [sum(row[k] != row[k - 1] for k in range(1, i + 1)) for i in range(8)]  # a run of equal ids
        for i in range(8):
            for j in range(8):
                assert bool(mask[b, 0, i, j]) == (j <= i and run[i] == run[j]), (b, i, j)
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8)),
                                                      [0, 0, 0, 1, 0, 1, 2, 0]]
    assert attention_mask(None, torch.arange(8)[None], 8, cached=False) == {"is_causal": True}  # no documents
    with pytest.raises(ValueError, match="documents"):
        attention_mask(None, torch.arange(8)[None], 8, cached=True, documents=documents)


@pytest.mark.parametrize("fields", [GQA, MLA], ids=["gqa", "mla"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
def test_a_packed_row_gives_each_document_its_own_logits(fields, checkpointing):
    torch.manual_seed(0)
    model = randomize(Transformer(ModelConfig(**fields)))
    model.grad_checkpointing = checkpointing  # applies in train mode only: the mask args reach every layer
    model.train(checkpointing)
    lengths = [7, 12, 1, 5]
    docs = [torch.randint(0, 300, (n,)) for n in lengths]
    row = torch.cat(docs + [torch.zeros(3, dtype=torch.long)])[None]  # (1, 28): 3 padding tokens at the end
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((3,), -1)])[None]
    packed = model(row, documents=documents)[0]  # (28, vocab)
    start = 0
    for doc in docs:
        alone = model(doc[None])[0]
        assert (packed[start:start + len(doc)] - alone).abs().max() < 1e-5
        start += len(doc)
    unpacked = model(row)[0]  # without documents: one sequence, so the later documents see the earlier ones
    assert (unpacked[7:19] - packed[7:19]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="documents"):
        model(row, documents=documents[:, :5])


@pytest.fixture(scope="module")
def sft_file(tiny_model_dir, tmp_path_factory):
    """Conversations of 27 to 206 tokens (two past block_size = 128), in one train split."""
    d = tmp_path_factory.mktemp("packing")
    tokenizer = Tokenizer.load(tiny_model_dir)
    with open(d / "sft.jsonl", "w") as f:
        for i, n in enumerate([3, 40, 1, 17, 60, 8, 25, 2, 11, 33, 5, 90, 14, 6]):
            reply = " ".join(str((i * 7 + k) % 10) for k in range(n))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count {i}"},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    prepare("sft", [str(d / "sft.jsonl")], tiny_model_dir, str(d / "sft.h5"), val_fraction=0.0, progress=False)
    return d / "sft.h5"


def sft_loss_and_grads(model, batches):
    """The SFT strategy's loss over `batches` (the sum of per-token losses over the mean's one count of scored
    tokens) and its gradients, float32."""
    strategy = STRATEGIES["sft"](SimpleNamespace(label_smoothing=0.0), model, None)
    totals = {"tokens": sum(strategy.normalizers(batch)["tokens"] for batch in batches)}
    model.zero_grad()
    loss = sum(strategy.loss(model, batch, 0, totals=totals)[0] for batch in batches)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_packed_sft_loss_and_gradients_equal_unpacked(sft_file, capsys):
    unpacked = load_dataset(str(sft_file), "train", block_size=128, stage="sft")
    packed = load_dataset(str(sft_file), "train", block_size=128, stage="sft", pack=True)
    lengths = np.diff(h5py.File(sft_file)["train/offsets"][:])
    assert (lengths > 129).sum() == 2
    report = capsys.readouterr().err
    assert f"2 of 14 conversations are longer than block_size + 1 = 129 tokens (the longest: {lengths.max()})" in report
    assert len(unpacked) == 14 and 2 <= len(packed) < 14
    packed_batches = [packed.get_batch(list(range(len(packed))))]
    documents = packed_batches[0]["documents"]
    assert documents.shape == (len(packed), 128) and (documents == -1).any()
    # the same scored tokens, each the same target: one conversation's targets never reach into the next
    unpacked_batches = [unpacked.get_batch(list(range(i, min(i + 4, 14)))) for i in range(0, 14, 4)]
    targets = lambda batches: sorted(t for b in batches for t in b["targets"][b["targets"] != -100].tolist())  # noqa
    assert targets(packed_batches) == targets(unpacked_batches)
    torch.manual_seed(0)
    model = randomize(Transformer(ModelConfig(**GQA)))
    loss, grads = sft_loss_and_grads(model, unpacked_batches)
    packed_loss, packed_grads = sft_loss_and_grads(model, packed_batches)
    assert abs(loss - packed_loss) < 1e-6, (loss, packed_loss)
    assert max((grads[k] - packed_grads[k]).abs().max().item() for k in grads) < 1e-6
    share = packed.padding_share(np.arange(len(packed)), 1)
    assert share == pytest.approx((documents == -1).float().mean().item())
    assert unpacked.padding_share(np.arange(12), 4) > share  # each batch padded to its longest conversation


def test_seq_documents_end_at_each_endoftext(tiny_model_dir, tmp_path):
    (tmp_path / "text.txt").write_text("one two three\n\nfour five\n\nsix\n\nseven eight nine ten\n\n" * 10)
    prepare("seq", [str(tmp_path / "text.txt")], tiny_model_dir, str(tmp_path / "seq.h5"), val_fraction=0.0,
            progress=False)
    plain = load_dataset(str(tmp_path / "seq.h5"), "train", block_size=16).get_batch([0, 1])
    dataset = load_dataset(str(tmp_path / "seq.h5"), "train", block_size=16, pack=True)
    batch, eot = dataset.get_batch([0, 1]), dataset.eot_id
    assert torch.equal(batch["input_ids"], plain["input_ids"]) and (batch["input_ids"] == eot).any()
    for row, ids in enumerate(batch["input_ids"].tolist()):
        expected = [sum(t == eot for t in ids[:i]) for i in range(16)]  # a document ends at its <|endoftext|>
        assert batch["documents"][row].tolist() == expected
        assert [t for i, t in enumerate(batch["targets"][row].tolist()) if ids[i] == eot] == [-100] * ids.count(eot)
        kept = [i for i in range(16) if ids[i] != eot]
        assert batch["targets"][row, kept].tolist() == plain["targets"][row, kept].tolist()


def train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


def test_train_sft_packed_end_to_end_and_resume_exact(sft_file, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--strategy=sft", "--pack=true", f"--data={sft_file}", f"--init_from={tiny_model_dir}",
            f"--out_dir={out}", "--batch_size=2", "--block_size=128", "--max_iters=6", "--ckpt_interval=3",
            "--keep_checkpoints=2", "--eval_interval=0", "--log_interval=1", "--warmup_iters=2", "--seed=3"]
    first = train(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "padding: " in first.stdout and "packed, block_size 128" in first.stdout
    assert "conversations are longer than block_size + 1 = 129 tokens" in first.stderr
    losses = lambda: {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}  # noqa
    before = losses()
    assert sorted(before) == list(range(1, 7))
    subprocess.run(["rm", "-r", str(out / "ckpt-6"), str(out / "final")], check=True)
    again = train(*args, "--resume=auto")
    assert again.returncode == 0 and "resumed from" in again.stdout and "at step 3" in again.stdout, again.stderr
    assert losses() == before  # bitwise: the same packed rows in the same order


def test_pack_is_refused_where_rows_hold_one_item(sft_file, tiny_model_dir, tmp_path):
    for strategy in ("dpo", "grpo"):
        p = train(f"--strategy={strategy}", "--pack=true", f"--data={sft_file}", f"--init_from={tiny_model_dir}",
                  f"--out_dir={tmp_path}")
        assert p.returncode != 0 and f"pack=true packs seq and sft rows; --strategy={strategy}" in p.stderr
