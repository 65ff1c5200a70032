"""Shared fixtures: a tiny random model directory with a tokenizer, made here (nothing downloaded)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = (
    "The quick brown fox jumps over the lazy dog. 23 + 45 = 68. What is 7 + 8? 15.\n"
    "敏捷的棕色狐狸跳过了懒狗。二十三加四十五等于六十八。你好，世界！Hello, world!\n"
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. Emoji: 🙂🚀. Mixed 中文 and English text.\n"
) * 20


def randomize(model, seed=0):
    """Weights far from init, so that a wrong transpose, scale or RoPE convention shows in the logits and
    greedy choices are decisive, not near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():  # DeepSeek-V3's router bias: part of the choice of experts
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A MODELDIR (config.json, model.safetensors, tokenizer files) of a random tiny GQA model."""
    from tokenizer import train_tokenizer
    from model import ModelConfig, Transformer

    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = train_tokenizer([TEXT], vocab_size=300, progress=False)
    tokenizer.save(path)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         dim_ffn=128, max_len=128, tie_weight=True)
    model = Transformer(config)
    with torch.no_grad():  # larger than init so that greedy choices are decisive, not near-ties
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return str(path)

