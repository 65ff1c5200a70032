"""Peak memory of loading a model, in a fresh process: python tests/load_memory.py MODELDIR|FILE.gguf DTYPE
prints one JSON line: the resident memory the load added at its peak (VmHWM after the load less VmRSS before it),
the bytes of the loaded model's tensors, and of the largest tensor in the file (tests/test_model.py's
test_loading_stays_within_the_weights_size asserts on these). Before the baseline is taken, a tiny model stored
the same way is loaded the same way: the modules imported lazily and the library code run for the first time are
then in the baseline, not in the load's figure."""
import gc
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf import safetensors_tensors  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from settings import DTYPES  # noqa: E402


def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024


def largest_tensor_bytes(path):
    if path.endswith(".gguf"):
        from gguf_in import open_gguf

        return max(t.n_bytes for t in open_gguf(path)[0].tensors)
    return max(read().nbytes for _, _, read in safetensors_tensors(path))  # memory-mapped: reads nothing


def warm_up(path, dtype):
    """Load a 2-layer model saved in the file's dtype (safetensors) with the same dtype."""
    if path.endswith(".gguf"):
        file_dtype = torch.float32
    else:
        file_dtype = safetensors_tensors(path)[0][2]().dtype
    config = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128, max_len=64)
    with tempfile.TemporaryDirectory() as tiny:
        Transformer(config).to(file_dtype).save_pretrained(tiny)
        Transformer.from_pretrained(tiny, dtype=DTYPES.get(dtype, dtype))


def main(path, dtype):
    largest = largest_tensor_bytes(path)
    warm_up(path, dtype)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = status_kib("VmRSS")
    model = Transformer.from_pretrained(path, dtype=DTYPES.get(dtype, dtype))
    peak = status_kib("VmHWM") - before
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    print(json.dumps({"peak": peak, "weights": sum(storages.values()), "largest": largest}))


if __name__ == "__main__":
    main(*sys.argv[1:])
