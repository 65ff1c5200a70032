"""
Retrieval: documents -> chunks (segmentation) -> vectors (pooled hidden states of a model) -> an index file (HDF5)
-> the chunks nearest a question, handed to the chat template (sample.py --rag, serve.py --rag_index).

    python data.py index --docs=notes/ --model=out/embed/final --out=notes.h5     # again later: only changed files
    python rag.py search --index=notes.h5 --query="Where is the spring festival held?" --k=5

Segmentation, structure first: Markdown headings start sections (a chunk never crosses one), blank lines end
paragraphs (a fenced code block is one), and a paragraph over the budget (--chunk_tokens) is cut at sentence ends
(. ! ? and the Chinese 。！？；), a sentence over it at words (a Han character is a word), a word over it into
windows; the pieces of one cut paragraph are packed back up to the budget, consecutive chunks sharing up to
--overlap_tokens. Then adjacent paragraphs of a section merge while the merged chunk fits the budget and their
embeddings' cosine is at least --merge_threshold (a heading always joins what follows it). Every chunk keeps its
file and its character span: its text is exactly text[start:end] of the file.

Embeddings: the model's last hidden states after the final norm, pooled (mean over the tokens, or the last token),
L2-normalized: a cosine is a dot product, and the exact top-k over the index is one matmul.

Retrieval (--retrieval): dense (those cosines), bm25 (bm25.py: word matches, no model needed) or hybrid (both rankings
fused by reciprocal rank); an index holds its default, and a query may name another.

## Index layout (HDF5, format_version 1)
Root attributes: `kind` = "astrai-rag-index", `format_version`, `model` (the MODELDIR it was made with),
`model_identity` (sha256 of the tokenizer, the pooling and a sample of every weight: see model_identity),
`pooling`, `chunk_tokens`, `overlap_tokens`, `merge_threshold`, `dim`, `retrieval` (a query's default: dense,
bm25 or hybrid). Datasets, one row a chunk: `vectors` (float32, n x dim), `text`, `source` (the file's path under
--docs), `title` (its section's heading; utf-8 strings), `start`, `end` (character offsets into the file),
`n_tokens`. One row a file: `files` and `file_sha256`, which the next build compares to re-embed only what changed.
With retrieval bm25 or hybrid, BM25's scores (bm25.py: `bm25_data`, `bm25_indices`, `bm25_indptr`, `bm25_terms`),
computed again over every chunk at each build. A dense query with another model is refused.
"""
import hashlib
import os
import sys
import threading
import time

import numpy as np
import regex
import torch
import torch.nn.functional as F

from data import _Dataset

FORMAT_VERSION = 1
KIND = "astrai-rag-index"
POOLINGS = ("mean", "last")
RETRIEVALS = ("dense", "bm25", "hybrid")  # cosine of pooled embeddings, BM25 (bm25.py), or both by rank fusion
EXTENSIONS = (".md", ".markdown", ".txt")
MARKDOWN = (".md", ".markdown")

# -----------------------------------------------------------------------------
# segmentation: structure first, within a token budget

HEADING = regex.compile(r" {0,3}#{1,6}(?:[ \t]|$)")
FENCE = regex.compile(r" {0,3}(?:```|~~~)")
SENTENCE_END = regex.compile(r"(?:[。！？；!?]+|…+|\.(?=\s|$))[”’」』）)\]\"']*\s*|\n+")
WORD = regex.compile(r"\p{Han}\s*|[^\s\p{Han}]+\s*|\s+")
forward_lock = threading.Lock()  # one embedding forward at a time: a server's handler threads share the model


class Chunk:
    """A span of one file: text == file_text[start:end]; title: its section's heading ("" before the first)."""
    __slots__ = ("source", "start", "end", "text", "n_tokens", "title", "section", "paragraph", "heading")

    def __init__(self, source, start, end, text, n_tokens, title="", section=0, paragraph=0, heading=False):
        self.source, self.start, self.end, self.text, self.n_tokens = source, start, end, text, n_tokens
        self.title, self.section, self.paragraph, self.heading = title, section, paragraph, heading

    def __repr__(self):
        return f"Chunk({self.source}:{self.start}-{self.end}, {self.n_tokens} tokens, {self.text[:30]!r})"


