# AstrAI 1B: 24 layers of 1536 wide, GQA 24 query heads over 4 KV heads, untied head: ~1.2B parameters.
vocab_size = 100000
dim = 1536
n_layers = 24
n_heads = 24
n_kv_heads = 4
dim_ffn = 6912
max_len = 4096
rope_theta = 1000000.0
tie_weight = False
