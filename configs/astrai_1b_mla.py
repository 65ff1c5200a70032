# AstrAI 1B with multi-head latent attention (DeepSeek-V3 style): 24 full query/key/value heads, yet the
# KV cache holds only a 256-wide latent and a 32-wide shared RoPE key per token and layer (288 numbers),
# against 2 * 4 * 64 = 512 for astrai_1b.py's GQA. Sizes otherwise as astrai_1b.py.
vocab_size = 100000
dim = 1536
n_layers = 24
n_heads = 24
dim_ffn = 6912
max_len = 4096
rope_theta = 1000000.0
tie_weight = False
attn = "mla"
n_kv_heads = 24
q_lora_rank = 768
kv_lora_rank = 256
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