def paragraphs(text, markdown):
    """(start, end, section, heading line or None) of each paragraph; blank lines separate paragraphs; in Markdown
    a heading line is a paragraph of its own that starts a section, and a fenced code block is one paragraph."""
    found, section, start, fenced, pos = [], 0, None, False, 0
    for line in text.splitlines(keepends=True):
        bare = line.strip()
        if markdown and FENCE.match(line):
            fenced = not fenced
        if markdown and not fenced and HEADING.match(line):
            if start is not None:
                found.append((start, pos, section, None))
            section += 1
            found.append((pos, pos + len(line.rstrip()), section, bare.lstrip("#").strip()))
            start = None
        elif not bare and not fenced:
            if start is not None:
                found.append((start, pos, section, None))
            start = None
        elif start is None:
            start = pos + len(line) - len(line.lstrip())
        pos += len(line)
    if start is not None:
        found.append((start, pos, section, None))
    return [(s, len(text[:e].rstrip()) if e > s else e, sec, h) for s, e, sec, h in found if text[s:e].strip()]


def _children(text, start, end, level, budget):
    """The pieces of text[start:end] one level down: sentences, then words, then windows of budget // 4 characters
    (a character is at most 4 bytes, so at most 4 tokens of a byte-level BPE)."""
    if level < 2:
        pattern = SENTENCE_END if level == 0 else WORD
        cuts = [m.end() for m in pattern.finditer(text, start, end) if m.end() > start]
        bounds = sorted(set([start] + cuts + [end]))
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]
    step = max(1, budget // 4)
    return [(a, min(a + step, end)) for a in range(start, end, step)]


def pack(pieces, budget, overlap):
    """Consecutive (start, end, n_tokens) pieces, each within the budget, packed greedily into spans of at most
    `budget` tokens (counted as the pieces' sum); each span after the first repeats the last pieces of the one
    before, up to `overlap` tokens, leaving room for the next new piece."""
    spans, i = [], 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and total + pieces[j][2] <= budget:
            total, j = total + pieces[j][2], j + 1
        spans.append((pieces[i][0], pieces[j - 1][1], total))
        if j == len(pieces):
            break
        k, back, room = j, 0, min(overlap, budget - pieces[j][2])
        while k - 1 > i and back + pieces[k - 1][2] <= room:
            back, k = back + pieces[k - 1][2], k - 1
        i = k
    return spans


def fit(text, start, end, count, budget, overlap, level=0, notes=None, where=""):
    """text[start:end] as (start, end, n_tokens) spans within the budget, cut at the finest structure needed."""
    n = count(text[start:end]) if end - start <= 32 * budget else budget + 1  # skip counting a huge line whole
    if n <= budget:
        return [(start, end, n)]
    if level == 2 and notes is not None:
        notes.append(f"{where}: characters {start}..{end} hold no sentence end or space within {budget} tokens; "
                     "cut into windows")
    pieces = [p for a, b in _children(text, start, end, level, budget)
              for p in fit(text, a, b, count, budget, overlap, level + 1, notes if level < 2 else None, where)]
    return pack(pieces, budget, overlap)


def split(text, source, count, chunk_tokens=256, overlap_tokens=32, markdown=None, notes=None):
    """The structural pieces of a file's text, each a Chunk within chunk_tokens (count: text -> its token count).
    markdown: None = by the source's extension."""
    if not 0 <= overlap_tokens <= chunk_tokens // 2:
        raise ValueError(f"overlap_tokens={overlap_tokens} must be from 0 to chunk_tokens // 2 = {chunk_tokens // 2}")
    markdown = source.lower().endswith(MARKDOWN) if markdown is None else markdown
    units, title = [], ""
    for p, (start, end, section, heading) in enumerate(paragraphs(text, markdown)):
        title = heading if heading is not None else title
        for a, b, n in fit(text, start, end, count, chunk_tokens, overlap_tokens, notes=notes, where=source):
            units.append(Chunk(source, a, b, text[a:b], n, title, section, p, heading is not None))
    return units


def merge(text, units, vectors, threshold, count, chunk_tokens):
    """Adjacent paragraphs of one section joined while the result fits chunk_tokens and the embeddings (rows of
    `vectors`, L2-normalized; None: always) of the two pieces that meet have a cosine >= threshold; a heading always
    joins what follows it. Returns the chunks and, for each, the unit it is when it is one unmerged (else None)."""
    chunks, same = [], []
    for i, unit in enumerate(units):
        prev = chunks[-1] if chunks else None
        if prev is not None and prev.section == unit.section and prev.paragraph != unit.paragraph:
            similar = vectors is None or float(vectors[i - 1] @ vectors[i]) >= threshold
            n = count(text[prev.start:unit.end]) if prev.heading or similar else chunk_tokens + 1
            if n <= chunk_tokens:
                chunks[-1] = Chunk(prev.source, prev.start, unit.end, text[prev.start:unit.end], n, unit.title,
                                   unit.section, unit.paragraph, False)
                same[-1] = None
                continue
        chunks.append(unit)
        same.append(i)
    return chunks, same


# -----------------------------------------------------------------------------
# embeddings: pooled hidden states


class Pooled:
    """A model output (model(ids, Pooled(lengths))): (B, dim) float32, L2-normalized, of the final-normed last
    hidden states of right-padded rows of `lengths` tokens: their mean, or the last token's state."""

    def __init__(self, lengths, pooling="mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose from {', '.join(POOLINGS)}")
        self.lengths, self.pooling = lengths, pooling

    def __call__(self, model, hidden, index):
        hidden, lengths = model.norm(hidden).float(), self.lengths.to(hidden.device)  # (B, T, dim), (B,)
        if self.pooling == "mean":
            valid = torch.arange(hidden.size(1), device=hidden.device)[None] < lengths[:, None]  # (B, T)
            pooled = (hidden * valid[..., None]).sum(1) / lengths[:, None]
        else:
            pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
        return torch.nn.functional.normalize(pooled, dim=-1)


def info_nce(queries, passages, temperature):
    """InfoNCE with in-batch negatives: (B, dim) L2-normalized queries and their passages (row i's passage is
    passages[i], every other row's a negative) -> (mean loss, share of queries whose own passage scores highest).
    All cosines equal: the loss is log B (log 4 = 1.386 for 4 pairs)."""
    logits = queries @ passages.T / temperature  # (B, B)
    labels = torch.arange(len(queries), device=queries.device)
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean().item()


class PairDataset(_Dataset):
    """data.py's embed stage: batches of queries and their passages as one right-padded (2B, T) `ids` (queries,
    then passages) with their `lengths` (2B,), each cut to block_size tokens."""

    def get_batch(self, indices):
        rows = [self._record(i, f"{side}_offsets", f"{side}_tokens")[0][:self.block_size].astype(np.int64)
                for side in ("query", "passage") for i in indices]
        return {"ids": self._pad(rows, self.pad_id, max(1, max(len(r) for r in rows))),
                "lengths": torch.tensor([max(1, len(r)) for r in rows])}


@torch.no_grad()
def embed_ids(model, rows, pooling="mean", batch_tokens=8192):
    """Token id lists -> (n, dim) float32 numpy, L2-normalized: the final-normed last hidden states pooled over
    each row's tokens (mean) or at its last token (last). Rows are batched by length, right-padded (causal
    attention: the padding never reaches a row's own tokens)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: choose from {', '.join(POOLINGS)}")
    for i, row in enumerate(rows):
        if not 0 < len(row) <= model.config.max_len:
            raise ValueError(f"input {i} has {len(row)} tokens; an embedding takes 1 to {model.config.max_len}")
    device = model.embed_tokens.weight.device
    out = np.zeros((len(rows), model.config.dim), dtype=np.float32)
    order, first = sorted(range(len(rows)), key=lambda i: len(rows[i])), 0
    while first < len(order):
        last = first + 1  # rows sorted by length: a batch's longest is its last
        while last < len(order) and (last + 1 - first) * len(rows[order[last]]) <= batch_tokens:
            last += 1
        take, first = order[first:last], last
        width = max(len(rows[i]) for i in take)
        ids = torch.zeros(len(take), width, dtype=torch.long)
        for b, i in enumerate(take):
            ids[b, :len(rows[i])] = torch.tensor(rows[i])
        out[take] = model(ids.to(device), Pooled(torch.tensor([len(rows[i]) for i in take]), pooling)).cpu().numpy()
    return out


def embed(model, tokenizer, texts, pooling="mean", batch_tokens=8192):
    """Texts -> (n, dim) float32 numpy, L2-normalized (embed_ids over each text's tokens, no special tokens)."""
    return embed_ids(model, [tokenizer.encode(t) for t in texts], pooling, batch_tokens)


def model_identity(model, tokenizer, pooling):
    """sha256 of what makes the vectors: the tokenizer, the pooling, every tensor's name and shape and its first 256
    values rounded to bfloat16 (so a float32 and a bfloat16 load of one model agree; a merged adapter or any
    training changes it)."""
    h = hashlib.sha256(f"{tokenizer.hash} {pooling}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype.is_floating_point}".encode())
        if tensor.dtype.is_floating_point:
            sample = tensor.detach().flatten()[:256].to("cpu", torch.bfloat16).view(torch.int16)
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# the index file


def read_document(path, where):
    """A file's text; None for an empty one; ValueError for one that is binary or not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data:
        raise ValueError(f"{where}: a binary file (it holds NUL bytes); index text files only, or move it out of "
                         "--docs")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or move it out of "
                         "--docs") from None
    return text if text.strip() else None, hashlib.sha256(data).hexdigest()


def document_paths(docs, extensions=EXTENSIONS):
    if not os.path.isdir(docs):
        raise FileNotFoundError(f"--docs={docs}: not a directory")
    paths = sorted(os.path.relpath(os.path.join(root, name), docs) for root, _, names in os.walk(docs)
                   for name in names if name.lower().endswith(extensions))
    if not paths:
        raise ValueError(f"--docs={docs}: no files ending in {', '.join(extensions)}")
    return paths


class Index:
    """An index file in memory: attrs (dict), vectors (n, dim) float32, and per chunk text, source, title, start,
    end, n_tokens; files and file_sha256."""
    COLUMNS = ("text", "source", "title", "start", "end", "n_tokens")

    def __init__(self, attrs, vectors, columns, files, bm25_arrays=None):
        self.attrs, self.vectors, self.files = attrs, vectors, files  # files: path -> sha256
        for name in self.COLUMNS:
            setattr(self, name, columns[name])
        self.matrix, self._bm25, self._bm25_arrays = torch.from_numpy(vectors), None, bm25_arrays

    def bm25(self):
        """BM25 over the chunks' texts (bm25.py): as the file keeps it, else built when first asked for."""
        if self._bm25 is None:
            from bm25 import BM25

            arrays = self._bm25_arrays
            self._bm25 = BM25(self.text) if arrays is None else BM25.from_arrays(arrays, len(self))
        return self._bm25

    def __len__(self):
        return len(self.text)

    @classmethod
    def load(cls, path):
        import h5py

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such index file (make one: python data.py index --docs=DIR "
                                    "--model=MODELDIR --out=FILE.h5)")
        with h5py.File(path, "r") as f:
            attrs = {k: v.item() if hasattr(v, "item") else v for k, v in f.attrs.items()}
            if attrs.get("kind") != KIND or attrs.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: not a version {FORMAT_VERSION} {KIND} file (kind={attrs.get('kind')!r}, "
                                 f"format_version={attrs.get('format_version')!r})")
            strings = lambda name: [s.decode() for s in f[name][:]]  # noqa: E731
            columns = {name: strings(name) if f[name].dtype.kind == "O" else f[name][:] for name in cls.COLUMNS}
            files = dict(zip(strings("files"), strings("file_sha256")))
            bm25_arrays = None
            if "bm25_terms" in f:  # made with --retrieval=bm25 or hybrid
                bm25_arrays = {name: f[name][:] for name in ("bm25_data", "bm25_indices", "bm25_indptr")}
                bm25_arrays["bm25_terms"] = strings("bm25_terms")
            return cls(attrs, f["vectors"][:].astype(np.float32), columns, files, bm25_arrays)

    def check_model(self, identity, model_name, where):
        if identity != self.attrs["model_identity"]:
            raise ValueError(f"{where}: this index was made with the model {self.attrs['model']} "
                             f"(identity {self.attrs['model_identity'][:12]}, pooling {self.attrs['pooling']}); "
                             f"{model_name} (identity {identity[:12]}) is another model, whose vectors it cannot be "
                             "compared with: query with that model, or rebuild the index with this one")


def check_retrieval(retrieval, where="--retrieval"):
    if retrieval not in RETRIEVALS:
        raise ValueError(f"{where}={retrieval!r}: choose from {', '.join(RETRIEVALS)}")
    return retrieval


def top_rows(retrieval, k, cosines=None, bm25_scores=None):
    """One query's (scores, rows), best first, from its (n,) cosines (dense), its (n,) BM25 scores (bm25: only
    chunks that share a term with it, so maybe fewer than k) or both (hybrid: reciprocal rank fusion, bm25.fuse)."""
    if retrieval == "dense":
        scores = np.asarray(cosines, np.float64)
    elif retrieval == "bm25":
        scores = np.where(bm25_scores > 0, bm25_scores, -np.inf)
    else:
        from bm25 import fuse, ranks

        scores = fuse([ranks(cosines), ranks(bm25_scores, bm25_scores > 0)])
    rows = np.argsort(-scores, kind="stable")[:k]
    rows = rows[np.isfinite(scores[rows])]
    return scores[rows], rows


def write_index(out, attrs, chunks, vectors, files):
    """Write to out + ".tmp" and rename it over out: a reader sees the old file or the new one, never half."""
    import h5py

    tmp = f"{out}.tmp{os.getpid()}"
    strings = h5py.string_dtype()
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"kind": KIND, "format_version": FORMAT_VERSION, **attrs})
            f.create_dataset("vectors", data=np.asarray(vectors, np.float32).reshape(len(chunks), attrs["dim"]))
            for name in ("text", "source", "title"):
                f.create_dataset(name, data=[getattr(c, name) for c in chunks], dtype=strings)
            for name in ("start", "end", "n_tokens"):
                f.create_dataset(name, data=np.array([getattr(c, name) for c in chunks], dtype=np.int64))
            f.create_dataset("files", data=list(files), dtype=strings)
            f.create_dataset("file_sha256", data=list(files.values()), dtype=strings)
            if attrs.get("retrieval", "dense") != "dense":  # BM25's scores, as a query reads them (bm25.py)
                from bm25 import BM25

                for name, values in BM25([c.text for c in chunks]).arrays().items():
                    f.create_dataset(name, data=values, dtype=strings if name == "bm25_terms" else None)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def segment_file(text, source, model, tokenizer, settings, notes):
    """A file's chunks and their vectors: split, embed the pieces, merge similar neighbours, embed what merged."""
    count = lambda s: len(tokenizer.encode(s))  # noqa: E731
    units = split(text, source, count, settings["chunk_tokens"], settings["overlap_tokens"], notes=notes)
    unit_vectors = embed(model, tokenizer, [u.text for u in units], settings["pooling"])
    chunks, same = merge(text, units, unit_vectors, settings["merge_threshold"], count, settings["chunk_tokens"])
    merged = [i for i, s in enumerate(same) if s is None]
    vectors = np.zeros((len(chunks), unit_vectors.shape[1]), np.float32)
    vectors[[i for i, s in enumerate(same) if s is not None]] = unit_vectors[[s for s in same if s is not None]]
    if merged:
        vectors[merged] = embed(model, tokenizer, [chunks[i].text for i in merged], settings["pooling"])
    return chunks, vectors


