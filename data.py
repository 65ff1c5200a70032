"""
Everything between raw text and a training batch: jsonl/txt -> HDF5 preparation, the datasets that read it,
and the resumable sampler that orders it. The tokenizer and the chat renderer are in tokenizer.py.

    python data.py tokenizer --input=data/demo/pretrain.txt --vocab_size=2048 --out=data/tok
    python data.py prepare --stage=seq --input=data/demo/pretrain.txt --tokenizer=data/tok --out=data/seq.h5
    python data.py index --docs=notes/ --model=out/final --out=notes.h5      (retrieval: rag.py)

## HDF5 layout (format_version 1)
Root attributes: `stage` (seq|sft|dpo|grpo|embed), `vocab_size`, `tokenizer_hash` (sha256 of the canonical
tokenizer.json), `eot_id`, `format_version`. Groups `train/` and `val/` hold the same datasets. Token ids are
uint32, masks uint8 (1 = the model learns to predict this token), offsets int64 with n+1 entries (item i is
`x[offsets[i]:offsets[i+1]]`), strings variable-length utf-8. All datasets are 1-D, chunked and resizable.
- seq:  `tokens`: every document followed by `<|endoftext|>`, one stream.
- sft:  `tokens`, `loss_mask`, `offsets` (one conversation per record, rendered by Tokenizer.render_chat).
- dpo:  `chosen_tokens`, `chosen_mask`, `chosen_offsets`, the same three for `rejected_`, and
        `prompt_lengths` (int64, one per record: the tokens before the reply, on both sides); masks are 1 on the reply.
- embed: `query_tokens`, `query_offsets`, `passage_tokens`, `passage_offsets` (records {"query", "passage"}).
- grpo: `prompt_tokens`, `prompt_offsets` (prompts end with `<|im_start|>assistant\\n`), `answer` and
        `record` (the input line as JSON) strings. Offline files add `response_tokens` and `response_offsets`
        (one entry per response: its tokens then `<|im_end|>`), `rewards` (float32, one per response) and
        `group_offsets` (record i's responses and rewards are `group_offsets[i]:group_offsets[i+1]`).
Train/val split by record: consecutive records form strata of about 1 / val_fraction records and one record
of each stratum, drawn from (seed, stratum), goes to val; so the split is deterministic, val holds val_fraction
of the records, and 1 / val_fraction records are enough for a non-empty val split.
`--data` takes one .h5 file or a directory of .h5 shards read as one, in sorted name order.
"""
import array
import bisect
import collections
import io
import itertools
import json
import multiprocessing
import os
import random
import sys
import time

import h5py
import numpy as np
import torch

from settings import load_settings
from tokenizer import Tokenizer, train_tokenizer

# -----------------------------------------------------------------------------
# preparation: txt/jsonl -> HDF5, streamed

FORMAT_VERSION = 1
BATCH_BYTES = 1 << 20  # input per task of a worker process
BUFFER_BYTES = 16 << 20  # encoded values held in memory before they are written, all datasets together


def _val_picks(val_fraction, seed):
    """Yield, for records 0, 1, 2, ..., whether each goes to val (one random record per stratum, see the top)."""
    per_million, stratum, picked = round(val_fraction * 1_000_000), None, -1
    for i in itertools.count():
        if per_million and i * per_million // 1_000_000 != stratum:
            stratum = i * per_million // 1_000_000  # integer arithmetic: strata boundaries are exact
            start, end = -(-stratum * 1_000_000 // per_million), -(-(stratum + 1) * 1_000_000 // per_million)
            picked = start + random.Random(f"{seed}:{stratum}").randrange(end - start)
        yield i == picked


def _read_batches(paths, jsonl_only=False, batch_bytes=BATCH_BYTES):
    """Yield (path, first line number, is_jsonl, data): whole records (jsonl lines, or documents of text between
    blank lines) as UTF-8 bytes, about batch_bytes at a time, in file order: the task of a worker process."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        is_jsonl = path.endswith((".jsonl", ".json"))
        if jsonl_only and not is_jsonl:
            raise ValueError(f"{path}: this stage reads .jsonl files (one JSON object per line)")
        with open(path, "rb") as f:
            first, carry = 1, b""
            while True:
                chunk = f.read(max(batch_bytes, len(carry)))  # a record longer than a batch: read on, doubling
                data = carry + chunk
                cut = _last_boundary(data, is_jsonl) if chunk else len(data)
                if cut:
                    yield path, first, is_jsonl, data[:cut]
                    first += data.count(b"\n", 0, cut)
                carry = data[cut:]
                if not chunk:
                    break


def _last_boundary(data, is_jsonl):
    """Where the last whole record in `data` (bytes from a line start) ends: after its last line (jsonl) or after
    its last blank line (text); 0 where there is none."""
    end = data.rfind(b"\n")
    if is_jsonl:
        return end + 1
    while end >= 0:
        start = data.rfind(b"\n", 0, end) + 1
        if not data[start:end].decode("utf-8", "replace").strip():
            return end + 1
        end = start - 1
    return 0


def _records_in(path, first_line, is_jsonl, data):
    """Yield (where, record) for each record of one batch; where = 'file:line' for error messages."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no, line_start = first_line + data.count(b"\n", 0, e.start), data.rfind(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start - line_start + 1} of the line)") \
            from None
    block, start = [], first_line
    for line_no, line in enumerate(io.StringIO(text, newline=None), first_line):  # lines as open(path) reads them
        if is_jsonl and line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{line_no}", record
        elif not is_jsonl and line.strip():  # text: a document is a block of lines between blank lines
            start = start if block else line_no
            block.append(line)
        elif block:
            yield f"{path}:{start}", {"text": "".join(block).rstrip("\n")}
            block = []
    if block:
        yield f"{path}:{start}", {"text": "".join(block).rstrip("\n")}


