# Tiny model for tests and the demo: trains in minutes on 2 CPU cores.
# No vocab_size: train.py takes the tokenizer's, rounded up to a multiple of 64; set vocab_size here or pass
# --vocab_size=N to fix it (never below the tokenizer's; configs/demo.py sets 2,048).
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2  # grouped-query attention, 2 query heads per KV head
dim_ffn = 384
max_len = 256
tie_weight = True
