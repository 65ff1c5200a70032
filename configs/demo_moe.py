# Pretrain the tiny mixture-of-experts model (configs/tiny_moe.py) on the demo data, as configs/demo.py does the dense
# tiny model: the same data, steps and schedule, so the two val losses compare (README.md, Mixture of experts).
out_dir = "out/demo_moe"
data = "data/demo/pretrain.h5"
tokenizer = "data/demo/tokenizer"
model_config = "configs/tiny_moe.py"
vocab_size = 2048
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