def _read_records(paths, jsonl_only=False):
    """Yield (where, record) for each record of the files, in order."""
    for batch in _read_batches(paths, jsonl_only):
        yield from _records_in(*batch)


def _get(record, key, types, where):
    if key not in record:
        raise ValueError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"{where}: key {key!r} must be {names}, got {type(value).__name__}")
    return value


def _render(tokenizer, messages, where, key, add_generation_prompt=False):
    try:
        return tokenizer.render_chat(messages, add_generation_prompt)
    except ValueError as e:
        raise ValueError(f"{where}: key {key!r}: {e}") from None


def _prompt_messages(record, where):
    key = "prompt" if "prompt" in record else "messages"
    prompt = _get(record, key, (str, list), where)
    return key, [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _columns(stage, offline=False):
    """Dataset name -> dtype for one split of a stage's file."""
    u32, u8, i64, text = np.uint32, np.uint8, np.int64, h5py.string_dtype()
    if stage == "seq":
        return {"tokens": u32}
    if stage == "sft":
        return {"tokens": u32, "loss_mask": u8, "offsets": i64}
    if stage == "dpo":
        sides = {f"{side}_{name}": dtype for side in ("chosen", "rejected")
                 for name, dtype in (("tokens", u32), ("mask", u8), ("offsets", i64))}
        return sides | {"prompt_lengths": i64}
    if stage == "embed":  # query/passage pairs (strategies.py's embed; rag.PairDataset reads them)
        return {"query_tokens": u32, "query_offsets": i64, "passage_tokens": u32, "passage_offsets": i64}
    columns = {"prompt_tokens": u32, "prompt_offsets": i64, "answer": text, "record": text}
    if offline:
        columns |= {"response_tokens": u32, "response_offsets": i64, "rewards": np.float32, "group_offsets": i64}
    return columns


class _Appender:
    """A resizable 1-D HDF5 dataset filled through a buffer of arrays, written when prepare says (by bytes)."""

    def __init__(self, group, name, dtype):
        self.is_text = dtype == h5py.string_dtype()
        self.dataset = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                            chunks=(256 if self.is_text else 1 << 16,))
        self.size, self.is_offsets, self.end, self.buffer = 0, name.endswith("offsets"), 0, []
        if self.is_offsets:
            self.buffer.append(np.zeros(1, np.int64))  # offsets hold n + 1 entries: 0, then where each item ends

    def extend(self, values: np.ndarray) -> int:
        """Append values (to an offsets dataset: the lengths of the items appended to its data); returns the
        bytes they hold in memory (strings: about 1 byte a character plus Python's 50-byte object header)."""
        if self.is_offsets and len(values):
            values = self.end + np.cumsum(values)
            self.end = int(values[-1])
        self.buffer.append(values)
        self.size += len(values)
        return sum(50 + len(s) for s in values) if self.is_text else values.nbytes

    def flush(self):
        if self.buffer:
            values, n = np.concatenate(self.buffer), self.dataset.shape[0]
            self.dataset.resize((n + len(values),))
            self.dataset[n:] = values
            self.buffer = []


