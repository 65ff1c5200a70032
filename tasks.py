"""
Exact-answer tasks: a task file of prompts and answers, the final-answer check, greedy accuracy over the file, and
on-policy preference pairs sampled from a model and graded by a reward.

    python sample.py --model=out/final --eval=task.jsonl      # prints the accuracy (task_accuracy)
    python tasks.py pairs --model=out/sft/final --data=task.jsonl --k=8 --out=pairs.jsonl   # DPO pairs (make_pairs)
    python tasks.py replies --model=out/grpo/final --data=sft.jsonl --out=teacher.jsonl    # a model's replies as SFT
    python tasks.py passk --model=out/sft/final --data=grpo.jsonl --k=8    # greedy pass@1 against sampled pass@8

A task file is jsonl: {"messages": [...]} (rendered with the chat template and its generation prompt) or
{"prompt": "..."} (plain text), plus "answer". answer_is_correct is also GRPO's exact_answer reward (strategies.py);
every accuracy (pipeline.py, sample.py --eval, GRPO's val reward) generates up to EVAL_MAX_NEW_TOKENS greedily.
"""
import json
import random
import sys
import unicodedata
from fractions import Fraction

import regex

from sample import EVAL_MAX_NEW_TOKENS, SamplingParams, generate, strip_stop

# a number: -12, 3.5, 3/4 (a fraction compares by value: 3/4 is 0.75)
_NUMBER = regex.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?(?:/\d+(?![.\d]))?")
_TRAILING = " \t\r\n.。,，!！?？:：;；'\"”’)）]】"
# what introduces a final answer: "The answer is 8 (5 + 3)." is 8, "Answer: 12 apples left after 3 days." 12
# digits grouped by thousands with one separator throughout: 1,234 and 1 234 567 (a space or narrow space)
_GROUPED = regex.compile(r"(?<![\d.,])\d{1,3}([, \u00a0\u202f])\d{3}(?:\1\d{3})*(?![\d]|[.,]\d)")
_MARKER = regex.compile(r"(?i)(?:final answer|answer|答案|结果)\s*(?:is|was|:|=|是|为|：)\s*|####\s*")


