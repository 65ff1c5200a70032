"""Retrieval (rag.py): segmentation against the `tokenizers` library's counts, embeddings against transformers'
hidden states (from Python and through /v1/embeddings with the openai client), the index file, and chats with
sources (the documents argument against transformers' apply_chat_template)."""
import base64
import json
import os
import shutil

import numpy as np
import openai
import pytest
import torch

import data
import rag
from conftest import randomize
from sample import load
import test_serve_browser as page
from test_serve import start_server, stop_server

browser = page.browser  # test_serve_browser's fixture: a headless Chromium

DOC = """# Foxes

The quick brown fox jumps over the lazy dog. Foxes live in dens! Do they sleep by day? Often they do.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. Mixed 中文 and English text. Hello, world!
Foxes run. Dogs nap. Cats hide. Owls hoot. Bees hum. Ants dig. Fish swim. Cows moo. Hens lay. Rams butt.

```
code = "a block"

that = "stays whole"
```

## 狐狸

敏捷的棕色狐狸跳过了懒狗。二十三加四十五等于六十八！你好，世界？狐狸住在洞里；它们白天睡觉。懒狗不动。
"""
HUGE_LINE = "9" * 20000 + "\n"


def reference_counter(model_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return lambda text: len(reference.encode(text, add_special_tokens=False).ids)


def reference_embeddings(model_dir, rows, pooling="mean"):
    """transformers' LlamaModel, one unpadded row at a time: the last hidden state (after the final norm) pooled."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            hidden = hf(torch.tensor([row])).last_hidden_state[0]  # (T, dim)
            pooled = hidden.mean(0) if pooling == "mean" else hidden[-1]
            out.append(torch.nn.functional.normalize(pooled, dim=0).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    return model, tokenizer, lambda text: len(tokenizer.encode(text))


def test_segments_are_spans_within_the_budget_cut_at_structure(tiny, tiny_model_dir):
    _, _, count = tiny
    reference = reference_counter(tiny_model_dir)
    budget, overlap = 40, 12
    notes = []
    text = DOC + "\n" + HUGE_LINE
    units = rag.split(text, "doc.md", count, budget, overlap, notes=notes)
    covered = np.zeros(len(text), bool)
    for u in units:
        assert u.text == text[u.start:u.end] and reference(u.text) <= budget
        assert "\n#" not in u.text  # a heading only ever starts a chunk: no chunk crosses into the next section
        covered[u.start:u.end] = True
    assert all(covered[i] for i, c in enumerate(text) if not c.isspace())  # nothing lost
    chinese = [u for u in units if u.paragraph == 4]
    assert len(chinese) > 1 and all(u.text.rstrip()[-1] in "。！？；" for u in chinese[:-1])  # Chinese sentence ends
    english = [u for u in units if u.paragraph == 1]
    assert len(english) > 1 and all(u.text.rstrip()[-1] in ".!?" for u in english)
    for a, b in zip(english, english[1:]):  # a cut paragraph: consecutive chunks share at most `overlap` tokens
        assert b.start <= a.end and reference(text[b.start:a.end]) <= overlap
    assert any(b.start < a.end for a, b in zip(english, english[1:]))
    assert any(u.text.startswith("```") and u.text.endswith("```") for u in units)  # the fence is one paragraph
    assert any("no sentence end or space" in n for n in notes)  # the huge line, cut into windows
    assert sum(len(u.text) for u in units if u.text.startswith("9")) >= 20000


def test_pack_overlaps_with_whole_pieces_and_never_repeats_a_chunk():
    pieces = [(0, 10, 10), (10, 20, 10), (20, 30, 8), (30, 40, 25)]  # (start, end, tokens)
    assert rag.pack(pieces, 30, 10) == [(0, 30, 28), (30, 40, 25)]  # 8 + 25 > 30: no room to overlap
    assert rag.pack(pieces[:3] + [(30, 40, 12)], 30, 10) == [(0, 30, 28), (20, 40, 20)]  # the last 8 tokens again
    assert rag.pack(pieces[:3] + [(30, 40, 12)], 30, 0) == [(0, 30, 28), (30, 40, 12)]


def test_semantic_merge_joins_similar_neighbours_of_a_section(tiny):
    _, _, count = tiny
    text = "# A\n\nfox one.\n\nfox two.\n\ndog three.\n\n# B\n\ndog four.\n"
    units = rag.split(text, "t.md", count, 48, 0)
    assert [u.text for u in units] == ["# A", "fox one.", "fox two.", "dog three.", "# B", "dog four."]
    fox, dog = np.eye(2, dtype=np.float32)
    vectors = np.stack([fox, fox, fox, dog, dog, dog])  # cos 1 within the foxes and dogs, 0 between
    chunks, same = rag.merge(text, units, vectors, 0.5, count, 48)
    assert [c.text for c in chunks] == ["# A\n\nfox one.\n\nfox two.", "dog three.", "# B\n\ndog four."]
    assert same == [None, 3, None]
    chunks, _ = rag.merge(text, units, vectors, 0.5, count, count("# A\n\nfox one."))  # the budget wins
    assert [c.text for c in chunks][:2] == ["# A\n\nfox one.", "fox two."]


def test_embeddings_match_transformers(tiny, tiny_model_dir):
    model, tokenizer, _ = tiny
    texts = ["The quick brown fox", "你好，世界！", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. Emoji: 🙂🚀."]
    rows = [tokenizer.encode(t) for t in texts]
    for pooling in rag.POOLINGS:
        ours = rag.embed(model, tokenizer, texts, pooling, batch_tokens=64)  # padded batches of different lengths
        np.testing.assert_allclose(ours, reference_embeddings(tiny_model_dir, rows, pooling), atol=2e-5)


def test_embeddings_route_with_the_openai_client(tiny_model_dir):
    s = start_server(tiny_model_dir)
    try:
        texts = ["The quick brown fox", "你好，世界！"]
        rows = [s.tokenizer.encode(t) for t in texts]
        want = reference_embeddings(tiny_model_dir, rows)
        r = s.client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
        assert [d.index for d in r.data] == [0, 1] and r.model == "tiny"
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), want, atol=2e-5)
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(reference_counter(tiny_model_dir), texts))
        r = s.client.embeddings.create(model="tiny", input=texts[1], encoding_format="float")
        np.testing.assert_allclose(r.data[0].embedding, want[1], atol=2e-5)
        r = s.client.embeddings.create(model="tiny", input=rows[0])  # token ids
        np.testing.assert_allclose(r.data[0].embedding, want[0], atol=2e-5)
        raw = s.client.embeddings.with_raw_response.create(model="tiny", input=rows, encoding_format="base64")
        data = json.loads(raw.text)["data"]
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(data[1]["embedding"]), "<f4"), want[1], atol=2e-5)
        for bad in [dict(input=""), dict(input=[[]]), dict(input="x" * 2000), dict(input="a", dimensions=7),
                    dict(input="a", encoding_format="int8"), dict(input=[s.model.config.vocab_size])]:
            with pytest.raises(openai.BadRequestError):
                s.client.embeddings.create(model="tiny", **bad)
    finally:
        stop_server(s)


def make_docs(path):
    os.makedirs(path / "sub")
    (path / "foxes.md").write_text(DOC, encoding="utf-8")
    (path / "sub" / "dogs.txt").write_text("The lazy dog sleeps. 23 + 45 = 68.\n\n懒狗不动。\n", encoding="utf-8")
    (path / "empty.txt").write_text(" \n", encoding="utf-8")
    (path / "line.txt").write_text(HUGE_LINE[-3000:], encoding="utf-8")


def index_command(docs, model_dir, out, capsys):
    data.main(["index", f"--docs={docs}", f"--model={model_dir}", f"--out={out}", "--chunk_tokens=48",
               "--overlap_tokens=8"])
    return capsys.readouterr().out


def test_index_builds_incrementally_refuses_another_model_and_writes_atomically(tiny, tiny_model_dir, tmp_path,
                                                                                capsys):
    model, tokenizer, _ = tiny
    docs, out = tmp_path / "docs", str(tmp_path / "kb.h5")
    make_docs(docs)
    log = index_command(docs, tiny_model_dir, out, capsys)
    assert "empty.txt: empty, skipped" in log and "cut into windows" in log and "3 embedded, 0 unchanged" in log
    index = rag.Index.load(out)
    reference = reference_counter(tiny_model_dir)
    assert set(index.source) == {"foxes.md", "sub/dogs.txt", "line.txt"} and index.attrs["dim"] == 64
    texts = {"foxes.md": DOC, "line.txt": HUGE_LINE[-3000:]}
    for i in range(len(index)):
        assert reference(index.text[i]) == index.n_tokens[i] <= 48
        if index.source[i] in texts:
            assert texts[index.source[i]][index.start[i]:index.end[i]] == index.text[i]
    rows = [tokenizer.encode(t) for t in index.text]
    np.testing.assert_allclose(index.vectors, reference_embeddings(tiny_model_dir, rows), atol=2e-5)
    query = "the lazy dog sleeps"
    reference_query = reference_embeddings(tiny_model_dir, [tokenizer.encode(query)])[0]
    hits = rag.Retriever(out, model, tokenizer, k=3).search(query)
    expected = np.argsort(-(index.vectors @ reference_query))[:3]
    assert [(h["source"], h["start"]) for h in hits] == [(index.source[i], index.start[i]) for i in expected]

    (docs / "sub" / "dogs.txt").write_text("The lazy dog wakes up.\n", encoding="utf-8")
    os.remove(docs / "line.txt")
    log = index_command(docs, tiny_model_dir, out, capsys)
    assert "1 embedded, 1 unchanged, 1 removed" in log
    again = rag.Index.load(out)
    kept = [i for i, s in enumerate(index.source) if s == "foxes.md"]
    np.testing.assert_array_equal(again.vectors[[i for i, s in enumerate(again.source) if s == "foxes.md"]],
                                  index.vectors[kept])
    assert [t for t, s in zip(again.text, again.source) if s == "sub/dogs.txt"] == ["The lazy dog wakes up."]

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    randomize(load(str(other))[0]).save_pretrained(str(other))
    with pytest.raises(ValueError, match="another model"):
        rag.Retriever(out, *load(str(other)))
    before = open(out, "rb").read()
    (docs / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    with pytest.raises(SystemExit, match="image.txt: a binary file"):
        index_command(docs, str(other), out, capsys)
    assert open(out, "rb").read() == before and os.listdir(tmp_path).count("kb.h5") == 1  # no half-written file
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a context that holds a question and its sources: max_len 512."""
    from model import ModelConfig, Transformer

    path = tmp_path_factory.mktemp("chat_model")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    config = load(tiny_model_dir)[0].config
    torch.manual_seed(0)
    randomize(Transformer(ModelConfig.from_dict({**config.__dict__, "max_len": 512}))).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def kb(chat_model_dir, tmp_path_factory):
    docs = tmp_path_factory.mktemp("kb") / "docs"
    make_docs(docs)
    os.remove(docs / "line.txt")
    out = str(docs.parent / "kb.h5")
    rag.build_index(str(docs), chat_model_dir, out, chunk_tokens=48, overlap_tokens=8, log=lambda *_: None)
    return out


def test_chat_with_sources_through_the_server(chat_model_dir, kb):
    from transformers import AutoTokenizer

    s = start_server(chat_model_dir)
    s.server.rag = rag.Retriever(kb, s.model, s.tokenizer, k=2)
    try:
        question = "Where do foxes live?"
        r = s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                             max_tokens=4, temperature=0)
        sources = r.model_extra["sources"]
        assert [h["text"] for h in sources] == [h["text"] for h in s.server.rag.search(question)]
        system = rag.SYSTEM_PROMPT + "\n\n" + rag.source_text(sources)  # ChatML has no documents: a system message
        hf = AutoTokenizer.from_pretrained(chat_model_dir)
        ids = hf.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert r.usage.prompt_tokens == len(ids)
        chunks = list(s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                       max_tokens=4, temperature=0, stream=True))
        assert chunks[0].model_extra["sources"] == sources and "sources" not in chunks[1].model_extra
        r = s.client.completions.create(model="tiny", prompt=question, max_tokens=2)  # completions: no retrieval
        assert "sources" not in r.model_extra
    finally:
        stop_server(s)


