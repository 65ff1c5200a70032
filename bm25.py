"""
Lexical retrieval for rag.py: BM25 (the bm25s library, Lucene's formula) over terms that work for English and
Chinese alike, and reciprocal rank fusion of several rankings (--retrieval=hybrid). Imported only when a search asks
for bm25 or hybrid.

Terms: the text NFKC-normalized and lowercased; a run of Han characters gives each character and each pair of
neighbours (Chinese has no spaces: 首都是 -> 首, 都, 是, 首都, 都是), any other run of letters or digits one word.
Scores (Lucene's BM25, k1 = 1.5, b = 0.75), for a query's terms t (a term twice counts twice) and a chunk d:
    sum_t ln(1 + (N - df_t + 0.5) / (df_t + 0.5)) * tf_td / (tf_td + k1 * (1 - b + b * len_d / mean len))
with N chunks, df_t the chunks holding t, tf_td its count in d and len_d d's number of terms.
An index made with --retrieval=bm25 or hybrid keeps the score matrix (arrays, from_arrays); another one has it
built from its chunks' texts when a search first asks (10,000 chunks of 150 words: 14 s, against 1.8 s to read it).
"""
import unicodedata

import numpy as np
import regex

TERM = regex.compile(r"\p{Han}+|[\p{L}\p{N}]+")
HAN = regex.compile(r"\p{Han}")
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009, and what Elasticsearch and Vespa use)


def terms(text):
    """The BM25 terms of a text: lowercased words, and each Han character and pair of neighbouring ones."""
    found = []
    for run in TERM.findall(unicodedata.normalize("NFKC", text).lower()):
        if HAN.match(run):
            found += list(run) + [run[i:i + 2] for i in range(len(run) - 1)]
        else:
            found.append(run)
    return found


class BM25:
    """BM25 scores of a query against every one of a list of texts (bm25s, method "lucene", k1 = 1.5, b = 0.75)."""

    def __init__(self, texts):
        import bm25s  # lexical retrieval's library: imported when a search asks for it

        self.n = len(texts)
        self.retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        if texts:
            self.retriever.index([terms(t) for t in texts], show_progress=False)

    def arrays(self):
        """What an index file keeps: the (term, chunk) scores in compressed sparse columns (a column a term) and the
        terms in column order."""
        scores, vocab = self.retriever.scores, self.retriever.vocab_dict
        return {"bm25_data": scores["data"], "bm25_indices": scores["indices"], "bm25_indptr": scores["indptr"],
                "bm25_terms": sorted(vocab, key=vocab.get)}

    @classmethod
    def from_arrays(cls, arrays, n):
        """The BM25 of n texts from arrays() as an index file kept them."""
        self = cls([])
        self.n, names = n, arrays["bm25_terms"]
        self.retriever.scores = {"data": arrays["bm25_data"], "indices": arrays["bm25_indices"],
                                 "indptr": arrays["bm25_indptr"], "num_docs": n}
        self.retriever.vocab_dict = {term: i for i, term in enumerate(names)}
        self.retriever.unique_token_ids_set, self.retriever.nonoccurrence_array = set(range(len(names))), None
        return self

    def scores(self, query):
        """(n,) float32: each text's score; 0 where no term of the query is in it."""
        known = [t for t in terms(query) if t in self.retriever.vocab_dict and t != ""]
        if not known:
            return np.zeros(self.n, np.float32)
        return np.asarray(self.retriever.get_scores(known), np.float32)


def ranks(scores, keep=None):
    """1-based rank of each row by descending score (ties: the earlier row first); rows not kept get rank 0."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return rank if keep is None else np.where(keep, rank, 0)


def fuse(rankings, rrf_k=RRF_K):
    """Reciprocal rank fusion: each row's sum over the rankings of 1 / (rrf_k + its rank), a ranking where the row
    has rank 0 (not retrieved by it: a chunk sharing no term with the query, for BM25) adding nothing. RRF reads
    only ranks, so a cosine and a BM25 score, on scales of their own, need no weighting against each other."""
    fused = np.zeros(len(rankings[0]), np.float64)
    for rank in rankings:
        fused += np.where(rank > 0, 1.0 / (rrf_k + np.maximum(rank, 1)), 0.0)
    return fused
