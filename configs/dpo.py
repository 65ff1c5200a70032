# Direct preference optimisation of the SFT demo model on pairs of a right and a wrong answer (see README.md):
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
# The pairs differ only in the answer's digits, the case where plain DPO lowers the chosen reply along with
# the rejected one and the probability goes to a third, also wrong, number: plain DPO lowered held-out answer
# accuracy whatever the lr and beta. Adding the chosen replies' next-token loss (RPO) keeps them likely: with
# rpo_alpha = 5 held-out accuracy rises (0.86 -> 0.88) and preference accuracy is 0.885.
rpo_alpha = 5.0
lr = 1e-4  # a tenth of SFT's
min_lr = 1e-5
warmup_iters = 10
weight_decay = 0.0
eval_interval = 50
eval_iters = 8
log_interval = 10
ckpt_interval = 150
