"""sample.py against transformers' generate and against the sampling formulas; streaming; the CLI."""
import gc
import io
import json
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import randomize

from model import ModelConfig, Transformer
from sample import SamplingParams, TextStream, generate, sample_tokens

transformers = pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97
NEVER = VOCAB + 5  # an eos/pad id no model here can produce: transformers then runs the full budget


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two busy OpenMP threads per
    process make every small op wait for the other (100x slower here under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_config(family, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
    common.update(kw)
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(num_key_value_heads=1, head_dim=24, **common)
    # HF DeepseekV3 wants num_key_value_heads == num_attention_heads; all layers dense
    mla = dict(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4,
               first_k_dense_replace=common["num_hidden_layers"], n_routed_experts=4)
    return transformers.DeepseekV3Config(**{**mla, **common})


FAMILIES = {
    "llama": ("llama", {}),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}),
    "deepseek_v3": ("deepseek_v3", {"q_lora_rank": None}),
    "deepseek_v3_q_lora": ("deepseek_v3", {"q_lora_rank": 32}),
}


def hf_and_ours(tmp_path, name, seed=0):
    family, kw = FAMILIES[name]
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(family, **kw), attn_implementation="sdpa").eval()
    randomize(hf, seed)
    hf.save_pretrained(tmp_path)
    return hf, Transformer.from_pretrained(tmp_path).eval()


