"""serve.py as lm-evaluation-harness uses servers (echo, prompt logprobs, token-id prompts, vLLM's tokenizer
endpoints), checked against transformers and against lm-eval's own `--model hf` on the same model directory."""
import json
import math
import os

import pytest
import torch

from test_serve import KEY, request, sse_events, start_server, stop_server

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["The quick brown fox jumps", "你好，世界！Hello", "23 + 45 = 68. What is 7 + 8? 15.", "Emoji: 🙂🚀 Mixed"]


@pytest.fixture(scope="module")
def s(tiny_model_dir):
    served = start_server(tiny_model_dir, max_batch=4, prefill_chunk=4)  # chunks of 4: a prompt is scored in pieces
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def completion(s, **body):
    status, _, data = request(s.port, "POST", "/v1/completions", body)
    assert status == 200, data
    return data


def test_echo_scores_the_prompt_as_transformers_does(s, hf):
    model, tokenizer = hf
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    data = completion(s, prompt=ids, echo=True, logprobs=3, max_tokens=1, temperature=0)
    for p, choice in zip(ids, sorted(data["choices"], key=lambda c: c["index"])):
        with torch.no_grad():
            reference = model(torch.tensor([p])).logits[0].float().log_softmax(-1)
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(p) + 1
        for i in range(1, len(p)):  # token i, predicted at position i - 1
            assert abs(lp["token_logprobs"][i] - reference[i - 1, p[i]].item()) < 1e-4
            top = reference[i - 1].topk(3)
            listed = list(zip(top.indices.tolist(), top.values.tolist()))  # the echoed token too, beside the top 3
            listed += [(p[i], reference[i - 1, p[i]].item())] * (p[i] not in top.indices.tolist())
            expected = {tokenizer.decode([t]): v for t, v in listed}  # keyed by text, as OpenAI's format is
            assert expected.keys() == lp["top_logprobs"][i].keys()
            assert all(abs(lp["top_logprobs"][i][text] - value) < 1e-4 for text, value in expected.items())
        assert choice["text"].startswith(tokenizer.decode(p)) and lp["text_offset"][0] == 0
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:k])) for k in range(len(lp["tokens"]))]
    # the generated token's logprob follows the prompt's, as in a plain request; max_tokens=0 scores only
    only = completion(s, prompt=PROMPTS[0], echo=True, max_tokens=0, logprobs=0)["choices"][0]
    assert only["text"] == PROMPTS[0] and only["finish_reason"] == "length"
    assert len(only["logprobs"]["tokens"]) == len(ids[0])
    plain = completion(s, prompt=PROMPTS[0], echo=True, max_tokens=0)
    assert plain["choices"][0]["text"] == PROMPTS[0] and plain["choices"][0]["logprobs"] is None
    assert plain["usage"]["completion_tokens"] == 0


def test_echo_streams_the_prompt_first_and_refuses_what_it_cannot_do(s):
    events = [json.loads(e) for e in sse_events(s.port, {"prompt": PROMPTS[1], "echo": True, "max_tokens": 3,
                                                         "temperature": 0, "logprobs": 1})[:-1]]
    streamed = "".join(c["text"] for e in events for c in e["choices"])
    whole = completion(s, prompt=PROMPTS[1], echo=True, max_tokens=3, temperature=0, logprobs=1)["choices"][0]
    assert events[0]["choices"][0]["text"].startswith(PROMPTS[1]) and streamed == whole["text"]
    tokens = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert tokens == whole["logprobs"]["tokens"]
    for body, param in [({"n": 2}, "n"), ({"max_tokens": 0, "echo": False}, "max_tokens"),
                        ({"best_of": 2}, "best_of"), ({"logprobs": 21}, "logprobs"), ({"echo": "yes"}, "echo")]:
        status, _, data = request(s.port, "POST", "/v1/completions", {"prompt": "Hi", "echo": True, **body})
        assert status == 400 and data["error"]["param"] == param, (body, data)
    status, _, data = request(s.port, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "Hi"}], "echo": True})
    assert status == 400 and data["error"]["param"] == "echo"


