"""The sampler's options beyond temperature/top-k/top-p (min_p, logit_bias, repetition, presence and frequency
penalties, near-zero temperatures) against independent references: transformers' own logits processors and
OpenAI's documented formula mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from sample import SamplingParams, generate, load, sample_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_warp(scores, temperature, top_k, top_p, min_p):
    """transformers' sampling chain, in its order: temperature, top-k, top-p, min-p -> log-probs (B, V)."""
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    for warper in [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1 else None, MinPLogitsWarper(min_p) if min_p else None]:
        if warper is not None:
            scores = warper(ids, scores)
    return torch.log_softmax(scores, -1)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [(1.0, 0, 1.0, 0.05), (0.7, 50, 0.9, 0.1),
                                                              (1.5, 0, 0.95, 0.2), (1.0, 0, 1.0, 0.0)])
def test_min_p_and_the_chain_match_transformers(temperature, top_k, top_p, min_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 200, generator=g) * 1.5
    reference = hf_warp(logits.clone(), temperature, top_k, top_p, min_p)[0]  # (V,)
    n = 400
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tokens, logprobs = sample_tokens(logits.expand(n, -1), params, [g] * n)
    assert torch.isfinite(reference[tokens]).all()  # never a token transformers cuts
    torch.testing.assert_close(logprobs, reference[tokens], atol=1e-5, rtol=0)
    kept = torch.isfinite(reference).sum().item()
    assert len(set(tokens.tolist())) > min(kept, 20) // 2  # it samples, across the kept set
    if min_p:  # and min_p does cut: fewer tokens than without it
        assert kept < torch.isfinite(hf_warp(logits.clone(), temperature, top_k, top_p, 0.0)[0]).sum().item()


