"""
Scoring text and the glue to lm-evaluation-harness (lm-eval), the evaluator people run on models and servers.

  PromptScores    the output a prefill uses for sequences that asked for their prompt's log-probs (serve.py's
                  /v1/completions with echo and logprobs, as lm-eval's loglikelihood requests send): the log-softmax
                  at every prompt position in the same forward that fills the KV cache, in row chunks of the output
                  head, never (tokens x vocabulary) for a whole batch
  write_tasks     exact-answer task files (tasks.py's jsonl) as lm-eval tasks: YAML + jsonl + a utils.py whose
                  process_results is tasks.py's own answer check, so lm-eval's exact_match is this project's accuracy

    python evaluate.py tasks --data=out/demo/data/arith_test.jsonl --out=out/demo/lm_eval_tasks [--max_new_tokens=N]
    lm_eval --model local-completions --model_args model=demo,base_url=http://127.0.0.1:8000/v1/completions,\\
        tokenizer_backend=remote --tasks=astrai_arith --include_path=out/demo/lm_eval_tasks

Imported only when used: a reader who trains or samples never opens it.
"""
import json
import os
import sys

import torch

from model import Logits, head_chunk_rows

DEFAULTS = dict(
    data="",  # a task file (tasks.py's jsonl: {"messages": [one user message]} or {"prompt": "..."}, plus "answer")
    tokenizer="",  # the model (or tokenizer) directory whose chat template renders "messages" records
    out="",  # the directory to write: NAME.yaml, NAME.jsonl, utils.py
    name="",  # the lm-eval task name; default: astrai_ + the data file's name
    max_new_tokens=0,  # tokens each reply may take; 0 = sample.EVAL_MAX_NEW_TOKENS, every accuracy's length
)
ROOT = os.path.dirname(os.path.abspath(__file__))


class PromptScores:
    """Logits(last_only=True) for every row of a prefill chunk (what the engine samples from), and for the rows in
    `rows` ({row in the batch: (sequence, first position of its chunk, chunk length)}) each prompt token's log-prob
    and the top k alternatives (k = the sequence's prompt_logprobs), written into seq.prompt_scores[position]
    (position p scores prompt token p + 1). Ids past vocab_size (padded embedding rows: no text) are -inf, as in
    sampling."""

    def __init__(self, rows, vocab_size=None):
        self.rows, self.vocab_size = rows, vocab_size

    def __call__(self, model, hidden, index):
        for row, (seq, start, length) in self.rows.items():
            stop = min(length, len(seq.prompt) - 1 - start)  # the chunk's positions whose next token is the prompt's
            targets = torch.tensor(seq.prompt[start + 1:start + 1 + stop], device=hidden.device)
            chunk = head_chunk_rows(model.config.vocab_size)
            for a in range(0, stop, chunk):
                logits = model.lm_head(model.norm(hidden[row, a:min(stop, a + chunk)])).float()
                if self.vocab_size and logits.shape[-1] > self.vocab_size:
                    logits[:, self.vocab_size:] = float("-inf")
                logprobs = logits.log_softmax(-1)
                chosen = logprobs.gather(1, targets[a:a + len(logprobs), None])[:, 0].tolist()
                top = logprobs.topk(max(seq.prompt_logprobs, 1), -1)
                for j, (ids, values) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                    seq.prompt_scores[start + a + j] = (seq.prompt[start + a + j + 1], chosen[j],
                                                        list(zip(ids, values))[:seq.prompt_logprobs])
        return Logits(last_only=True)(model, hidden, index)


# -----------------------------------------------------------------------------
# exact-answer task files as lm-eval tasks