def encode_record(stage, tokenizer, record, where):
    """One input record -> {dataset name: values to append}; an offsets dataset gets each item's length."""
    if stage == "seq":
        tokens = tokenizer.encode(_get(record, "text", str, where))
        tokens.append(tokenizer.eot_id)
        return {"tokens": tokens}
    if stage == "sft":
        ids, mask = _render(tokenizer, _get(record, "messages", list, where), where, "messages")
        return {"tokens": ids, "loss_mask": mask, "offsets": [len(ids)]}
    if stage == "embed":
        query, passage = (tokenizer.encode(_get(record, key, str, where)) for key in ("query", "passage"))
        return {"query_tokens": query, "query_offsets": [len(query)], "passage_tokens": passage,
                "passage_offsets": [len(passage)]}
    key, prompt = _prompt_messages(record, where)
    prompt_ids, _ = _render(tokenizer, prompt, where, key, add_generation_prompt=True)
    if stage == "dpo":
        columns, n_prompts = {}, []
        for side in ("chosen", "rejected"):
            reply = [{"role": "assistant", "content": _get(record, side, str, where)}]
            ids, mask = _render(tokenizer, prompt + reply, where, key)
            n_prompt = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), len(prompt_ids))
            columns |= {f"{side}_tokens": ids, f"{side}_mask": [0] * n_prompt + mask[n_prompt:],
                        f"{side}_offsets": [len(ids)]}
            n_prompts.append(n_prompt)
        return columns | {"prompt_lengths": [min(n_prompts)]}  # both sides start with these tokens
    answer = _get(record, "answer", (str, int, float), where)
    columns = {"prompt_tokens": prompt_ids, "prompt_offsets": [len(prompt_ids)], "answer": [str(answer)],
               "record": [json.dumps(record, ensure_ascii=False)]}
    if "responses" not in record and "rewards" not in record:
        return columns
    responses, rewards = _get(record, "responses", list, where), _get(record, "rewards", list, where)
    if len(responses) != len(rewards) or not all(isinstance(r, str) for r in responses) or \
            not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
        raise ValueError(f"{where}: 'responses' must be strings and 'rewards' numbers, as many of each")
    if not tokenizer.stop_ids:
        raise ValueError(f"{where}: offline 'responses' end with the tokenizer's end-of-turn token; it has none")
    # each ends with the end-of-turn token, as a sampled reply does (<|im_end|>, Llama 3's <|eot_id|>, ...)
    responses = [tokenizer.encode(response) + [tokenizer.stop_ids[0]] for response in responses]
    return columns | {"response_tokens": [t for r in responses for t in r],
                      "response_offsets": [len(r) for r in responses],
                      "rewards": [float(r) for r in rewards], "group_offsets": [len(rewards)]}


_worker = {}  # what _encode_batch needs, set in each worker process by _start_worker


def _start_worker(stage, tokenizer, offline):
    _worker.update(stage=stage, tokenizer=tokenizer, offline=offline)


def _encode_batch(batch):
    """One batch from _read_batches -> ({dataset: (values, how many values each record gave)}, records, bytes)."""
    stage, tokenizer, columns = _worker["stage"], _worker["tokenizer"], _columns(_worker["stage"], _worker["offline"])
    # numbers gather in array.array: 3x faster than numpy's conversion of a list of Python ints
    values = {key: [] if dtype == h5py.string_dtype() else array.array(np.dtype(dtype).char)
              for key, dtype in columns.items()}
    counts, n_records = {k: array.array("q") for k in columns}, 0
    for where, record in _records_in(*batch):
        encoded = encode_record(stage, tokenizer, record, where)
        if encoded.keys() != columns.keys():
            raise ValueError(f"{where}: every record of an offline GRPO file has 'responses' and "
                             "'rewards', of an online one neither (the first record decides)")
        for key, record_values in encoded.items():
            values[key].extend(record_values)
            counts[key].append(len(record_values))
        n_records += 1
    arrays = {key: (np.array(values[key], dtype=object) if dtype == h5py.string_dtype() else
                    np.frombuffer(values[key], dtype=dtype), np.frombuffer(counts[key], dtype=np.int64))
              for key, dtype in columns.items()}
    return arrays, n_records, len(batch[-1])


def _encoded_batches(batches, workers, start_args):
    """_encode_batch of each batch, in order, computed by `workers` processes (1: this one). At most two batches
    per worker are in flight, so memory stays bounded however long the input."""
    if workers == 1:
        _start_worker(*start_args)
        yield from map(_encode_batch, batches)
        return
    # fork: the workers inherit the loaded tokenizer and need not import torch again
    pool = multiprocessing.get_context("fork").Pool(workers, _start_worker, start_args)
    try:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    except KeyboardInterrupt:  # the workers got it too: their batches will never finish
        pool.terminate()
        raise
    finally:  # on an error too: the few batches in flight finish, then the workers exit. Pool.terminate() (what
        pool.close()  # `with Pool` does) can deadlock joining its task thread when it kills workers mid-task
        pool.join()


def _first_record(batches):
    """(the first record or None, an iterator over all the batches again)."""
    seen = []
    for batch in batches:
        seen.append(batch)
        for _, record in _records_in(*batch):
            return record, itertools.chain(seen, batches)
    return None, iter(seen)


