"""Tensor parallelism (parallel.py) on CPU with gloo, against the same model in one process: the logits and greedy
tokens of a model split over 2 processes, training with tp=2 and as 2 (dp) x 2 (tp), and checkpoints crossing tp."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEXT, randomize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# each process splits the model, then rank 0 writes the logits of IDS and the greedy tokens of PROMPTS
WORKER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from parallel import parallelize, start_inference
from model import Transformer
from sample import generate

_, mesh = start_inference(2, "cpu", "the test")
for path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    model = parallelize(Transformer.from_pretrained(path).eval(), mesh["tp"])
    with torch.no_grad():
        logits = model(torch.tensor({ids}))
    tokens = generate(model, {prompts}, 12, temperature=0.0)
    if dist.get_rank() == 0:
        torch.save({{"logits": logits, "tokens": tokens}}, out)
dist.destroy_process_group()
"""
IDS = [[5, 17, 3, 99, 42, 8, 61, 7, 23, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
PROMPTS = [[5, 17, 3], [42, 8, 61, 7, 23, 11, 4]]


def torchrun(*args, nproc=2):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def run(*args):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_a_model_split_over_two_processes_gives_the_one_process_logits_and_tokens(tmp_path):
    from model import ModelConfig, Transformer
    from sample import generate

    configs = {  # GQA with every attention option the plan splits, and MLA with query compression
        "gqa": ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=96, max_len=64,
                           attention_bias=True, use_qk_norm=True, use_gated_attention=True, tie_weight=False),
        "mla": ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, dim_ffn=96, max_len=64,
                           attn="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                           v_head_dim=12),
    }
    expected, args = {}, []
    for name, config in configs.items():
        torch.manual_seed(0)
        model = randomize(Transformer(config)).eval()
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = model(torch.tensor(IDS)), generate(model, PROMPTS, 12, temperature=0.0)
        args += [str(tmp_path / name), str(tmp_path / f"{name}.pt")]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT, ids=IDS, prompts=PROMPTS))
    torchrun(str(script), *args)
    for name, (logits, tokens) in expected.items():
        split = torch.load(tmp_path / f"{name}.pt")
        assert (split["logits"] - logits).abs().max().item() < 1e-5, name
        assert logits.std() > 1, "the logits must spread for greedy tokens to be decisive"
        assert split["tokens"] == tokens, name


def test_sample_py_with_tp_2_prints_the_one_process_text(tiny_model_dir, capsys):
    import sample

    args = [f"--model={tiny_model_dir}", "--prompt=The quick", "--max_new_tokens=16", "--temperature=0",
            "--compile=false", "--kv_memory=0.01", "--dtype=float32"]
    sample.main(args)
    one = capsys.readouterr().out
    two = torchrun("sample.py", *args, "--tp=2").stdout
    assert len(one.strip()) > 0 and two == one


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model_dir):
    """A seq .h5 of the shared test text with the tiny model's tokenizer, and a model preset small enough for
    seconds of training."""
    d = tmp_path_factory.mktemp("demo")
    (d / "text.txt").write_text(TEXT * 3, encoding="utf-8")
    run("data.py", "prepare", "--stage=seq", f"--input={d}/text.txt", f"--tokenizer={tiny_model_dir}",
        f"--out={d}/pretrain.h5", "--workers=1")
    with open(d / "model.py", "w") as f:
        f.write("vocab_size = 320\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\ndim_ffn = 128\nmax_len = 64\n")
    os.symlink(tiny_model_dir, d / "tokenizer")
    return d


def train_args(demo, out, *extra):
    return ["train.py", f"--data={demo}/pretrain.h5", f"--tokenizer={demo}/tokenizer",
            f"--model_config={demo}/model.py", f"--out_dir={out}", "--batch_size=4", "--block_size=32", "--lr=3e-3",
            "--warmup_iters=2", "--seed=7", "--eval_interval=0", "--eval_iters=2", "--log_interval=1",
            "--ckpt_interval=3", "--weight_decay=0.1", "--grad_clip=0.5", "--use_qk_norm=true",
            "--use_gated_attention=true", *extra]


