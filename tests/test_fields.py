"""Every ModelConfig field through every path that runs a model: the cached decode (ragged and aligned rows, prefix
reuse, the compiled step) equals a full recompute; a Hugging Face save gives transformers' logits or is refused by
transformers; a LoRA adapter merged on load equals it unmerged; a GGUF export gives llama.cpp's greedy tokens or is
refused naming the field. ROWS holds a value for each field: a field added to ModelConfig without a row here fails
test_every_field_has_a_row, so a new model option cannot skip these checks."""
import dataclasses
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import TEXT, randomize  # noqa: E402
from kv_cache import KVCache  # noqa: E402
from model import CrossEntropy, Logits, ModelConfig, TokenLogprobs, Transformer  # noqa: E402
from sample import Engine, SamplingParams, Sequence, generate  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402

BASE = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, dim_ffn=128, max_len=96, rope_theta=500.0)
MLA = dict(attn="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
# one config a mixture-of-experts family (the rows of several MoE fields share it: CASES runs each config once)
MIXTRAL = dict(n_experts=4, n_active_experts=3, moe_dim_ffn=32)
QWEN3_MOE = dict(n_experts=8, n_active_experts=3, moe_dim_ffn=48, use_qk_norm=True, n_kv_heads=2)
QWEN2_MOE = dict(n_experts=6, n_active_experts=2, moe_dim_ffn=32, shared_dim_ffn=48, shared_expert_gate=True,
                 attention_bias=True, norm_topk_prob=False)
DEEPSEEK_MOE = {**MLA, "q_lora_rank": 24, "n_experts": 8, "n_active_experts": 3, "moe_dim_ffn": 32,
                "shared_dim_ffn": 64, "router": "sigmoid", "n_expert_groups": 4, "topk_groups": 2,
                "routed_scaling_factor": 2.5, "first_dense_layers": 1}
ROWS = {  # field -> the configs (changes to BASE) that set it to something other than BASE and the default
    "vocab_size": [dict(vocab_size=333)],
    "dim": [dict(dim=48)],
    "n_layers": [dict(n_layers=3)],
    "n_heads": [dict(n_heads=8, n_kv_heads=8)],
    "n_kv_heads": [dict(n_kv_heads=2)],
    "head_dim": [dict(head_dim=24)],
    "dim_ffn": [dict(dim_ffn=96)],
    "norm_eps": [dict(norm_eps=1e-2)],
    "rope_theta": [dict(rope_theta=20.0)],
    "rope_scaling": [dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), dict(rope_scaling=YARN),
                     dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})],
    "max_len": [dict(max_len=64)],
    "tie_weight": [dict(tie_weight=False)],
    "attention_bias": [dict(attention_bias=True, n_kv_heads=2)],
    "use_qk_norm": [dict(use_qk_norm=True, n_kv_heads=2), dict(use_qk_norm=True, attention_bias=True)],
    "use_gated_attention": [dict(use_gated_attention=True, n_kv_heads=2)],
    "attn": [MLA, {**MLA, "rope_scaling": YARN}],
    "q_lora_rank": [{**MLA, "q_lora_rank": 48}],
    "kv_lora_rank": [{**MLA, "kv_lora_rank": 24}],
    "qk_nope_head_dim": [{**MLA, "qk_nope_head_dim": 8}],
    "qk_rope_head_dim": [{**MLA, "qk_rope_head_dim": 16}],
    "v_head_dim": [{**MLA, "v_head_dim": 24}],
    "n_experts": [MIXTRAL, QWEN3_MOE],
    "n_active_experts": [MIXTRAL],
    "moe_dim_ffn": [MIXTRAL],
    "shared_dim_ffn": [QWEN2_MOE, DEEPSEEK_MOE],
    "shared_expert_gate": [QWEN2_MOE],
    "router": [DEEPSEEK_MOE, {**MIXTRAL, "router": "sigmoid"}],  # the second: no published GQA family has it
    "norm_topk_prob": [QWEN2_MOE],
    "n_expert_groups": [DEEPSEEK_MOE],
    "topk_groups": [DEEPSEEK_MOE],
    "routed_scaling_factor": [DEEPSEEK_MOE],
    "first_dense_layers": [DEEPSEEK_MOE, {**QWEN3_MOE, "first_dense_layers": 1}],  # the second: not in llama.cpp
}
CASES = {}  # each config once, named by its first row
for field, variants in ROWS.items():
    for i, changes in enumerate(variants):
        CASES.setdefault(repr(changes), (field, i))