def default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(stage: str, inputs: list[str], tokenizer_dir: str, out_path: str, val_fraction: float = 0.05,
            seed: int = 0, progress: bool = True, workers: int = 0, batch_bytes: int = BATCH_BYTES) -> dict:
    """Tokenize `inputs` into `out_path` (layout at the top of this file) with `workers` processes (0: one per
    core); the file is the same for any number. Returns records per split."""
    if stage not in ("seq", "sft", "dpo", "grpo", "embed"):
        raise ValueError(f"--stage={stage!r}: expected one of seq, sft, dpo, grpo, embed")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction={val_fraction}: expected a number in [0, 1)")
    if workers < 0:
        raise ValueError(f"--workers={workers}: expected 0 (one per core) or a positive number of processes")
    workers = workers or default_workers()
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1  # no fork (Windows): one process
    tokenizer = Tokenizer.load(tokenizer_dir)
    if stage == "seq" and tokenizer.eot_id is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no <|endoftext|> to separate documents")
    first, batches = _first_record(_read_batches(inputs, stage != "seq", batch_bytes))
    if first is None:
        raise ValueError(f"{', '.join(inputs)}: no records")
    offline = stage == "grpo" and "responses" in first  # offline GRPO files have more datasets; the first decides
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp_path, t0 = out_path + ".tmp", time.time()
    encoded = _encoded_batches(batches, workers, (stage, tokenizer, offline))
    try:
        with h5py.File(tmp_path, "w") as f:
            f.attrs.update(stage=stage, vocab_size=tokenizer.vocab_size, tokenizer_hash=tokenizer.hash,
                           eot_id=-1 if tokenizer.eot_id is None else tokenizer.eot_id, format_version=FORMAT_VERSION)
            splits = {name: {key: _Appender(f.require_group(name), key, dtype)
                             for key, dtype in _columns(stage, offline).items()} for name in ("train", "val")}
            n_records, n_bytes = _write_batches(encoded, splits, _val_picks(val_fraction, seed), progress and stage)
        os.replace(tmp_path, out_path)
    finally:
        encoded.close()  # stops the workers, also on an error
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    if progress:
        print(f"wrote {out_path}: {stage}, train {n_records['train']:,} records, val {n_records['val']:,}, "
              f"{n_bytes / 1e6:.1f} MB in {time.time() - t0:.1f}s with {workers} worker(s)", file=sys.stderr)
    return n_records


def _write_batches(encoded, splits, val_picks, progress_label):
    """Append encoded batches to the train/val appenders, record by record as val_picks says; the buffers are
    written whenever they hold BUFFER_BYTES, so memory is bounded by bytes. Returns (records per split, bytes)."""
    n_records, n_bytes, buffered, t0, last_print = {"train": 0, "val": 0}, 0, 0, time.time(), 0.0
    for columns, n, size in encoded:
        is_val = np.fromiter(itertools.islice(val_picks, n), dtype=bool, count=n)
        for split, chosen in (("train", ~is_val), ("val", is_val)):
            if chosen.any():
                for key, (values, counts) in columns.items():
                    if not chosen.all():  # each record's values are counts[i] consecutive entries
                        values, counts = values[np.repeat(chosen, counts)], counts[chosen]
                    buffered += splits[split][key].extend(values)
                n_records[split] += int(chosen.sum())
        n_bytes += size
        if buffered >= BUFFER_BYTES:
            for appender in (a for split in splits.values() for a in split.values()):
                appender.flush()
            buffered = 0
        if progress_label and time.time() - last_print > 0.5:
            last_print, elapsed = time.time(), time.time() - t0
            tokens = sum(a.size for s in splits.values() for k, a in s.items() if k.endswith("tokens"))
            print(f"\r{progress_label}: {sum(n_records.values()):,} records, {tokens:,} tokens, "
                  f"{n_bytes / 1e6:.1f} MB, {n_bytes / 1e6 / elapsed:.1f} MB/s", end="", file=sys.stderr, flush=True)
    for appender in (a for split in splits.values() for a in split.values()):
        appender.flush()
    if last_print:
        print(file=sys.stderr)
    return n_records, n_bytes


# -----------------------------------------------------------------------------
# datasets: read lazily through h5py, batches as dicts of tensors