def build_index(docs, model_dir, out, chunk_tokens=256, overlap_tokens=32, merge_threshold=0.5, pooling="mean",
                device="cpu", dtype=None, log=print, retrieval="dense"):
    """Index the text files under docs with the model at model_dir into out; files whose sha256 the existing index
    at out holds, made with the same model and settings, keep their chunks and vectors. retrieval: the queries'
    default. Returns the Index."""
    from sample import load

    t0 = time.time()
    check_retrieval(retrieval)
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling={pooling}: choose from {', '.join(POOLINGS)}")
    paths = document_paths(docs)
    texts, notes = {}, []
    for path in paths:
        text, digest = read_document(os.path.join(docs, path), os.path.join(docs, path))
        if text is None:
            notes.append(f"{os.path.join(docs, path)}: empty, skipped")
        else:
            texts[path] = (text, digest)
    if not texts:
        raise ValueError(f"--docs={docs}: every file is empty; nothing to index")
    model, tokenizer = load(model_dir, device, dtype)
    if chunk_tokens > model.config.max_len:
        raise ValueError(f"--chunk_tokens={chunk_tokens} is more than the model's max_len={model.config.max_len}")
    settings = dict(chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens, merge_threshold=merge_threshold,
                    pooling=pooling)
    attrs = dict(model=os.path.abspath(model_dir), model_identity=model_identity(model, tokenizer, pooling),
                 dim=model.config.dim, **settings)
    old = Index.load(out) if os.path.exists(out) else None
    if old is not None and any(old.attrs.get(k) != v for k, v in attrs.items() if k != "model"):
        log(f"{out}: made with another model or other settings; rebuilding every file")
        old = None
    chunks, vectors, kept, old_rows = [], [], 0, {}
    for i, source in enumerate(old.source if old is not None else []):
        old_rows.setdefault(source, []).append(i)
    for path, (text, digest) in texts.items():
        if old is not None and old.files.get(path) == digest:
            rows = old_rows.get(path, [])
            chunks += [Chunk(path, int(old.start[i]), int(old.end[i]), old.text[i], int(old.n_tokens[i]),
                             old.title[i]) for i in rows]
            vectors.append(old.vectors[rows])
            kept += 1
            continue
        file_chunks, file_vectors = segment_file(text, path, model, tokenizer, settings, notes)
        chunks += file_chunks
        vectors.append(file_vectors)
    for note in notes:
        log(note)
    write_index(out, attrs | {"retrieval": retrieval}, chunks, np.concatenate(vectors),
                {p: d for p, (_, d) in texts.items()})
    removed = len(set(old.files) - set(texts)) if old is not None else 0
    log(f"wrote {out}: {len(chunks)} chunks from {len(texts)} files ({len(texts) - kept} embedded, {kept} unchanged, "
        f"{removed} removed) in {time.time() - t0:.1f}s")
    return Index.load(out)


