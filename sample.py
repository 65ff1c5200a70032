"""
Generation: batched, KV-cached sampling from a model directory, streamed text, and exact-answer eval.

    python sample.py --model=out/final --prompt="Once upon a time"
    python sample.py --model=out/final --prompt=FILE:prompt.txt --num_samples=3 --temperature=0.7
    python sample.py --model=out/final --chat --prompt="What is 7 + 8?" --temperature=0
    python sample.py --model=out/final --chat                      # interactive chat that keeps the history
    python sample.py --model=out/final --eval=task.jsonl           # greedy exact-answer accuracy

generate() is the project's one generation loop (GRPO rollouts in strategies.py call it) and
sample_tokens() its one sampler (serve.py calls it once per decode step with per-request settings).
A Hugging Face model directory (Llama, Qwen2, Qwen3, DeepseekV3-dense with tokenizer.json) works
here exactly as one written by train.py.
"""
import codecs
import json
import os
import sys

import torch

from model import KVCache, Transformer

DEFAULTS = dict(
    model="",  # MODELDIR: config.json + model.safetensors + tokenizer files
    prompt="",  # text, or FILE:path to read it from a file; empty: start a fresh document
    chat=False,  # wrap the prompt as a user message in the chat template; without --prompt: interactive chat
    num_samples=1,  # completions of the same prompt, generated as one batch
    max_new_tokens=256,
    temperature=0.8,  # 0 = greedy
    top_k=0,  # keep the k most likely tokens; 0 = all
    top_p=0.95,  # nucleus: the smallest set of tokens whose probability reaches top_p; 1 = all
    seed=1337,  # -1: a different sample every run
    device="auto",  # auto = cuda when available, else cpu
    dtype="auto",  # auto = bfloat16 on a GPU that has it, else float32; or float32, bfloat16, float16
    eval="",  # TASK.jsonl: greedy generation over {"messages"|"prompt", "answer"} records, prints accuracy
    batch_size=32,  # rows per generate() call with --eval
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -----------------------------------------------------------------------------
# sampling


def per_row(values, batch, name):
    """A setting given per row (list or tensor of length `batch`) or once for all rows -> a list."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        return [values] * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for {batch} rows")
    return list(values)


def sample_tokens(logits, temperature, top_k, top_p, generators=None):
    """Draw one token per row. logits (B, V) float32; temperature, top_k, top_p: per row (a list or tensor
    of length B, or one value for all rows); generators: None, or B torch.Generators (or None entries) on
    the logits' device, one per row so that each request's seed reproduces its own tokens.

    Temperature 0 is greedy. Otherwise: divide by the temperature, keep the top_k most likely tokens
    (0 = all), then the smallest set whose probability reaches top_p (always at least one token), sample.
    Returns tokens (B,) long and their log-probs (B,) float32 under that transformed distribution
    (greedy rows: log-softmax of the raw logits)."""
    B, V = logits.shape
    device = logits.device
    temperature = per_row(temperature, B, "temperature")
    top_k = per_row(top_k, B, "top_k")
    top_p = per_row(top_p, B, "top_p")
    generators = per_row(generators, B, "generators")
    for i in range(B):
        if temperature[i] < 0 or top_k[i] < 0 or not 0 <= top_p[i] <= 1:
            raise ValueError(f"row {i}: temperature={temperature[i]} (>= 0), top_k={top_k[i]} (>= 0), "
                             f"top_p={top_p[i]} (in [0, 1]) out of range")
    greedy = [t == 0 for t in temperature]
    if all(greedy):
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]

    # greedy rows go through the same arithmetic untransformed (temperature 1, nothing cut); the settings
    # reach the device in one copy. keep_p 2: never reached (a float cumulative sum can reach 1.0)
    settings = torch.tensor([
        [1.0 if g else t for g, t in zip(greedy, temperature)],
        [V if g or k == 0 else min(k, V) for g, k in zip(greedy, top_k)],
        [2.0 if g or p >= 1 else p for g, p in zip(greedy, top_p)],
        greedy,
    ], dtype=torch.float32).to(device)
    temps, keep_k, keep_p, is_greedy = settings[0, :, None], settings[1, :, None], settings[2, :, None], settings[3] > 0
    scores = logits / temps  # (B, V)
    if any(not g and (0 < k < V or p < 1) for g, k, p in zip(greedy, top_k, top_p)):
        # one descending sort serves both cuts, which keep a prefix of it
        sorted_scores, order = scores.sort(-1, descending=True)  # (B, V)
        cut = torch.arange(V, device=device)[None, :] >= keep_k  # top-k
        sorted_probs = torch.softmax(sorted_scores.masked_fill(cut, float("-inf")), -1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
        cut |= mass_before >= keep_p  # top-p
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


# -----------------------------------------------------------------------------
# generation


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), seed=None,
             return_logprobs=False, on_token=None, vocab_size=None):
    """Continue each prompt (a list of token ids; lengths may differ) by up to max_new_tokens tokens.

    One right-padded prefill of all prompts into a KV cache sized for the batch, then one batched decode
    step per token. A row that samples one of stop_ids, reaches max_new_tokens or fills the model's
    context (prompt + completion <= max_len) leaves the decode batch. Returns the new tokens per row, the
    stop token included as the last one when hit; with return_logprobs also their log-probs under the
    sampling distribution (see sample_tokens). on_token(row, token_id), when given, sees each token as
    it is sampled (streaming). vocab_size: the tokenizer's; ids at or past it (the padded embedding rows
    many models have) are never sampled, since they have no text."""
    config = model.config
    weight = model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    B = len(prompts)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (a document starts with eot_id)")
        if len(p) > config.max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context (max_len) is {config.max_len}")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside 0..{config.vocab_size - 1} (the model's vocab_size)")
    lengths = [len(p) for p in prompts]
    budgets = [min(max_new_tokens, config.max_len - n) for n in lengths]
    new_tokens = [[] for _ in range(B)]
    active = [i for i in range(B) if budgets[i] > 0]  # rows still generating, in batch order
    if not active:
        return (new_tokens, [[] for _ in range(B)]) if return_logprobs else new_tokens

    # prefill: every prompt at once, right-padded; the last prompt token of each row predicts its first token
    T = max(lengths)
    cache = KVCache(config, batch_size=B, max_len=min(config.max_len, T + max_new_tokens), device=device, dtype=dtype)
    x = torch.tensor([p + [0] * (T - len(p)) for p in prompts], dtype=torch.long, device=device)  # (B, T)
    input_lengths = torch.tensor(lengths, device=device)
    logits = model(x, cache=cache, input_lengths=input_lengths, last_only=True)[:, 0]  # (B, V)
    no_text = slice(vocab_size, None) if vocab_size and vocab_size < config.vocab_size else None
    rows = None  # None: all B rows in order, which the cache slices instead of gathering
    if len(active) < B:
        rows = torch.tensor(active, device=device)
        logits = logits[rows]

    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stop = {int(i) for i in stop_ids}
    logprobs = torch.zeros(B, max(budgets), device=device) if return_logprobs else None  # (B, steps)
    for step in range(max(budgets)):
        b = len(active)
        if no_text is not None:
            logits[:, no_text] = float("-inf")
        if temperature == 0 and not return_logprobs:
            tokens = logits.argmax(-1)  # what sample_tokens does for greedy rows, minus the log-softmax
        else:
            tokens, token_logprobs = sample_tokens(logits, [temperature] * b, [top_k] * b, [top_p] * b,
                                                   None if generator is None else [generator] * b)
        if return_logprobs:
            logprobs[slice(None) if rows is None else rows, step] = token_logprobs
        still = []  # positions within this step's batch of the rows that go on
        for j, (row, token) in enumerate(zip(active, tokens.tolist())):  # the one host sync per step
            new_tokens[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if token not in stop and len(new_tokens[row]) < budgets[row]:
                still.append(j)
        if not still:
            break
        if len(still) < b:  # finished rows leave the batch and stop costing compute
            keep = torch.tensor(still, device=device)
            tokens = tokens[keep]
            active = [active[j] for j in still]
            rows = torch.tensor(active, device=device)
        logits = model(tokens[:, None], cache=cache, rows=rows)[:, -1]  # (b, V)

    if not return_logprobs:
        return new_tokens
    logprobs = logprobs.tolist()
    return new_tokens, [logprobs[i][: len(new_tokens[i])] for i in range(B)]


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


def load(model_dir, device="cpu", dtype=None):
    """(model in eval mode, tokenizer) from a MODELDIR: ours or a Hugging Face one with tokenizer.json."""
    from data import Tokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    model = Transformer.from_pretrained(model_dir, device=device, dtype=dtype).eval()
    tokenizer = Tokenizer.load(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={model.config.vocab_size}")
    return model, tokenizer


def stop_ids_for(model_dir, tokenizer):
    """The tokenizer's stop tokens plus the eos_token_id(s) of a Hugging Face config.json and
    generation_config.json (an instruct model's end-of-turn token often lives only there)."""
    ids = list(tokenizer.stop_ids)
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


# -----------------------------------------------------------------------------
# evaluation: exact-answer accuracy on a task file


def read_task(task_path, tokenizer):
    """(prompt token ids, answer) per record of a jsonl task file: {"messages": [...]} or {"prompt": "..."}
    plus "answer". Chat messages get the generation prompt; plain prompts are encoded as text."""
    prompts, answers = [], []
    with open(task_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{task_path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or "answer" not in record or not ("messages" in record or "prompt" in record):
                raise ValueError(f'{where}: expected {{"messages": [...]}} or {{"prompt": "..."}} with "answer"')
            try:
                if "messages" in record:
                    ids, _ = tokenizer.render_chat(record["messages"], add_generation_prompt=True)
                elif isinstance(record["prompt"], str):
                    ids = tokenizer.encode(record["prompt"])
                else:
                    raise ValueError(f'"prompt" must be a string, got {type(record["prompt"]).__name__}')
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            prompts.append(list(ids))
            answers.append(str(record["answer"]))
    if not prompts:
        raise ValueError(f"{task_path}: no records")
    return prompts, answers


def evaluate(model, tokenizer, task_path, batch_size=32, max_new_tokens=64, stop_ids=None):
    """Fraction of a task file's records whose greedy completion holds the answer (data.answer_is_correct,
    the check GRPO's reward uses). Prompts are batched shortest first to waste little on padding."""
    from data import answer_is_correct

    prompts, answers = read_task(task_path, tokenizer)
    stop_ids = list(tokenizer.stop_ids if stop_ids is None else stop_ids)
    for i, p in enumerate(prompts):
        if len(p) >= model.config.max_len:
            raise ValueError(f"{task_path}: record {i + 1} has a {len(p)}-token prompt; the model's context is "
                             f"{model.config.max_len}, leaving no room for an answer")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        outputs = generate(model, [prompts[i] for i in batch], max_new_tokens, temperature=0.0, stop_ids=stop_ids,
                           vocab_size=tokenizer.vocab_size)
        for i, tokens in zip(batch, outputs):
            if tokens and tokens[-1] in stop_ids:
                tokens = tokens[:-1]
            correct += bool(answer_is_correct(tokenizer.decode(tokens), answers[i]))
    return correct / len(prompts)


# -----------------------------------------------------------------------------
# command line


def stream_completion(model, tokenizer, prompt_ids, args, stop_ids, seed):
    """Generate one completion, printing it as it comes; returns its tokens without the stop token."""
    stream = TextStream(tokenizer)
    stops = set(stop_ids)

    def show(row, token):
        if token not in stops:
            print(stream.push(token), end="", flush=True)

    tokens = generate(model, [prompt_ids], args["max_new_tokens"], args["temperature"], args["top_k"], args["top_p"],
                      stop_ids, seed, on_token=show, vocab_size=tokenizer.vocab_size)[0]
    print(stream.flush())
    return tokens[:-1] if tokens and tokens[-1] in stops else tokens


def chat_loop(model, tokenizer, args, stop_ids, seed):
    """Interactive chat that keeps the history; the oldest turns are dropped when the context fills up."""
    print("chat: type a message; /reset forgets the history; Ctrl-D or /exit quits")
    messages = []
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
        while len(ids) + args["max_new_tokens"] > model.config.max_len and len(messages) > 1:
            messages = messages[2:] if len(messages) > 2 else messages[1:]  # a user turn and its reply
            ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
        ids = list(ids)[-(model.config.max_len - 1) :]  # a single message longer than the context
        reply = stream_completion(model, tokenizer, ids, args, stop_ids, seed)
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
        seed = None if seed is None else seed + 1


def main(argv):
    from data import parse_args

    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n")  # parse_args then lists the options and exits
    args = parse_args(DEFAULTS, argv)
    if not args["model"]:
        sys.exit("sample.py: --model=MODELDIR is required (a directory with config.json, model.safetensors, tokenizer)")
    device = args["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in DTYPES:
        sys.exit(f"sample.py: --dtype={dtype}: choose from auto, {', '.join(DTYPES)}")
    model, tokenizer = load(args["model"], device=device, dtype=dtype)
    stop_ids = stop_ids_for(args["model"], tokenizer)
    seed = None if args["seed"] < 0 else args["seed"]

    if args["eval"]:
        accuracy = evaluate(model, tokenizer, args["eval"], args["batch_size"], args["max_new_tokens"], stop_ids)
        print(f"{args['eval']}: accuracy {accuracy:.4f}")
        return

    prompt = args["prompt"]
    if prompt.startswith("FILE:"):
        with open(prompt[len("FILE:") :], encoding="utf-8") as f:
            prompt = f.read()
    if args["chat"] and not prompt:
        chat_loop(model, tokenizer, args, stop_ids, seed)
        return
    if args["chat"]:
        prompt_ids, _ = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        if not prompt and tokenizer.eot_id is None:
            sys.exit("sample.py: this tokenizer has no <|endoftext|> to start a fresh document: give --prompt")
        prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    prompt_ids = list(prompt_ids)
    if args["num_samples"] == 1:
        stream_completion(model, tokenizer, prompt_ids, args, stop_ids, seed)
        return
    outputs = generate(model, [prompt_ids] * args["num_samples"], args["max_new_tokens"], args["temperature"],
                       args["top_k"], args["top_p"], stop_ids, seed)
    for tokens in outputs:
        if tokens and tokens[-1] in stop_ids:
            tokens = tokens[:-1]
        print(tokenizer.decode(tokens))
        print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:  # bad input: the message names the file, key or value
        sys.exit(f"sample.py: {e}")