class _Dataset:
    """The `split` groups of every shard; records are numbered across shards in sorted file order."""

    def __init__(self, files, groups, attrs, block_size, first_offsets):
        self.files, self.groups, self.block_size = files, groups, block_size
        self.stage, self.vocab_size = str(attrs["stage"]), int(attrs["vocab_size"])
        self.tokenizer_hash, self.pad_id = str(attrs["tokenizer_hash"]), max(0, int(attrs["eot_id"]))
        if first_offsets:  # offsets hold n + 1 entries
            self._bases = np.cumsum([0] + [len(g[first_offsets]) - 1 for g in groups])

    def __len__(self):
        return int(self._bases[-1])

    def _locate(self, index):
        if not 0 <= index < self._bases[-1]:
            raise IndexError(f"index {index} out of range for {self._bases[-1]} items of {self.files[0]}...")
        shard = bisect.bisect_right(self._bases, index) - 1
        return self.groups[shard], int(index - self._bases[shard])

    def _record(self, index, offsets, *names):
        group, local = self._locate(index)
        start, stop = group[offsets][local:local + 2]
        return [group[name][start:stop] for name in names]

    def _shifted(self, tokens, mask):
        """(T+1 tokens kept from the start) -> inputs, targets = next token where it is learned, else -100."""
        tokens, mask = tokens[:self.block_size + 1].astype(np.int64), mask[:self.block_size + 1]
        return tokens[:-1], np.where(mask[1:] == 1, tokens[1:], -100)

    def _pad(self, rows, value, width):
        batch = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, :len(row)] = torch.from_numpy(row)
        return batch


