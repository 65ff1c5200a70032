# Tiny mixture-of-experts model for tests and the demo (Qwen3-MoE style): tiny.py's attention with q/k norms, and in
# every layer 8 experts of 192, 2 chosen a token by a softmax router (renormalized weights), balanced by the
# auxiliary loss (train.py's moe_balance=auto -> aux). Active per token: 2 * 192 = 384 hidden units, tiny.py's
# dim_ffn: 2.8M parameters, 1.05M of them active, as many as tiny.py has in all (at the demo's 2,048 vocab).
# Saves as Qwen3MoeForCausalLM (transformers) and exports to llama.cpp's qwen3moe.
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
dim_ffn = 384
max_len = 256
tie_weight = True
use_qk_norm = True
n_experts = 8
n_active_experts = 2
moe_dim_ffn = 192
