# Tiny model for tests and the demo: trains in minutes on 2 CPU cores.
vocab_size = 2048  # fits the demo tokenizer (train.py checks the tokenizer fits)
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2  # grouped-query attention, 2 query heads per KV head
dim_ffn = 384
max_len = 256
tie_weight = True
