"""Lexical and hybrid retrieval (bm25.py, rag.py --retrieval): the terms of English and Chinese text, BM25 scores
against Lucene's formula computed here by hand, reciprocal rank fusion by hand, and the retrieval choice through the
index, its Retriever, recall@k and sample.py --eval --rag."""
import math
import os
import re
from collections import Counter

import numpy as np
import pytest

import bm25
import rag
from sample import load

CORPUS = ["The capital of Zorvimark is Tanlo.", "Zorvimark 的首都是 Tanlo。", "The river Dosen flows through Umira.",
          "Umira 的首都是 Calra。Umira 的人用 Rylo 付钱。", "People in Umira pay with the Rylo, and the Rylo only.",
          "懒狗不动。", "A dog and a dog and a cat."]


def test_terms_are_words_and_han_characters_with_their_pairs():
    assert bm25.terms("The Capital of 北京市 is X-2!") == ["the", "capital", "of", "北", "京", "市", "北京", "京市", "is",
                                                         "x", "2"]
    assert bm25.terms("ＡＢＣ，首都。") == ["abc", "首", "都", "首都"]  # NFKC: full-width letters are ASCII words


def lucene_bm25(query, texts, k1=1.5, b=0.75):
    """BM25 as Lucene scores it, from its formula: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    tf part = tf / (tf + k1 * (1 - b + b * len / mean len)), summed over the query's terms (repeats too)."""
    docs = [Counter(bm25.terms(t)) for t in texts]
    lengths = [sum(d.values()) for d in docs]
    mean_length, n = sum(lengths) / len(docs), len(docs)
    scores = []
    for doc, length in zip(docs, lengths):
        score = 0.0
        for term in bm25.terms(query):
            df = sum(term in d for d in docs)
            if doc[term]:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                score += idf * doc[term] / (doc[term] + k1 * (1 - b + b * length / mean_length))
        scores.append(score)
    return np.array(scores)


@pytest.mark.parametrize("query", ["What is the capital of Zorvimark?", "Umira 的首都是哪里？", "rylo rylo dog",
                                   "a dog", "nothing matches this"])
def test_bm25_scores_are_lucenes_formula(query):
    expected = lucene_bm25(query, CORPUS)
    np.testing.assert_allclose(bm25.BM25(CORPUS).scores(query), expected, rtol=1e-5, atol=1e-6)
    assert query.startswith("nothing") or expected.max() > 0


def test_reciprocal_rank_fusion_by_hand():
    dense = np.array([0.9, 0.1, 0.5, 0.7])  # ranks 1, 4, 3, 2
    lexical = np.array([0.0, 3.0, 1.0, 0.0])  # ranks -, 1, 2, -: rows sharing no term are not retrieved
    np.testing.assert_array_equal(bm25.ranks(dense), [1, 4, 3, 2])
    np.testing.assert_array_equal(bm25.ranks(lexical, lexical > 0), [0, 1, 2, 0])
    fused = bm25.fuse([bm25.ranks(dense), bm25.ranks(lexical, lexical > 0)], rrf_k=60)
    np.testing.assert_allclose(fused, [1 / 61, 1 / 64 + 1 / 61, 1 / 63 + 1 / 62, 1 / 62])
    scores, rows = rag.top_rows("hybrid", 3, dense, lexical)
    assert list(rows) == [1, 2, 0]
    scores, rows = rag.top_rows("bm25", 3, None, lexical)
    assert list(rows) == [1, 2]  # only the rows that share a term with the query
    assert list(rag.top_rows("dense", 2, dense)[1]) == [0, 3]


@pytest.fixture(scope="module")
def fact_index(tiny_model_dir, tmp_path_factory):
    docs = tmp_path_factory.mktemp("facts") / "docs"
    docs.mkdir()
    for n, text in enumerate(CORPUS):
        (docs / f"{n}.txt").write_text(text + "\n", encoding="utf-8")
    out = str(docs.parent / "facts.h5")
    rag.build_index(str(docs), tiny_model_dir, out, chunk_tokens=100, merge_threshold=2, log=lambda *_: None,
                    retrieval="hybrid")
    return out


