# Qwen3-0.6B's shape: 28 layers, 1024 wide, 16 query heads over 8 KV heads of 128, SwiGLU 3072, qk-norm, a tied
# 151,936-token vocabulary and a 40,960-token context: bench.py's hardware section measures it.
vocab_size = 151936
dim = 1024
n_layers = 28
n_heads = 16
n_kv_heads = 8
head_dim = 128
dim_ffn = 3072
use_qk_norm = True
tie_weight = True
max_len = 40960
rope_theta = 1000000.0
