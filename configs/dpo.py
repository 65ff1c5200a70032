# Direct preference optimisation of an SFT model on pairs of a right and a wrong answer (see README.md):
#   python tasks.py pairs --model=out/sft/final --data=data/demo/grpo.jsonl --k=8 --out=pairs.jsonl   (on-policy)
#   python data.py prepare --stage=dpo --input=pairs.jsonl --tokenizer=out/sft/final --out=data/demo/dpo.h5
#   python train.py configs/dpo.py
# The reference is a frozen copy of the starting (SFT) model. dpo_loss starts at log 2 = 0.693 with
# pref_accuracy 0 (policy == reference) and falls as the policy learns to prefer the right answers;
# a dpo_loss stuck at 0.693 means nothing is being learned.
out_dir = "out/dpo"
init_from = "out/sft/final"
data = "data/demo/dpo.h5"
strategy = "dpo"
max_iters = 150
batch_size = 16  # pairs: each step runs 32 conversations through the policy and the reference
block_size = 128
beta = 0.1
# The pairs are best the model's own replies, right against wrong (tasks.py pairs): they target the errors it
# makes, and its chosen replies are already likely, so little of the NLL term is needed. rpo_alpha = 1 (RPO's own
# choice) keeps the chosen replies from being unlearned with the rejected ones, the failure of plain DPO on pairs
# that differ in a few tokens; the demo's dpo.jsonl pairs (a right answer against its digits changed, not the
# model's own) needed rpo_alpha = 5 to gain (0.86 -> 0.88).
rpo_alpha = 1.0
lr = 1e-4  # a tenth of SFT's
min_lr = 1e-5
warmup_iters = 10
weight_decay = 0.0
eval_interval = 50
eval_iters = 8
log_interval = 10
ckpt_interval = 150