def ragged_prompts(lengths=(5, 11, 2, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new_tokens, eos=NEVER):
    """transformers' greedy generate for one prompt alone (no padding involved): the new tokens."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt) :].tolist()


def count_rows_per_call(model):
    """Records the batch size of every forward call (prefill and each decode step)."""
    sizes = []
    model.embed_tokens.register_forward_hook(lambda module, inputs, output: sizes.append(inputs[0].shape[0]))
    return sizes


# -----------------------------------------------------------------------------
# generate() against transformers


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_matches_transformers_token_for_token(tmp_path, name, monkeypatch):
    hf, ours = hf_and_ours(tmp_path, name)
    prompts = ragged_prompts()
    got = generate(ours, prompts, 48, temperature=0.0)
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf, prompt, 48)
        assert len(expected) == 48
        assert got[i] == expected, f"row {i} (prompt of {len(prompt)} tokens)"
    assert len({tuple(t) for t in got}) == len(prompts)  # the rows are not all one degenerate sequence


def test_stop_token_ends_a_row_and_the_others_still_match(tmp_path):
    hf, ours = hf_and_ours(tmp_path, "llama")
    prompts = ragged_prompts()
    free = [hf_greedy(hf, p, 48) for p in prompts]
    # a stop id that row 0 produces early and some other row never produces
    stop = next(t for t in free[0][3:20] if any(t not in row for row in free[1:]))
    expected = [hf_greedy(hf, p, 48, eos=stop) for p in prompts]
    assert expected[0][-1] == stop and len(expected[0]) < 20
    assert any(len(e) == 48 and stop not in e for e in expected)  # a row that runs on after row 0 stopped
    rows_per_call = count_rows_per_call(ours)
    got = generate(ours, prompts, 48, temperature=0.0, stop_ids=[stop])
    assert got == expected
    # a finished row costs nothing: the decode steps fed exactly the tokens still needed
    assert rows_per_call[0] == len(prompts)  # one prefill
    assert sum(rows_per_call[1:]) == sum(len(e) - 1 for e in expected)
    assert rows_per_call[1:] == sorted(rows_per_call[1:], reverse=True) and rows_per_call[-1] < len(prompts)


def test_logprobs_equal_a_fresh_full_forward(tmp_path):
    hf, ours = hf_and_ours(tmp_path, "qwen3_tied")
    prompts = ragged_prompts((3, 9, 6))
    for temperature in (1.0, 0.0):  # sampled (no truncation) and greedy: both are the raw log-softmax
        tokens, logprobs = generate(ours, prompts, 20, temperature=temperature, seed=5, return_logprobs=True)
        for prompt, new, lp in zip(prompts, tokens, logprobs):
            assert len(new) == len(lp) == 20
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([prompt + new])).logits[0].float(), -1)
            expected = ref[len(prompt) - 1 : -1].gather(1, torch.tensor(new)[:, None])[:, 0]
            assert (torch.tensor(lp) - expected).abs().max().item() < 1e-4
    assert min(min(lp) for lp in logprobs) < -0.01  # sampled tokens are not all certain ones


def test_seeded_sampling_is_reproducible(tmp_path):
    _, ours = hf_and_ours(tmp_path, "deepseek_v3")
    prompts = ragged_prompts()
    a = generate(ours, prompts, 24, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = generate(ours, prompts, 24, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    c = generate(ours, prompts, 24, temperature=1.0, top_k=20, top_p=0.9, seed=8)
    assert a == b
    assert a != c
    assert a != generate(ours, prompts, 24, temperature=0.0)


def test_budget_context_and_bad_prompts(tmp_path):
    _, ours = hf_and_ours(tmp_path, "llama")  # max_len 128
    out = generate(ours, [[1] * 125, [2] * 3, [3] * 128], 10, temperature=0.0)
    assert [len(t) for t in out] == [3, 10, 0]  # prompt + completion never exceeds the context
    assert generate(ours, [[1, 2]], 0) == [[]]
    with pytest.raises(ValueError, match="prompt 1 has 129 tokens.*max_len\\) is 128"):
        generate(ours, [[1], [1] * 129], 4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(ours, [[]], 4)
    with pytest.raises(ValueError, match="outside 0..96"):
        generate(ours, [[5, 97]], 4)


# -----------------------------------------------------------------------------
# sample_tokens against the formulas


def test_sample_tokens_logprobs_are_those_of_the_transformed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    # temperature 0.5, top-k 3: softmax of logits / 0.5 over tokens 0, 1, 2
    tokens, lp = sample_tokens(logits.expand(300, -1), SamplingParams(temperature=0.5, top_k=3), [g] * 300)
    kept = [4.0, 2.0, 1.0]
    seen = set(tokens.tolist())
    for t, l in zip(tokens.tolist(), lp.tolist()):
        assert abs(l - (kept[t] - math.log(sum(math.exp(v) for v in kept)))) < 1e-6
    assert seen == {0, 1, 2}
    # top-p 0.7 on probabilities (0.5, 0.3, 0.15, 0.05): {0.5} < 0.7 <= {0.5, 0.3}, renormalised
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    for _ in range(30):
        token, lp = sample_tokens(probs.log(), [SamplingParams(top_p=0.7)], [g])
        assert token.item() in (0, 1)
        assert abs(lp.item() - math.log([0.625, 0.375][token.item()])) < 1e-6
    # temperature 2 with no cut: softmax(logits / 2)
    token, lp = sample_tokens(logits, [SamplingParams(temperature=2.0)], [g])
    assert abs(lp.item() - torch.log_softmax(logits[0] / 2, -1)[token.item()].item()) < 1e-6


def test_sample_tokens_draws_follow_the_distribution():
    n = 20000
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(1)
    tokens, _ = sample_tokens(probs.log().expand(n, -1), SamplingParams(), [g] * n)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert (freq - probs).abs().max().item() < 0.015
    tokens, _ = sample_tokens(probs.log().expand(n, -1), SamplingParams(top_p=0.7), [g] * n)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert (freq - torch.tensor([0.625, 0.375, 0, 0])).abs().max().item() < 0.015


def test_sample_tokens_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(2)) * 3
    greedy, greedy_lp = sample_tokens(logits, SamplingParams(temperature=0.0))
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(greedy_lp, torch.log_softmax(logits, -1).max(-1).values)
    for top_k, top_p in ((1, 1.0), (0, 1e-6), (0, 0.0)):
        tokens, lp = sample_tokens(logits, SamplingParams(temperature=1.3, top_k=top_k, top_p=top_p))
        assert torch.equal(tokens, greedy)
        assert torch.equal(lp, torch.zeros(16))  # the one kept token has probability 1


def test_sample_tokens_settings_apply_per_row():
    logits = torch.tensor([[3.0, 2.9, 2.8, -5.0]] * 4)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    seen = [set() for _ in range(4)]
    for _ in range(60):
        rows = [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(top_k=2),
                SamplingParams(top_p=0.5)]
        tokens, lp = sample_tokens(logits, rows, gens)
        for i, t in enumerate(tokens.tolist()):
            seen[i].add(t)
        assert abs(lp[0].item() - torch.log_softmax(logits[0], -1)[0].item()) < 1e-6  # greedy row: raw log-softmax
        assert lp[1].item() == 0.0
    assert seen[0] == {0} and seen[1] == {0} and seen[2] == {0, 1} and seen[3] == {0, 1}
    with pytest.raises(ValueError, match="temperature=-1.0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="params has 2 values for 4 rows"):
        sample_tokens(logits, [SamplingParams(), SamplingParams()])


def test_sample_tokens_per_row_generators_reproduce_each_row():
    logits = torch.zeros(3, 1000)
    a, _ = sample_tokens(logits, SamplingParams(), [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    b, _ = sample_tokens(logits, SamplingParams(), [torch.Generator().manual_seed(s) for s in (1, 9, 3)])
    assert a[0] == b[0] and a[2] == b[2] and a[1] != b[1]


# -----------------------------------------------------------------------------
# streaming text, loading a model directory, the command line


def test_text_stream_never_splits_a_character(tiny_model_dir):
    from sample import load

    model, tokenizer = load(tiny_model_dir)
    text = "敏捷的棕色狐狸跳过了懒狗。你好，世界！🙂"
    ids = tokenizer.encode(text)
    # the test means something only if some token ends inside a multi-byte character
    assert any(not _is_utf8(tokenizer.decode_bytes(ids[: n + 1])) for n in range(len(ids)))
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    # a completion of a Chinese prompt streams to the same text as decoding it at once
    new = generate(model, [ids], 40, temperature=1.0, seed=0)[0]
    stream = TextStream(tokenizer)
    assert "".join(stream.push(i) for i in new) + stream.flush() == tokenizer.decode(new)


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=120, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_prompt_prints_the_greedy_completion(tiny_model_dir):
    from sample import load

    # compiled in float32 against the eager generate()
    result = run_cli(f"--model={tiny_model_dir}", "--prompt", "hi", "--max_new_tokens", "5", "--temperature=0",
                     "--dtype=float32", "--compile=true")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load(tiny_model_dir)
    stops = tokenizer.stop_ids
    new = generate(model, [tokenizer.encode("hi")], 5, temperature=0.0, stop_ids=stops)[0]
    expected = tokenizer.decode([t for t in new if t not in stops])
    assert result.stdout == expected + "\n"


def test_compile_auto_where_it_pays_and_eager_without_a_compiler(monkeypatch, capsys):
    """--compile=auto compiles from the measured break-even on (a server always gets there); true and false are
    obeyed; without a working C++ compiler (torch's own search finds none) it decodes eager and says so once."""
    import torch._inductor.config

    from compiled import COMPILE_BREAK_EVEN_STEPS, compile_setting, cpp_compiler

    cpp_compiler.cache_clear()
    assert cpp_compiler() is not None  # the test machine has one: g++
    assert compile_setting("auto", 256) is False and compile_setting("auto", COMPILE_BREAK_EVEN_STEPS) is True
    assert compile_setting("true", 1) is True and compile_setting("false", 10**9) is False
    assert compile_setting("auto", float("inf"), "serve.py") is True
    with pytest.raises(ValueError, match="--compile='maybe'"):
        compile_setting("maybe", 1)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-c++",))
    cpp_compiler.cache_clear()
    try:
        assert compile_setting("true", 1) is False
        assert capsys.readouterr().err == ("sample.py: no working C++ compiler for the compiled decode step (tried "
                                           "('no-such-c++',)): decoding eager\n")
        assert compile_setting("auto", 256) is False and capsys.readouterr().err == ""  # eager anyway: nothing said
    finally:
        cpp_compiler.cache_clear()


def test_cli_samples_chat_prompt_file_and_errors(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The rest of the command line, in-process (main() is what `python sample.py` runs) to save startups."""
    from sample import main

    main([f"--model={tiny_model_dir}", "--prompt", "hi", "--max_new_tokens", "5", "--num_samples", "3",
          "--top_k", "5", "--seed", "3", "--compile=false"])
    assert capsys.readouterr().out.count("---------------") == 3
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("你好，世界！", encoding="utf-8")
    main([f"--model={tiny_model_dir}", f"--prompt=FILE:{prompt_file}", "--chat", "--max_new_tokens=4",
          "--compile=false"])
    assert capsys.readouterr().out.endswith("\n")
    main([f"--model={tiny_model_dir}", "--prompt=hi", "--dtype=bfloat16", "--device=cpu", "--max_new_tokens=4",
          "--compile=false"])
    assert capsys.readouterr().out.endswith("\n")
    # interactive chat reads turns from stdin until EOF
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\n7 + 8?\n"))
    main([f"--model={tiny_model_dir}", "--chat", "--max_new_tokens=4", "--compile=false"])
    assert capsys.readouterr().out.count("> ") == 4  # three turns read, then EOF
    for argv, named in ((["--bogus=1"], "--bogus"), (["--max_new_tokens=many"], "max_new_tokens"), ([], "--model")):
        with pytest.raises(SystemExit, match=named):
            main(([f"--model={tiny_model_dir}"] if named != "--model" else []) + argv)


def test_eval_accuracy(tiny_model_dir, tmp_path):
    from sample import load
    from tasks import task_accuracy

    model, tokenizer = load(tiny_model_dir)
    stops = tokenizer.stop_ids
    records = [{"messages": [{"role": "user", "content": "What is 7 + 8?"}]}, {"prompt": "23 + 45 ="},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]},
               {"prompt": "Numbers: 0 1 2"}]
    # answers: the model's own greedy completion (alone, unbatched) for two records, something it never says for two
    for n, record in enumerate(records):
        ids = tokenizer.render_chat(record["messages"], add_generation_prompt=True)[0] if "messages" in record \
            else tokenizer.encode(record["prompt"])
        new = generate(model, [ids], 12, temperature=0.0, stop_ids=stops)[0]
        completion = tokenizer.decode([t for t in new if t not in stops])
        record["answer"] = completion.strip() if n in (0, 3) else "no such answer 12345"
        assert n not in (0, 3) or any(c.isalnum() for c in record["answer"])
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert task_accuracy(model, tokenizer, str(task), batch_size=3, max_new_tokens=12) == 0.5
    result = run_cli(f"--model={tiny_model_dir}", f"--eval={task}", "--max_new_tokens=12", "--batch_size=2")
    assert result.returncode == 0, result.stderr
    assert "accuracy 0.5000" in result.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "answer": "1"}\n{"prompt": "no answer"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        task_accuracy(model, tokenizer, str(bad))


def test_padded_vocab_ids_are_never_sampled(tiny_model_dir, tmp_path):
    """A model whose embedding has rows past the tokenizer (as many HF models do) and that prefers them:
    generate(vocab_size=...) never emits them, and --eval decodes what it does emit."""
    from sample import load
    from tasks import task_accuracy

    model, tokenizer = load(tiny_model_dir)
    V = tokenizer.vocab_size
    padded = Transformer(ModelConfig(**{**model.config.__dict__, "vocab_size": V + 2})).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, p in padded.state_dict().items():
            p[: state[name].shape[0]] = state[name]
        # the final norm keeps one coordinate; padded ids V and V+1 get huge logits of either sign on it
        padded.norm.weight.zero_()
        padded.norm.weight[0] = 1.0
        padded.lm_head.weight[V:] = 0.0
        padded.lm_head.weight[V, 0], padded.lm_head.weight[V + 1, 0] = 100.0, -100.0
    prompts = [tokenizer.encode("7 + 8 ="), tokenizer.encode("你好")]
    assert all(t >= V for row in generate(padded, prompts, 6, temperature=0.0) for t in row)  # the trap works
    for temperature in (0.0, 1.0):
        rows = generate(padded, prompts, 6, temperature=temperature, seed=0, vocab_size=V)
        assert all(len(row) == 6 and all(t < V for t in row) for row in rows)
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "7 + 8 =", "answer": "15"}) + "\n")
    assert task_accuracy(padded, tokenizer, str(task), max_new_tokens=6) == 0.0


def test_hugging_face_directory_works_like_ours(tiny_model_dir, tmp_path):
    """A Qwen3 directory written by transformers with tokenizer.json, whose generation_config.json names an
    eos token the tokenizer does not know as one: the CLI prints what transformers generates, stop included."""
    import shutil

    from tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_model_dir)
    hf = transformers.AutoModelForCausalLM.from_config(
        hf_config("qwen3", vocab_size=tokenizer.vocab_size, tie_word_embeddings=True)).eval()
    randomize(hf, seed=4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_model_dir, name), tmp_path / name)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = "The quick brown fox"
    prompt_ids = hf_tokenizer.encode(prompt)
    free = hf_greedy(hf, prompt_ids, 24, eos=tokenizer.eot_id)
    eos = next(t for n, t in enumerate(free) if n >= 4 and t not in free[:n])  # first seen after a few tokens
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = tokenizer.eot_id
    hf.save_pretrained(tmp_path)
    assert Tokenizer.load(str(tmp_path)).stop_ids == tokenizer.stop_ids + [eos]
    with torch.no_grad():  # transformers reads the eos from generation_config.json
        out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=24)[0, len(prompt_ids) :].tolist()
    assert out[-1] == eos and len(out) < 24
    expected = hf_tokenizer.decode(out[:-1])
    result = run_cli(f"--model={tmp_path}", f"--prompt={prompt}", "--max_new_tokens=24", "--temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_tokenizer_stop_ids_read_hf_configs(tiny_model_dir, tmp_path):
    """Tokenizer.load adds the eos_token_id(s) of config.json and generation_config.json; a malformed one is an
    error that names the file."""
    import shutil

    from tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_model_dir)
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, tokenizer.im_end_id]}))
    assert Tokenizer.load(str(tmp_path)).stop_ids == tokenizer.stop_ids + [5, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "7"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id='7'"):
        Tokenizer.load(str(tmp_path))


# -----------------------------------------------------------------------------
# the compiled decode step, prefix reuse, bfloat16 and int8


@pytest.mark.parametrize("name", ["llama", "deepseek_v3_q_lora"])
def test_compiled_decode_equals_eager(tmp_path, name):
    """The compiled decode step against the eager one: the same greedy tokens and log-probs within 1e-4, over
    ragged prompts (a gathered, masked batch), rows that stop early (the batch shrinks) and a full batch."""
    _, ours = hf_and_ours(tmp_path, name)
    prompts = ragged_prompts()
    free = generate(ours, prompts, 24, temperature=0.0)
    stop = next(t for t in free[0][3:12] if any(t not in row for row in free[1:]))
    for stops in ((), (stop,)):
        eager = generate(ours, prompts, 24, temperature=0.0, stop_ids=stops, return_logprobs=True)
        compiled = generate(ours, prompts, 24, temperature=0.0, stop_ids=stops, return_logprobs=True, compile=True)
        assert compiled[0] == eager[0]
        for a, b in zip(compiled[1], eager[1]):
            assert (torch.tensor(a) - torch.tensor(b)).abs().max().item() < 1e-4
    assert min(len(t) for t in eager[0]) < 24  # some row stopped early
    model = weakref.ref(ours)  # the compiled step does not keep a model alive (a process that loads models in turn)
    del ours
    gc.collect()
    assert model() is None


def test_prefix_reuse_prefills_only_the_rest(tmp_path):
    """A finished row keeps its keys and values: a prompt that starts with that row's tokens (a chat's next
    turn) prefills only the rest, and its greedy continuation is the one a fresh engine gives."""
    from sample import Engine, Sequence

    _, ours = hf_and_ours(tmp_path, "qwen3_tied")
    first, extra = ragged_prompts((9, 5))
    engine = Engine(ours, max_batch=2, max_len=96, prefill_chunk=4)
    a = Sequence(first, 12, SamplingParams(temperature=0.0))
    engine.add([a])
    while engine.has_work():
        engine.step()
    second = first + a.tokens + extra
    fed_tokens = []
    ours.embed_tokens.register_forward_hook(lambda m, inputs, out: fed_tokens.append(inputs[0].shape[1]))
    b = Sequence(second, 10, SamplingParams(temperature=0.0))
    engine.add([b])
    while engine.has_work():
        engine.step()
    assert b.slot == a.slot and b.reused == len(first) + len(a.tokens) - 1  # a's last token never went in
    assert sum(fed_tokens[:2]) == len(second) - b.reused  # the prefill chunks: the rest of the prompt only
    assert b.tokens == generate(ours, [second], 10, temperature=0.0)[0]
    c = Sequence(extra + first, 4, SamplingParams(temperature=0.0))  # shares nothing with either row's start
    engine.add([c])
    while engine.has_work():
        engine.step()
    assert c.reused == 0 and c.tokens == generate(ours, [extra + first], 4, temperature=0.0)[0]


def greedy_with_gaps(model, prompt, n):
    """float32 greedy tokens, and at each step the gap between the two most likely tokens' logits."""
    tokens, gaps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + tokens]))[0, -1].float()
            top = logits.topk(2).values
            gaps.append((top[0] - top[1]).item())
            tokens.append(int(logits.argmax()))
    return tokens, gaps