CASES = list(CASES.values())
TOL = 1e-4


def test_every_field_has_a_row():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(ROWS) == names, f"ModelConfig fields without a row: {sorted(names - set(ROWS))}"
    defaults = ModelConfig()
    for field, variants in ROWS.items():
        for changes in variants:  # each row really sets its field away from the base and from the default
            config = ModelConfig(**{**BASE, **changes})
            assert getattr(config, field) != getattr(ModelConfig(**BASE), field) or \
                getattr(config, field) != getattr(defaults, field), (field, changes)


def model_for(field, i):
    config = ModelConfig(**{**BASE, **ROWS[field][i]})
    torch.manual_seed(0)
    return randomize(Transformer(config), seed=i).eval()


def recompute_greedy(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("field, i", CASES)
@torch.no_grad()
def test_cached_decode_and_training_heads_equal_a_full_recompute(field, i):
    model = model_for(field, i)
    V, g = model.config.vocab_size, torch.Generator().manual_seed(i + 1)
    for lengths in ([5, 11], [7, 7]):  # ragged rows (a mask), then aligned ones (none)
        seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]
        cache = KVCache(model.config, batch_size=2, max_len=48)
        ids = torch.tensor([s + [0] * (max(lengths) - len(s)) for s in seqs])
        logits = model(ids, Logits(last_only=True), cache, input_lengths=lengths)[:, 0]
        steps = []
        for _ in range(30):  # past YARN's original context of 16
            steps.append(logits)
            new = logits.argmax(-1)
            for r in range(2):
                seqs[r].append(int(new[r]))
            logits = model(new[:, None], cache=cache)[:, 0]
        for r, (seq, n) in enumerate(zip(seqs, lengths)):  # causal: a prefix's logits are the full sequence's
            full = model(torch.tensor([seq]))[0, n - 1:-1]
            assert (torch.stack([step[r] for step in steps]) - full).abs().max().item() < TOL, (field, lengths, r)
    # the training heads: per-token log-probs and the summed loss from the same body
    ids = torch.randint(0, V, (2, 20), generator=g)
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    full = model(ids).float()
    picked = full.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    assert (model(ids, TokenLogprobs(targets)) - picked).abs().max().item() < TOL
    expected = F.cross_entropy(full.flatten(0, 1), targets.flatten(), reduction="sum")
    assert model(ids, CrossEntropy(targets)).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("field, i", CASES)
@torch.no_grad()
def test_prefix_reuse_equals_a_full_recompute(field, i):
    """A second turn that starts with the first's prompt and reply takes its row and prefills only the rest."""
    model = model_for(field, i)
    prompt = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(i)).tolist()
    engine = Engine(model, max_batch=1, max_len=64, prefill_chunk=4, kv_memory="0.01")
    first = Sequence(prompt, 8, SamplingParams(temperature=0.0))
    engine.add([first])
    while engine.has_work():
        engine.step()
    second = Sequence(prompt + first.tokens + [3, 4], 8, SamplingParams(temperature=0.0))
    engine.add([second])
    while engine.has_work():
        engine.step()
    assert second.reused > len(prompt)
    assert first.tokens == recompute_greedy(model, prompt, 8)
    assert second.tokens == recompute_greedy(model, second.prompt, 8)


@pytest.mark.parametrize("changes", [dict(n_kv_heads=2, head_dim=24, use_qk_norm=True, attention_bias=True,
                                          use_gated_attention=True, tie_weight=False, rope_scaling=YARN),
                                     {**MLA, "q_lora_rank": 48, "rope_scaling": YARN},
                                     {**QWEN2_MOE, "n_experts": 4, "n_active_experts": 3}])