def test_documents_go_through_a_template_that_reads_them(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tokenizer import Tokenizer

    directory = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "chat_template.jinja").write_text(
        "{% if documents %}<|im_start|>system\n{% for d in documents %}# {{ d.title }}\n{{ d.text }}\n{% endfor %}"
        "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    tokenizer = Tokenizer.load(str(directory))
    assert rag.uses_documents(tokenizer) and not rag.uses_documents(Tokenizer.load(tiny_model_dir))
    sources = [{"source": "a.md", "title": "Foxes", "text": "Foxes live in dens.", "start": 0, "end": 19, "score": 1}]
    messages = [{"role": "user", "content": "Where do foxes live?"}]
    ids, _ = rag.WithSources(tokenizer, sources).render_chat(messages, add_generation_prompt=True)
    hf = AutoTokenizer.from_pretrained(str(directory))
    want = hf.apply_chat_template(messages, documents=[{"title": "a.md (Foxes)", "text": "Foxes live in dens."}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == list(want)


def test_sample_chat_with_rag_prints_sources(chat_model_dir, kb, capsys):
    import sample

    argv = [f"--model={chat_model_dir}", "--chat", f"--rag={kb}", "--prompt=Where do foxes live?",
            "--max_new_tokens=3", "--compile=false"]
    sample.main(argv)
    out = capsys.readouterr().out
    assert "sources: [1] " in out and "foxes.md" in out
    with pytest.raises(SystemExit, match="--rag retrieves for a chat or a task file"):
        sample.main(argv[:1] + argv[2:])


def test_info_nce_by_hand():
    equal = torch.nn.functional.normalize(torch.ones(4, 3), dim=-1)
    loss, _ = rag.info_nce(equal, equal, 0.05)
    assert loss.item() == pytest.approx(np.log(4), abs=1e-6)  # every passage alike: log B
    eye = torch.eye(2)
    loss, accuracy = rag.info_nce(eye, eye, 1.0)  # logits [[1, 0], [0, 1]]: -log(e / (e + 1)) = log(1 + 1/e)
    assert loss.item() == pytest.approx(np.log(1 + np.exp(-1)), abs=1e-6) and accuracy == 1.0


def test_embed_strategy_raises_recall(tiny_model_dir, tmp_path):
    """data.py prepare --stage=embed, then the embed strategy's loss on its batches (as train.py calls it) from
    the tiny model: recall@5 on the pairs (made-up places, English and Chinese) rises."""
    from types import SimpleNamespace

    from data import load_dataset, prepare
    from strategies import STRATEGIES

    records = rag.made_up_facts(16, seed=1)
    with open(tmp_path / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    prepare("embed", [str(tmp_path / "pairs.jsonl")], tiny_model_dir, str(tmp_path / "embed.h5"), 0.1, progress=False)
    dataset = load_dataset(str(tmp_path / "embed.h5"), "train", 64, stage="embed")
    model, tokenizer = load(tiny_model_dir)
    batch = dataset.get_batch([0, 1])
    assert batch["lengths"].tolist() == [len(tokenizer.encode(records[i][side])) for side in ("query", "passage")
                                         for i in (0, 1)]  # the val split's records are not among the first two
    before = rag.recall_at_k(model, tokenizer, records, k=5)
    cfg = SimpleNamespace(**STRATEGIES["embed"].settings)
    strategy = STRATEGIES["embed"](cfg, model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    generator = np.random.default_rng(0)
    for step in range(20):
        loss, metrics = strategy.loss(model, dataset.get_batch(generator.permutation(len(dataset))[:16].tolist()), step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = rag.recall_at_k(model, tokenizer, records, k=5)
    assert after > before + 0.2, (before, after)


# each of 2 gloo processes takes its half of the pairs through DDP; rank 0 saves the loss and the averaged gradients
DDP_WORKER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from types import SimpleNamespace
from sample import load
from strategies import STRATEGIES

dist.init_process_group("gloo")
rank, batch = dist.get_rank(), torch.load(sys.argv[2])
model = load(sys.argv[1])[0].train()
strategy = STRATEGIES["embed"](SimpleNamespace(**STRATEGIES["embed"].settings), model, None, rank, 2)
half = batch["ids"].size(0) // 4  # this rank's queries and their passages
rows = list(range(rank * half, (rank + 1) * half)) + list(range(2 * half + rank * half, 2 * half + (rank + 1) * half))
ddp = torch.nn.parallel.DistributedDataParallel(model)
loss, _ = strategy.loss(ddp, {{"ids": batch["ids"][rows], "lengths": batch["lengths"][rows]}}, 0)
loss.backward()
if rank == 0:
    torch.save({{"loss": loss.detach(), "grads": {{n: p.grad for n, p in model.named_parameters()}}}}, sys.argv[3])
dist.destroy_process_group()
"""


def test_embed_in_batch_negatives_cross_processes(tiny_model_dir, tmp_path):
    """--strategy=embed under DDP on 2 processes: each query's negatives are both processes' passages, so the loss
    and the gradients are one process's on the joined batch (without the gather: the mean of two half-batch losses)."""
    import subprocess
    import sys

    from data import load_dataset, prepare
    from strategies import STRATEGIES
    from types import SimpleNamespace

    records = rag.made_up_facts(4, seed=2)
    with open(tmp_path / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    prepare("embed", [str(tmp_path / "pairs.jsonl")], tiny_model_dir, str(tmp_path / "embed.h5"), 0.0, progress=False)
    batch = load_dataset(str(tmp_path / "embed.h5"), "train", 64, stage="embed").get_batch(list(range(8)))
    torch.save(batch, tmp_path / "batch.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "worker.py").write_text(DDP_WORKER.format(root=root))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "worker.py"), tiny_model_dir, str(tmp_path / "batch.pt"),
                        str(tmp_path / "out.pt")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = torch.load(tmp_path / "out.pt")

    model = load(tiny_model_dir)[0].train()
    strategy = STRATEGIES["embed"](SimpleNamespace(**STRATEGIES["embed"].settings), model, None)
    loss, _ = strategy.loss(model, batch, 0)  # the joined batch of 8 pairs in one process
    loss.backward()
    assert two["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    halves = [strategy.loss(model, {"ids": batch["ids"][rows], "lengths": batch["lengths"][rows]}, 0)[0].item()
              for rows in ([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])]
    assert abs(sum(halves) / 2 - loss.item()) > 0.01  # in-batch negatives of one process alone: another loss
    for name, param in model.named_parameters():
        torch.testing.assert_close(two["grads"][name], param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(bool(page.reason), reason=page.reason)
def test_chat_page_shows_the_sources(chat_model_dir, kb, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = start_server(chat_model_dir)
    s.server.rag, s.server.api_key = rag.Retriever(kb, s.model, s.tokenizer, k=2), ""  # the page sends no key
    try:
        browser.get(f"http://127.0.0.1:{s.port}/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        page.say(browser, "Where do foxes live?")
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]"))
        shown = page.texts(browser, ".sources summary")
        want = s.server.rag.search("Where do foxes live?")
        assert shown == ["sources: " + " ".join(f"[{n}] {h['source']}" for n, h in enumerate(want, 1))]
        assert want[0]["text"] in page.texts(browser, ".sources div")[0]
    finally:
        stop_server(s)
