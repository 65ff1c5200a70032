# The 82M Qwen3-shaped model of bench.py's decode and serve sections (llama.cpp's speed is measured on it):
# 768 wide, 12 layers, 12 query heads over 4 KV heads of 64, SwiGLU 2048, q/k norms, 8192-token vocabulary.
vocab_size = 8192
dim = 768
n_layers = 12
n_heads = 12
n_kv_heads = 4
head_dim = 64
dim_ffn = 2048
use_qk_norm = True
tie_weight = False
max_len = 2048
