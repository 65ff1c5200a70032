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
import torch

from model import Logits, head_chunk_rows


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
