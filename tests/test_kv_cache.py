"""The paged KV cache under a memory budget (--kv_memory): many short requests share a budget far below
max_batch x max_len with the greedy tokens of an unbudgeted engine; requests that do not fit together wait or are
preempted and recomputed with the same tokens; memory is taken as tokens are written; what can never fit is refused
with the numbers. GQA and MLA (whose cache holds latents) alike."""
import http.client
import json
import re
import threading

import pytest
import torch
from conftest import randomize

from kv_cache import BLOCK, KVCache
from model import ModelConfig, Transformer
from sample import Engine, SamplingParams, Sequence, generate

SHAPES = {"gqa": dict(n_kv_heads=2),
          "mla": dict(attn="mla", n_kv_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=12)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()  # tiny models: one thread each on a shared machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(shape, max_len=128):
    config = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, dim_ffn=96, max_len=max_len, **SHAPES[shape])
    return randomize(Transformer(config)).eval()


def kv_memory(model, tokens):
    """The --kv_memory (GB) whose budget holds exactly `tokens` tokens (a multiple of BLOCK)."""
    return (tokens // BLOCK * KVCache.block_bytes(model.config, torch.float32) + 0.5) / 1e9


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def run(engine, seqs):
    """Steps the engine until the sequences are done -> the most of them running at once."""
    engine.add(seqs)
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, len(engine.running))
    return most


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_many_short_requests_share_a_small_budget(shape):
    model = tiny(shape)
    asked = prompts([3, 12, 5, 9, 7, 2, 11, 4, 6, 10, 8, 3, 5, 12, 9, 7])
    expected = generate(model, asked, 10, temperature=0.0)  # a budget for every row's whole context
    engine = Engine(model, max_batch=8, kv_memory=kv_memory(model, 12 * BLOCK))
    assert engine.kv_tokens == 12 * BLOCK < 8 * 128 // 4  # a budget far below max_batch x max_len
    seqs = [Sequence(p, 10, SamplingParams(temperature=0.0)) for p in asked]
    assert run(engine, seqs) >= 5  # they share it: several run at once (each needs 1-2 blocks)
    assert [s.tokens for s in seqs] == expected
    assert {s.finish for s in seqs} == {"length"}
    assert len(engine.cache.free) + sum(map(len, engine.cache.tables)) == engine.cache.n_blocks  # none lost


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_one_long_request_fits_two_do_not(shape):
    """A budget of one full context (128 tokens): two long requests both complete with the tokens an unbudgeted
    engine gives, the newer one preempted and recomputed (its streamed tokens never repeat), or waiting."""
    model = tiny(shape)
    a, b = prompts([60, 20])
    expected = generate(model, [a, b], 68, temperature=0.0)
    streamed = {0: [], 1: []}
    engine = Engine(model, max_batch=2, kv_memory=kv_memory(model, 128))
    assert engine.max_len == 128  # one request may use the model's whole context
    seqs = [Sequence(p, n, SamplingParams(temperature=0.0), on_token=lambda seq, t, entry, i=i: streamed[i].append(t))
            for i, (p, n) in enumerate([(a, 68), (b, 60)])]
    assert run(engine, seqs) == 2  # both ran together until the cache filled up
    assert engine.preemptions >= 1
    assert [s.tokens for s in seqs] == [expected[0], expected[1][:60]]
    assert [streamed[0], streamed[1]] == [s.tokens for s in seqs]  # recomputed tokens are not emitted again
    assert [s.finish for s in seqs] == ["length", "length"] and len(a) + len(seqs[0].tokens) == 128
    assert generate(model, [a, b], 68, temperature=0.0, kv_memory=kv_memory(model, 128)) == expected

    # a prompt that cannot start while another fills the cache waits for it: its first token comes after
    order = []
    long, short = prompts([100, 40], seed=2)
    seqs = [Sequence(p, 20, SamplingParams(temperature=0.0), on_token=lambda seq, t, entry, i=i: order.append(i))
            for i, p in enumerate([long, short])]
    run(engine, seqs)
    assert order == [0] * 20 + [1] * 20
    assert [s.tokens for s in seqs] == generate(model, [long, short], 20, temperature=0.0)


