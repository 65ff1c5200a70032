"""
Everything between raw text and a training batch: command-line parsing, the tokenizer (tiktoken, read from
and written as a Hugging Face tokenizer.json), BPE training, the one chat renderer, the exact-answer check,
jsonl/txt -> HDF5 preparation, datasets, the resumable sampler and the built-in demo data.

  python data.py demo --out=data/demo
  python data.py tokenizer --input=data/demo/pretrain.txt --vocab_size=2048 --out=data/tok
  python data.py prepare --stage=seq --input=data/demo/pretrain.txt --tokenizer=data/tok --out=data/seq.h5

## HDF5 layout (format_version 1)
Root attributes: `stage` (seq|sft|dpo|grpo), `vocab_size`, `tokenizer_hash` (sha256 of the canonical
tokenizer.json), `eot_id`, `format_version`. Groups `train/` and `val/` hold the same datasets. Token ids are
uint32, masks uint8 (1 = the model learns to predict this token), offsets int64 with n+1 entries (item i is
`x[offsets[i]:offsets[i+1]]`), strings variable-length utf-8. All datasets are 1-D, chunked and resizable.
- seq:  `tokens`: every document followed by `<|endoftext|>`, one stream.
- sft:  `tokens`, `loss_mask`, `offsets` (one conversation per record, rendered by render_chat).
- dpo:  `chosen_tokens`, `chosen_mask`, `chosen_offsets`, the same three for `rejected_`, and
        `prompt_lengths` (int64, one per record: the tokens before the reply); masks are 1 on the reply only.
- grpo: `prompt_tokens`, `prompt_offsets` (prompts end with `<|im_start|>assistant\\n`), `answer` and
        `record` (the input line as JSON) strings. Offline files add `response_tokens` and `response_offsets`
        (one entry per response: its tokens then `<|im_end|>`), `rewards` (float32, one per response) and
        `group_offsets` (record i's responses and rewards are `group_offsets[i]:group_offsets[i+1]`).
Train/val split by record: consecutive records form strata of about 1 / val_fraction records and one record
of each stratum, drawn from (seed, stratum), goes to val; so the split is deterministic, val holds val_fraction
of the records, and 1 / val_fraction records are enough for a non-empty val split.
`--data` takes one .h5 file or a directory of .h5 shards read as one, in sorted name order.
"""
import bisect, collections, heapq, itertools, json, os, random, sys, time, unicodedata
from functools import cached_property
from hashlib import sha256

import h5py
import numpy as np
import regex  # tiktoken depends on it; used for the pre-split when training
import tiktoken
import torch

# -----------------------------------------------------------------------------
# command-line options, shared by every script


