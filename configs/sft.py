# Supervised fine-tuning of the pretrained demo model on chat conversations (see README.md):
#   python train.py configs/sft.py
# The loss counts only the assistant's reply and its <|im_end|>, so the model learns to answer in the
# ChatML format and to stop. One conversation per row (~30 tokens of the demo's); --pack=true packs several a row
# (README.md, Packed sequences).
# 32 conversations * 300 steps = 9,600: two passes over the demo's 4,750 training conversations. Held-out
# accuracy after 300 steps: 0.86-0.95 (pretraining seeds 0 and 1), still rising; the demo stops early so that
# DPO and GRPO have errors left to fix. For a model to keep, train longer.
out_dir = "out/sft"
init_from = "out/demo/final"  # the pretrained model; its tokenizer comes with it
data = "data/demo/sft.h5"
strategy = "sft"
max_iters = 300
batch_size = 32
block_size = 128  # longer conversations are cut here (train.py says how many)
lr = 1e-3  # a third of pretraining's: adapt to the format without forgetting the arithmetic
min_lr = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = 8
log_interval = 20
ckpt_interval = 300
