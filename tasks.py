"""
Exact-answer tasks: a task file of prompts and answers, the answer check, and greedy accuracy over the file.

    python sample.py --model=out/final --eval=task.jsonl      # prints the accuracy (task_accuracy)

A task file is jsonl: {"messages": [...]} (rendered with the chat template and its generation prompt) or
{"prompt": "..."} (plain text), plus "answer". answer_is_correct is also GRPO's exact_answer reward (strategies.py).
"""
import json
import unicodedata

import regex

from sample import SamplingParams, generate, strip_stop

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
            if not isinstance(record, dict) or "answer" not in record or \
                    not ("messages" in record or "prompt" in record):
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


def task_accuracy(model, tokenizer, task_path, batch_size=32, max_new_tokens=64, kv_memory="50%"):
    """Fraction of a task file's records whose greedy completion holds the answer (answer_is_correct, the
    check GRPO's reward uses), stopping at tokenizer.stop_ids. Prompts are batched shortest first to waste little
    on padding."""
    prompts, answers = read_task(task_path, tokenizer)
    stop_ids = tokenizer.stop_ids
    for i, p in enumerate(prompts):
        if len(p) >= model.config.max_len:
            raise ValueError(f"{task_path}: record {i + 1} has a {len(p)}-token prompt; the model's context is "
                             f"{model.config.max_len}, leaving no room for an answer")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        outputs = generate(model, [prompts[i] for i in batch], max_new_tokens, SamplingParams(temperature=0.0),
                           stop_ids, vocab_size=tokenizer.vocab_size, kv_memory=kv_memory)
        for i, tokens in zip(batch, outputs):
            correct += answer_is_correct(tokenizer.decode(strip_stop(tokens, stop_ids)), answers[i])
    return correct / len(prompts)