def _boxed(text):
    """The contents of the last \\boxed{...} (braces nested), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None


def _value(number):
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def _final(completion):
    """(the text that holds the final answer, whether a \\boxed{} or an answer marker picked it)."""
    text = unicodedata.normalize("NFKC", completion)  # full-width digits and punctuation to ASCII
    text = _GROUPED.sub(lambda m: regex.sub(r"\D", "", m.group()), text)  # 1,234 / 1 234 -> 1234
    boxed = _boxed(text)
    if boxed is not None:
        return regex.sub(r"\\d?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", boxed), True  # \\frac{3}{4} -> 3/4
    markers = list(_MARKER.finditer(text))
    return (text[markers[-1].end():], True) if markers else (text, False)


def final_answer(completion: str) -> str:
    """The part of a completion that holds its final answer: the last \\boxed{} if any, else what follows the last
    "answer is" / "Answer:" / "答案是" / "####", else the whole completion; NFKC-normalized, thousands separators
    ("1,234", "1 234") removed."""
    return _final(completion)[0]


def answer_is_correct(completion: str, answer: str) -> bool:
    """True when the completion's final answer equals the answer. A numeric answer: the first number of
    final_answer's text when a \\boxed{} or an answer marker picked it, else the completion's last number, compared
    by value (0.75 = 3/4). Otherwise final_answer's text ends with the answer, or (after a marker) starts with it,
    as a whole word."""
    answer = " ".join(unicodedata.normalize("NFKC", str(answer)).split()).rstrip(_TRAILING).lstrip()
    text, marked = _final(completion)
    if _NUMBER.fullmatch(answer.replace(",", "")):
        numbers = _NUMBER.findall(text)
        expected = _value(answer.replace(",", ""))
        return bool(numbers) and expected is not None and _value(numbers[0 if marked else -1]) == expected
    text = " ".join(text.split()).rstrip(_TRAILING).lstrip()
    if not answer:
        return False
    if marked and text.lower().startswith(answer.lower()):
        after = text[len(answer):][:1]
        if not (after.isascii() and after.isalnum()):
            return True
    if not text.lower().endswith(answer.lower()):
        return False
    before = text[:-len(answer)][-1:]  # "Comparis" does not end with the answer "Paris"
    return not (before.isascii() and before.isalnum())


def read_task(task_path, tokenizer, with_records=False, retriever=None):
    """(prompt token ids, answer) per record of a jsonl task file: {"messages": [...]} or {"prompt": "..."}
    plus "answer" (with_records: and the records). Chat messages get the generation prompt (and with a retriever,
    rag.py's, the chunks retrieved for their last user turn, as sample.py --chat --rag hands them over); plain
    prompts are encoded as text."""
    prompts, answers, records = [], [], []
    with open(task_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{task_path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or "answer" not in record or \
                    not ("messages" in record or "prompt" in record):
                raise ValueError(f'{where}: expected {{"messages": [...]}} or {{"prompt": "..."}} with "answer"')
            try:
                if "messages" in record:
                    chat = retriever.augment(tokenizer, record["messages"])[0] if retriever else tokenizer
                    ids, _ = chat.render_chat(record["messages"], add_generation_prompt=True)
                elif isinstance(record["prompt"], str):
                    ids = tokenizer.encode(record["prompt"])
                else:
                    raise ValueError(f'"prompt" must be a string, got {type(record["prompt"]).__name__}')
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            prompts.append(list(ids))
            answers.append(str(record["answer"]))
            records.append(record)
    if not prompts:
        raise ValueError(f"{task_path}: no records")
    return (prompts, answers, records) if with_records else (prompts, answers)


def task_results(model, tokenizer, task_path, batch_size=32, max_new_tokens=EVAL_MAX_NEW_TOKENS, kv_memory="50%",
                 retriever=None):
    """Per record of a task file, in file order: whether its greedy completion holds the answer (answer_is_correct,
    the check GRPO's reward uses), stopping at tokenizer.stop_ids. Prompts are batched shortest first to waste little
    on padding. retriever (rag.py): chat records get the chunks it retrieves (read_task)."""
    prompts, answers = read_task(task_path, tokenizer, retriever=retriever)
    for i, p in enumerate(prompts):
        if len(p) >= model.config.max_len:
            raise ValueError(f"{task_path}: record {i + 1} has a {len(p)}-token prompt; the model's context is "
                             f"{model.config.max_len}, leaving no room for an answer")
    right = sampled_results(model, tokenizer, prompts, answers, 1, 0.0, max_new_tokens, batch_size,
                            kv_memory=kv_memory)
    return [r > 0 for r in right]


def sampled_results(model, tokenizer, prompts, answers, k, temperature, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                    batch_size=16, seed=0, kv_memory="50%"):
    """Per prompt (token ids), how many of k sampled completions hold the answer (answer_is_correct). Prompts go
    shortest first, to waste little on padding; task_results is its greedy case (k=1, temperature 0)."""
    stop_ids, right = tokenizer.stop_ids, [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        outputs = generate(model, [prompts[i] for i in batch for _ in range(k)], max_new_tokens,
                           SamplingParams(temperature=temperature), stop_ids, seed=seed + start,
                           vocab_size=tokenizer.vocab_size, kv_memory=kv_memory)
        for n, i in enumerate(batch):
            right[i] = sum(answer_is_correct(tokenizer.decode(strip_stop(tokens, stop_ids)), answers[i])
                           for tokens in outputs[n * k:(n + 1) * k])
    return right


def task_accuracy(model, tokenizer, task_path, batch_size=32, max_new_tokens=EVAL_MAX_NEW_TOKENS, kv_memory="50%",
                  retriever=None):
    """The fraction of a task file's records answered right (task_results): what sample.py --eval prints."""
    correct = task_results(model, tokenizer, task_path, batch_size, max_new_tokens, kv_memory, retriever)
    return sum(correct) / len(correct)


def interval95(correct, before=None):
    """The 95% half-width (normal approximation) of an accuracy over per-problem results, or, with before (the same
    problems' results of another model), of the change in accuracy: paired, so the problems' own difficulty cancels."""
    diffs = [float(c) for c in correct] if before is None else [float(a) - float(b) for a, b in zip(correct, before)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    return 1.96 * (variance / n) ** 0.5


# -----------------------------------------------------------------------------
# on-policy preference pairs: the model's own right and wrong replies to each prompt

PAIRS_DEFAULTS = dict(
    model="",  # MODELDIR (or .gguf) to sample from: the model DPO will start from (its reference)
    data="",  # a task file (jsonl, "messages" or "prompt" plus "answer"), as --eval and GRPO read
    out="",  # the pairs, in DPO's jsonl format: {"prompt": str | messages, "chosen": str, "rejected": str}
    k=8,  # replies sampled per prompt
    reward="exact_answer",  # a built-in name or module:function(prompt, completion, record) -> float (as GRPO's)
    temperature=1.0,  # sampling temperature (top_p 1, top_k off: the model's own distribution)
    max_new_tokens=EVAL_MAX_NEW_TOKENS,  # a reply that has not ended by then is left out of every pair
    batch_size=16,  # prompts per generate() call (batch_size * k rows)
    max_prompts=0,  # > 0: only the task file's first this many records
    seed=0,
    device="auto",
)


def dpo_messages(record):
    """A task record's prompt as DPO's data renders it (data.py prepare --stage=dpo): "messages" as given, a "prompt"
    string as the user's message. Replies for DPO are sampled after these messages and the generation prompt, never
    after the plain text: a reply sampled as a continuation of the text is not one the policy gives in the chat."""
    prompt = record["messages"] if "messages" in record else record["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def dpo_prompts(tokenizer, records):
    """Token ids of each record's prompt (dpo_messages) with the chat template's generation prompt."""
    return [tokenizer.render_chat(dpo_messages(record), add_generation_prompt=True)[0] for record in records]


def round_trips(tokenizer, messages, prompt_ids, reply_ids, reply):
    """True when DPO's or SFT's data, rendering the messages and the reply's text, trains on exactly the tokens the
    model sampled: the prompt's ids, then reply_ids, then the template's end of message. Decoding and encoding again
    may not give back the ids sampled (a word sampled in two pieces comes back as one token)."""
    ids, mask = tokenizer.render_chat(messages + [{"role": "assistant", "content": reply}])
    scored = [token for token, m in zip(ids, mask) if m]
    return ids[:len(prompt_ids)] == list(prompt_ids) and scored[:-1] == list(reply_ids)


def reply_text(tokenizer, tokens, messages, prompt_ids, counts):
    """The text of a sampled reply (tokens, its stop token last) that DPO's or SFT's data would train on exactly, or
    None, counted in counts: "unfinished" (no stop token within max_new_tokens: its text is not a reply) or
    "not_round_trip" (round_trips)."""
    if not (tokens and tokens[-1] in tokenizer.stop_ids):
        counts["unfinished"] += 1
        return None
    reply_ids = strip_stop(tokens, tokenizer.stop_ids)
    reply = tokenizer.decode(reply_ids)
    if not round_trips(tokenizer, messages, prompt_ids, reply_ids, reply):
        counts["not_round_trip"] += 1
        return None
    return reply


def make_pairs(model, tokenizer, records, prompts, reward_fn, k=8, temperature=1.0,
               max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=16, seed=0, kv_memory="50%"):
    """Sample k replies to each prompt (token ids: dpo_prompts'), score each with reward_fn(prompt, reply, record)
    and pair the best-scored reply (chosen) with the worst (rejected), picked at random among ties, where they differ.
    Replies that did not end (no stop token within max_new_tokens) are left out: their text is not a reply; so are
    replies whose text DPO's data would not tokenize back to the ids sampled (round_trips).
    Returns (pairs as DPO jsonl records, counts {prompts, pairs, all_equal, unfinished, not_round_trip})."""
    from strategies import check_reward

    rng, stop_ids = random.Random(seed), tokenizer.stop_ids
    pairs, counts = [], {"prompts": len(prompts), "pairs": 0, "all_equal": 0, "unfinished": 0, "not_round_trip": 0}
    for start in range(0, len(prompts), batch_size):
        batch = list(range(start, min(start + batch_size, len(prompts))))
        rows = [prompts[i] for i in batch for _ in range(k)]
        outputs = generate(model, rows, max_new_tokens, SamplingParams(temperature=temperature), stop_ids,
                           seed=seed + start, vocab_size=tokenizer.vocab_size, kv_memory=kv_memory)
        for n, i in enumerate(batch):
            prompt_text, scored = tokenizer.decode(prompts[i]), []
            for tokens in outputs[n * k:(n + 1) * k]:
                reply = reply_text(tokenizer, tokens, dpo_messages(records[i]), prompts[i], counts)
                if reply is None:
                    continue
                scored.append((check_reward(reward_fn(prompt_text, reply, records[i]), "reward", prompt_text, reply),
                               reply))
            if not scored or min(scored)[0] == max(scored)[0]:
                counts["all_equal"] += 1
                continue
            best, worst = max(r for r, _ in scored), min(r for r, _ in scored)
            chosen = rng.choice([reply for r, reply in scored if r == best])
            rejected = rng.choice([reply for r, reply in scored if r == worst])
            prompt = records[i]["messages"] if "messages" in records[i] else records[i]["prompt"]
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            counts["pairs"] += 1
    return pairs, counts


def pairs_main(argv):
    """python tasks.py pairs --model=DIR --data=TASK.jsonl --out=PAIRS.jsonl [--k=8 --reward=exact_answer ...]"""
    from sample import load
    from settings import load_settings, pick_device, write_jsonl
    from strategies import load_reward

    args = load_settings(PAIRS_DEFAULTS, argv, "tasks.py pairs")
    for key in ("model", "data", "out"):
        if not args[key]:
            sys.exit(f"tasks.py pairs: --{key} is required")
    problems = [f"--{key}={args[key]} must be {rule}" for key, ok, rule in [
        ("k", args.k >= 2, ">= 2: a pair needs two replies"), ("temperature", args.temperature > 0, "> 0"),
        ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"), ("batch_size", args.batch_size >= 1, ">= 1"),
        ("max_prompts", args.max_prompts >= 0, ">= 0 (0 = all)")] if not ok]
    if problems:
        sys.exit("tasks.py pairs: " + "; ".join(problems))
    try:
        reward_fn = load_reward(args.reward)
    except ValueError as e:
        sys.exit(f"tasks.py pairs: {e}")
    device, dtype = pick_device(args.device, "auto", inference=True)
    model, tokenizer = load(args.model, device=device, dtype=dtype)
    _, _, records = read_task(args.data, tokenizer, with_records=True)
    records = records[:args.max_prompts] if args.max_prompts else records
    prompts = dpo_prompts(tokenizer, records)  # as DPO will see them: a "prompt" string as the user's message
    pairs, counts = make_pairs(model, tokenizer, records, prompts, reward_fn, args.k, args.temperature,
                               args.max_new_tokens, args.batch_size, args.seed)
    write_jsonl(args.out, pairs)
    print(f"wrote {args.out}: {counts['pairs']:,} pairs from {counts['prompts']:,} prompts x {args.k} replies "
          f"({counts['all_equal']:,} prompts whose replies all scored alike, {counts['unfinished']:,} replies "
          f"unfinished at max_new_tokens={args.max_new_tokens} and {counts['not_round_trip']:,} whose text does not "
          "tokenize back to the ids sampled left out)")


# -----------------------------------------------------------------------------
# a model's own replies to SFT data's prompts, as SFT data (to distill a teacher over the replies it gives)

REPLIES_DEFAULTS = dict(
    model="",  # MODELDIR (or .gguf) whose replies to write: a teacher to distill
    data="",  # SFT jsonl ({"messages": [...]}): each conversation up to its last assistant message is a prompt
    out="",  # SFT jsonl: each prompt with the model's reply as the last assistant message
    temperature=0.0,  # 0: greedy, the reply the model gives (a prompt repeated in data is answered once)
    max_new_tokens=EVAL_MAX_NEW_TOKENS,  # a reply that has not ended by then is left out
    batch_size=64,  # prompts per generate() call
    seed=0,
    device="auto",
)


def sft_prompt(messages):
    """The messages before a conversation's last assistant message (all of them when none is last)."""
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def make_replies(model, tokenizer, conversations, temperature=0.0, max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=64,
                 seed=0, kv_memory="50%"):
    """Each conversation's prompt (sft_prompt) with the model's reply as its last message, where the reply ended with
    a stop token within max_new_tokens and its text tokenizes back to the ids generated (round_trips). Returns
    (conversations as SFT jsonl records, counts {conversations, written, unfinished, not_round_trip})."""
    prompts = [sft_prompt(messages) for messages in conversations]
    rows = [tokenizer.render_chat(prompt, add_generation_prompt=True)[0] for prompt in prompts]
    todo = list({tuple(row): None for row in rows}) if temperature == 0 else rows  # greedy: each prompt once
    outputs = []
    for start in range(0, len(todo), batch_size):
        outputs += generate(model, [list(row) for row in todo[start:start + batch_size]], max_new_tokens,
                            SamplingParams(temperature=temperature), tokenizer.stop_ids, seed=seed + start,
                            vocab_size=tokenizer.vocab_size, kv_memory=kv_memory)
    reply_of = dict(zip(todo, outputs)) if temperature == 0 else None
    written, counts = [], {"conversations": len(prompts), "written": 0, "unfinished": 0, "not_round_trip": 0}
    for n, (prompt, row) in enumerate(zip(prompts, rows)):
        tokens = reply_of[tuple(row)] if reply_of is not None else outputs[n]
        reply = reply_text(tokenizer, tokens, prompt, row, counts)
        if reply is None:
            continue
        written.append({"messages": prompt + [{"role": "assistant", "content": reply}]})
        counts["written"] += 1
    return written, counts


def replies_main(argv):
    """python tasks.py replies --model=DIR --data=SFT.jsonl --out=SFT_REPLIES.jsonl [--temperature=0 ...]"""
    from sample import load
    from settings import load_settings, pick_device, write_jsonl

    args = load_settings(REPLIES_DEFAULTS, argv, "tasks.py replies")
    problems = [f"--{key} is required" for key in ("model", "data", "out") if not args[key]]
    problems += [f"--{key}={args[key]} must be {rule}" for key, ok, rule in [
        ("temperature", args.temperature >= 0, ">= 0 (0 = greedy)"),
        ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"), ("batch_size", args.batch_size >= 1, ">= 1")] if not ok]
    if problems:
        sys.exit("tasks.py replies: " + "; ".join(problems))
    conversations = []
    with open(args.data, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if not (isinstance(record, dict) and isinstance(record.get("messages"), list) and
                        sft_prompt(record["messages"])):
                    sys.exit(f'tasks.py replies: {args.data}:{line_no}: expected {{"messages": [...]}} with a prompt')
                conversations.append(record["messages"])
    device, dtype = pick_device(args.device, "auto", inference=True)
    model, tokenizer = load(args.model, device=device, dtype=dtype)
    written, counts = make_replies(model, tokenizer, conversations, args.temperature, args.max_new_tokens,
                                   args.batch_size, args.seed)
    write_jsonl(args.out, written)
    print(f"wrote {args.out}: {counts['written']:,} of {counts['conversations']:,} conversations with {args.model}'s "
          f"replies ({counts['unfinished']:,} unfinished at max_new_tokens={args.max_new_tokens} and "
          f"{counts['not_round_trip']:,} whose text does not tokenize back to the ids generated left out)")


# -----------------------------------------------------------------------------
# pass@1 against pass@k: whether a model's samples hold right answers its greedy reply misses (what GRPO learns from)

PASSK_DEFAULTS = dict(
    model="",  # MODELDIR (or .gguf): best the model GRPO would start from
    data="",  # task jsonl ({"messages": [...]} or {"prompt": "..."} with "answer"), prompts rendered as in pairs
    k=8,  # samples a prompt: configs/grpo.py's group_size
    temperature=1.0,  # configs/grpo.py's rollout_temperature
    max_new_tokens=EVAL_MAX_NEW_TOKENS,
    batch_size=16,
    max_prompts=0,  # > 0: only the task file's first this many records
    seed=0,
    device="auto",
)


def passk_main(argv):
    """python tasks.py passk --model=DIR --data=TASK.jsonl [--k=8 --temperature=1.0]: greedy pass@1, the sampled
    accuracy, pass@k and the share of prompts whose k samples are partly right (GRPO's groups with an advantage)."""
    from sample import load
    from settings import load_settings, pick_device

    args = load_settings(PASSK_DEFAULTS, argv, "tasks.py passk")
    for key in ("model", "data"):
        if not args[key]:
            sys.exit(f"tasks.py passk: --{key} is required")
    if args.k < 1 or args.temperature <= 0:
        sys.exit(f"tasks.py passk: --k={args.k} must be >= 1 and --temperature={args.temperature} > 0")
    device, dtype = pick_device(args.device, "auto", inference=True)
    model, tokenizer = load(args.model, device=device, dtype=dtype)
    _, answers, records = read_task(args.data, tokenizer, with_records=True)
    n = min(args.max_prompts, len(records)) if args.max_prompts else len(records)
    prompts, answers = dpo_prompts(tokenizer, records[:n]), answers[:n]
    greedy = sampled_results(model, tokenizer, prompts, answers, 1, 0.0, args.max_new_tokens, 256)  # as pipeline.py
    right = sampled_results(model, tokenizer, prompts, answers, args.k, args.temperature, args.max_new_tokens,
                            args.batch_size, args.seed)
    print(f"{args.data}, {n} prompts: greedy pass@1 {sum(greedy) / n:.3f}, sampled accuracy "
          f"{sum(right) / (n * args.k):.3f}, pass@{args.k} {sum(r > 0 for r in right) / n:.3f}, partly right "
          f"{sum(0 < r < args.k for r in right) / n:.3f} (temperature {args.temperature})")


COMMANDS = {"pairs": pairs_main, "replies": replies_main, "passk": passk_main}

if __name__ == "__main__":
    if sys.argv[1:2] not in ([name] for name in COMMANDS):
        sys.exit("usage: python tasks.py pairs --model=MODELDIR --data=TASK.jsonl --out=PAIRS.jsonl [--k=8] "
                 "[--reward=exact_answer|module:function] [--temperature=1.0] [--max_new_tokens=N] [--seed=0]\n"
                 "       python tasks.py replies --model=MODELDIR --data=SFT.jsonl --out=SFT_REPLIES.jsonl "
                 "[--temperature=0] [--max_new_tokens=N]\n"
                 "       python tasks.py passk --model=MODELDIR --data=TASK.jsonl [--k=8] [--temperature=1.0]")
    COMMANDS[sys.argv[1]](sys.argv[2:])