def test_the_retrieval_choice_through_the_index(fact_index, tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    query = "Umira 的首都是哪里？"
    lexical = rag.Retriever(fact_index, retrieval="bm25")  # BM25 needs no model
    assert lexical.model is None
    index = lexical.index
    expected = lucene_bm25(query, index.text)
    hits = lexical.search(query, k=10)
    assert [h["text"] for h in hits] == [index.text[i] for i in np.argsort(-expected, kind="stable") if expected[i] > 0]
    np.testing.assert_allclose([h["score"] for h in hits], sorted(expected[expected > 0], reverse=True), atol=1e-4)

    hybrid = rag.Retriever(fact_index, model, tokenizer)  # the index's own choice: data.py index --retrieval=hybrid
    assert hybrid.retrieval == "hybrid" and index._bm25_arrays is not None  # the file keeps BM25's scores
    cosines = index.vectors @ rag.embed(model, tokenizer, [query])[0]
    fused = bm25.fuse([bm25.ranks(cosines), bm25.ranks(expected, expected > 0)])
    assert [h["text"] for h in hybrid.search(query, k=3)] == [index.text[i] for i in np.argsort(-fused)[:3]]
    rebuilt = rag.Index(index.attrs, index.vectors, {n: getattr(index, n) for n in index.COLUMNS}, index.files)
    np.testing.assert_array_equal(rebuilt.bm25().scores(query), index.bm25().scores(query))  # as from the texts
    with pytest.raises(ValueError, match="--retrieval='sparse': choose from dense, bm25, hybrid"):
        rag.Retriever(fact_index, model, tokenizer, retrieval="sparse")


def test_recall_by_retrieval(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    records = rag.made_up_facts(6, seed=3)
    passages = [r["passage"] for r in records]
    lexical = bm25.BM25(passages)
    by_hand = np.mean([i in np.argsort(-lexical.scores(r["query"]), kind="stable")[:5] for i, r in enumerate(records)])
    assert rag.recall_at_k(None, None, records, 5, retrieval="bm25") == pytest.approx(by_hand)
    assert by_hand > 0.8  # the made-up names are rare words: BM25 finds their passages


def test_eval_with_rag_renders_the_retrieved_sources(fact_index, tiny_model_dir, tmp_path, capsys):
    import json
    import shutil

    from model import ModelConfig, Transformer
    from sample import main
    from tasks import read_task

    long_context = str(tmp_path / "model")  # the tiny model with room for sources: max_len 512
    shutil.copytree(tiny_model_dir, long_context)
    Transformer(ModelConfig.from_dict({**load(tiny_model_dir)[0].config.__dict__, "max_len": 512})).save_pretrained(
        long_context)

    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"messages": [{"role": "user", "content": "Where do they pay with the Rylo?"}],
                                "answer": "Umira"}) + "\n", encoding="utf-8")
    model, tokenizer = load(tiny_model_dir)
    retriever = rag.Retriever(fact_index, retrieval="bm25", k=1)
    (prompt,), _ = read_task(str(task), tokenizer, retriever=retriever)
    assert tokenizer.decode(prompt).startswith(f"<|im_start|>system\n{rag.SYSTEM_PROMPT}\n\n[1] 4.txt:\n{CORPUS[4]}")
    with pytest.raises(ValueError, match="a 177-token prompt; the model's context is 128"):  # sources that do not fit
        main([f"--model={tiny_model_dir}", f"--eval={task}", f"--rag={fact_index}", "--retrieval=bm25", "--rag_k=1"])
    main([f"--model={long_context}", f"--eval={task}", f"--rag={fact_index}", "--retrieval=bm25", "--rag_k=1",
          "--max_new_tokens=4"])
    assert "accuracy 0.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--rag retrieves for a chat or a task file"):
        main([f"--model={tiny_model_dir}", "--prompt=hi", f"--rag={fact_index}"])


def test_the_demo_knowledge_base_is_unseen_elsewhere(tmp_path):
    """pipeline.py's knowledge base: each question's passage is in kb/ once, no place asked about appears in the SFT
    chats, and each chat's sources (a system message, as sample.py --rag renders them) hold its reply first; a
    place's numbers differ from chat to chat (only the sources answer)."""
    import json

    from pipeline import KB_K, make_kb

    paths = make_kb(str(tmp_path), n_chats=200)
    kb = {name: (tmp_path / "kb" / name).read_text(encoding="utf-8") for name in sorted(os.listdir(tmp_path / "kb"))}
    questions = [json.loads(line) for line in open(paths["kb_eval.jsonl"], encoding="utf-8")]
    chats = [json.loads(line)["messages"] for line in open(paths["kb_sft.jsonl"], encoding="utf-8")]
    assert len(questions) == 10 * len(kb) and len(chats) == 200
    assert all(sum(r["passage"] in text for text in kb.values()) == 1 and r["answer"] in r["passage"]
               for r in questions)
    places = {r["passage"].split()[0] for r in questions}  # a passage is "place relation number ..."
    chat_text = json.dumps(chats, ensure_ascii=False)
    assert len(places) == len(kb) and not [p for p in places if re.search(rf"\b{p}\b", chat_text)]
    numbers = {}  # (place, relation) -> the numbers the chats' sources give it
    for system, user, reply in chats:
        assert system["content"].startswith(rag.SYSTEM_PROMPT) and system["content"].count(".md:\n") == KB_K
        assert system["content"].split(".md:\n")[1].startswith(reply["content"]) and user["role"] == "user"
        for passage in re.findall(r"\.md:\n(.*)", system["content"]):
            place, relation, number = passage.split()[:3]
            numbers.setdefault((place, relation), set()).add(number)
    assert max(len(found) for found in numbers.values()) > 1