@pytest.mark.parametrize("dtype,resolution,most_agree", [("bfloat16", 0.1, 2), ("int8", 0.2, 2), ("int4", 1.0, 0)])
def test_quantized_follow_float32_greedy(tiny_model_dir, dtype, resolution, most_agree):
    """On the tiny preset's shape, bfloat16, int8 and int4 weights, eager and through the compiled step, give
    float32's greedy tokens, or first differ where float32's two best logits are closer than the lower precision
    resolves (bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding, a few hundredths on logits of this size over a
    few layers; int8 per-channel weights twice that; int4 in groups of 32 errs ten times int8 per weight
    (tests/test_quant.py), several tenths on these logits, where few rows of 24 tokens meet no near-tie)."""
    from sample import load

    model32, tokenizer = load(tiny_model_dir)
    low, _ = load(tiny_model_dir, dtype=dtype)
    assert low.embed_tokens.weight.dtype == torch.bfloat16
    if dtype in ("int8", "int4"):
        assert low.layers[0].mlp.up_proj.weight.dtype == (torch.int8 if dtype == "int8" else torch.uint8)
    prompts = [tokenizer.encode(t) for t in ("The quick brown fox", "你好，世界！", "23 + 45 =", "Numbers: 0 1")]
    for compile in (False, True):  # eager, and the compiled step (compiled.py) on the same weights
        agree = 0
        for prompt in prompts:
            expected, gaps = greedy_with_gaps(model32, prompt, 24)
            got = generate(low, [prompt], 24, temperature=0.0, compile=compile)[0]
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
            if first is None:
                agree += 1
            else:
                assert gaps[first] < resolution, f"{dtype} left float32's greedy path at a gap of {gaps[first]:.3f}"
        assert agree >= most_agree  # bfloat16 and int8: most prompts follow float32 all the way