# -----------------------------------------------------------------------------
# retrieval, and the chunks handed to a chat

SYSTEM_PROMPT = "Answer from these sources where they hold the answer, and say which ones you used."


class Retriever:
    """An index and the model that made it: search(question) -> the k best chunks as source dicts (their "score":
    a cosine, a BM25 score or a fused one). model and tokenizer: the one to embed queries with (refused unless it is
    the index's); None loads the MODELDIR the index names. retrieval: dense, bm25 (no model needed) or hybrid;
    "" = the index's own (data.py index --retrieval)."""

    def __init__(self, path, model=None, tokenizer=None, k=4, device="cpu", dtype=None, retrieval=""):
        from sample import load

        self.index, self.k = Index.load(path), k
        self.retrieval = check_retrieval(retrieval or self.index.attrs.get("retrieval", "dense"))
        name = "the given model"
        if model is None and self.retrieval != "bm25":
            name = self.index.attrs["model"]
            model, tokenizer = load(name, device, dtype)
        if self.retrieval != "bm25":
            self.index.check_model(model_identity(model, tokenizer, self.index.attrs["pooling"]), name, path)
        self.model, self.tokenizer = model, tokenizer

    def search(self, question, k=None):
        cosines, bm25_scores = None, None
        if self.retrieval != "bm25":
            with forward_lock:
                ids = self.tokenizer.encode(question)[-self.model.config.max_len:]
                query = embed_ids(self.model, [ids or [0]], self.index.attrs["pooling"])
            cosines = (torch.from_numpy(query) @ self.index.matrix.T)[0].numpy()  # (n,)
        if self.retrieval != "dense":
            bm25_scores = self.index.bm25().scores(question)
        scores, rows = top_rows(self.retrieval, k or self.k, cosines, bm25_scores)
        ix = self.index
        return [{"source": ix.source[i], "title": ix.title[i], "start": int(ix.start[i]), "end": int(ix.end[i]),
                 "score": round(float(s), 4), "text": ix.text[i]} for s, i in zip(scores, rows)]

    @classmethod
    def sharing(cls, path, model, tokenizer, k=4, device="cpu", retrieval=""):
        """A server's retriever: the served model where the index was made with it, else the index's own."""
        index = Index.load(path)
        same = model_identity(model, tokenizer, index.attrs["pooling"]) == index.attrs["model_identity"]
        return cls(path, model if same else None, tokenizer if same else None, k, device, retrieval=retrieval)

    def augment(self, tokenizer, messages):
        """(tokenizer, sources) for a conversation: the chunks retrieved for its last user turn and a tokenizer that
        hands them to the chat template (WithSources); (tokenizer, None) when it has no user turn."""
        question = last_user_text(messages) if isinstance(messages, list) else None
        if not question:
            return tokenizer, None
        sources = self.search(question)
        return WithSources(tokenizer, sources), sources


