"""Mixture-of-experts models against transformers: Qwen3-MoE, Qwen2-MoE, Mixtral and DeepSeek-V3 checkpoints made by
transformers (tiny, random, unlike each other) load with its logits and greedy tokens, and our save loads back in
transformers with the same logits; the grouped and the per-expert loop computations both; training's auxiliary
loss, the bias balancing and the expert load in the log; an exact resume with the balancing biases."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import moe  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

COMMON = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
              tie_word_embeddings=False)
FAMILIES = {  # transformers config class, its arguments
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, mlp_only_layers=[0])),
    "qwen2_moe": ("Qwen2MoeConfig", dict(COMMON, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                                         num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                                         shared_expert_intermediate_size=48)),
    "mixtral": ("MixtralConfig", dict(COMMON, num_key_value_heads=1, head_dim=32, intermediate_size=48,
                                      num_local_experts=4, num_experts_per_tok=2, rope_theta=500.0)),
    "deepseek_v3": ("DeepseekV3Config", dict(COMMON, num_key_value_heads=4, intermediate_size=96,
                                             moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
                                             n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                             first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
}


def hf_model(family, seed=0):
    """A random transformers model of the family, far from init (router bias included), in eval mode."""
    transformers = pytest.importorskip("transformers")
    name, kwargs = FAMILIES[family]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**kwargs),
                                                          attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            scale, offset = (0.3, 1.0) if "norm" in n else (0.15, 0.0)
            p.copy_(offset + scale * torch.randn(p.shape, generator=g))
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_checkpoint_loads_with_its_logits_and_our_save_loads_back(family, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    theirs = hf_model(family)
    theirs.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    kwargs = FAMILIES[family][1]
    assert ours.config.n_experts == next(kwargs[k] for k in ("num_experts", "num_local_experts", "n_routed_experts")
                                         if k in kwargs)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(x).logits
        assert (ours(x) - expected).abs().max().item() < 1e-4
        if family == "qwen2_moe":  # the loop over experts (builds without torch._grouped_mm) gives the same
            monkeypatch.setattr(moe, "grouped_mm_fits", lambda *a: False)
            assert (ours(x) - expected).abs().max().item() < 1e-4
    ours.save_pretrained(tmp_path / "ours")
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["model_type"] == family
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (back(x).logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_greedy_tokens_are_transformers_generate(family, tmp_path):
    from sample import generate

    theirs = hf_model(family, seed=2)
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    prompts = [[5, 6, 7, 8], [100, 31, 2, 250, 17, 9, 44]]
    got = generate(ours, prompts, 16, temperature=0.0, kv_memory="0.01")
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()


def test_refusals_name_the_field():
    with pytest.raises(ValueError, match="router='sigmoid'.*dense model"):
        ModelConfig(router="sigmoid")
    with pytest.raises(ValueError, match="n_active_experts=5"):
        ModelConfig(n_experts=4, n_active_experts=5)
    with pytest.raises(ValueError, match="n_expert_groups=4"):
        ModelConfig(n_experts=6, n_expert_groups=4)
    from hf import config_from_hf

    hf = dict(model_type="qwen3_moe", vocab_size=10, hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
              intermediate_size=8, num_experts=4, moe_intermediate_size=8, mlp_only_layers=[1, 3])
    with pytest.raises(ValueError, match="mlp_only_layers"):
        config_from_hf(hf, "config.json")


# ----------------------------------------------------------------------------- training


def test_aux_loss_is_one_when_balanced_and_bias_moves_toward_balance():
    c = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, dim_ffn=32, n_experts=4,
                    n_active_experts=1, router="sigmoid")
    layer = moe.MoE(c).train()
    with torch.no_grad():  # equal router scores for every expert
        layer.gate.weight.zero_()
    x = torch.randn(8, 32)
    layer(x[None])
    # equal scores: every token's probability is 1/4 each; the k=1 choice is one expert, so the loss is
    # E * sum_e f_e * 1/4 = 1 whatever the counts
    assert layer.aux_loss.item() == pytest.approx(1.0)
    load = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    model = torch.nn.ModuleList([layer])
    moe.update_biases(model, load, 0.01)
    assert layer.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert moe.load_metrics(load) == {"expert_load": [4.0]}
