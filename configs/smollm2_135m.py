# SmolLM2-135M's shape (a Llama: 30 layers, 576 wide, 9 query heads over 3 KV heads of 64, SwiGLU 1536, a tied
# 49,152-token vocabulary): bench.py's gguf_load section loads a random model of it as a Q4_K_M file.
vocab_size = 49152
dim = 576
n_layers = 30
n_heads = 9
n_kv_heads = 3
head_dim = 64
dim_ffn = 1536
tie_weight = True
max_len = 8192
rope_theta = 100000.0
norm_eps = 1e-5