def test_near_zero_temperature_is_greedy():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 5
    for temperature in (1e-38, 1e-30, 1e-6):
        tokens, logprobs = sample_tokens(logits, SamplingParams(temperature=temperature))
        assert tokens.tolist() == logits.argmax(-1).tolist()
        assert torch.isfinite(logprobs).all()
    # per row: a near-zero row stays greedy in a batch that samples
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    tokens, _ = sample_tokens(logits, [SamplingParams(temperature=t) for t in (1e-37, 5.0, 1e-7, 5.0)], g)
    assert tokens[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()


def reference_logprobs(hf, prompt, tokens, bias, repetition, presence, frequency, temperature, min_p):
    """Each generated token's log-prob, recomputed: transformers' logits for the whole sequence, the logit bias,
    transformers' RepetitionPenaltyLogitsProcessor, OpenAI's presence/frequency formula, then hf_warp."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()  # (T, V)
    result = []
    for t, token in enumerate(tokens):
        scores = logits[t:t + 1].clone()
        for i, b in bias.items():
            scores[0, i] += b
        scores = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([prompt + tokens[:t]]), scores)
        counts = torch.bincount(torch.tensor(tokens[:t], dtype=torch.long), minlength=scores.shape[1]).float()
        scores = scores - counts * frequency - (counts > 0).float() * presence
        result.append(hf_warp(scores, temperature, 0, 1.0, min_p)[0, token].item())
    return result


@pytest.mark.parametrize("repetition, presence, frequency", [(1.3, 0.0, 0.0), (1.0, 0.8, 0.0), (1.0, 0.0, 0.6),
                                                             (0.8, -0.5, 1.2)])
def test_penalties_in_the_engine_match_transformers_and_openai(tiny_model_dir, repetition, presence, frequency):
    model, tokenizer = load(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.encode("Numbers: 0 1 2 3"), tokenizer.encode("Hello, world! Hello")]
    bias = {5: 2.5, 17: -3.0}
    # (min_p stays 0 here: with this model's flat logits some token always sits within float noise of its cut)
    tokens, logprobs = generate(model, prompts, 80, temperature=0.9, seed=3, return_logprobs=True, logit_bias=bias,
                                repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency)
    plain = generate(model, prompts, 80, temperature=0.9, seed=3)
    assert tokens != plain  # the options changed what was sampled
    assert all(len(row) == 80 for row in tokens) and any(len(set(row)) < 80 for row in tokens)  # counts matter
    for prompt, row, row_logprobs in zip(prompts, tokens, logprobs):
        expected = reference_logprobs(hf, prompt, row, bias, repetition, presence, frequency, 0.9, 0.0)
        assert row_logprobs == pytest.approx(expected, abs=1e-4)


def test_logit_bias_and_min_p_steer_generation(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompt = tokenizer.encode("Hello")
    greedy = generate(model, [prompt], 6, temperature=0.0)[0]
    assert generate(model, [prompt], 6, temperature=1.0, seed=0)[0] != greedy
    assert generate(model, [prompt], 6, temperature=1.0, seed=0, min_p=1.0)[0] == greedy  # only the likeliest left
    assert generate(model, [prompt], 6, temperature=0.0, logit_bias={42: 100.0})[0] == [42] * 6
    banned = generate(model, [prompt], 6, temperature=0.0, logit_bias={t: -100.0 for t in set(greedy)})[0]
    assert not set(banned) & set(greedy)


def test_sample_cli_takes_the_options(tiny_model_dir):
    _, tokenizer = load(tiny_model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "sample.py", f"--model={tiny_model_dir}", "--prompt=Hello", "--temperature=0",
            "--max_new_tokens=4"]
    p = subprocess.run(base + ["--logit_bias=42:100", "--min_p=0.1", "--repetition_penalty=1.2",
                               "--presence_penalty=0.5", "--frequency_penalty=0.5"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip("\n") == tokenizer.decode([42] * 4)
    p = subprocess.run(base + ["--logit_bias=42"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--logit_bias='42'" in p.stderr


# -----------------------------------------------------------------------------
# SamplingParams: every field reaches the command line and the engine

# per field: (its --field text, the value that text gives, a value the object refuses). A new field needs a line
# here, and the two tests below then check that the command line and the engine both see it.
FIELDS = {
    "temperature": ("0.3", 0.3, -1.0),
    "top_k": ("2", 2, -1),
    "top_p": ("0.5", 0.5, 1.5),
    "min_p": ("0.3", 0.3, -0.1),
    "repetition_penalty": ("1.5", 1.5, 0.0),
    "presence_penalty": ("1", 1.0, float("inf")),
    "frequency_penalty": ("1", 1.0, float("nan")),
    "logit_bias": ("42:5,7:-100", {42: 5.0, 7: -100.0}, {-1: 5.0}),
}


def test_every_sampling_field_is_a_command_line_option(tiny_model_dir, monkeypatch):
    """sample.py --FIELD=VALUE for each SamplingParams field: the SamplingParams that main() hands generate()
    holds VALUE there and the command line's defaults elsewhere."""
    import dataclasses

    import sample

    assert set(FIELDS) == {f.name for f in dataclasses.fields(SamplingParams)}, "a field without a line in FIELDS"
    seen = []
    monkeypatch.setattr(sample, "generate", lambda model, prompts, n, params, *args, **kwargs: seen.append(params)
                        or [[] for _ in prompts])
    defaults = SamplingParams(temperature=0.8, top_p=0.95)
    for name, (text, value, _) in FIELDS.items():
        sample.main([f"--model={tiny_model_dir}", "--prompt=Hello", f"--{name}={text}", "--max_new_tokens=2",
                     "--compile=false", "--device=cpu", "--dtype=float32"])
        assert seen.pop() == dataclasses.replace(defaults, **{name: value}), name
    with pytest.raises(ValueError, match="top_p=1.5"):
        sample.main([f"--model={tiny_model_dir}", "--top_p=1.5"])


def test_every_sampling_field_reaches_the_engine(tiny_model_dir):
    """A non-default value of each field changes the sampled tokens or their log-probs against the defaults (same
    seed), and an out-of-range one is refused with an error that names the field."""
    model, tokenizer = load(tiny_model_dir)
    prompts = [tokenizer.encode("Numbers: 0 1 2 3"), tokenizer.encode("Hello, world! Hello")]
    base = generate(model, prompts, 12, SamplingParams(), seed=3, return_logprobs=True)
    for name, (_, value, bad) in FIELDS.items():
        changed = generate(model, prompts, 12, SamplingParams(**{name: value}), seed=3, return_logprobs=True)
        assert changed != base, f"{name}={value!r} changed nothing"
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: bad})
    with pytest.raises(ValueError, match="logit_bias names token 100000"):
        generate(model, prompts, 2, SamplingParams(logit_bias={100000: 1.0}))