def uses_documents(tokenizer):
    """Whether the chat template reads a `documents` variable (then sources go there, else in a system message)."""
    import jinja2.meta

    from tokenizer import _compiled_template

    template = tokenizer.chat_template
    return bool(template) and "documents" in jinja2.meta.find_undeclared_variables(
        _compiled_template(template).environment.parse(template))


def source_text(sources):
    return "\n\n".join(f"[{n}] {s['source']}" + (f" ({s['title']})" if s["title"] else "") + f":\n{s['text']}"
                       for n, s in enumerate(sources, 1))


def with_source_message(messages, sources):
    """The conversation with the sources as a system message (put before the conversation's own system message's
    text): what a template without `documents` gets (WithSources), and what pipeline.py's retrieval chats train on."""
    system = f"{SYSTEM_PROMPT}\n\n{source_text(sources)}"
    if messages and messages[0].get("role") == "system":
        return [{"role": "system", "content": f"{system}\n\n{messages[0]['content']}"}] + list(messages[1:])
    return [{"role": "system", "content": system}] + list(messages)


class WithSources:
    """A tokenizer whose render_chat hands `sources` to the chat template: as its `documents` argument
    ({"title", "text"} each) when the template reads one, else as a system message (the conversation's own system
    message, if it has one, follows the sources). Everything else is the tokenizer's."""

    def __init__(self, tokenizer, sources):
        self.tokenizer, self.sources = tokenizer, sources

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def render_chat(self, messages, add_generation_prompt=False, **kwargs):
        if uses_documents(self.tokenizer):
            documents = [{"title": s["source"] + (f" ({s['title']})" if s["title"] else ""), "text": s["text"]}
                         for s in self.sources]
            return self.tokenizer.render_chat(messages, add_generation_prompt, documents=documents, **kwargs)
        return self.tokenizer.render_chat(with_source_message(messages, self.sources), add_generation_prompt, **kwargs)


