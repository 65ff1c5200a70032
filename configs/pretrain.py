# Pretrain AstrAI 1B. Usage:
#   torchrun --nproc_per_node=4 train.py configs/pretrain.py --data=DIR_OF_SHARDS --tokenizer=TOKDIR
# 8 rows * 2048 tokens * 8 accumulation steps * 4 GPUs = 524,288 tokens a step;
# 40,000 steps = 21B tokens, ~18 tokens per parameter.
out_dir = "out/pretrain"
data = "data/pretrain"  # a directory of .h5 shards from `python data.py prepare --stage=seq`
model_config = "configs/astrai_1b.py"
strategy = "seq"
max_iters = 40000
batch_size = 8
block_size = 2048
grad_accum = 8
lr = 3e-4
min_lr = 3e-5
warmup_iters = 2000
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 1000
eval_iters = 50
log_interval = 10
ckpt_interval = 1000
keep_checkpoints = 3
dtype = "auto"  # bfloat16 autocast on GPUs
compile = True
grad_checkpointing = True  # 2048-token rows of a 1B model: trade compute for memory
parallel = "ddp"  # "fsdp" shards parameters, gradients and optimizer state across GPUs
