"""
Generation: the sampler, the engine (continuous batching over a paged KV cache: the one decode path),
generate() on top of it, streamed text, and the command line (--eval's task files: tasks.py).

    python sample.py --model=out/final --prompt="Once upon a time"
    python sample.py --model=out/final --prompt=FILE:prompt.txt --num_samples=3 --temperature=0.7
    python sample.py --model=out/final --chat --prompt="What is 7 + 8?" --temperature=0
    python sample.py --model=out/final --chat                      # interactive chat that keeps the history
    python sample.py --model=out/final --eval=task.jsonl           # greedy exact-answer accuracy
    torchrun --nproc_per_node=2 sample.py --model=out/final --tp=2 --prompt="Hi"   # split over 2 processes

Engine.step() is admit, forward, sample, emit; generate() is a loop over step() (GRPO rollouts and --eval
call it), and serve.py runs the same engine in its own thread. sample_tokens() is the one sampler, SamplingParams
the one object that carries its settings, from the command line or a request to the engine.
A Hugging Face model directory (Llama, Qwen2, Qwen3, DeepseekV3-dense with tokenizer.json) works here
exactly as one written by train.py.
"""
import codecs
import dataclasses
import math
import numbers
import sys
import threading
from collections import deque

import torch

from kv_cache import BLOCK, CacheIndex, KVCache, budget_blocks, budget_text
from model import Logits, Transformer
# only model.py and what it imports: copied beside them, generate() works (load() and main() import the rest)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a sequence picks its tokens: the one object that carries sampling settings. sample.py's command line has
    an option per field (DEFAULTS takes them from here), serve.py's APIs build one per request (api.sampling),
    a Sequence holds one, and the Engine's sampler reads it (adjust_logits, then sample_tokens).
    A new setting is a field here (its type is checked; a range goes in __post_init__), its use in adjust_logits or
    sample_tokens, and, where the APIs take it, a line in api.sampling."""
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p; 1 = all
    min_p: float = 0.0  # drop tokens less than min_p times as likely as the most likely one; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or reply (CTRL's rule); 1 = off
    presence_penalty: float = 0.0  # subtracted once from the logit of each token already in the reply (OpenAI's)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the reply (OpenAI's)
    logit_bias: dict = dataclasses.field(default_factory=dict)  # {token id: bias} added to those tokens' logits;
    # on the command line "ID:BIAS,ID:BIAS", e.g. "0:-100" never samples token 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), field.type
            if kind in (int, float) and not is_number(value, numbers.Integral if kind is int else numbers.Real):
                raise ValueError(f"{field.name}={value!r}: expected {'an integer' if kind is int else 'a number'}")
            if kind in (int, float):
                object.__setattr__(self, field.name, kind(value))
        bias = self.logit_bias
        if not isinstance(bias, dict) or not all(is_number(i, numbers.Integral) and i >= 0 and
                                                 is_number(b, numbers.Real) for i, b in bias.items()):
            raise ValueError(f"logit_bias={bias!r}: expected {{token id (an int >= 0): bias (a finite number)}}")
        object.__setattr__(self, "logit_bias", {int(i): float(b) for i, b in bias.items()})
        for ok, name, expected in [(self.temperature >= 0, "temperature", ">= 0 (0 = greedy)"),
                                   (self.top_k >= 0, "top_k", ">= 0"), (0 <= self.top_p <= 1, "top_p", "in [0, 1]"),
                                   (0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
                                   (self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 = off)")]:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {expected}")

    @property
    def adjusts_logits(self):  # whether adjust_logits changes anything
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0 or \
            self.repetition_penalty != 1

    def settings(self):
        """The fields as command-line settings (sample.py's DEFAULTS): logit_bias as its "ID:BIAS,..." text."""
        return dataclasses.asdict(self) | {"logit_bias": ",".join(f"{i}:{b:g}" for i, b in self.logit_bias.items())}

    @classmethod
    def from_settings(cls, args):
        """The object from command-line settings (load_settings' over settings())."""
        text = args["logit_bias"]
        try:
            bias = {int(i): float(b) for i, _, b in (item.partition(":") for item in text.split(",") if item)}
        except ValueError:
            raise ValueError(f"--logit_bias={text!r}: expected ID:BIAS pairs like 0:-100,42:5") from None
        return cls(**{field.name: args[field.name] for field in dataclasses.fields(cls)} | {"logit_bias": bias})


def is_number(value, kind):
    """value is a finite number of that kind (numbers.Integral or numbers.Real): an int stands for a float, a bool
    for neither."""
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)


# replies generated for an accuracy: --eval, pipeline.py's and GRPO's val reward (tasks.py) all use this one length
EVAL_MAX_NEW_TOKENS = 256

