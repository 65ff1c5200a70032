"""
The demo pipeline: pretrain -> SFT -> DPO -> GRPO on the built-in bilingual arithmetic data, each stage
starting from the last one's final/ model, with greedy exact-answer accuracy on the held-out problems
(eval.jsonl, never seen in training) after each stage, and a table at the end.

    python pipeline.py                      # everything from scratch: ~8 minutes on 2 CPU cores
    python pipeline.py --from_stage=dpo     # reuse data and the pretrain and sft models, run dpo and grpo again

It runs the same commands a user would (printed as it goes); the accuracy is sample.py --eval's.
"""
import os
import subprocess
import sys
import time

DEFAULTS = dict(
    data="data/demo",  # demo data, tokenizer and .h5 files
    out="out",  # a directory per stage: OUT/demo (pretraining), OUT/sft, OUT/dpo, OUT/grpo
    from_stage="data",  # data | pretrain | sft | dpo | grpo: earlier stages' outputs are reused
)
# stage, its config, the directory its model goes to (under --out), the stage whose model it starts from
STAGES = [("pretrain", "configs/demo.py", "demo", None), ("sft", "configs/sft.py", "sft", "demo"),
          ("dpo", "configs/dpo.py", "dpo", "sft"), ("grpo", "configs/grpo.py", "grpo", "dpo")]


def sh(*args):
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def make_data(data):
    sh("data.py", "demo", f"--out={data}")
    sh("data.py", "tokenizer", f"--input={data}/pretrain.txt", "--vocab_size=2048", f"--out={data}/tokenizer")
    for stage, source, name in [("seq", "pretrain.txt", "pretrain"), ("sft", "sft.jsonl", "sft"),
                                ("dpo", "dpo.jsonl", "dpo"), ("grpo", "grpo.jsonl", "grpo")]:
        sh("data.py", "prepare", f"--stage={stage}", f"--input={data}/{source}", f"--tokenizer={data}/tokenizer",
           f"--out={data}/{name}.h5")
    # held-out preference pairs (problems of eval.jsonl), all in one split, for DPO's preference accuracy
    sh("data.py", "prepare", "--stage=dpo", f"--input={data}/dpo_eval.jsonl", f"--tokenizer={data}/tokenizer",
       f"--out={data}/dpo_eval.h5", "--val_fraction=0")


def answer_accuracy(model_dir, task):
    """What `python sample.py --model=MODEL_DIR --eval=TASK` prints: greedy exact-answer accuracy."""
    from sample import evaluate, load, stop_ids_for

    model, tokenizer = load(model_dir)
    return evaluate(model, tokenizer, task, stop_ids=stop_ids_for(model_dir, tokenizer))


def preference_accuracy(policy_dir, reference_dir, pairs_path):
    """Share of preference pairs where DPO's implicit reward, beta * log(policy / reference), is higher for
    the chosen reply than for the rejected one."""
    import torch

    from data import load_dataset
    from sample import load
    from strategies import DPO

    policy, _ = load(policy_dir)
    dpo = DPO({"beta": 1.0}, load(reference_dir)[0])  # the sign of the margin does not depend on beta
    pairs = load_dataset(pairs_path, "train", policy.config.max_len - 1, stage="dpo")
    correct = 0.0
    with torch.no_grad():
        for start in range(0, len(pairs), 64):
            indices = list(range(start, min(start + 64, len(pairs))))
            _, metrics = dpo.loss(policy, pairs.get_batch(indices), step=0)
            correct += metrics["pref_accuracy"] * len(indices)
    return correct / len(pairs)


def main(argv):
    from data import parse_args

    args = parse_args(DEFAULTS, argv)
    names = ["data"] + [stage for stage, *_ in STAGES]
    if args["from_stage"] not in names:
        sys.exit(f"pipeline.py: --from_stage={args['from_stage']!r}: choose from {', '.join(names)}")
    first = names.index(args["from_stage"])
    data, out, task = args["data"], args["out"], os.path.join(args["data"], "eval.jsonl")
    rows, t_start = [], time.time()
    if first == 0:
        make_data(data)
    for i, (stage, config, name, parent) in enumerate(STAGES, 1):
        t0 = time.time()
        model_dir = os.path.join(out, name, "final")
        if i >= first:
            data_file = "pretrain.h5" if stage == "pretrain" else f"{stage}.h5"
            start = [f"--tokenizer={data}/tokenizer"] if parent is None else [f"--init_from={out}/{parent}/final"]
            sh("train.py", config, f"--data={data}/{data_file}", f"--out_dir={out}/{name}", *start)
        elif not os.path.isdir(model_dir):
            sys.exit(f"pipeline.py: --from_stage={args['from_stage']} reuses {model_dir}, which does not exist")
        print(f"$ python sample.py --model={model_dir} --eval={task}", flush=True)
        accuracy = answer_accuracy(model_dir, task)
        note = ""
        if stage == "dpo":
            pairs = preference_accuracy(model_dir, os.path.join(out, parent, "final"), f"{data}/dpo_eval.h5")
            note = f"preference accuracy {pairs:.3f} on {data}/dpo_eval.jsonl"
        rows.append((stage, accuracy, (time.time() - t0) / 60 if i >= first else None, note))
        print(f"{stage}: accuracy {accuracy:.3f} {note}", flush=True)

    print(f"\nexact-answer accuracy on {task} (greedy), after each stage:")
    print(f"{'stage':<9} {'accuracy':>8} {'minutes':>8}")
    for stage, accuracy, minutes, note in rows:
        print(f"{stage:<9} {accuracy:>8.3f} {'-' if minutes is None else f'{minutes:.1f}':>8}  {note}")
    print(f"total {(time.time() - t_start) / 60:.1f} minutes")


if __name__ == "__main__":
    main(sys.argv[1:])