@torch.no_grad()
def test_compiled_decode_equals_a_full_recompute(changes):
    """Every GQA option at once, then MLA, then experts (2 rows choose 6 of 4: the compiled step runs every expert;
    1 row chooses 3 of 4: an MoE model's other library, which gathers them): the compiled decode step is the same
    code as the eager one, at 2 rows and at 1."""
    from compiled import cpp_compiler

    if cpp_compiler() is None:
        pytest.skip("no C++ compiler for the compiled decode step")
    torch.manual_seed(0)
    model = randomize(Transformer(ModelConfig(**{**BASE, **changes}))).eval()
    prompts = [[5, 6, 7], list(range(10, 21))]
    want = [recompute_greedy(model, p, 24) for p in prompts]
    assert generate(model, prompts, 24, temperature=0.0, compile=True, kv_memory="0.01") == want
    assert generate(model, prompts[1:], 24, temperature=0.0, compile=True, kv_memory="0.01") == want[1:]


# ----------------------------------------------------------------------------- Hugging Face and LoRA


@pytest.mark.parametrize("field, i", CASES)
def test_hf_save_gives_transformers_logits_or_is_refused_by_it(field, i, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = model_for(field, i)
    model.save_pretrained(tmp_path)
    x = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        ours = model(x)
    from hf import architecture

    try:
        architecture(model.config)
    except ValueError as e:
        assert any(name in str(e) for name in ROWS[field][i]), e
        with pytest.raises((ValueError, KeyError)):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        return
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (theirs(x).logits - ours).abs().max().item() < TOL
    assert Transformer.from_pretrained(tmp_path).config == model.config


@pytest.mark.parametrize("field, i", CASES)
def test_lora_adapter_merged_on_load_equals_it_unmerged(field, i, tmp_path):
    import lora

    model = model_for(field, i)
    model.save_pretrained(tmp_path / "base")
    if model.config.n_experts:  # the routed experts take no adapter: refused by name
        with pytest.raises(ValueError, match="experts"):
            lora.target_names(model, "attention,mlp")
    names = lora.target_names(model, "attention" if model.config.n_experts else "attention,mlp")
    lora.add_adapters(model, names, 4, 2.0)
    g = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for layer in lora.adapter_layers(model):
            layer.lora_B.weight.copy_(0.2 * torch.randn(layer.lora_B.weight.shape, generator=g))
    state = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    lora.save_adapter(tmp_path / "adapter", state, lora.peft_config(names, 4, 8.0, 0.0, str(tmp_path / "base"),
                                                                          model.config.n_layers))
    merged = Transformer.from_pretrained(tmp_path / "base", adapter=str(tmp_path / "adapter")).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 30), generator=g)
    with torch.no_grad():
        assert (merged(x) - model(x)).abs().max().item() < TOL


# ----------------------------------------------------------------------------- GGUF in llama.cpp


@pytest.mark.parametrize("field, i", CASES)
def test_gguf_export_runs_alike_in_llamacpp_or_is_refused(field, i, tmp_path):
    pytest.importorskip("gguf")
    import export
    from test_export import SERVER, llama_server, post

    model = model_for(field, i)
    tokenizer = train_tokenizer([TEXT], vocab_size=300, progress=False)
    tokenizer.save(tmp_path)
    model.save_pretrained(tmp_path, token_ids=tokenizer.token_ids())
    path = str(tmp_path / "m.gguf")
    try:
        export.export(str(tmp_path), path, "f32")
    except ValueError as e:  # refused: the message names the field, and no file is left
        assert any(name in str(e) for name in ROWS[field][i]), e
        assert not os.path.exists(path)
        return
    if model.config.n_experts:  # read back (gguf_in.py): the same model
        back = Transformer.from_pretrained(path).eval()
        unused = {} if model.config.first_dense_layers else {"dim_ffn": model.config.dim_ffn}  # no dense MLP
        assert dataclasses.replace(back.config, **unused) == model.config
        x = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            assert (back(x) - model(x)).abs().max().item() < TOL
    if not os.path.isfile(SERVER):
        pytest.skip(f"llama.cpp is not built ({SERVER} missing): README, GGUF export")
    prompts = [tokenizer.encode(text)[:6] for text in ("23 + 45 = 68", "你好，世界！Hello")]
    with llama_server(path, str(tmp_path / "server.log")) as port:
        for ids in prompts:
            theirs = post(port, "/completion", {"prompt": ids, "n_predict": 30, "temperature": 0, "top_k": 1,
                                                "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True})
            ours = recompute_greedy(model, ids, 30)
            stop = next((n for n, t in enumerate(ours) if t in tokenizer.stop_ids), None)  # llama.cpp stops there
            assert theirs["tokens"] == ours[:None if stop is None else stop + 1], (field, i, ids)