DEFAULTS = dict(
    model="",  # MODELDIR (config.json + model.safetensors + tokenizer files) or a .gguf file
    adapter="",  # a LoRA adapter directory (train.py --lora_rank, or peft's) trained on --model: merged in on load
    prompt="",  # text, or FILE:path to read it from a file; empty: start a fresh document
    chat=False,  # wrap the prompt as a user message in the chat template; without --prompt: interactive chat
    num_samples=1,  # completions of the same prompt, generated as one batch
    max_new_tokens=EVAL_MAX_NEW_TOKENS,  # with --eval, every accuracy's length (README's answers are checked at it)
    # every SamplingParams field is an option (--temperature, --top_k, ..., --logit_bias); the CLI's own defaults:
    **SamplingParams(temperature=0.8, top_p=0.95).settings(),
    seed=1337,  # -1: a different sample every run
    device="auto",  # auto = cuda when available, else cpu
    dtype="auto",  # auto = bfloat16 where the GPU or CPU has it natively, else float32; or float32, bfloat16,
    # float16, int8 or int4 (weight-only int8 or int4 with bfloat16 activations: quant.py)
    compile="auto",  # decode steps through the compiled step (compiled.py): true, false, or auto = where it pays
    weight_layout="auto",  # float32/bfloat16 on a CPU: plain, transposed, packed; auto: quant.py's pick_layout
    eval="",  # TASK.jsonl: greedy generation over {"messages"|"prompt", "answer"} records, prints accuracy
    batch_size=32,  # rows per generate() call with --eval
    kv_memory="50%",  # KV cache budget: GB (like 8), or a share of the memory left after the weights (like 50%);
    # taken as tokens are written on a CPU, up front on a GPU; rows that do not fit together wait their turn
    tp=1,  # tensor parallel: the model split over tp processes (torchrun --nproc_per_node=tp; parallel.py)
    rag="",  # FILE.h5 (python data.py index): each --chat turn or --eval record gets the rag_k best chunks as sources
    rag_k=4,  # chunks retrieved for each --chat turn or --eval record with --rag
    retrieval="",  # with --rag: dense, bm25 or hybrid (rag.py); "" = the index's own (data.py index --retrieval)
)

# -----------------------------------------------------------------------------
# sampling


def per_row(values, batch, name):
    """A setting given per row (a list of length `batch`) or once for all rows -> a list."""
    if not isinstance(values, (list, tuple)):
        return [values] * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for {batch} rows")
    return list(values)


