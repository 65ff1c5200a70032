"""
The tokenizer: byte-level BPE encoded and decoded by tiktoken, read from and written as a Hugging Face
tokenizer.json (so GPT-2, Llama 3, Qwen and DeepSeek tokenizers load, and ours load in transformers), BPE
training, and the one chat renderer, which returns the loss mask with the ids.

    tokenizer = Tokenizer.load("data/demo/tokenizer")       # a directory holding tokenizer.json
    ids, loss_mask = tokenizer.render_chat(messages)        # 1 on what each assistant message adds
    tokenizer = train_tokenizer(texts, vocab_size=2048)     # python data.py tokenizer ... runs this
"""
import collections
import heapq
import json
import os
import sys
import time
import unicodedata
from functools import cached_property
from hashlib import sha256

import regex  # tiktoken depends on it; used for the pre-split when training
import tiktoken

# -----------------------------------------------------------------------------
# formats: special tokens, the pre-split regex, ChatML, GPT-2's byte map

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-split: a run of letters with at most one non-letter in front (" the", or a whole run of Chinese
# characters up to the next punctuation) is one chunk, every digit is its own chunk (so numbers are spelled
# digit by digit, which helps arithmetic), punctuation and whitespace runs are chunks. BPE never merges across chunks.
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
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
            raise ValueError(f"{source}: BPE dropout, continuing_subword_prefix and end_of_word_suffix are "
                             "not supported")
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
                raise ValueError(f"{source}: vocab entry {text!r} is not byte-level (a character outside GPT-2's "
                                 "byte map)") from None
        added = {token["content"]: token["id"] for token in hf_json.get("added_tokens", [])}
        for content, token_id in added.items():
            self._id_to_bytes[token_id] = content.encode()
        missing = [b for b in range(256) if BYTE_TO_CHAR[b] not in vocab]
        if missing:
            raise ValueError(f"{source}: {len(missing)} of the 256 single-byte tokens are missing "
                             f"(e.g. byte {missing[0]}); "
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
            self._tiktoken = tiktoken.Encoding("tokenizer", pat_str=pattern, mergeable_ranks=ranks,
                                               special_tokens=special_ranks)
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
        raise ValueError(f"vocab_size {vocab_size} is too small: 256 bytes + {len(SPECIAL_TOKENS)} special tokens "
                         "at least")
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
                          "rstrip": False, "normalized": False, "special": True}
                         for n, content in enumerate(SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {to_text(b): i for i, b in enumerate(token_bytes)},
                  "merges": [[to_text(token_bytes[a]), to_text(token_bytes[b])] for a, b in merges]},
    }
    return Tokenizer(hf_json, source="trained tokenizer")


