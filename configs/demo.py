# Pretrain the tiny model on the built-in demo data (python data.py demo; see README.md).
# 16 rows * 128 tokens = 2,048 tokens a step; 2000 steps see ~4M tokens, ~5.5 minutes on 2 CPU cores.
# Fewer steps leave SFT (configs/sft.py) at the mercy of the seed: measured, 600 steps ended at val loss
# 0.95-1.01 and SFT from there at 0.14-0.81 held-out accuracy, 1000 steps at 0.87-0.92 and 0.34-0.90;
# 2000 steps end at 0.85-0.86 and SFT at 0.86-0.95 (seeds 0 and 1).
out_dir = "out/demo"
data = "data/demo/pretrain.h5"
tokenizer = "data/demo/tokenizer"
model_config = "configs/tiny.py"
strategy = "seq"
max_iters = 2000
batch_size = 16
block_size = 128
lr = 3e-3
min_lr = 3e-4
warmup_iters = 50
eval_interval = 100
eval_iters = 10
log_interval = 20
ckpt_interval = 200