@pytest.mark.parametrize("dtype,layout,resolution", [("float32", "transposed", 1e-3), ("float32", "packed", 1e-3),
                                                     ("bfloat16", "packed", 0.1)])
def test_weight_layouts_follow_float32_greedy(tiny_model_dir, dtype, layout, resolution, monkeypatch):
    """quant.py's transposed and packed (oneDNN's blocked layout) weights: the logits are torch's float32 nn.Linear
    model's within what the dtype resolves (float32: only the order of a dot product's sums differs), the greedy
    tokens float32's or first differing where its two best logits are closer than that; the compiled decode step
    (packed: the custom op inside the graph) as the eager one; the parameter count unchanged. The fixture's weights
    are below PACK_MIN_WEIGHTS, which is lowered here so that they are packed."""
    import quant
    from sample import load

    monkeypatch.setattr(quant, "PACK_MIN_WEIGHTS", 0)

    model32, tokenizer = load(tiny_model_dir)
    laid, _ = load(tiny_model_dir, dtype=dtype, layout=layout)
    up = laid.layers[0].mlp.up_proj
    assert type(up).__name__ == "LaidOutLinear" and up.layout == layout and up.stored.is_mkldnn == (layout == "packed")
    assert laid.num_params() == model32.num_params()
    x = torch.tensor([tokenizer.encode("The quick brown fox jumps")])
    with torch.no_grad():
        assert (laid(x).float() - model32(x)).abs().max() < (resolution / 10 if dtype == "float32" else resolution)
    for prompt in [tokenizer.encode(t) for t in ("The quick brown fox", "你好，世界！", "23 + 45 =")]:
        expected, gaps = greedy_with_gaps(model32, prompt, 16)
        for compile in (False, True) if layout == "packed" and dtype == "float32" else (False,):
            got = generate(laid, [prompt], 16, temperature=0.0, compile=compile)[0]
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
            assert first is None or gaps[first] < resolution, f"{layout} {dtype} left float32's path at {first}"


