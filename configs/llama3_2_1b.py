# Llama-3.2-1B's shape: 16 layers, 2048 wide, 32 query heads over 8 KV heads of 64, SwiGLU 8192, a tied 128,256-token
# vocabulary, Llama 3's RoPE scaling over a 131,072-token context: bench.py's hardware section measures it.
vocab_size = 128256
dim = 2048
n_layers = 16
n_heads = 32
n_kv_heads = 8
head_dim = 64
dim_ffn = 8192
tie_weight = True
max_len = 131072
rope_theta = 500000.0
norm_eps = 1e-5
rope_scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