def _convert(key, text, default):
    try:
        if isinstance(default, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(default, (list, tuple)):
            item_default = default[0] if default else ""
            return type(default)(_convert(key, item, item_default) for item in text.split(",") if item)
        if default is None:
            return None if text.lower() == "none" else text
        return type(default)(text)  # int, float, str
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else type(default).__name__
        raise SystemExit(f"--{key}={text!r}: expected a {kind} value (the default is {default!r})") from None


def parse_args(defaults: dict, argv: list[str]) -> dict:
    """Return a copy of `defaults` with `--key=value` / `--key value` overrides, typed like the defaults."""
    config, i = dict(defaults), 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("-h", "--help"):
            print("options (default values):\n" + "\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
            raise SystemExit(0)
        if not arg.startswith("--") or arg == "--":
            raise SystemExit(f"unexpected argument {arg!r}: options look like --key=value")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in defaults:
            raise SystemExit(f"unknown option --{key}; known options: " + " ".join(f"--{k}" for k in defaults))
        if not has_value:
            bool_word = i < len(argv) and argv[i].lower() in ("true", "false", "1", "0", "yes", "no")
            if isinstance(defaults[key], bool) and not bool_word:
                value = "true"  # a bare --flag
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                raise SystemExit(f"option --{key} needs a value")
        config[key] = _convert(key, value, defaults[key])
    return config


# -----------------------------------------------------------------------------
# tokenizer: tiktoken underneath, a Hugging Face tokenizer.json on disk

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-split: a run of letters with at most one non-letter in front (" the", or a whole run of Chinese
# characters up to the next punctuation) is one chunk, every digit is its own chunk (so numbers are spelled
# digit by digit, which helps arithmetic), punctuation and whitespace runs are chunks. BPE never merges across chunks.
SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_ROLES = ("system", "user", "assistant")


def _bytes_to_unicode():
    # GPT-2's reversible map from the 256 bytes to printable characters: the keys of a byte-level vocab
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _split_pattern(hf_json, source):
    """The one regex of a byte-level pre-tokenizer (tiktoken takes exactly one), or a clear error."""
    pre = hf_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds.count("ByteLevel") != 1 or kinds.count("Split") > 1 or set(kinds) - {"ByteLevel", "Split"}:
        raise ValueError(f"{source}: pre_tokenizer {kinds} is not supported; need ByteLevel, optionally after one "
                         "Split (as GPT-2, Llama 3, Qwen2 and Qwen3 tokenizers have)")
    byte_level = steps[kinds.index("ByteLevel")]
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{source}: ByteLevel add_prefix_space=true is not supported")
    if "Split" not in kinds:
        return GPT2_SPLIT_PATTERN if byte_level.get("use_regex", True) else r"[\s\S]+"
    split = steps[kinds.index("Split")]
    if byte_level.get("use_regex", True) or split.get("behavior") != "Isolated" or split.get("invert"):
        raise ValueError(f"{source}: only a Split with behavior Isolated, invert false, then ByteLevel with "
                         "use_regex false is supported")
    pattern = split["pattern"]
    return pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])


class Tokenizer:
    """Byte-level BPE: encode/decode with tiktoken, stored as a Hugging Face tokenizer.json (self.hf_json)."""

    def __init__(self, hf_json: dict, source: str = "tokenizer.json"):
        self.hf_json = hf_json
        model = hf_json.get("model") or {}
        if model.get("type") != "BPE" or (hf_json.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{source}: only byte-level BPE tokenizers (model BPE, decoder ByteLevel, as GPT-2, "
                             f"Llama 3 and Qwen ship) can be loaded; this one has model {model.get('type')!r} "
                             f"and decoder {(hf_json.get('decoder') or {}).get('type')!r}")
        if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"{source}: BPE dropout, continuing_subword_prefix and end_of_word_suffix are not supported")
        normalizer = (hf_json.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC"):
            raise ValueError(f"{source}: normalizer {normalizer!r} is not supported (only none or NFC)")
        self._nfc = normalizer == "NFC"  # Qwen2/Qwen3 normalize to NFC before splitting
        pattern = _split_pattern(hf_json, source)

        vocab = model["vocab"]
        self._id_to_bytes = {}  # decoding needs no tiktoken: a token id is its bytes
        for text, token_id in vocab.items():
            try:
                self._id_to_bytes[token_id] = bytes(CHAR_TO_BYTE[c] for c in text)
            except KeyError:
                raise ValueError(f"{source}: vocab entry {text!r} is not byte-level (character outside GPT-2's byte map)") from None
        added = {token["content"]: token["id"] for token in hf_json.get("added_tokens", [])}
        for content, token_id in added.items():
            self._id_to_bytes[token_id] = content.encode()
        missing = [b for b in range(256) if BYTE_TO_CHAR[b] not in vocab]
        if missing:
            raise ValueError(f"{source}: {len(missing)} of the 256 single-byte tokens are missing (e.g. byte {missing[0]}); "
                             "train byte-level BPE with the full byte alphabet (initial_alphabet=ByteLevel.alphabet())")
        # tiktoken merges the adjacent pair whose joined bytes have the lowest rank; HF merges the pair listed
        # first in `merges`. Both agree when a token's rank is the index of the merge that made it.
        byte_ids = [vocab[BYTE_TO_CHAR[b]] for b in range(256)]
        merged_ids, seen = [], set()
        for merge in model["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            if left + right not in vocab:
                raise ValueError(f"{source}: merge {left!r} + {right!r} makes a token missing from the vocab")
            if left + right not in seen:  # a token made by two merges: the first one ranks it
                seen.add(left + right)
                merged_ids.append(vocab[left + right])
        bpe_ids = byte_ids + merged_ids
        in_merge_order = all(a < b for a, b in zip(merged_ids, merged_ids[1:]))
        if in_merge_order and len(set(bpe_ids) | set(added.values())) == len(bpe_ids) + len(added):
            self._rank_to_id = None  # the usual case (GPT-2, Llama 3, Qwen, ours): rank == id
            ranks = {self._id_to_bytes[i]: i for i in bpe_ids}
            special_ranks = dict(added)
        else:  # ids out of merge order: tiktoken gets ranks 0.., and we translate ranks back to ids
            self._rank_to_id = bpe_ids + list(added.values())
            ranks = {self._id_to_bytes[i]: rank for rank, i in enumerate(bpe_ids)}
            special_ranks = {content: len(bpe_ids) + n for n, content in enumerate(added)}
        try:
            self._tiktoken = tiktoken.Encoding("tokenizer", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ranks)
        except Exception as e:
            raise ValueError(f"{source}: tiktoken rejects the split pattern {pattern!r}: {e}") from None

        self.vocab_size = max(self._id_to_bytes) + 1
        self._decode_table = [self._id_to_bytes.get(i) for i in range(self.vocab_size)]
        self.eot_id = added.get("<|endoftext|>", added.get("<|end_of_text|>"))  # the latter is Llama 3's
        self.im_start_id, self.im_end_id = added.get("<|im_start|>"), added.get("<|im_end|>")
        self.stop_ids = [i for i in (self.im_end_id, added.get("<|eot_id|>"), self.eot_id) if i is not None]

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        path = directory if os.path.isfile(directory) else os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found; a tokenizer directory holds a Hugging Face tokenizer.json "
                                    "(make one with: python data.py tokenizer --input=... --out=DIR)")
        try:
            with open(path, encoding="utf-8") as f:
                return cls(json.load(f), source=path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

    def token_ids(self):
        """The special token ids a model's config.json names (Transformer.save_pretrained's token_ids)."""
        return {"bos_token_id": None, "eos_token_id": self.stop_ids, "pad_token_id": self.eot_id}

    def save(self, directory: str):
        """tokenizer.json + tokenizer_config.json: what transformers.AutoTokenizer.from_pretrained(directory) reads."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(self.hf_json, f, ensure_ascii=False, indent=1)
        names = {i: content for content, i in ((t["content"], t["id"]) for t in self.hf_json.get("added_tokens", []))}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "bos_token": None, "eos_token": names.get(self.stop_ids[0]) if self.stop_ids else None,
                  "pad_token": names.get(self.eot_id), "unk_token": None}
        if self.im_start_id is not None and self.im_end_id is not None:
            config["chat_template"] = CHAT_TEMPLATE
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)

    @cached_property
    def hash(self) -> str:
        canonical = json.dumps(self.hf_json, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return sha256(canonical.encode()).hexdigest()

    def _ids(self, ranks):
        return ranks if self._rank_to_id is None else [self._rank_to_id[r] for r in ranks]

    def encode(self, text: str) -> list[int]:
        """Plain text: '<|im_end|>' typed by a user stays text, never becomes the special token."""
        return self._ids(self._tiktoken.encode_ordinary(unicodedata.normalize("NFC", text) if self._nfc else text))

    def encode_with_special(self, text: str) -> list[int]:
        """Special-token strings in `text` become their ids, as Hugging Face tokenizers do."""
        text = unicodedata.normalize("NFC", text) if self._nfc else text
        return self._ids(self._tiktoken.encode(text, allowed_special="all"))

    def decode_bytes(self, ids) -> bytes:
        try:
            return b"".join([self._decode_table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size or self._decode_table[i] is None)
            raise ValueError(f"token id {bad} is not in the tokenizer (vocab_size {self.vocab_size})") from None

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """ChatML `<|im_start|>{role}\\n{content}<|im_end|>\\n` -> (ids, loss_mask). The mask is 1 on assistant
        content and its <|im_end|>; a token that straddles the role's "\\n" and the content counts as content."""
        if self.im_start_id is None or self.im_end_id is None:
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens, so it cannot render ChatML")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
        newline = self.encode("\n")
        ids, mask = [], []
        for n, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role not in CHAT_ROLES:
                raise ValueError(f"message {n}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"message {n} ({role}): content must be a string, got {type(content).__name__}")
            head_bytes, body = len(role) + 1, self.encode(role + "\n" + content)
            n_head = 0
            while n_head < len(body) and head_bytes >= len(self._decode_table[body[n_head]]):
                head_bytes -= len(self._decode_table[body[n_head]])
                n_head += 1
            learn = int(role == "assistant")
            ids += [self.im_start_id, *body, self.im_end_id, *newline]
            mask += [0] * (1 + n_head) + [learn] * (len(body) - n_head + 1) + [0] * len(newline)
        if add_generation_prompt:
            prompt = [self.im_start_id, *self.encode("assistant\n")]
            ids, mask = ids + prompt, mask + [0] * len(prompt)
        return ids, mask


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False):
    return tokenizer.render_chat(messages, add_generation_prompt)


# -----------------------------------------------------------------------------
# BPE training: count unique pre-split chunks, then merge the most frequent pair, updating counts incrementally


def _merge_pair(word, left, right, new_id):
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def train_tokenizer(texts, vocab_size: int, progress: bool = True) -> Tokenizer:
    """Ids 0..255 are the bytes, 256.. one per merge in order, then <|endoftext|>, <|im_start|>, <|im_end|>."""
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small: 256 bytes + {len(SPECIAL_TOKENS)} special tokens at least")
    t0, split = time.time(), regex.compile(SPLIT_PATTERN)
    chunk_counts = collections.Counter()
    for text in texts:
        chunk_counts.update(split.findall(text))
    words = [list(chunk.encode()) for chunk in chunk_counts]  # each unique chunk once, as token ids
    counts = list(chunk_counts.values())
    pair_counts = collections.defaultdict(int)
    where = collections.defaultdict(list)  # pair -> indices of words that held it (may hold stale entries)
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            where[pair].append(w)
    # a lazy max-heap: an entry may overstate its pair's count; popped, it is checked and pushed back if stale
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    if progress:
        print(f"{len(words):,} unique chunks of {sum(counts):,} counted in {time.time() - t0:.1f}s", file=sys.stderr)
    merges, token_bytes = [], [bytes([b]) for b in range(256)]
    while len(merges) < n_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -negative_count:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < 2:
            break  # a pair seen once teaches nothing
        new_id = 256 + len(merges)
        merges.append(pair)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        delta = collections.defaultdict(int)
        for w in set(where.pop(pair)):
            word = words[w]
            merged = _merge_pair(word, pair[0], pair[1], new_id)
            if len(merged) == len(word):
                continue
            for old in zip(word, word[1:]):
                delta[old] -= counts[w]
            for new in zip(merged, merged[1:]):
                delta[new] += counts[w]
                if new_id in new:
                    where[new].append(w)
            words[w] = merged
        for changed, d in delta.items():
            if d:
                pair_counts[changed] += d
                if d > 0:
                    heapq.heappush(heap, (-pair_counts[changed], changed))
        pair_counts.pop(pair, None)
        if progress and (len(merges) % 200 == 0 or len(merges) == n_merges):
            print(f"\rmerge {len(merges):,}/{n_merges:,} count {count:,} {token_bytes[-1]!r:.40} "
                  f"{time.time() - t0:.0f}s   ", end="", file=sys.stderr, flush=True)
    if progress:
        print(f"\n{len(merges):,} merges in {time.time() - t0:.1f}s", file=sys.stderr)

    to_text = lambda b: "".join(BYTE_TO_CHAR[x] for x in b)  # noqa: E731
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    hf_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": len(token_bytes) + n, "content": content, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for n, content in enumerate(SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False}, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {to_text(b): i for i, b in enumerate(token_bytes)},
                  "merges": [[to_text(token_bytes[a]), to_text(token_bytes[b])] for a, b in merges]},
    }
    return Tokenizer(hf_json, source="trained tokenizer")


# -----------------------------------------------------------------------------
# exact-answer check, shared by sample.py --eval and GRPO's reward

_NUMBER = regex.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?")
_TRAILING = " \t\r\n.。,，!！?？:：;；'\"”’)）]】"


def answer_is_correct(completion: str, answer: str) -> bool:
    """True when the completion's final number (or, for a non-numeric answer, its ending) equals the answer."""
    completion = unicodedata.normalize("NFKC", completion)  # full-width digits and punctuation to ASCII
    answer = " ".join(unicodedata.normalize("NFKC", str(answer)).split()).rstrip(_TRAILING).lstrip()
    completion = regex.sub(r"(?<=\d),(?=\d{3}\b)", "", completion)  # 1,234 -> 1234
    if _NUMBER.fullmatch(answer.replace(",", "")):
        numbers = _NUMBER.findall(completion)
        return bool(numbers) and float(numbers[-1]) == float(answer.replace(",", ""))
    completion = " ".join(completion.split()).rstrip(_TRAILING)
    if not answer or not completion.lower().endswith(answer.lower()):
        return False
    before = completion[:-len(answer)][-1:]  # "Comparis" does not end with the answer "Paris"
    return not (before.isascii() and before.isalnum())


# -----------------------------------------------------------------------------
# preparation: txt/jsonl -> HDF5, streamed

FORMAT_VERSION = 1


def _val_picks(val_fraction, seed):
    """Yield, for records 0, 1, 2, ..., whether each goes to val (one random record per stratum, see the top)."""
    per_million, stratum, picked = round(val_fraction * 1_000_000), None, -1
    for i in itertools.count():
        if per_million and i * per_million // 1_000_000 != stratum:
            stratum = i * per_million // 1_000_000  # integer arithmetic: strata boundaries are exact
            start, end = -(-stratum * 1_000_000 // per_million), -(-(stratum + 1) * 1_000_000 // per_million)
            picked = start + random.Random(f"{seed}:{stratum}").randrange(end - start)
        yield i == picked


def _read_records(paths, jsonl_only=False):
    """Yield (where, record, n_bytes) for each record; where = 'file:line' for error messages."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        is_jsonl = path.endswith((".jsonl", ".json"))
        if jsonl_only and not is_jsonl:
            raise ValueError(f"{path}: this stage reads .jsonl files (one JSON object per line)")
        with open(path, encoding="utf-8") as f:
            block, start = [], 1
            for line_no, line in enumerate(f, 1):
                if is_jsonl and line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                    yield f"{path}:{line_no}", record, len(line.encode())
                elif not is_jsonl and line.strip():  # text: a document is a block of lines between blank lines
                    start = start if block else line_no
                    block.append(line)
                elif block:
                    text = "".join(block).rstrip("\n")
                    yield f"{path}:{start}", {"text": text}, len(text.encode())
                    block = []
            if block:
                text = "".join(block).rstrip("\n")
                yield f"{path}:{start}", {"text": text}, len(text.encode())


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
    columns = {"prompt_tokens": u32, "prompt_offsets": i64, "answer": text, "record": text}
    if offline:
        columns |= {"response_tokens": u32, "response_offsets": i64, "rewards": np.float32, "group_offsets": i64}
    return columns


class _Appender:
    """A resizable 1-D HDF5 dataset filled through a buffer, so the corpus never sits in memory."""

    def __init__(self, group, name, dtype, flush_at=1 << 20):
        is_text = dtype == h5py.string_dtype()
        self.dtype, self.flush_at, self.buffer = (object if is_text else dtype), flush_at, []
        self.dataset = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                            chunks=(256 if is_text else 1 << 16,))
        self.size = 0
        if name.endswith("offsets"):
            self.append(0)  # offsets hold n + 1 entries

    def extend(self, values):
        self.buffer.extend(values)
        self.size += len(values)
        if len(self.buffer) >= self.flush_at:
            self.flush()

    def append(self, value):
        self.extend([value])

    def flush(self):
        n = self.dataset.shape[0]
        self.dataset.resize((n + len(self.buffer),))
        self.dataset[n:] = np.asarray(self.buffer, dtype=self.dtype)
        self.buffer = []


def _write_record(stage, out, tokenizer, record, where):
    if stage == "seq":
        out["tokens"].extend(tokenizer.encode(_get(record, "text", str, where)) + [tokenizer.eot_id])
    elif stage == "sft":
        ids, mask = _render(tokenizer, _get(record, "messages", list, where), where, "messages")
        out["tokens"].extend(ids), out["loss_mask"].extend(mask), out["offsets"].append(out["tokens"].size)
    elif stage == "dpo":
        key, prompt = _prompt_messages(record, where)
        prompt_ids, _ = _render(tokenizer, prompt, where, key, add_generation_prompt=True)
        for side in ("chosen", "rejected"):
            reply = [{"role": "assistant", "content": _get(record, side, str, where)}]
            ids, mask = _render(tokenizer, prompt + reply, where, key)
            n_prompt = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), len(prompt_ids))
            out[f"{side}_tokens"].extend(ids), out[f"{side}_mask"].extend([0] * n_prompt + mask[n_prompt:])
            out[f"{side}_offsets"].append(out[f"{side}_tokens"].size)
        out["prompt_lengths"].append(n_prompt)
    else:  # grpo
        key, prompt = _prompt_messages(record, where)
        prompt_ids, _ = _render(tokenizer, prompt, where, key, add_generation_prompt=True)
        answer = _get(record, "answer", (str, int, float), where)
        out["prompt_tokens"].extend(prompt_ids), out["prompt_offsets"].append(out["prompt_tokens"].size)
        out["answer"].append(str(answer)), out["record"].append(json.dumps(record, ensure_ascii=False))
        if ("responses" in record) != ("rewards" in out):
            raise ValueError(f"{where}: every record of an offline GRPO file has 'responses' and 'rewards', "
                             f"of an online one neither (the first record decides)")
        if "rewards" in out:
            responses, rewards = _get(record, "responses", list, where), _get(record, "rewards", list, where)
            if len(responses) != len(rewards) or not all(isinstance(r, str) for r in responses) or \
                    not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
                raise ValueError(f"{where}: 'responses' must be strings and 'rewards' numbers, as many of each")
            for response in responses:
                out["response_tokens"].extend(tokenizer.encode(response) + [tokenizer.im_end_id])
                out["response_offsets"].append(out["response_tokens"].size)
            out["rewards"].extend([float(r) for r in rewards]), out["group_offsets"].append(out["rewards"].size)


def prepare(stage: str, inputs: list[str], tokenizer_dir: str, out_path: str, val_fraction: float = 0.05,
            seed: int = 0, progress: bool = True) -> dict:
    """Tokenize `inputs` into `out_path` (layout at the top of this file); returns records per split."""
    if stage not in ("seq", "sft", "dpo", "grpo"):
        raise ValueError(f"--stage={stage!r}: expected one of seq, sft, dpo, grpo")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction={val_fraction}: expected a number in [0, 1)")
    tokenizer = Tokenizer.load(tokenizer_dir)
    if stage == "seq" and tokenizer.eot_id is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no <|endoftext|> to separate documents")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp_path, val_picks = out_path + ".tmp", _val_picks(val_fraction, seed)
    n_records, n_bytes, t0, last_print = {"train": 0, "val": 0}, 0, time.time(), 0.0
    try:
        with h5py.File(tmp_path, "w") as f:
            f.attrs.update(stage=stage, vocab_size=tokenizer.vocab_size, tokenizer_hash=tokenizer.hash,
                           eot_id=-1 if tokenizer.eot_id is None else tokenizer.eot_id, format_version=FORMAT_VERSION)
            splits = None
            for where, record, size in _read_records(inputs, jsonl_only=stage != "seq"):
                if splits is None:  # offline GRPO files have more datasets; the first record tells
                    columns = _columns(stage, offline="responses" in record)
                    splits = {name: {key: _Appender(f.require_group(name), key, dtype) for key, dtype in columns.items()}
                              for name in ("train", "val")}
                split = "val" if next(val_picks) else "train"
                _write_record(stage, splits[split], tokenizer, record, where)
                n_records[split] += 1
                n_bytes += size
                if progress and time.time() - last_print > 0.5:
                    last_print, elapsed = time.time(), time.time() - t0
                    tokens = sum(a.size for s in splits.values() for k, a in s.items() if k.endswith("tokens"))
                    print(f"\r{stage}: {sum(n_records.values()):,} records, {tokens:,} tokens, {n_bytes / 1e6:.1f} MB, "
                          f"{n_bytes / 1e6 / elapsed:.1f} MB/s", end="", file=sys.stderr, flush=True)
            if splits is None:
                raise ValueError(f"{', '.join(inputs)}: no records")
            for split in splits.values():
                for appender in split.values():
                    appender.flush()
        os.replace(tmp_path, out_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    if progress:
        print(("\n" if last_print else "") + f"wrote {out_path}: {stage}, train {n_records['train']:,} records, "
              f"val {n_records['val']:,}, {n_bytes / 1e6:.1f} MB in {time.time() - t0:.1f}s", file=sys.stderr)
    return n_records


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
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items of {self.files[0]}...")
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
    """Windows of block_size + 1 tokens every `stride` tokens over the shards' token streams joined."""

    def __init__(self, files, groups, attrs, block_size, stride=None):
        super().__init__(files, groups, attrs, block_size, first_offsets=None)
        self.stride = stride or block_size
        self._starts = np.cumsum([0] + [len(g["tokens"]) for g in groups])
        self.n_tokens = int(self._starts[-1])

    def __len__(self):
        return max(0, (self.n_tokens - self.block_size - 1) // self.stride + 1)

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
        windows = torch.from_numpy(np.stack([self._span(i * self.stride, i * self.stride + self.block_size + 1)
                                             for i in indices]))  # (B, T+1)
        return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}


class SFTDataset(_Dataset):
    """One conversation per row, truncated to block_size + 1 tokens, right-padded to the longest in the batch."""

    def get_batch(self, indices):
        rows = [self._shifted(*self._record(i, "offsets", "tokens", "loss_mask")) for i in indices]
        width = max(1, max(len(inputs) for inputs, _ in rows))
        return {"input_ids": self._pad([r[0] for r in rows], self.pad_id, width),
                "targets": self._pad([r[1] for r in rows], -100, width)}


class DPODataset(_Dataset):
    """Chosen and rejected rows padded to one width, so a loss may run both in one forward pass."""

    def get_batch(self, indices):
        sides = {side: [self._shifted(*self._record(i, f"{side}_offsets", f"{side}_tokens", f"{side}_mask"))
                        for i in indices] for side in ("chosen", "rejected")}
        width = max(1, max(len(inputs) for rows in sides.values() for inputs, _ in rows))
        batch = {}
        for side, rows in sides.items():
            batch[f"{side}_ids"] = self._pad([r[0] for r in rows], self.pad_id, width)
            batch[f"{side}_targets"] = self._pad([r[1] for r in rows], -100, width)
        return batch


class GRPODataset(_Dataset):
    """Prompts (token lists, ending in the generation prompt) with their answers; offline files add responses."""

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


def load_dataset(path: str, split: str = "train", block_size: int = 1024, stage: str | None = None, stride: int | None = None):
    """`path`: one .h5 file or a directory of .h5 shards (sorted by name). Checks stage, format and datasets."""
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
    if file_stage == "seq":
        return SeqDataset(files, groups, attrs, block_size, stride)
    first_offsets = {"sft": "offsets", "dpo": "chosen_offsets", "grpo": "prompt_offsets"}[file_stage]
    cls = {"sft": SFTDataset, "dpo": DPODataset, "grpo": GRPODataset}[file_stage]
    return cls(files, groups, attrs, block_size, first_offsets)


# -----------------------------------------------------------------------------
# resumable distributed sampler


class ResumableSampler:
    """A permutation per epoch from (seed, epoch). One optimizer step takes the next G = batch_size * grad_accum
    * world_size indices; rank r's micro-batch m is chunk r * grad_accum + m, so 2 ranks x accum 1 see per step
    what 1 rank x accum 2 sees. An epoch ends when fewer than G indices are left (they are dropped)."""

    def __init__(self, num_items, batch_size, grad_accum=1, rank=0, world_size=1, seed=0, shuffle=True):
        self.global_batch = batch_size * grad_accum * world_size
        if num_items < self.global_batch:
            raise ValueError(f"{num_items} items are fewer than one step needs: batch_size {batch_size} x grad_accum "
                             f"{grad_accum} x world_size {world_size} = {self.global_batch}")
        self.num_items, self.batch_size, self.grad_accum = num_items, batch_size, grad_accum
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self.epoch, self.position = 0, 0  # position: indices of this epoch's permutation already used
        self._permutation_epoch, self._permutation = None, None

    def _order(self):
        if self._permutation_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._permutation = rng.permutation(self.num_items) if self.shuffle else np.arange(self.num_items)
            self._permutation_epoch = self.epoch
        return self._permutation

    def next_step(self) -> list[list[int]]:
        if self.position + self.global_batch > self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
        step = self._order()[self.position:self.position + self.global_batch]
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
# built-in demo data: bilingual arithmetic with exact answers

SENTENCES = [("The cat sleeps on the mat.", "猫在垫子上睡觉。"), ("I like green tea.", "我喜欢绿茶。"),
             ("It is raining today.", "今天下雨了。"), ("We read books at night.", "我们晚上看书。"),
             ("The sun rises in the east.", "太阳从东方升起。"), ("She walks to school.", "她走路去学校。"),
             ("Numbers help us count.", "数字帮助我们计数。"), ("He drinks a cup of water.", "他喝了一杯水。"),
             ("The river is long.", "这条河很长。"), ("Birds sing in the morning.", "鸟儿在早上唱歌。"),
             ("Math is fun to learn.", "学数学很有趣。"), ("My friend has two dogs.", "我的朋友有两只狗。")]


def _question(rng, a, op, b, chinese):
    if chinese:
        return rng.choice(["{a} {z} {b} 等于多少？", "计算 {a} {o} {b}。", "{a} {o} {b} 等于几？"]).format(
            a=a, b=b, o=op, z="加" if op == "+" else "减")
    return rng.choice(["What is {a} {o} {b}?", "Compute {a} {o} {b}.", "{a} {o} {b} = ?"]).format(a=a, b=b, o=op)


def _reply(a, op, b, result, chinese):
    return f"{a} {'加' if op == '+' else '减'} {b} 等于 {result}。" if chinese else f"{a} {op} {b} = {result}"


def make_demo(out_dir, seed=0, max_operand=49, n_eval=200, pretrain_docs=8000, sft=5000, dpo=3000, grpo=2000):
    """Writes pretrain.txt, sft.jsonl, dpo.jsonl, grpo.jsonl, eval.jsonl, dpo_eval.jsonl; returns their paths.
    Problems: a + b and a - b (a >= b), operands 0..max_operand; eval problems never appear in training files."""
    rng = random.Random(seed)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}
    problems = [(a, op, b) for a in range(max_operand + 1) for b in range(max_operand + 1)
                for op in ops if op == "+" or a >= b]
    rng.shuffle(problems)
    held_out, train = problems[:n_eval], problems[n_eval:]
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in
             ("pretrain.txt", "sft.jsonl", "dpo.jsonl", "grpo.jsonl", "eval.jsonl", "dpo_eval.jsonl")}

    def solved(problem, chinese=None):
        a, op, b = problem
        chinese = rng.random() < 0.5 if chinese is None else chinese
        return a, op, b, ops[op](a, b), chinese

    with open(paths["pretrain.txt"], "w", encoding="utf-8") as f:
        for _ in range(pretrain_docs):
            lines = []
            for _ in range(rng.randint(3, 8)):
                a, op, b, c, chinese = solved(rng.choice(train))
                kind = rng.random()
                if kind < 0.2:
                    lines.append(rng.choice(SENTENCES)[int(chinese)])
                elif kind < 0.5:
                    lines.append(f"{_question(rng, a, op, b, chinese)} {_reply(a, op, b, c, chinese)}")
                else:
                    word = ("加" if op == "+" else "减") if chinese else ("plus" if op == "+" else "minus")
                    lines.append(f"{a} {word} {b} {'等于' if chinese else 'equals'} {c}{'。' if chinese else '.'}"
                                 if rng.random() < 0.5 else _reply(a, op, b, c, chinese) + ("" if chinese else "."))
            f.write("\n".join(lines) + "\n\n")

    def write_jsonl(name, records):
        with open(paths[name], "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def chat(problem):
        a, op, b, c, chinese = solved(problem)
        return {"messages": [{"role": "user", "content": _question(rng, a, op, b, chinese)},
                             {"role": "assistant", "content": _reply(a, op, b, c, chinese)}]}

    def pair(problem):
        a, op, b, c, chinese = solved(problem)
        wrong = c + rng.choice([-10, -2, -1, 1, 2, 10])
        return {"prompt": _question(rng, a, op, b, chinese), "chosen": _reply(a, op, b, c, chinese),
                "rejected": _reply(a, op, b, wrong, chinese)}

    def task(problem, as_messages):
        a, op, b, c, chinese = solved(problem)
        prompt = _question(rng, a, op, b, chinese)
        return ({"messages": [{"role": "user", "content": prompt}]} if as_messages else {"prompt": prompt}) | {"answer": str(c)}

    write_jsonl("sft.jsonl", (chat(rng.choice(train)) for _ in range(sft)))
    write_jsonl("dpo.jsonl", (pair(rng.choice(train)) for _ in range(dpo)))
    write_jsonl("grpo.jsonl", (task(rng.choice(train), False) for _ in range(grpo)))
    write_jsonl("eval.jsonl", (task(problem, True) for problem in held_out))
    write_jsonl("dpo_eval.jsonl", (pair(problem) for problem in held_out))
    return paths


# -----------------------------------------------------------------------------
# command line

USAGE = """usage:
  python data.py demo --out=DIR [--seed=0] [--max_operand=49] [--n_eval=200] [--pretrain_docs=8000] [--sft=5000] ...
      write the built-in bilingual arithmetic demo data (pretrain.txt, sft/dpo/grpo.jsonl, eval.jsonl, dpo_eval.jsonl)
  python data.py tokenizer --input=FILE[,FILE...] --vocab_size=N --out=TOKDIR
      train a byte-level BPE tokenizer on .txt / .jsonl ("text" or "messages") files
  python data.py prepare --stage=seq|sft|dpo|grpo --input=FILE[,FILE...] --tokenizer=TOKDIR --out=FILE.h5
                         [--val_fraction=0.05] [--seed=0]
      tokenize into an HDF5 file for train.py --data
Any command with --help lists its options."""


def _training_texts(paths):
    for where, record, _ in _read_records(paths):
        if "text" in record:
            yield _get(record, "text", str, where)
        elif "messages" in record:
            for message in _get(record, "messages", list, where):
                yield str(message.get("content", "")) if isinstance(message, dict) else ""
        else:
            raise ValueError(f"{where}: missing key 'text' or 'messages'")


def main(argv):
    if not argv or argv[0] not in ("demo", "tokenizer", "prepare"):
        print(USAGE)
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    command, argv = argv[0], argv[1:]
    if command == "demo":
        args = parse_args({"out": "data/demo", "seed": 0, "max_operand": 49, "n_eval": 200, "pretrain_docs": 8000,
                           "sft": 5000, "dpo": 3000, "grpo": 2000}, argv)
        for name, path in make_demo(args.pop("out"), **args).items():
            with open(path, encoding="utf-8") as f:
                count = sum(1 for line in f if line.strip()) if name.endswith(".jsonl") else f.read().count("\n\n")
            print(f"wrote {path}: {count:,} {'records' if name.endswith('.jsonl') else 'documents'}, "
                  f"{os.path.getsize(path) / 1e6:.2f} MB")
        return
    if command == "tokenizer":
        args = parse_args({"input": "", "vocab_size": 4096, "out": ""}, argv)
    else:
        args = parse_args({"stage": "", "input": "", "tokenizer": "", "out": "", "val_fraction": 0.05, "seed": 0}, argv)
    for key, value in args.items():
        if value == "":
            raise SystemExit(f"--{key} is required; see python data.py {command} --help")
    inputs = [p for p in args["input"].split(",") if p]
    try:
        if command == "tokenizer":
            tokenizer = train_tokenizer(_training_texts(inputs), args["vocab_size"])
            tokenizer.save(args["out"])
            print(f"wrote {args['out']}: vocab_size {tokenizer.vocab_size}, hash {tokenizer.hash[:12]}")
        else:
            prepare(args["stage"], inputs, args["tokenizer"], args["out"], args["val_fraction"], args["seed"])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
