# AstrAI MoE 1B (DeepSeek-V3 style): 0.94B parameters, 0.26B of them active per token. Multi-head latent attention
# as astrai_1b_mla.py; layer 0 a dense MLP, layers 1-15 each 64 fine-grained routed experts of 256 (6 chosen a
# token, from the 4 best of 8 groups) beside a shared expert of 512 (two experts' worth), chosen by DeepSeek-V3's
# sigmoid router, whose correction bias train.py balances without an auxiliary loss (moe_balance=auto -> bias).
# A token's MLP work is 6 * 256 + 512 = 2,048 hidden units, against 2,816 for layer 0's dense MLP.
# Saves as DeepseekV3ForCausalLM (transformers) and exports to llama.cpp's deepseek2.
vocab_size = 100000
dim = 1024
n_layers = 16
n_heads = 16
n_kv_heads = 16
dim_ffn = 2816  # layer 0's dense MLP
max_len = 4096
rope_theta = 1000000.0
tie_weight = True
attn = "mla"
q_lora_rank = 512
kv_lora_rank = 256
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
n_experts = 64
n_active_experts = 6
moe_dim_ffn = 256
shared_dim_ffn = 512
router = "sigmoid"
n_expert_groups = 8
topk_groups = 4
routed_scaling_factor = 2.5  # DeepSeek-V3's: the renormalized weights of 6 experts times 2.5
first_dense_layers = 1
