"""
The paged KV cache: a pool of fixed-size blocks handed out as tokens are written, a block table per row, and where
one forward pass writes its new keys and values and where its tokens stand (model.attention_mask makes the attention
mask of that). model.py's attention layers read and write it; sample.Engine decides which rows get blocks.

    budget = kv_budget_bytes("50%", device)                # --kv_memory: GB, or a share of the memory left
    cache = KVCache(config, batch_size=8, n_blocks=budget // KVCache.block_bytes(config, dtype))

A layer's pool is one tensor of n_blocks * BLOCK token slots, (slots, heads, width): GQA layers hold (k, v), each
(slots, n_kv_heads, head_dim); MLA layers one (slots, 1, kv_lora_rank + qk_rope_head_dim) tensor of latents and
RoPE keys. Token t of a row lives in slot table[t // BLOCK] * BLOCK + t % BLOCK (vLLM's slot mapping).
On a CPU the pool is torch.empty: the operating system gives a page the first time it is written, and blocks are
handed out lowest first and zeroed on first use, so the memory held grows block by block up to the budget. On a
GPU the budget is taken up front, as vLLM does.
"""
import heapq
import os
import re

import torch

BLOCK = 16  # tokens per block: a row wastes at most BLOCK - 1 slots


def available_bytes(device):
    """Memory left now: free GPU memory, or the host's MemAvailable (what the kernel could give without swapping)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):  # not Linux: all physical memory
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget_bytes(kv_memory, device):
    """--kv_memory -> bytes: "8" or 8 is 8 GB (10^9 bytes); "40%" a share of the memory left after the weights
    (call it once they are loaded)."""
    text = str(kv_memory).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            return int(share * available_bytes(device))
        gb = float(text)
        if not gb > 0:
            raise ValueError
        return int(gb * 1e9)
    except ValueError:
        raise ValueError(f"kv_memory={kv_memory!r}: expected GB (like 8 or 0.5) or a share of the memory left after "
                         "the weights (like 50%)") from None


def budget_blocks(kv_memory, config, dtype, device, rows, context, tp_size=1):
    """-> (the budget in bytes, the blocks it holds): no more than `rows` rows of `context` tokens would use."""
    budget, block = kv_budget_bytes(kv_memory, device), KVCache.block_bytes(config, dtype, tp_size)
    if budget < block:
        raise ValueError(f"kv_memory={kv_memory!r} ({budget} bytes) holds less than one KV cache block of {BLOCK} "
                         f"tokens ({block} bytes)")
    return budget, min(budget // block, rows * -(-context // BLOCK))


def budget_text(kv_memory, budget, n_blocks, device):
    """The line a command prints at start: what the budget is and the tokens it holds."""
    share = f" ({kv_memory} of the memory left after the weights)" if str(kv_memory).strip().endswith("%") else ""
    taken = "taken up front" if torch.device(device).type == "cuda" else "taken as tokens are written"
    return (f"KV cache: --kv_memory={kv_memory}: {budget / 1e9:.2f} GB{share} holds {n_blocks * BLOCK:,} tokens "
            f"in blocks of {BLOCK}, {taken}")


class KVCache:
    """A pool of n_blocks blocks of BLOCK tokens (default: enough for every row's max_len) shared by batch_size
    rows; `tables` (host lists) hold each row's blocks in order and `lengths` count its tokens. grow() hands a row
    the blocks its next tokens need, reset() gives back those past a length."""

    def __init__(self, config, batch_size, max_len=None, device=None, dtype=torch.float32, n_blocks=None, tp_size=1):
        self.config, self.batch_size = config, batch_size  # tp_size: a GQA layer holds n_kv_heads // tp_size heads
        self.max_len = max_len or config.max_len
        if self.max_len > config.max_len:
            raise ValueError(f"KVCache max_len={self.max_len} exceeds the model's max_len={config.max_len}")
        self.n_blocks = n_blocks or batch_size * -(-self.max_len // BLOCK)
        slots = self.n_blocks * BLOCK
        if config.attn == "mla":
            shape = (slots, 1, config.kv_lora_rank + config.qk_rope_head_dim)
            self.layers = [(torch.empty(shape, device=device, dtype=dtype),) for _ in range(config.n_layers)]
        else:
            shape = (slots, config.n_kv_heads // tp_size, config.head_dim)
            self.layers = [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device,
                                                                                       dtype=dtype))
                           for _ in range(config.n_layers)]
        self.free = list(range(self.n_blocks))  # a heap: the lowest free block first, so used memory stays compact
        self.touched = 0  # blocks below this were zeroed once: an unwritten slot is never NaN under a mask
        self.tables = [[] for _ in range(batch_size)]
        self.lengths = [0] * batch_size

    @staticmethod
    def block_bytes(config, dtype, tp_size=1):
        width = config.kv_lora_rank + config.qk_rope_head_dim if config.attn == "mla" else \
            2 * config.n_kv_heads // tp_size * config.head_dim
        return config.n_layers * width * torch.empty((), dtype=dtype).element_size() * BLOCK

    def bytes_per_token(self):
        return sum(t[0].numel() * t.element_size() for layer in self.layers for t in layer)

    def bytes_touched(self):
        """The pool's memory written so far (on a CPU, what it holds): blocks ever handed out."""
        return self.touched * BLOCK * self.bytes_per_token()

    def blocks_needed(self, row, length):
        return max(0, -(-length // BLOCK) - len(self.tables[row]))

    def grow(self, row, length):
        """Blocks for row `row` to hold `length` tokens -> True, or False (nothing taken) when the pool is short."""
        need = self.blocks_needed(row, length)
        if need > len(self.free):
            return False
        for _ in range(need):
            block = heapq.heappop(self.free)
            if block >= self.touched:
                for t in (t for layer in self.layers for t in layer):
                    t[self.touched * BLOCK:(block + 1) * BLOCK].zero_()
                self.touched = block + 1
            self.tables[row].append(block)
        return True

    def reset(self, rows=None, length=0):
        """Rows keep their first `length` tokens; the blocks past them go back to the pool."""
        for r in range(self.batch_size) if rows is None else rows:
            keep = -(-length // BLOCK)
            for block in self.tables[r][keep:]:
                heapq.heappush(self.free, block)
            del self.tables[r][keep:]
            self.lengths[r] = length


class CacheIndex:
    """Where one forward pass writes its new keys and values into the KV cache, and where its tokens and each row's
    cached keys stand (their positions, from which model.attention_mask decides who sees whom): worked out once per
    forward on the host from the cache's lengths and block tables, copied to the device in one transfer, shared by
    all layers. Grows the rows' blocks for the new tokens (ValueError when the pool is out of them). rows: cache rows
    of the batch (None: all, in order); n_new: valid tokens per row of a right-padded batch (None: all seq_len).
    aligned: one new token per row and every row `length` tokens long (no row sees a key past its end); never for
    a compiled step (always_mask), which wants one graph whatever the lengths."""

    def __init__(self, cache, seq_len, rows=None, n_new=None, device=None, always_mask=False):
        rows = list(range(cache.batch_size)) if rows is None else [int(r) for r in rows]
        start = [cache.lengths[r] for r in rows]
        n_new = [seq_len] * len(rows) if n_new is None else [int(n) for n in n_new]
        self.ends = [s + n for s, n in zip(start, n_new)]
        self.rows = rows
        if max(self.ends) > cache.max_len:
            raise ValueError(f"KV cache overflow: a row would reach {max(self.ends)} tokens, "
                             f"the cache holds {cache.max_len}")
        for r, end in zip(rows, self.ends):
            if not cache.grow(r, end):
                raise ValueError(f"KV cache out of blocks: row {r} needs {cache.blocks_needed(r, end)} more, "
                                 f"{len(cache.free)} of {cache.n_blocks} are free")
        n_blocks = max(len(cache.tables[r]) for r in rows)
        self.length = n_blocks * BLOCK  # keys to attend to: 0 .. length-1 of each row's gathered blocks
        tables = [cache.tables[r] + cache.tables[r][-1:] * (n_blocks - len(cache.tables[r])) for r in rows]
        positions = [s + t for s in start for t in range(seq_len)]
        valid = [(i, r, s + t) for i, (r, s, n) in enumerate(zip(rows, start, n_new)) for t in range(n)]
        slots = [cache.tables[r][p // BLOCK] * BLOCK + p % BLOCK for _, r, p in valid]
        ragged = len(valid) < len(positions)
        flat = [i * seq_len + p - start[i] for i, _, p in valid] if ragged else []
        last = [i * seq_len + n - 1 for i, n in enumerate(n_new)] if ragged else []
        host = [positions, slots, sum(tables, []), flat, last]
        packed = torch.tensor(sum(host, []), dtype=torch.long).to(device)  # one host-to-device copy
        self.positions, self.slots, tables, flat, last = packed.split([len(h) for h in host])
        self.positions = self.positions.view(len(rows), seq_len)  # (b, T)
        offsets = torch.arange(BLOCK, device=device)
        self.read_slots = (tables.view(len(rows), n_blocks, 1) * BLOCK + offsets).view(len(rows), -1)  # (b, length)
        # a right-padded batch: the valid tokens' places in the flattened (b * T) batch, and each row's last one
        self.flat, self.last = (flat, last) if ragged else (None, None)
        self.aligned = not always_mask and seq_len == 1 and min(self.ends) == self.length

    @classmethod
    def of_tensors(cls, positions, slots, read_slots):
        """One new token per row, from the tensors a compiled step (compiled.py) takes as its inputs: masked."""
        index = cls.__new__(cls)
        index.positions, index.slots, index.read_slots = positions, slots, read_slots
        index.flat = index.last = None
        index.aligned = False
        return index

    def new_entries(self, x):
        # x (b, T, ...) -> (n, ...) the entries of valid tokens, in `slots` order
        x = x.reshape(-1, *x.shape[2:])
        return x if self.flat is None else x.index_select(0, self.flat)

    def write(self, buf, x):
        # x (b, T, heads, width): the new tokens' entries into their slots of buf (slots, heads, width)
        buf[self.slots] = self.new_entries(x).to(buf.dtype)

    def read(self, buf):
        # buf (slots, heads, width) -> (b, heads, length, width): each row's blocks gathered in order (index_select:
        # a few times faster than indexing with a 2-d tensor on a CPU)
        b, length = self.read_slots.shape
        return buf.index_select(0, self.read_slots.view(-1)).view(b, length, *buf.shape[1:]).transpose(1, 2)

    def advance(self, cache):
        for r, end in zip(self.rows, self.ends):
            cache.lengths[r] = end