def sample_tokens(logits, params, generators=None, want_logprobs=True):
    """Draw one token per row. logits (B, V) float32; params: a SamplingParams per row (a list of B), or one for all
    rows, of which this reads temperature, top_k, top_p and min_p; generators: None, or B torch.Generators (or None
    entries) on the logits' device, one per row so that each request's seed reproduces its own tokens.

    Temperature below 1e-5 is greedy (a near-zero one would round to 0 in float32 and divide by it). Otherwise:
    divide by the temperature, keep the top_k most likely tokens (0 = all), then the smallest set whose
    probability reaches top_p (always at least one token), then those at least min_p times as likely as the
    most likely one (transformers' order), sample.
    Returns tokens (B,) long and their log-probs (B,) float32 under that transformed distribution
    (greedy rows: log-softmax of the logits given), or None for the log-probs when not want_logprobs."""
    B, V = logits.shape
    device = logits.device
    params = per_row(params, B, "params")
    temperature, top_k = [p.temperature for p in params], [p.top_k for p in params]
    top_p, min_p = [p.top_p for p in params], [p.min_p for p in params]
    generators = per_row(generators, B, "generators")
    greedy = [t < 1e-5 for t in temperature]
    if all(greedy):
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0] if want_logprobs else None

    # greedy rows go through the same arithmetic untransformed (temperature 1, nothing cut); the settings
    # reach the device in one copy. keep_p 2: never reached (a float cumulative sum can reach 1.0)
    settings = torch.tensor([
        [1.0 if g else t for g, t in zip(greedy, temperature)],
        [V if g or k == 0 else min(k, V) for g, k in zip(greedy, top_k)],
        [2.0 if g or p >= 1 else p for g, p in zip(greedy, top_p)],
        [math.log(m) if m > 0 and not g else float("-inf") for g, m in zip(greedy, min_p)],
        greedy,
    ], dtype=torch.float32).to(device)
    temps, keep_k, keep_p, log_min_p = (settings[i, :, None] for i in range(4))
    is_greedy = settings[4] > 0
    scores = logits / temps  # (B, V)
    if any(not g and (0 < k < V or p < 1 or m > 0) for g, k, p, m in zip(greedy, top_k, top_p, min_p)):
        # one descending sort serves the three cuts, which keep a prefix of it
        sorted_scores, order = scores.sort(-1, descending=True)  # (B, V)
        cut = torch.arange(V, device=device)[None, :] >= keep_k  # top-k
        sorted_probs = torch.softmax(sorted_scores.masked_fill(cut, float("-inf")), -1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
        cut |= mass_before >= keep_p  # top-p
        cut |= sorted_scores < sorted_scores[:, :1] + log_min_p  # min-p: p / p_max < min_p, whatever was cut before
        cut[:, 0] = False  # the most likely token always stays
        scores = scores.masked_fill(torch.zeros_like(cut).scatter_(1, order, cut), float("-inf"))
    log_probs = torch.log_softmax(scores, -1)  # (B, V)

    # exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p; unlike torch.multinomial it
    # never syncs with the host, and each row's noise can come from that row's generator
    noise = torch.empty_like(log_probs)
    if all(g is None for g in generators):
        noise.exponential_()
    elif all(g is generators[0] for g in generators):
        noise.exponential_(generator=generators[0])  # one seeded call (generate()): one draw for the batch
    else:
        for i, g in enumerate(generators):
            noise[i].exponential_(generator=g)
    sampled = (log_probs.exp() / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)
    tokens = torch.where(is_greedy, logits.argmax(-1), sampled)
    return tokens, log_probs.gather(1, tokens[:, None])[:, 0]


def adjust_logits(logits, seqs):
    """The logit bias and penalties of each row's sequence (its SamplingParams) on logits (b, V), before
    temperature (vLLM's order): add logit_bias; divide a positive logit of a token seen in the prompt or the reply
    by repetition_penalty and multiply a negative one (CTRL's rule, as transformers' RepetitionPenaltyLogitsProcessor);
    subtract OpenAI's c * frequency_penalty + (c > 0) * presence_penalty, c = the token's count in the reply so far.
    Returns new logits. Each sequence keeps its counts on the logits' device (Engine.sample updates them)."""
    V, device = logits.shape[1], logits.device
    for s in seqs:
        if s.counts is None:  # its first token
            s.counts, s.seen = torch.zeros(V, device=device), torch.zeros(V, dtype=torch.bool, device=device)
            s.seen[torch.tensor(s.prompt + s.tokens, device=device)] = True
            bias = s.params.logit_bias
            if bias:
                s.bias = torch.zeros(V, device=device)
                s.bias[torch.tensor(list(bias), device=device)] = torch.tensor(list(bias.values()),
                                                                               dtype=torch.float32, device=device)
    logits = logits + torch.stack([torch.zeros_like(s.counts) if s.bias is None else s.bias for s in seqs])
    counts, seen = torch.stack([s.counts for s in seqs]), torch.stack([s.seen for s in seqs])  # (b, V)
    penalty = torch.tensor([[s.params.repetition_penalty, s.params.frequency_penalty, s.params.presence_penalty]
                            for s in seqs], device=device)  # (b, 3)
    logits = torch.where(seen, torch.where(logits > 0, logits / penalty[:, :1], logits * penalty[:, :1]), logits)
    return logits - counts * penalty[:, 1:2] - (counts > 0) * penalty[:, 2:]


# -----------------------------------------------------------------------------
# the engine: sequences in the rows of one paged KV cache, continuous batching


class Sequence:
    """One prompt's continuation: its SamplingParams, its tokens so far, and where it stands in the engine.
    on_token(seq, token, logprobs_entry), when given, is called after each token (seq.finish already says "stop"
    for a stop token and "length" for the last one the budget allows; logprobs_entry is (token, logprob,
    [(id, logprob), ...]) when top_logprobs was asked for, else None); returning True ends the sequence there with
    finish "stop". want_logprobs: keep each token's log-prob under the sampling distribution (GRPO's old ones).
    prompt_logprobs=k: the prefill also scores the prompt (evaluate.PromptScores): prompt_scores[p] is the entry
    (token, logprob, top k) of prompt token p + 1; such a sequence never reuses a cached prefix."""

    def __init__(self, prompt, max_tokens, params=SamplingParams(), generator=None, want_logprobs=False,
                 top_logprobs=None, on_token=None, prompt_logprobs=None, constraint=None):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params={params!r}: expected a SamplingParams")
        self.prompt, self.max_tokens, self.params, self.generator = list(prompt), max_tokens, params, generator
        self.counts = self.seen = self.bias = None  # adjust_logits' state, on the device
        self.want_logprobs = want_logprobs
        self.top_logprobs = top_logprobs  # k: the model's own log-probs of the token and the k most likely ones
        self.on_token = on_token
        self.prompt_logprobs, self.prompt_scores = prompt_logprobs, [None] * (len(self.prompt) - 1)
        self.constraint = constraint  # a structured.Constraint: a grammar's allowed tokens, a thinking budget
        self.tokens, self.logprobs = [], []  # generated token ids (a stop token included) and their log-probs
        self.slot, self.prefilled = None, 0  # the KV cache row, and how many tokens of `fill` are in it
        self.fill = self.prompt  # what to prefill: the prompt, plus the tokens generated before a preemption
        self.reused = 0  # prompt tokens whose keys and values were already in the row (prefix reuse)
        self.finish, self.cancelled = None, False  # finish: "stop" | "length" | "error" once done


class Engine:
    """Continuous batching over one paged KV cache (kv_cache.py) of max_batch rows. Sequences wait in a FIFO queue;
    step() admits them into free rows while the cache has blocks for their prompts, runs the model once (a prefill
    chunk for rows still reading their prompt, one decode token for the others), samples every row with its own
    settings and emits the tokens. Blocks are handed out as tokens are written; when none are left, free rows'
    cached prefixes go first, then the newest running sequence is preempted: re-queued first in line and
    recomputed later. A finished row is free for the next sequence at the next step, and keeps its keys and
    values: a sequence whose prompt starts with a free row's tokens takes that row and prefills only the rest
    (prefix reuse: a chat's next turn). add() may be called from other threads (serve.py's). compile: decode steps
    run through compiled.CompiledStep (one library whatever the batch and length, compiled at the first decode
    step unless one fits already), prefill stays eager. kv_memory: the cache's budget, GB or a share of the memory
    left ("50%": see kv_cache.kv_budget_bytes); a row holds at most min(max_len, the tokens the budget holds)."""

    def __init__(self, model, max_batch, max_len=None, prefill_chunk=256, stop_ids=(), vocab_size=None,
                 compile=False, kv_memory="50%"):
        self.model, self.max_batch, self.prefill_chunk = model.eval(), max_batch, prefill_chunk
        self.stop_ids = {int(i) for i in stop_ids}
        self.vocab_size = vocab_size  # the tokenizer's: ids past it (padded embedding rows) have no text
        weight = model.embed_tokens.weight  # the activations' dtype (an int8 model computes in bfloat16)
        self.device, self.context = weight.device, min(max_len or model.config.max_len, model.config.max_len)
        self.kv_bytes, n_blocks = budget_blocks(kv_memory, model.config, weight.dtype, self.device, max_batch,
                                                self.context, model.tp_size)
        self.kv_tokens = n_blocks * BLOCK  # what the budget holds, all rows together
        self.max_len = min(self.context, self.kv_tokens)  # one row's longest prompt + reply
        with torch.inference_mode():  # the compiled step writes into it
            self.cache = KVCache(model.config, max_batch, self.max_len, self.device, weight.dtype, n_blocks,
                                 model.tp_size)
        self.compiled, self.decode = compile, model.run
        if compile:  # models of one structure share the compiled library (compiled.py)
            from compiled import CompiledStep

            self.decode = CompiledStep(model, self.cache.layers)
        self.free_slots = list(range(max_batch))  # least recently freed first
        self.cached = [[] for _ in range(max_batch)]  # the tokens whose keys and values each free row holds
        self.waiting, self.running = deque(), []  # running: sequences holding a row, oldest first
        self.preemptions = 0
        self.lock = threading.Lock()  # guards `waiting`

    def add(self, seqs):
        self.check(seqs)
        with self.lock:
            self.waiting.extend(seqs)

    def check(self, seqs):
        """A ValueError naming what the engine cannot take: a prompt past its context, a token past the vocab."""
        for seq in seqs:
            if len(seq.prompt) > self.max_len:
                raise ValueError(f"a prompt of {len(seq.prompt)} tokens does not fit: the context is {self.context} "
                                 f"tokens and the KV cache budget holds {self.kv_tokens}")
            if max(seq.params.logit_bias, default=-1) >= self.model.config.vocab_size:
                raise ValueError(f"logit_bias names token {max(seq.params.logit_bias)}; the model's token ids are "
                                 f"0..{self.model.config.vocab_size - 1}")

    def cancel(self, seqs):
        """Waiting sequences leave now, running ones at the next step (their rows are then free)."""
        with self.lock:
            for seq in seqs:
                seq.cancelled = True
            self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def has_work(self):
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self):
        try:
            self.admit()
            self.make_room()
            batch, logits = self.forward()
            if batch:
                tokens, logprobs = self.sample(batch, logits)
                self.emit(batch, tokens, logprobs)
        except Exception:
            # fail only the rows it can be pinned on: those without a token yet were prefilling, where a long
            # prompt runs out of memory; if none were, every running sequence
            self.fail([s for s in self.running if not s.tokens] or list(self.running))
            raise

    def admit(self):
        """Cancelled sequences leave; waiting ones take free rows, lowest first, while the cache has blocks for
        their whole prompt (counting those free rows hold): else they wait."""
        for seq in [s for s in self.running if s.cancelled]:
            self.leave(seq)
        with self.lock:
            while self.free_slots and self.waiting:
                seq = self.waiting[0]
                slot, reused = self.pick_slot(seq.fill) if seq.prompt_logprobs is None else (self.free_slots[0], 0)
                spare = sum(len(self.cache.tables[s]) for s in self.free_slots if s != slot)
                kept = -(-reused // BLOCK)
                if -(-len(seq.fill) // BLOCK) - kept > len(self.cache.free) + spare:
                    break
                self.waiting.popleft()
                seq.slot, seq.reused, seq.prefilled = slot, reused, reused
                self.free_slots.remove(slot)
                self.cache.reset([slot], reused)  # the blocks past the reused prefix go back to the pool
                self.running.append(seq)

    def pick_slot(self, prompt):
        """-> (row, tokens to reuse): the free row whose cached tokens start the prompt for longest (one prompt
        token is always left to prefill: its logits give the first new token), else the least recently freed."""
        best, best_n = self.free_slots[0], 0
        for slot in self.free_slots:
            n = common_prefix(self.cached[slot], prompt[:-1])
            if n > best_n:
                best, best_n = slot, n
        return best, best_n

    def make_room(self):
        """Blocks for what this step writes, oldest sequence first: from the pool, then from free rows' cached
        prefixes (least recently freed first), then by preempting the newest running sequence."""
        for seq in list(self.running):
            if seq not in self.running:  # preempted for an older one
                continue
            new = min(len(seq.fill) - seq.prefilled, self.prefill_chunk) if seq.prefilled < len(seq.fill) else 1
            while not self.cache.grow(seq.slot, self.cache.lengths[seq.slot] + new):
                holder = next((s for s in self.free_slots if self.cache.tables[s]), None)
                if holder is not None:
                    self.cached[holder] = []
                    self.cache.reset([holder])
                    continue
                newest = self.running[-1]
                self.preempt(newest)
                if newest is seq:
                    break

    def preempt(self, seq):
        """The sequence gives its row and blocks back and waits first in line; when admitted again it prefills its
        prompt and the tokens it generated (recomputed: none is emitted twice) and goes on from there."""
        self.running.remove(seq)
        self.cache.reset([seq.slot])
        self.cached[seq.slot] = []
        self.free_slots.append(seq.slot)
        seq.fill, seq.slot, seq.prefilled, seq.reused = seq.prompt + seq.tokens, None, 0, 0
        self.preemptions += 1
        with self.lock:
            self.waiting.appendleft(seq)

    def forward(self):
        """-> (sequences that get a token now, their logits (b, V)): one prefill chunk for every row still
        reading its prompt, right-padded into one call, then one decode token for every other row."""
        prefilling = [s for s in self.running if s.prefilled < len(s.fill)]
        decoding = sorted((s for s in self.running if s.prefilled == len(s.fill)), key=lambda s: s.slot)
        batch, logits = [], []
        if prefilling:
            chunks = [s.fill[s.prefilled:s.prefilled + self.prefill_chunk] for s in prefilling]
            lengths = [len(c) for c in chunks]
            T = max(lengths)
            ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=self.device)  # (b, T)
            input_lengths = None if min(lengths) == T else torch.tensor(lengths, device=self.device)
            output = Logits(last_only=True)
            scored = {i: (s, s.prefilled, lengths[i]) for i, s in enumerate(prefilling)
                      if s.prompt_logprobs is not None and s.prefilled < len(s.prompt) - 1}
            if scored:  # the same forward scores their prompts
                from evaluate import PromptScores

                output = PromptScores(scored, self.vocab_size)
            out = self.model(ids, output, self.cache, [s.slot for s in prefilling], input_lengths)  # (b, 1, V)
            for i, seq in enumerate(prefilling):
                seq.prefilled += lengths[i]
                if seq.prefilled == len(seq.fill):  # the prompt's last token predicts the first new one
                    batch.append(seq)
                    logits.append(out[i, 0])
        if decoding:
            ids = torch.tensor([[s.tokens[-1]] for s in decoding], device=self.device)  # (b, 1)
            index = CacheIndex(self.cache, 1, [s.slot for s in decoding], device=self.device,
                               always_mask=self.compiled)
            out = self.decode(ids, self.cache.layers, index)[:, -1]  # (b, V)
            index.advance(self.cache)
            if not batch:
                return decoding, out
            batch += decoding
            logits += list(out)
        return batch, (torch.stack(logits) if batch else None)

    def sample(self, batch, logits):
        """-> tokens (b,) on the host, and per row its log-prob entry (or None)."""
        if self.vocab_size and logits.shape[1] > self.vocab_size:
            logits[:, self.vocab_size:] = float("-inf")  # padded embedding rows are no text
        adjusted = [i for i, s in enumerate(batch) if s.params.adjusts_logits]
        scores = logits  # what is sampled from; top_logprobs stay the model's own
        if adjusted:
            scores = logits.clone()
            scores[adjusted] = adjust_logits(logits[adjusted], [batch[i] for i in adjusted])
        constrained = [i for i, s in enumerate(batch) if s.constraint is not None]
        if constrained:  # only these rows pay for a mask
            from structured import apply_constraints

            scores = scores.clone() if scores is logits else scores
            apply_constraints(scores, [batch[i] for i in constrained], constrained)
        want = any(s.want_logprobs for s in batch)
        tokens, logprobs = sample_tokens(scores, [s.params for s in batch], [s.generator for s in batch], want)
        for i in adjusted:  # the reply's token counts, on the device: no sync
            batch[i].counts[tokens[i]] += 1
            batch[i].seen[tokens[i]] = True
        top = self.top_logprobs(batch, logits, tokens)
        tokens = tokens.tolist()  # the one host sync per step
        for i in constrained:
            batch[i].constraint.consume(tokens[i])
        logprobs = logprobs.tolist() if want else [None] * len(batch)
        return tokens, [(lp, t) for lp, t in zip(logprobs, top)]

    def top_logprobs(self, batch, logits, tokens):
        """(token, logprob, top) for rows that asked for top_logprobs, from the raw logits: the model's own
        distribution, before temperature and top-k/top-p, as OpenAI reports them."""
        want = [i for i, s in enumerate(batch) if s.top_logprobs is not None]
        result = [None] * len(batch)
        if want:
            logprobs = torch.log_softmax(logits[want], -1)  # (w, V)
            chosen = logprobs.gather(1, tokens[want][:, None])[:, 0].tolist()
            top = logprobs.topk(max(batch[i].top_logprobs for i in want), -1)
            top_ids, top_values = top.indices.tolist(), top.values.tolist()
            for j, i in enumerate(want):
                k = batch[i].top_logprobs
                result[i] = (int(tokens[i]), chosen[j], list(zip(top_ids[j][:k], top_values[j][:k])))
        return result

    def emit(self, batch, tokens, entries):
        """Record each row's token; a row that hit a stop token, its budget or the context leaves."""
        for seq, token, (logprob, logprobs_entry) in zip(batch, tokens, entries):
            seq.tokens.append(token)
            if seq.want_logprobs:
                seq.logprobs.append(logprob)
            if token in self.stop_ids:
                seq.finish = "stop"
            elif len(seq.tokens) >= seq.max_tokens or len(seq.prompt) + len(seq.tokens) >= self.max_len:
                seq.finish = "length"
            if seq.on_token is not None and seq.on_token(seq, token, logprobs_entry):
                seq.finish = "stop"
            if seq.finish is not None:
                self.leave(seq)

    def leave(self, seq):
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        length = self.cache.lengths[seq.slot]  # the last token sampled was never fed back: not in the cache
        self.cached[seq.slot] = (seq.prompt + seq.tokens)[:length]

    def fail(self, seqs=None, reason="error"):
        """End seqs (default: every running and waiting one) with finish=reason; their on_token sees token None.
        For the rows a failed step() blames, and for a server that shuts down."""
        with self.lock:
            seqs = list(self.running) + list(self.waiting) if seqs is None else seqs
            self.waiting = deque(s for s in self.waiting if s not in seqs)
        for seq in seqs:
            seq.finish = reason
            if seq in self.running:
                self.leave(seq)
            if seq.on_token is not None:
                seq.on_token(seq, None, None)


# -----------------------------------------------------------------------------
# generation: a loop over the engine's step


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, params=SamplingParams(), stop_ids=(), seed=None, return_logprobs=False,
             on_token=None, vocab_size=None, compile=False, kv_memory="50%", tokenizer=None, json_schema=None,
             regex=None, lark=None, **sampling):
    """Continue each prompt (a list of token ids; lengths may differ) by up to max_new_tokens tokens.

    All prompts go into one engine with a row each: one right-padded prefill, then one batched decode step
    per token. A row that samples one of stop_ids, reaches max_new_tokens or fills the model's context
    (prompt + completion <= max_len) leaves the decode batch. Returns the new tokens per row, the stop token
    included as the last one when hit; with return_logprobs also their log-probs under the sampling
    distribution (see sample_tokens). on_token(row, token_id), when given, sees each token as it is sampled
    (streaming). vocab_size: the tokenizer's; ids at or past it (the padded embedding rows many models have)
    are never sampled, since they have no text. seed: one generator shared by the batch. compile: decode
    steps through the compiled step (see Engine). kv_memory: the KV cache's budget (see Engine): rows that do not
    fit together wait or are recomputed, with the same tokens. params: the SamplingParams of every row; sampling:
    SamplingParams fields by name, over params's (generate(model, prompts, n, temperature=0.0) is greedy).
    json_schema (a dict; True: any JSON object), regex or lark (llguidance's Lark): every row's reply follows it
    (structured.py), which needs the tokenizer; the reply ends with a stop token once the grammar is complete."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params={params!r}: expected a SamplingParams; one setting by name: temperature=...")
    params = dataclasses.replace(params, **sampling)
    config, device = model.config, model.embed_tokens.weight.device
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (a document starts with eot_id)")
        if len(p) > config.max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context (max_len) is {config.max_len}")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside 0..{config.vocab_size - 1} (the model's vocab_size)")
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def callback(row):
        return None if on_token is None else lambda seq, token, logprobs_entry: on_token(row, token)

    constraint = lambda: None  # noqa: E731
    if (json_schema, regex, lark) != (None, None, None):
        from structured import Constraint, compile_grammar, grammar_text

        if tokenizer is None:
            raise ValueError("json_schema, regex and lark need tokenizer=: the grammar is matched on its tokens")
        matcher = compile_grammar(tokenizer, grammar_text(json_schema, regex, lark))
        stop_ids, vocab_size = stop_ids or tokenizer.stop_ids, vocab_size or tokenizer.vocab_size
        constraint = lambda: Constraint(tokenizer, matcher.deep_copy())  # noqa: E731
    seqs = [Sequence(p, min(max_new_tokens, config.max_len - len(p)), params, generator, return_logprobs,
                     on_token=callback(row), constraint=constraint()) for row, p in enumerate(prompts)]
    if any(s.max_tokens > 0 for s in seqs):
        max_len = min(config.max_len, max(len(p) for p in prompts) + max_new_tokens)
        engine = Engine(model, len(prompts), max_len, max_len, stop_ids, vocab_size, compile, kv_memory)
        engine.add([s for s in seqs if s.max_tokens > 0])
        while engine.has_work():
            engine.step()
    tokens = [s.tokens for s in seqs]
    return (tokens, [s.logprobs for s in seqs]) if return_logprobs else tokens


def strip_stop(tokens, stop_ids):
    """The tokens without a trailing stop token (generate() returns it as the last one when hit)."""
    return tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens


def common_prefix(a, b):
    """How many leading items a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class TextStream:
    """Token ids in, text out as soon as it is whole: bytes of a multi-byte UTF-8 character split across
    tokens are held back until the character is complete (invalid bytes become U+FFFD, like decode)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.decoder.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self):
        text = self.decoder.decode(b"", final=True)
        self.decoder.reset()
        return text


# -----------------------------------------------------------------------------
# loading a model directory


def load(model_dir, device="cpu", dtype=None, adapter="", layout="plain"):
    """(model in eval mode, tokenizer) from a MODELDIR: ours or a Hugging Face one with tokenizer.json.
    dtype: a torch dtype or its name (float32, bfloat16, float16), or "int8" or "int4" (weight-only, bfloat16
    activations: quant.py); None keeps float32. adapter: a LoRA adapter directory (lora.py) trained
    on model_dir, merged into the weights (before any quantization): the base model's speed. tokenizer.stop_ids
    are every id the directory names as an end (Tokenizer.load). layout: the projections' weights "transposed" or
    "packed" for a CPU's matmuls (quant.py, for decoding only), or "plain"."""
    from settings import DTYPES
    from tokenizer import Tokenizer

    model = Transformer.from_pretrained(model_dir, device, DTYPES.get(dtype, dtype), adapter).eval()  # int8/4 as is
    if layout != "plain":
        from quant import relayout
        relayout(model, layout)
    tokenizer = Tokenizer.load(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={model.config.vocab_size}")
    return model, tokenizer


# -----------------------------------------------------------------------------
# command line


def stream_completion(model, tokenizer, prompt_ids, args, params, seed):
    """Generate one completion, printing it as it comes; returns its tokens without the stop token."""
    stop_ids = tokenizer.stop_ids
    stream = TextStream(tokenizer)

    def show(row, token):
        if token not in stop_ids:
            print(stream.push(token), end="", flush=True)

    tokens = generate(model, [prompt_ids], args.max_new_tokens, params, stop_ids, seed, on_token=show,
                      vocab_size=tokenizer.vocab_size, compile=args.compile, kv_memory=args.kv_memory)[0]
    print(stream.flush())
    return strip_stop(tokens, stop_ids)


def chat_loop(model, tokenizer, args, params, seed, retriever=None, turns=None):
    """Interactive chat that keeps the history; the oldest turns are dropped when the context fills up. turns: the
    user's messages, instead of reading them; retriever (rag.py): each turn's sources, printed after the reply."""
    if turns is None:
        print("chat: type a message; /reset forgets the history; Ctrl-D or /exit quits")
    messages, turns = [], None if turns is None else iter(turns)
    while True:
        try:
            text = input("> ") if turns is None else next(turns)
        except (EOFError, KeyboardInterrupt, StopIteration):
            print()
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        chat, sources = retriever.augment(tokenizer, messages) if retriever else (tokenizer, None)  # rag.py
        ids, _ = chat.render_chat(messages, add_generation_prompt=True)
        while len(ids) + args.max_new_tokens > model.config.max_len and len(messages) > 1:
            messages = messages[2:] if len(messages) > 2 else messages[1:]  # a user turn and its reply
            ids, _ = chat.render_chat(messages, add_generation_prompt=True)
        ids = list(ids)[-(model.config.max_len - 1):]  # a single message longer than the context
        reply = stream_completion(model, tokenizer, ids, args, params, seed)
        if sources:
            print("sources: " + "; ".join(f"[{n}] {s['source']}:{s['start']}-{s['end']} {s['title']}"
                                           for n, s in enumerate(sources, 1)))
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
        seed = None if seed is None else seed + 1


def main(argv):
    from quant import pick_layout
    from settings import load_settings, pick_device

    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n")  # load_settings then lists the options and exits
    args = load_settings(DEFAULTS, argv, "sample.py")
    if not args.model:
        sys.exit("sample.py: --model=MODELDIR|FILE.gguf is required (a directory with config.json, model.safetensors, "
                 "tokenizer, or a .gguf file)")
    params = SamplingParams.from_settings(args)  # a bad value stops here, before the model loads
    device, dtype = pick_device(args.device, args.dtype, inference=True)
    from compiled import compile_setting

    args.compile = compile_setting(args.compile, args.max_new_tokens, tp=args.tp)  # one generate() call's steps
    if args.tp > 1:  # one model split over tp processes, each running the same steps (parallel.py)
        from parallel import split_for_inference, start_inference

        if args.chat and not args.prompt:
            sys.exit(f"sample.py: tp={args.tp}: the interactive chat reads one terminal; give --prompt")
        device, mesh = start_inference(args.tp, device, "sample.py")
    rows = args.batch_size if args.eval else args.num_samples
    layout = pick_layout(args.weight_layout, device, dtype, rows, args.tp)  # quant.py: a bad value is a ValueError
    model, tokenizer = load(args.model, device=device, dtype=dtype, adapter=args.adapter, layout=layout)
    seed = None if args.seed < 0 else args.seed
    if args.tp > 1:
        model, seed, args.kv_memory = split_for_inference(model, mesh["tp"], seed, args.kv_memory, device)
    budget = budget_blocks(args.kv_memory, model.config, model.embed_tokens.weight.dtype, device, rows,
                           model.config.max_len, model.tp_size)
    print(budget_text(args.kv_memory, *budget, device), file=sys.stderr)
    retriever = None
    if args.rag:
        from rag import Retriever

        if not (args.chat or args.eval) or args.num_samples != 1:
            sys.exit("sample.py: --rag retrieves for a chat or a task file: give --chat or --eval, no --num_samples")
        retriever = Retriever.sharing(args.rag, model, tokenizer, args.rag_k, device, args.retrieval)
    if args.eval:
        from tasks import task_accuracy

        accuracy = task_accuracy(model, tokenizer, args.eval, args.batch_size, args.max_new_tokens, args.kv_memory,
                                 retriever)
        print(f"{args.eval}: accuracy {accuracy:.4f}")
        return
    prompt = args.prompt
    if prompt.startswith("FILE:"):
        with open(prompt[len("FILE:"):], encoding="utf-8") as f:
            prompt = f.read()
    if args.chat and (retriever or not prompt):
        chat_loop(model, tokenizer, args, params, seed, retriever, [prompt] if prompt else None)
        return
    if not args.chat and not prompt and tokenizer.eot_id is None:
        sys.exit("sample.py: this tokenizer has no <|endoftext|> to start a fresh document: give --prompt")
    prompt_ids = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0] \
        if args.chat else tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    if args.num_samples == 1:
        stream_completion(model, tokenizer, list(prompt_ids), args, params, seed)
        return
    outputs = generate(model, [list(prompt_ids)] * args.num_samples, args.max_new_tokens, params, tokenizer.stop_ids,
                       seed, vocab_size=tokenizer.vocab_size, compile=args.compile, kv_memory=args.kv_memory)
    for tokens in outputs:
        print(tokenizer.decode(strip_stop(tokens, tokenizer.stop_ids)))
        print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:  # bad input: the message names the file, key or value
        sys.exit(f"sample.py: {e}")
    from settings import exit_torchrun

    exit_torchrun()  # with --tp (settings.py says why)