def lm_eval_records(data, tokenizer):
    """A task file's records as lm-eval docs {"prompt": text, "answer"}: chat records rendered through the chat
    template to text whose special-token strings re-tokenize to the very ids sample.py --eval feeds the model
    (checked), so that no --apply_chat_template is needed and lm-eval's prompt is the pipeline's."""
    from tasks import read_task

    prompts, answers = read_task(data, tokenizer)
    records = []
    for i, (ids, answer) in enumerate(zip(prompts, answers), 1):
        text = tokenizer.decode(ids)
        if tokenizer.encode_with_special(text) != ids:
            raise ValueError(f"{data}: record {i}'s rendered prompt does not tokenize back to the same ids; "
                             "it cannot be an lm-eval text prompt")
        records.append({"prompt": text, "answer": answer})
    return records


def write_tasks(data, tokenizer, out, name="", max_new_tokens=0, context=None):
    """Write an lm-eval task for a task file: OUT/NAME.yaml (generate_until, greedy, up to max_new_tokens, cut at the
    tokenizer's stop tokens), OUT/NAME.jsonl and OUT/utils.py, whose process_results is tasks.answer_is_correct:
    lm-eval's exact_match is then sample.py --eval's accuracy. Paths inside are absolute. context: the model's, when
    known: max_new_tokens is then at most what the longest prompt leaves (lm-eval wants prompt + reply to fit, where
    generate() stops at the context's end). -> the task name."""
    from sample import EVAL_MAX_NEW_TOKENS
    from settings import write_jsonl

    name, max_new_tokens = name or "astrai_" + os.path.splitext(os.path.basename(data))[0], max_new_tokens or \
        EVAL_MAX_NEW_TOKENS
    records = lm_eval_records(data, tokenizer)
    if context:
        longest = max(len(tokenizer.encode_with_special(r["prompt"])) for r in records)
        if longest >= context:
            raise ValueError(f"{data}: a prompt of {longest} tokens leaves no room for a reply in the {context}-token "
                             "context")
        max_new_tokens = min(max_new_tokens, context - longest)
    os.makedirs(out, exist_ok=True)
    jsonl, stops = os.path.abspath(os.path.join(out, name + ".jsonl")), [tokenizer.decode([i]) for i in
                                                                          tokenizer.stop_ids]
    write_jsonl(jsonl, records)
    yaml = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": jsonl}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}", "generation_kwargs": {"until": stops, "max_gen_toks": max_new_tokens,
                                                                 "do_sample": False, "temperature": 0.0},
            "process_results": "!function utils.process_results",
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    text = "".join(f"{key}: {json.dumps(value, ensure_ascii=False)}\n" for key, value in yaml.items())  # JSON is YAML
    with open(os.path.join(out, name + ".yaml"), "w", encoding="utf-8") as f:
        f.write(text.replace('"!function utils.process_results"', "!function utils.process_results"))
    with open(os.path.join(out, "utils.py"), "w", encoding="utf-8") as f:
        f.write(f'"""lm-eval glue written by evaluate.py: exact_match is tasks.py\'s answer check."""\nimport sys\n\n'
                f"sys.path.insert(0, {ROOT!r})\nfrom tasks import answer_is_correct  # noqa: E402\n\n\n"
                "def process_results(doc, results):\n"
                '    return {"exact_match": float(answer_is_correct(results[0], doc["answer"]))}\n')
    return name


def main(argv):
    if not argv or argv[0] != "tasks":
        print(__doc__)
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    from settings import load_settings
    from tokenizer import Tokenizer

    args = load_settings(DEFAULTS, argv[1:], "evaluate.py tasks")
    for key in ("data", "tokenizer", "out"):
        if not args[key]:
            raise SystemExit(f"--{key} is required; see python evaluate.py tasks --help")
    config = os.path.join(args.tokenizer, "config.json")  # a model directory: its context bounds the replies
    try:
        context = None
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                context = json.load(f).get("max_position_embeddings")
        name = write_tasks(args.data, Tokenizer.load(args.tokenizer), args.out, args.name, args.max_new_tokens,
                           context)
    except (ValueError, OSError) as e:
        raise SystemExit(f"evaluate.py: {e}") from None
    print(f"wrote the lm-eval task {name} to {args.out}; run it with --include_path={args.out} --tasks={name}")


if __name__ == "__main__":
    main(sys.argv[1:])