def test_weight_layout_choice_and_refusals():
    """pick_layout: auto lays float32 out transposed for one-row calls and packed from 4 rows, bfloat16 packed where
    the CPU computes it natively, nothing on a GPU, for int8/int4 or a split model; an explicit layout a path
    cannot take, or an unknown one, is an error naming it. A weight under PACK_MIN_WEIGHTS is transposed when packed
    is asked for."""
    from quant import PACK_MIN_WEIGHTS, LaidOutLinear, pick_layout

    small, large = torch.nn.Linear(128, 384, bias=False), torch.nn.Linear(512, PACK_MIN_WEIGHTS // 512, bias=False)
    assert LaidOutLinear(small, "packed").layout == "transposed" and not LaidOutLinear(small, "packed").stored.is_mkldnn
    assert LaidOutLinear(large, "packed").layout == "packed" and LaidOutLinear(large, "packed").stored.is_mkldnn

    assert pick_layout("auto", "cpu", "float32", 1) == "transposed"
    assert pick_layout("auto", "cpu", "float32", 8) == "packed"
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert pick_layout("auto", "cpu", "bfloat16", 1) == ("packed" if native else "plain")
    assert pick_layout("auto", "cuda", "float32", 8) == pick_layout("auto", "cpu", "int8", 8) == "plain"
    assert pick_layout("auto", "cpu", "float32", 8, tp=2) == "plain"
    assert pick_layout("packed", "cpu", "bfloat16", 1) == "packed"
    for setting, device, dtype, tp, named in [("packed", "cpu", "int8", 1, "--dtype=int8"),
                                              ("transposed", "cuda", "float32", 1, "on cuda"),
                                              ("packed", "cpu", "float32", 2, "--tp=2"), ("fast", "cpu", "float32", 1,
                                                                                        "'fast'")]:
        with pytest.raises(ValueError, match=named):
            pick_layout(setting, device, dtype, 1, tp)


# -----------------------------------------------------------------------------
# one source of stop ids; sample.py copied alone


def test_generation_config_stop_ids_reach_sample_serve_and_grpo(tiny_model_dir, tmp_path, monkeypatch):
    """A model directory whose generation_config.json lists an extra eos id: sample.py's generate() calls, the
    server's engine and GRPO's rollouts (its tokenizer found by train.py from --init_from) all stop at it."""
    import shutil

    import sample
    import serve
    import strategies
    from settings import Settings
    from train import DEFAULTS as TRAIN_DEFAULTS, find_tokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    plain = sample.load(tiny_model_dir)[1].stop_ids
    extra = next(i for i in range(5, 300) if i not in plain)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [plain[0], extra]}))
    assert sample.load(str(model_dir))[1].stop_ids == plain + [extra]

    stops = []  # the stop_ids of each generate() call
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: stops.append(list(
        kwargs["stop_ids"] if "stop_ids" in kwargs else args[4])) or real_generate(*args, **kwargs))
    sample.main([f"--model={model_dir}", "--prompt=Hello", "--max_new_tokens=2", "--compile=false"])
    sample.main([f"--model={model_dir}", "--prompt=Hello", "--max_new_tokens=2", "--num_samples=2"])

    class Built(Exception):
        pass

    def engine(model, max_batch, max_len, prefill_chunk, stop_ids, *args):
        raise Built(list(stop_ids))

    monkeypatch.setattr(serve, "Engine", engine)
    with pytest.raises(Built) as built:
        serve.main([f"--model={model_dir}", "--compile=false"])
    stops.append(built.value.args[0])

    cfg = Settings({**TRAIN_DEFAULTS, **strategies.GRPO.settings}, strategy="grpo", init_from=str(model_dir),
                   group_size=2, max_new_tokens=3)
    tokenizer = find_tokenizer(cfg)
    policy = sample.load(str(model_dir))[0].train()
    grpo = strategies.GRPO(cfg, policy, tokenizer)
    prompt = tokenizer.render_chat([{"role": "user", "content": "Hello"}], add_generation_prompt=True)[0]
    grpo.rollout({"prompt_ids": [prompt], "answers": ["1"], "records": [{"answer": "1"}]}, 0, 0)
    assert len(stops) == 4 and all(extra in s for s in stops), stops


COPYABLE = ("model.py", "kv_cache.py", "rope.py", "hf.py", "sample.py")


def test_sample_py_works_copied_beside_model_py_alone(tmp_path):
    """`import sample` and generate() in a directory holding only model.py and what it imports: no tokenizer.py,
    settings.py or lora.py. The greedy tokens are the ones generate() gives here."""
    import shutil

    for name in COPYABLE:
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    script = (
        "import importlib.util, json, torch\n"
        "import sample\n"
        "from model import ModelConfig, Transformer\n"
        "assert not any(importlib.util.find_spec(m) for m in ('tokenizer', 'settings', 'lora'))\n"
        "torch.manual_seed(0)\n"
        "model = Transformer(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, dim_ffn=64,\n"
        "                                max_len=64)).eval()\n"
        "print(json.dumps(sample.generate(model, [[1, 2, 3], [4, 5]], 8, sample.SamplingParams(temperature=0.0),\n"
        "                                 stop_ids=[96])))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, dim_ffn=64,
                                    max_len=64)).eval()
    expected = generate(model, [[1, 2, 3], [4, 5]], 8, SamplingParams(temperature=0.0), stop_ids=[96])
    assert json.loads(result.stdout) == expected
