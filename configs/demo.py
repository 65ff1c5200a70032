# Pretrain the tiny model on the built-in demo data (python data.py demo; see README.md).
# 16 rows * 128 tokens = 2,048 tokens a step; 600 steps see ~1.2M tokens, a few minutes on 2 CPU cores.
out_dir = "out/demo"
data = "data/demo/pretrain.h5"
tokenizer = "data/demo/tokenizer"
model_config = "configs/tiny.py"
strategy = "seq"
max_iters = 600
batch_size = 16
block_size = 128
lr = 3e-3
min_lr = 3e-4
warmup_iters = 50
eval_interval = 100
eval_iters = 10
log_interval = 20
ckpt_interval = 200
