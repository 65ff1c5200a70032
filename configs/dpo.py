# Direct preference optimisation of the SFT demo model on pairs of a right and a wrong answer (see README.md):
#   python train.py configs/dpo.py
# The reference is a frozen copy of the starting (SFT) model. The loss starts at log 2 = 0.693 with
# pref_accuracy 0 (policy == reference) and falls as the policy learns to prefer the right answers;
# a loss stuck at 0.693 means nothing is being learned.
out_dir = "out/dpo"
init_from = "out/sft/final"
data = "data/demo/dpo.h5"
strategy = "dpo"
max_iters = 150
batch_size = 16  # pairs: each step runs 32 conversations through the policy and the reference
block_size = 128
# beta = 1 holds the policy closer to the reference than the usual 0.1. On this data, beta 0.1 also pushed
# the chosen replies down (chosen_reward < 0) and cost answer accuracy on the training problems; at lr 3e-4
# the model fell apart (ids outside the tokenizer). Watch chosen_reward: far below 0 means too far.
beta = 1.0
lr = 1e-4  # a tenth of SFT's
min_lr = 1e-5
warmup_iters = 10
weight_decay = 0.0
eval_interval = 50
eval_iters = 8
log_interval = 10
ckpt_interval = 150