def test_tokenizer_endpoints_match_the_tokenizers_library(s, hf):
    _, tokenizer = hf
    for text in PROMPTS + ["<|im_start|>user\nHi<|im_end|>\n"]:  # special-token strings are special tokens there
        status, _, data = request(s.port, "POST", "/tokenize", {"prompt": text, "add_special_tokens": False,
                                                                "return_token_strs": True})
        assert status == 200 and data["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
        assert data["count"] == len(data["tokens"]) and data["max_model_len"] == s.engine.max_len
        assert data["tokens"] == request(s.port, "POST", "/tokenize", {"prompt": text})[2]["tokens"]  # adds none
        status, _, back = request(s.port, "POST", "/detokenize", {"tokens": data["tokens"]})
        assert status == 200 and back["prompt"] == tokenizer.decode(data["tokens"])
    messages = [{"role": "user", "content": "What is 7 + 8?"}]
    data = request(s.port, "POST", "/tokenize", {"messages": messages})[2]
    assert data["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)
    info = request(s.port, "GET", "/tokenizer_info")[2]
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    for path, body, param in [("/tokenize", {"prompt": 3}, "prompt"), ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
                              ("/tokenize", {"prompt": "x", "tools": [{}]}, "tools")]:
        status, _, data = request(s.port, "POST", path, body)
        assert status == 400 and data["error"]["param"] == param
    assert request(s.port, "GET", "/tokenizer_info", key="")[0] == 401


def write_tasks(folder):
    """A multiple-choice task and a generate_until task, as lm-eval loads local ones (dataset_path: json)."""
    docs = [{"q": "What is 7 + 8?", "choices": [" 15", " 16", " 51"], "label": 0},
            {"q": "The quick brown", "choices": [" fox", " dog jumps", " cat"], "label": 1},
            {"q": "你好，", "choices": ["世界！", "狐狸", "懒狗"], "label": 2},
            {"q": "Numbers: 0 1 2", "choices": [" 3", " 4 5", " 9"], "label": 0},
            {"q": "Emoji:", "choices": [" 🙂", " 🚀", " A"], "label": 1}]
    for name, kind, extra in [("mc", "multiple_choice", 'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
                               "metric_list:\n  - metric: acc\n"),
                              ("gen", "generate_until", 'doc_to_target: "{{choices[label]}}"\ngeneration_kwargs:\n'
                               '  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n'
                               "  - metric: exact_match\n")]:
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        (folder / f"tiny_{name}.yaml").write_text(
            f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{name}.jsonl\n"
            f'test_split: test\noutput_type: {kind}\ndoc_to_text: "{{{{q}}}}"\n' + extra, encoding="utf-8")


def run_lm_eval(model, model_args, tasks, folder, chat=False):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder)), apply_chat_template=chat,
                                  device="cpu")
    return out["results"], {task: [x["resps"] for x in samples] for task, samples in out["samples"].items()}


def test_lm_eval_against_the_server_matches_lm_eval_on_the_model_dir(s, tiny_model_dir, tmp_path):
    write_tasks(tmp_path)
    base = f"base_url=http://127.0.0.1:{s.port}/v1"
    os.environ["OPENAI_API_KEY"] = KEY  # lm-eval's local-* models send it as the bearer token
    hf_results, hf_samples = run_lm_eval("hf", f"pretrained={tiny_model_dir},dtype=float32",
                                         ["tiny_mc", "tiny_gen"], tmp_path)
    for args in [f"model=tiny,{base}/completions,auth_token={KEY}",  # found: vLLM's /tokenize, /tokenizer_info
                 f"model=tiny,{base}/completions,tokenizer_backend=huggingface,tokenizer={tiny_model_dir},"
                 "batch_size=4"]:  # 4 prompts a request
        results, samples = run_lm_eval("local-completions", args, ["tiny_mc", "tiny_gen"], tmp_path)
        for ours, theirs in zip(samples["tiny_mc"], hf_samples["tiny_mc"]):
            for (mine,), (reference,) in zip(ours, theirs):
                assert abs(float(mine[0]) - float(reference[0])) < 1e-3 and mine[1] == reference[1]
        assert samples["tiny_gen"] == hf_samples["tiny_gen"]
        for task in ("tiny_mc", "tiny_gen"):
            assert {k: v for k, v in results[task].items() if not k.endswith("stderr,none")} == \
                {k: v for k, v in hf_results[task].items() if not k.endswith("stderr,none")}
    hf_chat = run_lm_eval("hf", f"pretrained={tiny_model_dir},dtype=float32", ["tiny_gen"], tmp_path, chat=True)
    chat = run_lm_eval("local-chat-completions", f"model=tiny,{base}/chat/completions", ["tiny_gen"], tmp_path,
                       chat=True)
    assert chat[1]["tiny_gen"] == hf_chat[1]["tiny_gen"] and any(r[0][0] for r in chat[1]["tiny_gen"])


def test_a_task_file_as_an_lm_eval_task_scores_as_sample_py_eval(s, tiny_model_dir, tmp_path):
    from evaluate import write_tasks as write_lm_eval_task
    from tasks import read_task, task_accuracy

    questions = ["What is 7 + 8?", "你好，世界！", "Numbers: 0 1 2 3", "23 + 45 = ?"]
    with open(tmp_path / "eval.jsonl", "w", encoding="utf-8") as f:
        for q, a in zip(questions, ["15", "世界", "4", "68"]):
            f.write(json.dumps({"messages": [{"role": "user", "content": q}], "answer": a}, ensure_ascii=False) + "\n")
    name = write_lm_eval_task(str(tmp_path / "eval.jsonl"), s.tokenizer, str(tmp_path / "tasks"), max_new_tokens=16)
    results, samples = run_lm_eval("hf", f"pretrained={tiny_model_dir},dtype=float32", [name], tmp_path / "tasks")
    prompts, _ = read_task(str(tmp_path / "eval.jsonl"), s.tokenizer)
    from sample import SamplingParams, generate, strip_stop

    ours = generate(s.model, prompts, 16, SamplingParams(temperature=0.0), s.stop_ids)
    texts = [s.tokenizer.decode(strip_stop(t, s.stop_ids)) for t in ours]
    assert [r[0][0] for r in samples[name]] == texts  # the same prompts, greedy replies and stops as sample.py --eval
    accuracy = task_accuracy(s.model, s.tokenizer, str(tmp_path / "eval.jsonl"), max_new_tokens=16)
    assert math.isclose(results[name]["exact_match,none"], accuracy)