def last_user_text(messages):
    """The text of the last user message (a string, or the text blocks of a list), or None."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
            return content if isinstance(content, str) else None
    return None


# -----------------------------------------------------------------------------
# made-up facts (no pretraining text holds them) and recall@k over them

SYLLABLES = ["zor", "vi", "quel", "mark", "tan", "lo", "bri", "sen", "dra", "ku", "mi", "ra", "thel", "an", "gos",
             "pe", "ry", "nal", "vor", "ish", "cal", "do", "fen", "u"]
FACTS = [  # (English question, English passage, Chinese question, Chinese passage); {e} the entity, {v} its value
    ("What is the capital of {e}?", "The capital of {e} is {v}.", "{e} 的首都是哪里？", "{e} 的首都是 {v}。"),
    ("Who founded {e}?", "{e} was founded by {v}.", "谁建立了 {e}？", "{e} 由 {v} 建立。"),
    ("Which river flows through {e}?", "The river {v} flows through {e}.", "哪条河流经 {e}？", "{v} 河流经 {e}。"),
    ("What is the festival of {e} called?", "The great festival of {e} is called {v}.", "{e} 的节日叫什么？",
     "{e} 的大节日叫 {v}。"),
    ("What currency does {e} use?", "People in {e} pay with the {v}.", "{e} 用什么货币？", "{e} 的人用 {v} 付钱。"),
]


def made_up_word(rng, parts=3):
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def made_up_facts(n_entities, seed=0):
    """Records {"query", "passage", "entity", "lang", "answer"}: every FACTS line for n_entities made-up places, in
    English and in Chinese, with made-up values (the answer); the same seed gives the same facts."""
    import random

    rng, seen, records = random.Random(seed), set(), []
    while len(seen) < n_entities:
        entity = made_up_word(rng)
        if entity in seen:
            continue
        seen.add(entity)
        for question_en, passage_en, question_zh, passage_zh in FACTS:
            value = made_up_word(rng, 2)
            for lang, question, passage in (("en", question_en, passage_en), ("zh", question_zh, passage_zh)):
                records.append({"query": question.format(e=entity), "passage": passage.format(e=entity, v=value),
                                "entity": entity, "lang": lang, "answer": value})
    return records


def recall_at_k(model, tokenizer, records, k=5, pooling="mean", retrieval="dense"):
    """The share of records whose own passage is among the k best retrieved for its query (top_rows), all records'
    passages competing. model and tokenizer: None for bm25."""
    cosines, bm25_scores = None, None
    if retrieval != "bm25":
        queries = embed(model, tokenizer, [r["query"] for r in records], pooling)
        cosines = queries @ embed(model, tokenizer, [r["passage"] for r in records], pooling).T  # (n, n)
    if retrieval != "dense":
        from bm25 import BM25

        lexical = BM25([r["passage"] for r in records])
        bm25_scores = [lexical.scores(r["query"]) for r in records]
    found = [i in top_rows(retrieval, k, None if cosines is None else cosines[i],
                           None if bm25_scores is None else bm25_scores[i])[1] for i in range(len(records))]
    return float(np.mean(found))


# -----------------------------------------------------------------------------
# command lines: python data.py index (index_main), python rag.py search|recall|facts

INDEX_DEFAULTS = dict(
    docs="",  # a directory: its .md, .markdown and .txt files, recursively
    model="",  # the MODELDIR whose pooled hidden states are the vectors (queries must use the same model)
    out="",  # FILE.h5; when it exists, files whose sha256 it holds keep their chunks and vectors
    chunk_tokens=256,  # token budget of a chunk
    overlap_tokens=32,  # tokens consecutive chunks of one cut paragraph share (at most chunk_tokens // 2)
    merge_threshold=0.5,  # adjacent paragraphs merge (within chunk_tokens) at this cosine or more; >1: never
    pooling="mean",  # mean over the tokens, or last (the last token's state)
    retrieval="dense",  # what a query uses unless it names its own: dense, bm25 or hybrid (stored in the index)
    device="cpu",
    dtype="float32",  # float32, bfloat16 or float16
)


def index_main(argv):
    from settings import load_settings

    args = load_settings(INDEX_DEFAULTS, argv, "data.py index")
    for key in ("docs", "model", "out"):
        if not args[key]:
            sys.exit(f"data.py index: --{key} is required; see python data.py index --help")
    try:
        build_index(args.docs, args.model, args.out, args.chunk_tokens, args.overlap_tokens, args.merge_threshold,
                    args.pooling, args.device, args.dtype, retrieval=args.retrieval)
    except (OSError, ValueError) as e:
        sys.exit(f"data.py index: {e}")


DEFAULTS = dict(
    index="",  # search: FILE.h5 made by python data.py index
    query="",  # search: the question
    k=5,  # search: chunks to show; recall: recall@k
    retrieval="",  # dense, bm25 or hybrid; "" = search: the index's own (data.py index --retrieval), recall: dense
    model="",  # search: the model to query with (default: the index's own; another is refused); recall: the model
    pooling="mean",  # recall: mean or last
    pairs="",  # recall: a jsonl file of {"query", "passage"} records
    out="",  # facts: a directory for train.jsonl (query/passage pairs), heldout.jsonl (other places), text.jsonl
    entities=400,  # facts: made-up places in train.jsonl; heldout.jsonl has a tenth as many more
    seed=0,
    device="cpu",
)
USAGE = """usage:
  python rag.py search --index=FILE.h5 --query=TEXT [--k=5] [--model=MODELDIR] [--retrieval=dense|bm25|hybrid]
  python rag.py recall --model=MODELDIR --pairs=FILE.jsonl [--k=5] [--pooling=mean] [--retrieval=dense|bm25|hybrid]
  python rag.py facts --out=DIR [--entities=400] [--seed=0]      (made-up query/passage pairs, English and Chinese)"""


def main(argv):
    import json

    from sample import load
    from settings import load_settings

    if not argv or argv[0] not in ("search", "recall", "facts"):
        sys.exit(USAGE)
    command, args = argv[0], load_settings(DEFAULTS, argv[1:], f"rag.py {argv[0]}")
    needed = {"search": ("index", "query"), "recall": ("pairs",) + (("model",) if args.retrieval != "bm25" else ()),
              "facts": ("out",)}[command]
    if not all(args[key] for key in needed):
        sys.exit(f"rag.py {command}: give " + " and ".join(f"--{key}" for key in needed))
    try:
        if command == "facts":
            records = made_up_facts(args.entities + args.entities // 10, args.seed)
            os.makedirs(args.out, exist_ok=True)
            cut = args.entities * 2 * len(FACTS)
            text = [{"text": f"{r['query']} {r['passage']}"} for r in records[:cut]]  # for a tokenizer, pretraining
            for name, part in (("train.jsonl", records[:cut]), ("heldout.jsonl", records[cut:]), ("text.jsonl", text)):
                with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
                print(f"wrote {os.path.join(args.out, name)}: {len(part)} records")
            return
        model, tokenizer = load(args.model, args.device) if args.model else (None, None)
        if command == "recall":
            with open(args.pairs, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
            retrieval = check_retrieval(args.retrieval or "dense")
            recall = recall_at_k(model, tokenizer, records, args.k, args.pooling, retrieval)
            print(f"{args.pairs}: recall@{args.k} {recall:.4f} ({retrieval}) over {len(records)} pairs")
            return
        retriever = Retriever(args.index, model, tokenizer, args.k, args.device, retrieval=args.retrieval)
    except (OSError, ValueError) as e:
        sys.exit(f"rag.py: {e}")
    for n, hit in enumerate(retriever.search(args.query), 1):
        print(f"[{n}] {hit['score']:.4f} {hit['source']}:{hit['start']}-{hit['end']} {hit['title']}\n{hit['text']}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