def vm_rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def test_memory_grows_as_tokens_are_written():
    """A 250 MB budget on a CPU: a few short requests take their blocks' memory, not the budget's."""
    model = tiny("gqa", max_len=1 << 15)
    before = vm_rss()
    engine = Engine(model, max_batch=16, kv_memory=0.25)
    assert engine.kv_bytes == 250_000_000 and engine.kv_tokens > 400_000
    seqs = [Sequence(p, 20, SamplingParams(temperature=0.0)) for p in prompts([5, 9, 3, 7])]
    run(engine, seqs)
    block_bytes = KVCache.block_bytes(model.config, torch.float32)
    assert engine.cache.bytes_touched() == 4 * 2 * block_bytes  # 4 rows of 25-29 tokens: two blocks each
    assert vm_rss() - before < 25e6  # the pool's pages were never written: the process holds ~nothing more


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_what_never_fits_is_refused_naming_both_numbers(shape):
    model = tiny(shape)
    engine = Engine(model, max_batch=4, kv_memory=kv_memory(model, 64))
    assert (engine.context, engine.kv_tokens, engine.max_len) == (128, 64, 64)
    with pytest.raises(ValueError, match="a prompt of 70 tokens does not fit: the context is 128 tokens and the "
                                         "KV cache budget holds 64"):
        engine.add([Sequence([1] * 70, 4)])
    assert not engine.has_work()
    with pytest.raises(ValueError, match="kv_memory='1e-09' .* less than one KV cache block"):
        Engine(model, max_batch=4, kv_memory="1e-09")
    with pytest.raises(ValueError, match="kv_memory='lots': expected GB"):
        Engine(model, max_batch=4, kv_memory="lots")
    # a row stops at what the budget holds, with finish "length"
    seq = Sequence([1] * 50, 40, SamplingParams(temperature=0.0))
    run(engine, [seq])
    assert (len(seq.tokens), seq.finish) == (14, "length")


def test_serve_answers_400_naming_the_context_and_the_budget(tiny_model_dir):
    from sample import load
    from serve import EngineLoop, make_server

    model, tokenizer = load(tiny_model_dir)
    engine = Engine(model, 2, vocab_size=tokenizer.vocab_size, kv_memory=kv_memory(model, 64))
    loop = EngineLoop(engine, tokenizer, 8).start()
    server = make_server(loop, port=0, model_name="tiny", log_requests=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def post(body):
            connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())

        status, data = post({"prompt": list(range(3, 73))})
        assert status == 400 and data["error"]["code"] == "context_length_exceeded"
        assert "70 tokens" in data["error"]["message"] and "context is 128 tokens" in data["error"]["message"]
        assert "KV cache budget (--kv_memory) holds 64" in data["error"]["message"]
        status, data = post({"prompt": list(range(3, 13)), "max_tokens": 55})
        assert status == 400 and "ask for at most 54 tokens" in data["error"]["message"]
        status, data = post({"prompt": list(range(3, 13)), "max_tokens": 54, "temperature": 0})  # the whole budget
        assert status == 200 and data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 54
    finally:
        server.shutdown()
        server.server_close()
        loop.stop()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_compiled_decode_compiles_once_under_a_budget(shape):
    """The compiled decode step over the block pool: one library for a batch of one and for any larger batch,
    whatever the lengths, the pool's size or preemptions; tokens equal the eager step's."""
    import compiled

    model = tiny(shape)
    before = set(compiled._libraries)
    generate(model, prompts([4]), 3, temperature=0.0, compile=True)  # batch 1
    generate(model, prompts([4, 6]), 3, temperature=0.0, compile=True)  # batch 2 and more
    assert len(set(compiled._libraries) - before) <= 1  # none where this structure was compiled by another test
    libraries = dict(compiled._libraries)
    for lengths, new, budget in [([5, 40, 2, 8], 40, None), ([60, 20], 68, 128), ([4, 4, 4], 10, 2 * BLOCK)]:
        memory = "50%" if budget is None else kv_memory(model, budget)
        asked = prompts(lengths)
        eager = generate(model, asked, new, temperature=0.0, kv_memory=memory)
        assert generate(model, asked, new, temperature=0.0, kv_memory=memory, compile=True) == eager
    assert compiled._libraries == libraries


def test_compiled_decode_follows_a_model_changed_in_place():
    """A library is keyed on the model's structure: the same model object with LoRA adapters added, one switched
    off, then its other weights laid out transposed (quant.relayout) decodes each time through a library of its own
    (never one compiled before the change), with the eager step's tokens."""
    import compiled
    from lora import add_adapters, adapter_layers
    from quant import relayout

    torch.manual_seed(0)
    model = tiny("gqa")
    asked = prompts([5, 9])
    results = []

    def both():
        eager = generate(model, asked, 12, temperature=0.0)
        assert generate(model, asked, 12, temperature=0.0, compile=True) == eager
        results.append(eager)

    both()
    add_adapters(model, ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"], rank=4, scaling=2.0)
    for layer in adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # adapters that change the output
    both()
    before = len(compiled._libraries)
    adapter_layers(model)[1].enabled = False
    both()
    assert len(compiled._libraries) == before + 1
    relayout(model, "transposed")  # the layers without an adapter
    both()
    assert results[0] != results[1] != results[2]  # the adapters moved the greedy tokens