def max_difference(a, b):
    a, b = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_training_with_tp_2_and_as_2_dp_by_2_tp_and_checkpoints_crossing_tp(demo, tmp_path):
    """tp=2 takes the one-process optimizer steps (clipping on); its checkpoint resumes at tp=1, and the one-process
    checkpoint resumes as 2 (dp) x 2 (tp) with FSDP2: both end where the one-process run ends."""
    one, split, back, grid = (tmp_path / n for n in ("one", "split", "back", "grid"))
    run(*train_args(demo, one, "--max_iters=6", "--grad_accum=2"))
    torchrun(*train_args(demo, split, "--max_iters=3", "--grad_accum=2", "--tp=2"))
    assert max_difference(one / "ckpt-3", split / "ckpt-3") < 1e-5
    assert max_difference(one / "ckpt-3", one / "final") > 1e-3  # steps 4 to 6 move the weights
    for source, out in ((split, back), (one, grid)):
        os.makedirs(out)
        shutil.copytree(source / "ckpt-3", out / "ckpt-3")
    run(*train_args(demo, back, "--max_iters=6", "--grad_accum=2", "--resume=auto"))
    log = torchrun(*train_args(demo, grid, "--max_iters=6", "--resume=auto", "--tp=2", "--parallel=fsdp"),
                   nproc=4).stdout
    assert "resumed from" in log and "4 process(es)" in log
    assert max_difference(one / "final", back / "final") < 1e-5
    assert max_difference(one / "final", grid / "final") < 1e-5


def test_tp_refuses_what_it_cannot_split(demo, tmp_path):
    from model import ModelConfig
    from parallel import tp_problems

    config = ModelConfig(dim=64, n_heads=6, n_kv_heads=3, dim_ffn=102, attn="gqa")
    assert tp_problems(config, 2, 4) == ["n_kv_heads=3 is not a multiple of tp=2"]
    assert tp_problems(config, 4, 4) == ["n_heads=6 is not a multiple of tp=4", "dim_ffn=102 is not a multiple of "
                                         "tp=4", "n_kv_heads=3 is not a multiple of tp=4"]
    assert tp_problems(config, 3, 6) == []
    mla = ModelConfig(dim=64, n_heads=4, n_kv_heads=4, dim_ffn=128, attn="mla")
    assert tp_problems(mla, 2, 2) == [] and "attn='mla'" in tp_problems(mla, 2, 2, training=True)[0]
    p = subprocess.run([sys.executable, *train_args(demo, tmp_path / "y", "--max_iters=1", "--tp=2")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "must be a multiple of tp" in p.stderr


def test_serve_py_with_tp_2_answers_as_one_process_generates(tiny_model_dir):
    """Two processes serve one split model: rank 0's HTTP requests, more than --max_batch at once (some wait for a
    row), give sample.generate's greedy text in one process; a stop string ends a reply on every rank; SIGTERM
    ends rank 0's requests and then both processes."""
    import http.client
    import json
    import re
    import signal
    import threading

    from sample import generate, load

    model, tokenizer = load(tiny_model_dir)
    prompts = ["The quick brown", "Numbers: 0 1", "你好，世界", "Hello, world"]
    expected = [tokenizer.decode(generate(model, [tokenizer.encode(p)], 12, temperature=0.0,
                                          stop_ids=tokenizer.stop_ids)[0]) for p in prompts]
    stop = expected[0][3:5]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "serve.py", f"--model={tiny_model_dir}", "--port=0", "--tp=2", "--max_batch=2",
                          "--dtype=float32", "--kv_memory=0.01"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        while port is None:
            line = p.stderr.readline()
            assert line, "the server ended before serving"
            port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        port = int(port.group(1))

        def complete(prompt, **extra):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                                **extra}), {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
            conn.close()
            return reply["choices"][0]

        answers = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, complete(prompts[i])["text"]))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == expected
        stopped = complete(prompts[0], stop=[stop])
        assert stopped["finish_reason"] == "stop" and stopped["text"] == expected[0][:expected[0].index(stop)]
        complete(prompts[1])  # its prefix is cached on every rank now; a scored prompt must not reuse it anywhere
        scored = complete(prompts[1], echo=True, logprobs=1)
        assert scored["text"] == prompts[1] + expected[1] and scored["logprobs"]["token_logprobs"][0] is None
        # a streaming client that leaves: rank 0 cancels its sequence, and every rank's next steps still agree
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": prompts[2], "max_tokens": 100, "stream": True,
                                                            "temperature": 0.8}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.fp.readline().startswith(b"data: ")
        response.close()  # the connection's socket goes with it
        conn.close()
        assert complete(prompts[1])["text"] == expected[1]  # every rank took the same steps after the stop
        assert complete(prompts[3])["text"] == expected[3]
    finally:
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1]
    assert "shutting down" in err and 'parallel.py", line' not in err and 'serve.py", line' not in err