class SeqDataset(_Dataset):
    """Windows of block_size + 1 tokens every block_size tokens over the shards' token streams joined (each
    window's last token is the next one's first, so every token is a target once). With pack, a batch also carries
    `documents` (B, T): each token's document, which ends at its <|endoftext|>, so attention never crosses one and
    positions restart; the target after each <|endoftext|> (another document's first token) is not scored."""

    def __init__(self, files, groups, attrs, block_size, pack=False):
        super().__init__(files, groups, attrs, block_size, first_offsets=None)
        self._starts = np.cumsum([0] + [len(g["tokens"]) for g in groups])
        self.n_tokens, self.pack, self.eot_id = int(self._starts[-1]), pack, int(attrs["eot_id"])

    def __len__(self):
        return max(0, (self.n_tokens - self.block_size - 1) // self.block_size + 1)

    def _span(self, start, stop):
        parts = []
        for group, base in zip(self.groups, self._starts):
            lo, hi = max(start, base), min(stop, base + len(group["tokens"]))
            if lo < hi:
                parts.append(group["tokens"][lo - base:hi - base])
        return np.concatenate(parts).astype(np.int64)

    def get_batch(self, indices):
        if any(not 0 <= i < len(self) for i in indices):
            raise IndexError(f"window index out of range: {len(self)} windows in {self.files[0]}...")
        T = self.block_size
        windows = torch.from_numpy(np.stack([self._span(i * T, i * T + T + 1) for i in indices]))  # (B, T+1)
        batch = {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}
        if self.pack:
            ends = batch["input_ids"] == self.eot_id  # a document's last token
            batch["documents"] = ends.long().cumsum(1) - ends.long()  # (B, T): <|endoftext|>s before each token
            batch["targets"] = batch["targets"].masked_fill(ends, -100)
        return batch


class SFTDataset(_Dataset):
    """One conversation per row, right-padded to the longest in the batch. With pack, rows of block_size tokens hold
    consecutive conversations in file order (next-fit: a row closes when the next conversation does not fit; the
    sampler shuffles rows), and a batch also carries `documents` (B, T): each conversation's number in its row,
    -1 on padding, so attention never crosses two and positions restart at each. Either way a conversation of n
    tokens fills n - 1 positions (inputs and targets shifted within it: its last target is its own last token)
    and one longer than block_size + 1 tokens is cut there; how many are, and the longest, is printed."""

    def __init__(self, files, groups, attrs, block_size, first_offsets, pack=False):
        super().__init__(files, groups, attrs, block_size, first_offsets)
        lengths = np.concatenate([np.diff(g["offsets"][:]) for g in groups])  # tokens per conversation
        if (lengths > block_size + 1).any():
            self._report_cuts(lengths)
        self.pack, self._filled = pack, np.clip(lengths - 1, 0, block_size)  # positions each fills
        if pack:  # self._rows[r]: row r's first conversation (n_rows + 1 entries)
            rows, filled = [0], 0
            for i, n in enumerate(self._filled.tolist()):
                if filled + n > block_size:
                    rows.append(i)
                    filled = 0
                filled += n
            self._rows = np.array(rows + [len(lengths)])
            self._filled = np.add.reduceat(self._filled, self._rows[:-1]) if len(lengths) else self._filled

    def __len__(self):
        return len(self._rows) - 1 if self.pack else super().__len__()

    def _report_cuts(self, lengths):
        """Print how many conversations are cut at block_size + 1 tokens, which (record numbers of the split), and
        how many reply tokens, those the loss would have learned, the cuts lose."""
        cut = np.flatnonzero(lengths > self.block_size + 1)
        masks = [self._record(int(i), "offsets", "loss_mask")[0] for i in cut]
        lost = np.array([int(mask[self.block_size + 1:].sum()) for mask in masks])
        scored = np.array([int(mask.sum()) for mask in masks])
        where = f"{self.files[0]}{' ...' if len(self.files) > 1 else ''} {self.groups[0].name}"
        print(f"{where}: {len(cut):,} of {len(lengths):,} conversations are longer than block_size + 1 = "
              f"{self.block_size + 1} tokens (the longest: {int(lengths.max()):,}) and are cut there: records "
              f"{', '.join(str(i) for i in cut[:5])}{' ...' if len(cut) > 5 else ''} (numbered from 0 in the split); "
              f"they lose {int(lost.sum()):,} of their {int(scored.sum()):,} reply tokens, and "
              f"{int((lost == scored).sum()):,} of them every reply token", file=sys.stderr)

    def padding_share(self, order, batch_size):
        """The share of padding among the row tokens of the batches that `order` (item indices, batch_size a batch,
        a last partial batch dropped) makes: rows are block_size wide packed, else as wide as the batch's longest."""
        filled = self._filled[np.asarray(order)[:len(order) // batch_size * batch_size]].reshape(-1, batch_size)
        widths = np.full(len(filled), self.block_size) if self.pack else np.maximum(1, filled.max(1, initial=0))
        return 1 - filled.sum() / max(1, widths.sum() * batch_size)

    def get_batch(self, indices):
        if not self.pack:
            rows = [self._shifted(*self._record(i, "offsets", "tokens", "loss_mask")) for i in indices]
            width = max(1, max(len(inputs) for inputs, _ in rows))
            return {"input_ids": self._pad([r[0] for r in rows], self.pad_id, width),
                    "targets": self._pad([r[1] for r in rows], -100, width)}
        if any(not 0 <= i < len(self) for i in indices):
            raise IndexError(f"row index out of range: {len(self)} packed rows in {self.files[0]}...")
        shape = (len(indices), self.block_size)
        batch = {"input_ids": torch.full(shape, self.pad_id), "targets": torch.full(shape, -100),
                 "documents": torch.full(shape, -1)}
        for row, index in enumerate(indices):
            start = 0
            for document, item in enumerate(range(self._rows[index], self._rows[index + 1])):
                inputs, targets = self._shifted(*self._record(item, "offsets", "tokens", "loss_mask"))
                stop = start + len(inputs)
                batch["input_ids"][row, start:stop] = torch.from_numpy(inputs)
                batch["targets"][row, start:stop] = torch.from_numpy(targets)
                batch["documents"][row, start:stop] = document
                start = stop
        return batch


class DPODataset(_Dataset):
    """Chosen and rejected rows padded to one width, so a loss may run both in one forward pass. A pair longer than
    block_size + 1 tokens loses the start of its prompt, the same tokens on both sides, so both replies stay whole;
    a pair whose longer reply (its tokens after the prompt) leaves no prompt token in block_size + 1 is dropped,
    and how many were dropped is printed."""

    def __init__(self, files, groups, attrs, block_size, first_offsets):
        super().__init__(files, groups, attrs, block_size, first_offsets)
        replies = [np.maximum(*(np.diff(g[f"{side}_offsets"][:]) for side in ("chosen", "rejected")))
                   - g["prompt_lengths"][:] for g in groups]  # 3 numbers a pair: 24 MB for a million pairs
        fits = np.concatenate(replies) <= block_size
        self._kept = np.flatnonzero(fits)  # the pairs this dataset's indices number
        totals = np.concatenate([np.maximum(*(np.diff(g[f"{side}_offsets"][:]) for side in ("chosen", "rejected")))
                                 for g in groups])
        if (fits & (totals > block_size + 1)).any():
            cut = np.flatnonzero(fits & (totals > block_size + 1))
            print(f"{files[0]}{' ...' if len(files) > 1 else ''} {groups[0].name}: {len(cut):,} of {len(fits):,} "
                  f"DPO pairs are longer than block_size + 1 = {block_size + 1} tokens and lose the start of their "
                  f"prompt (up to {int((totals[cut] - block_size - 1).max()):,} tokens; replies whole): pairs "
                  f"{', '.join(str(i) for i in cut[:5])}{' ...' if len(cut) > 5 else ''}", file=sys.stderr)
        if not fits.all():
            where = f"{files[0]}{' ...' if len(files) > 1 else ''} {groups[0].name}"
            print(f"{where}: dropped {len(fits) - len(self._kept):,} of {len(fits):,} DPO pairs whose reply alone "
                  f"is longer than block_size={block_size} tokens", file=sys.stderr)
            if not len(self._kept):
                raise ValueError(f"{where}: every DPO pair has a reply longer than block_size={block_size} tokens")

    def __len__(self):
        return len(self._kept)

    def _pair(self, index):
        """(chosen (tokens, mask), rejected (tokens, mask)) of one pair, with the prompt cut from the left."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} DPO pairs of {self.files[0]}...")
        index = int(self._kept[index])
        group, local = self._locate(index)
        n_prompt = int(group["prompt_lengths"][local])
        sides = [self._record(index, f"{side}_offsets", f"{side}_tokens", f"{side}_mask")
                 for side in ("chosen", "rejected")]
        reply = max(len(tokens) for tokens, _ in sides) - n_prompt
        start = max(0, n_prompt - (self.block_size + 1 - reply))  # keeps >= 1 prompt token: reply <= block_size
        return [(tokens[start:], mask[start:]) for tokens, mask in sides]

    def get_batch(self, indices):
        pairs = [self._pair(i) for i in indices]
        sides = {side: [self._shifted(*pair[n]) for pair in pairs] for n, side in enumerate(("chosen", "rejected"))}
        width = max(1, max(len(inputs) for rows in sides.values() for inputs, _ in rows))
        batch = {}
        for side, rows in sides.items():
            batch[f"{side}_ids"] = self._pad([r[0] for r in rows], self.pad_id, width)
            batch[f"{side}_targets"] = self._pad([r[1] for r in rows], -100, width)
        return batch


class GRPODataset(_Dataset):
    """Prompts (token lists, ending in the generation prompt) with their answers; offline files add responses."""

    def longest_prompt(self):
        return int(max(np.diff(g["prompt_offsets"][:]).max(initial=0) for g in self.groups))

    def get_batch(self, indices):
        batch = {"prompt_ids": [], "answers": [], "records": []}
        offline = "rewards" in self.groups[0]
        if offline:
            batch |= {"responses": [], "rewards": []}
        for i in indices:
            group, local = self._locate(i)
            batch["prompt_ids"].append(self._record(i, "prompt_offsets", "prompt_tokens")[0].tolist())
            batch["answers"].append(group["answer"].asstr()[local])
            batch["records"].append(json.loads(group["record"].asstr()[local]))
            if offline:
                first, last = group["group_offsets"][local:local + 2]
                offsets = group["response_offsets"][first:last + 1]
                tokens = group["response_tokens"][offsets[0]:offsets[-1]].tolist()
                batch["responses"].append([tokens[a - offsets[0]:b - offsets[0]] for a, b in zip(offsets, offsets[1:])])
                batch["rewards"].append(group["rewards"][first:last].tolist())
        return batch


def load_dataset(path: str, split: str = "train", block_size: int = 1024, stage: str | None = None,
                 pack: bool = False):
    """`path`: one .h5 file or a directory of .h5 shards (sorted by name). Checks stage, format and datasets.
    pack: rows that hold several documents (seq) or conversations (sft), with `documents` in each batch."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".h5"))
        if not files:
            raise FileNotFoundError(f"{path}: directory holds no .h5 files (make them with python data.py prepare)")
    elif os.path.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file (--data takes an .h5 file or a directory of .h5 shards)")
    handles, groups = [], []
    for file in files:
        try:
            handles.append(h5py.File(file, "r"))
        except OSError as e:
            raise ValueError(f"{file}: not a readable HDF5 file ({e}); make one with python data.py prepare") from None
        attrs = handles[-1].attrs
        if any(key not in attrs for key in ("stage", "vocab_size", "tokenizer_hash", "format_version")):
            raise ValueError(f"{file}: missing the stage/vocab_size/tokenizer_hash/format_version attributes; "
                             "not a file written by python data.py prepare")
        if attrs["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{file}: format_version {attrs['format_version']}, this data.py reads {FORMAT_VERSION}")
        if stage is not None and attrs["stage"] != stage:
            raise ValueError(f"{file}: holds stage '{attrs['stage']}' data, expected '{stage}' "
                             f"(prepare it with python data.py prepare --stage={stage})")
        first = handles[0].attrs
        for key in ("stage", "vocab_size", "tokenizer_hash"):
            if attrs[key] != first[key]:
                raise ValueError(f"{file}: {key} {attrs[key]!r} differs from {files[0]}'s {first[key]!r}")
        if split not in handles[-1]:
            raise ValueError(f"{file}: no '{split}' group (expected train/ and val/)")
        group = handles[-1][split]
        missing = [name for name in _columns(str(attrs["stage"]), offline="rewards" in group) if name not in group]
        if missing:
            raise ValueError(f"{file}: '{split}' group lacks datasets {missing}; the file is incomplete or corrupt")
        groups.append(group)
    file_stage, attrs = str(handles[0].attrs["stage"]), dict(handles[0].attrs)
    if pack and file_stage not in ("seq", "sft"):
        raise ValueError(f"{files[0]}: pack=true packs seq and sft rows, not {file_stage} data")
    if file_stage == "seq":
        return SeqDataset(files, groups, attrs, block_size, pack)
    if file_stage == "sft":
        return SFTDataset(files, groups, attrs, block_size, "offsets", pack)
    if file_stage == "embed":
        from rag import PairDataset  # retrieval's own data: imported when used

        return PairDataset(files, groups, attrs, block_size, "query_offsets")
    first_offsets = {"dpo": "chosen_offsets", "grpo": "prompt_offsets"}[file_stage]
    cls = {"dpo": DPODataset, "grpo": GRPODataset}[file_stage]
    return cls(files, groups, attrs, block_size, first_offsets)


# -----------------------------------------------------------------------------
# resumable distributed sampler


class ResumableSampler:
    """A permutation per epoch from (seed, epoch). One optimizer step takes the next G = batch_size * grad_accum
    * world_size indices; rank r's micro-batch m is chunk r * grad_accum + m, so 2 ranks x accum 1 see per step
    what 1 rank x accum 2 sees. An epoch ends when fewer than G indices are left (they are dropped)."""

    def __init__(self, num_items, batch_size, grad_accum=1, rank=0, world_size=1, seed=0):
        self.global_batch = batch_size * grad_accum * world_size
        if num_items < self.global_batch:
            raise ValueError(f"{num_items} items are fewer than one step needs: batch_size {batch_size} x grad_accum "
                             f"{grad_accum} x world_size {world_size} = {self.global_batch}")
        self.num_items, self.batch_size, self.grad_accum = num_items, batch_size, grad_accum
        self.rank, self.seed = rank, seed
        self.epoch, self.position = 0, 0  # position: indices of this epoch's permutation already used
        self._permutation_epoch, self._permutation = None, None

    def order(self):
        """This epoch's item indices in the order its steps take them."""
        if self._permutation_epoch != self.epoch:
            self._permutation = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
            self._permutation_epoch = self.epoch
        return self._permutation

    def next_step(self) -> list[list[int]]:
        if self.position + self.global_batch > self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
        step = self.order()[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        chunks = [self.rank * self.grad_accum + m for m in range(self.grad_accum)]
        return [step[c * self.batch_size:(c + 1) * self.batch_size].tolist() for c in chunks]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict):
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['num_items']} items and seed {state['seed']}, "
                             f"this run has {self.num_items} items and seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]


# -----------------------------------------------------------------------------
# command line

USAGE = """usage:
  python data.py tokenizer --input=FILE[,FILE...] --vocab_size=N --out=TOKDIR
      train a byte-level BPE tokenizer on .txt / .jsonl ("text" or "messages") files
  python data.py prepare --stage=seq|sft|dpo|grpo|embed --input=FILE[,FILE...] --tokenizer=TOKDIR --out=FILE.h5
                         [--val_fraction=0.05] [--seed=0] [--workers=N]
      tokenize into an HDF5 file for train.py --data, with N processes (default: one per core)
  python data.py index --docs=DIR --model=MODELDIR --out=FILE.h5 [--chunk_tokens=256] [--overlap_tokens=32]
      segment and embed the .md/.txt files under DIR into a retrieval index (rag.py); again: only changed files
Any command with --help lists its options. The demo data: python pipeline.py demo --out=DIR."""


def _training_texts(paths):
    for where, record in _read_records(paths):
        if "text" in record:
            yield _get(record, "text", str, where)
        elif "messages" in record:
            for message in _get(record, "messages", list, where):
                yield str(message.get("content", "")) if isinstance(message, dict) else ""
        else:
            raise ValueError(f"{where}: missing key 'text' or 'messages'")


def main(argv):
    if argv and argv[0] == "index":
        import rag  # retrieval: only this command needs it

        return rag.index_main(argv[1:])
    if not argv or argv[0] not in ("tokenizer", "prepare"):
        print(USAGE)
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    command, argv = argv[0], argv[1:]
    if command == "tokenizer":
        args = load_settings({"input": "", "vocab_size": 4096, "out": ""}, argv, "data.py tokenizer")
    else:
        args = load_settings({"stage": "", "input": "", "tokenizer": "", "out": "", "val_fraction": 0.05, "seed": 0,
                              "workers": 0}, argv, "data.py prepare")
    for key, value in args.items():
        if value == "":
            raise SystemExit(f"--{key} is required; see python data.py {command} --help")
    inputs = [p for p in args.input.split(",") if p]
    try:
        if command == "tokenizer":
            tokenizer = train_tokenizer(_training_texts(inputs), args.vocab_size)
            tokenizer.save(args.out)
            print(f"wrote {args.out}: vocab_size {tokenizer.vocab_size}, hash {tokenizer.hash[:12]}")
        else:
            prepare(args.stage, inputs, args.tokenizer, args.out, args.val_fraction, args.seed, workers=args.workers)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
