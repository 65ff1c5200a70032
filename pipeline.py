"""
The demo: built-in bilingual arithmetic data, and the pipeline pretrain -> SFT -> DPO -> GRPO on it, each stage
starting from the last one's final/ model, with greedy exact-answer accuracy on the held-out problems
(eval.jsonl, never seen in training) after each stage, and a table at the end.

    python pipeline.py quickstart               # demo data, tokenizer, pretraining, a sample: README's quickstart
    python pipeline.py demo --out=data/demo     # only write the demo data (pretrain.txt, sft/dpo/grpo.jsonl, ...)
    python pipeline.py                          # everything from scratch: ~11 minutes on 2 CPU cores
    python pipeline.py --from_stage=dpo         # reuse data and the pretrain and sft models, run dpo and grpo again
    python pipeline.py --lora_rank=8            # then sft, dpo and grpo again as LoRA adapters: a column beside
    python pipeline.py --lora_rank=8 --from_stage=lora-sft    # only the LoRA stages, on the pretrained model
    python pipeline.py --task=working           # the same four stages on another task: word problems with working
    python pipeline.py task --task=bilingual --out=DIR    # only write a task's data
    python pipeline.py distill                  # a half-depth student distilled from out/grpo/final, beside SFT alone,
                                                # both on out/grpo/final's replies to the SFT prompts (tasks.py replies)

It runs the same commands a user would (printed as it goes); the accuracy is sample.py --eval's, printed with its
95% interval and, from SFT on, the change from the stage before with the change's (paired) 95% interval.
The demo also writes a knowledge base of made-up facts (kb/, kb_eval.jsonl) and SFT chats that answer from retrieved
passages about other made-up facts (kb_sft.jsonl: SFT trains on the arithmetic chats into
sft-arith/, then on them mixed with these into sft/); after SFT and after the last stage a second table
gives the accuracy on kb_eval.jsonl without retrieval and with dense, bm25 and hybrid retrieval, and recall@5.
"""
import glob
import json
import os
import random
import shlex
import subprocess
import sys
import time

from settings import Settings, load_settings, write_jsonl

DEFAULTS = dict(
    task="demo",  # demo | working (word problems, replies that show their working) | bilingual (short answers)
    data="",  # the task's data, tokenizer and .h5 files; default data/TASK
    out="",  # a directory per stage: OUT/demo (pretraining), OUT/sft (the demo's after OUT/sft-arith), OUT/dpo,
    # OUT/grpo; default out, or out/TASK
    pairs="auto",  # DPO's pairs: onpolicy (tasks.py pairs: the SFT model's own right and wrong replies to the
    # grpo.jsonl prompts) | file (the demo's dpo.jsonl: right answers against their digits changed, trained with
    # rpo_alpha=5) | auto = file for the demo (on-policy pairs lowered its accuracy: README), onpolicy for the others
    scale=1.0,  # every stage's max_iters (and the on-policy prompts) times this: < 1 for a quicker, weaker run
    from_stage="data",  # data | pretrain | sft | dpo | grpo (| lora-sft | lora-dpo | lora-grpo): earlier ones reused
    lora_rank=0,  # > 0: after grpo, sft -> dpo -> grpo again from the pretrained model with LoRA adapters of this rank
)
# stage, its config, the directory its model goes to (under --out), the stage whose model it starts from
STAGES = [("pretrain", "configs/demo.py", "demo", None), ("sft", "configs/sft.py", "sft", "demo"),
          ("dpo", "configs/dpo.py", "dpo", "sft"), ("grpo", "configs/grpo.py", "grpo", "dpo")]
# the LoRA stages' learning rates: adapters start at zero and take larger steps than full-weight fine-tuning
LORA_LR = {"sft": 3e-3, "dpo": 5e-4, "grpo": 5e-4}
# the chat template's tokens, which pretraining on plain text never saw: their embedding rows train beside the
# adapters (without them LoRA SFT leaves p(<|im_end|>) after an answer at 0.004: see README.md, LoRA adapters)
LORA_TOKENS = "<|im_start|>,<|im_end|>"


def stage_list(lora_rank):
    """[(label, stage, config, out name, parent out name, extra train.py args)]: STAGES, then with lora_rank the
    stages after pretraining as LoRA adapters (lora_alpha = 2 * rank), each merged into its final/ for the next."""
    stages = [(stage, stage, config, name, parent, []) for stage, config, name, parent in STAGES]
    for stage, config, name, parent in STAGES[1:] if lora_rank else []:
        lr = LORA_LR[stage]
        stages.append(("lora-" + stage, stage, config, "lora-" + name, parent if parent == "demo" else "lora-" + parent,
                       [f"--lora_rank={lora_rank}", f"--lora_alpha={2 * lora_rank}", "--merge_lora=true", f"--lr={lr}",
                        f"--min_lr={lr / 10}", f"--lora_tokens={LORA_TOKENS}"]))
    return stages


# -----------------------------------------------------------------------------
# the demo data: a + b and a - b, in English and Chinese, with exact answers

SENTENCES = [("The cat sleeps on the mat.", "猫在垫子上睡觉。"), ("I like green tea.", "我喜欢绿茶。"),
             ("It is raining today.", "今天下雨了。"), ("We read books at night.", "我们晚上看书。"),
             ("The sun rises in the east.", "太阳从东方升起。"),
             ("She walks to school.", "她走路去学校。"),
             ("Numbers help us count.", "数字帮助我们计数。"),
             ("He drinks a cup of water.", "他喝了一杯水。"),
             ("The river is long.", "这条河很长。"), ("Birds sing in the morning.", "鸟儿在早上唱歌。"),
             ("Math is fun to learn.", "学数学很有趣。"),
             ("My friend has two dogs.", "我的朋友有两只狗。")]


def _question(rng, a, op, b, chinese):
    if chinese:
        return rng.choice(["{a} {z} {b} 等于多少？", "计算 {a} {o} {b}。", "{a} {o} {b} 等于几？"]).format(
            a=a, b=b, o=op, z="加" if op == "+" else "减")
    return rng.choice(["What is {a} {o} {b}?", "Compute {a} {o} {b}.", "{a} {o} {b} = ?"]).format(a=a, b=b, o=op)


def _reply(a, op, b, result, chinese):
    return f"{a} {'加' if op == '+' else '减'} {b} 等于 {result}。" if chinese else f"{a} {op} {b} = {result}"


def make_demo(out_dir, seed=0, max_operand=49, n_eval=200, pretrain_docs=8000, sft=5000, dpo=3000, grpo=2000):
    """Writes pretrain.txt, sft.jsonl, dpo.jsonl, grpo.jsonl, eval.jsonl, dpo_eval.jsonl; returns their paths.
    Problems: a + b and a - b (a >= b), operands 0..max_operand; eval problems never appear in training files."""
    rng = random.Random(seed)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}
    problems = [(a, op, b) for a in range(max_operand + 1) for b in range(max_operand + 1)
                for op in ops if op == "+" or a >= b]
    rng.shuffle(problems)
    held_out, train = problems[:n_eval], problems[n_eval:]
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in
             ("pretrain.txt", "sft.jsonl", "dpo.jsonl", "grpo.jsonl", "eval.jsonl", "dpo_eval.jsonl")}

    def solved(problem, chinese=None):
        a, op, b = problem
        chinese = rng.random() < 0.5 if chinese is None else chinese
        return a, op, b, ops[op](a, b), chinese

    with open(paths["pretrain.txt"] + ".tmp", "w", encoding="utf-8") as f:  # each file whole or absent
        for _ in range(pretrain_docs):
            lines = []
            for _ in range(rng.randint(3, 8)):
                a, op, b, c, chinese = solved(rng.choice(train))
                kind = rng.random()
                if kind < 0.2:
                    lines.append(rng.choice(SENTENCES)[int(chinese)])
                elif kind < 0.5:
                    lines.append(f"{_question(rng, a, op, b, chinese)} {_reply(a, op, b, c, chinese)}")
                else:
                    word = ("加" if op == "+" else "减") if chinese else ("plus" if op == "+" else "minus")
                    lines.append(f"{a} {word} {b} {'等于' if chinese else 'equals'} {c}{'。' if chinese else '.'}"
                                 if rng.random() < 0.5 else _reply(a, op, b, c, chinese) + ("" if chinese else "."))
            f.write("\n".join(lines) + "\n\n")
    os.replace(paths["pretrain.txt"] + ".tmp", paths["pretrain.txt"])

    def chat(problem):
        a, op, b, c, chinese = solved(problem)
        return {"messages": [{"role": "user", "content": _question(rng, a, op, b, chinese)},
                             {"role": "assistant", "content": _reply(a, op, b, c, chinese)}]}

    def pair(problem):
        a, op, b, c, chinese = solved(problem)
        wrong = c + rng.choice([-10, -2, -1, 1, 2, 10])
        return {"prompt": _question(rng, a, op, b, chinese), "chosen": _reply(a, op, b, c, chinese),
                "rejected": _reply(a, op, b, wrong, chinese)}

    def task(problem, as_messages):
        a, op, b, c, chinese = solved(problem)
        prompt = _question(rng, a, op, b, chinese)
        record = {"messages": [{"role": "user", "content": prompt}]} if as_messages else {"prompt": prompt}
        return record | {"answer": str(c)}

    write_jsonl(paths["sft.jsonl"], (chat(rng.choice(train)) for _ in range(sft)))
    write_jsonl(paths["dpo.jsonl"], (pair(rng.choice(train)) for _ in range(dpo)))
    write_jsonl(paths["grpo.jsonl"], (task(rng.choice(train), False) for _ in range(grpo)))
    write_jsonl(paths["eval.jsonl"], (task(problem, True) for problem in held_out))
    write_jsonl(paths["dpo_eval.jsonl"], (pair(problem) for problem in held_out))
    return paths | make_kb(out_dir, seed)


# -----------------------------------------------------------------------------
# the knowledge base: made-up facts no pretraining text holds, answered from retrieved passages

KB_SFT = ["--pack=true", "--block_size=256", "--batch_size=10"]  # the demo's SFT with its retrieval chats (~175
# tokens, the arithmetic ones ~30): packed rows of the model's whole context, 10 a step, ~2,500 tokens as before
KB_CHATS = 10_000  # kb_sft.jsonl's chats, ~13 a step: 1,000 steps see each ~1.3 times
KB_SFT_ITERS = 1000  # the demo's SFT steps on its mixture (sft_kb.h5), after configs/sft.py's 300 on the arithmetic
# chats alone (sft.h5). The model learns to copy the first source's number suddenly, at a step that varies from run to
# run. kb_eval with bm25 (240 questions), from the demo's pretraining, --seed=0,1,2,3: arithmetic first (0.960-0.985
# after it), then the mixture: 1.000 in each (arithmetic 0.955, 0.965, 0.920, 0.955), 0.996-1.000 already at 750 steps
# (the val loss fell between 400 and 600); with a 700-step schedule, 0.258 (seed 0). Perhaps the arithmetic replies,
# which restate the question's numbers, teach the copy the retrieval chats then build on: the mixture alone, 1,000
# steps, copied in 2 of 6 runs (0.904, 0.892; the others 0.004-0.158), and the retrieval chats alone, 400-500 steps at
# 1e-3 or 2e-3, in none of 4 (0.008-0.021; one given only the answer's passage: 0.008; arithmetic 0.005-0.025, and 0.020
# after 300 mixture steps more). The answer anywhere among the sources (fresh numbers, up to 1,500 steps; fixed ones, up
# to 2,400), or first only beside another place's fact: 0.004-0.025
KB_PLACES = 24  # made-up places in kb/, a file each; kb_eval.jsonl asks about each of their facts (240 questions)
KB_K = 3  # chunks retrieved per question: the system prompt, 3 one-fact passages (~10 tokens each, ~20 with their
# source line) and a question are 150-167 of the demo model's 256 positions
# A fact is "place relation number": the number directly follows its keys, so the reply, which restates the fact,
# has just written the keys when the number comes, and copying it is matching them in the sources (an induction
# head's job); places are two tokens of the demo tokenizer, relations one (bar the Chinese 书 and English schools, cats).
# An English passage has its question's noun ("schools", not "school"), so BM25 ranks it above the place's other facts:
# with "cat" each question about cats had its passage third of 3 (recall@1 0.900), and a demo model that copies the
# first source's number answered 0.904 of kb_eval with bm25 (1 of the 24); with "cats" and "schools" 1.000
KB_NAME_PARTS = (["Bi", "Birds", "Co", "Comp", "He", "Mat", "Math", "My", "Nu", "Number", "She", "We"],
                 ["al", "alks", "als", "at", "ater", "ber", "ch", "day", "ds", "gh", "gs", "he", "ien", "igh", "ik",
                  "in", "ing", "inus", "is", "ises", "iv", "ks", "lee", "lp", "lus", "ogs", "ong", "oo", "ooks", "ool",
                  "orn", "oun", "qu", "un", "up", "us"])  # 432 names
KB_FACTS = [  # (English question, passage, Chinese question, passage): {e} a made-up place, {v} a number 10..98
    ("How long is the river of {e}?", "{e} river {v} km.", "{e} 这条河有多长？", "{e} 这条河 {v} 公里。"),
    ("How many schools does {e} have?", "{e} schools {v}.", "{e} 有几所学校？", "{e} 学校 {v} 所。"),
    ("How many books does {e} have?", "{e} books {v}.", "{e} 有多少本书？", "{e} 书 {v} 本。"),
    ("How much tea does {e} grow?", "{e} tea {v} tons.", "{e} 产多少吨茶？", "{e} 茶 {v} 吨。"),
    ("How many cats live in {e}?", "{e} cats {v}.", "{e} 有几只猫？", "{e} 猫 {v} 只。"),
]


def kb_facts(rng, n_places):
    """Per made-up place (KB_NAME_PARTS joined, none twice), its facts: {"query", "passage", "answer", "lang"} for
    each KB_FACTS line in English and in Chinese. The answers are numbers, which the demo model already copies from a
    prompt (its arithmetic replies repeat the question's numbers); the facts are in no other text."""
    names = [first + second for first in KB_NAME_PARTS[0] for second in KB_NAME_PARTS[1]]
    if n_places > len(names):
        raise ValueError(f"kb_facts: {n_places} places asked for, {len(names)} names to give them")
    return [place_facts(rng, place) for place in rng.sample(names, n_places)]


def place_facts(rng, place):
    """A place's facts, one number drawn for each KB_FACTS line and used in both its languages."""
    facts = []
    for question_en, passage_en, question_zh, passage_zh in KB_FACTS:
        value = str(rng.randint(10, 98))
        facts += [{"query": question.format(e=place), "passage": passage.format(e=place, v=value), "answer": value,
                   "lang": lang} for lang, question, passage in (("en", question_en, passage_en),
                                                                 ("zh", question_zh, passage_zh))]
    return facts


def make_kb(out_dir, seed=0, n_chats=KB_CHATS, n_places=400, other_place=0.3):
    """Writes kb/NN.md (a made-up place's facts, English then Chinese, a paragraph each), kb_eval.jsonl (a question
    about each fact, in its language, with the answer and the passage that holds it) and kb_sft.jsonl: n_chats chats
    about n_places other made-up places whose system message carries KB_K passages as sample.py --rag hands them over
    (rag.with_source_message): first the one holding the answer (where a ranking retriever puts the best match), then
    the same place's other facts (what BM25 retrieves beside it) or, at rate other_place, another place's same fact;
    the reply restates the fact. Each chat draws its place's numbers afresh, so only the sources answer it (with fixed
    numbers a model can learn them instead). Returns the paths."""
    from rag import with_source_message

    rng = random.Random(seed + 1)  # its own generator: the demo's other files stay as they were
    places = kb_facts(rng, KB_PLACES + n_places)  # kb/'s places, then the chats' (whose numbers are redrawn)
    kb_dir = os.path.join(out_dir, "kb")
    os.makedirs(kb_dir, exist_ok=True)
    for old in glob.glob(os.path.join(kb_dir, "*.md")):
        os.remove(old)
    kb_eval = []
    for number, facts in enumerate(places[:KB_PLACES]):
        with open(os.path.join(kb_dir, f"{number:02d}.md"), "w", encoding="utf-8") as f:
            f.write("\n\n".join([r["passage"] for r in facts if r["lang"] == "en"] +
                                 [r["passage"] for r in facts if r["lang"] == "zh"]) + "\n")
        kb_eval += [{"messages": [{"role": "user", "content": r["query"]}], "answer": r["answer"],
                     "passage": r["passage"]} for r in facts]
    names = [facts[0]["passage"].split()[0] for facts in places[KB_PLACES:]]
    chats = []
    for _ in range(n_chats):
        place = rng.choice(names)
        facts = place_facts(rng, place)
        asked = rng.choice(facts)
        others = rng.sample([r for r in facts if r["answer"] != asked["answer"]], KB_K - 1)
        if others and rng.random() < other_place:  # the same question about another place (the answer: the asked's)
            others[-1] = place_facts(rng, rng.choice([name for name in names if name != place]))[facts.index(asked)]
        name = f"{rng.randrange(100):02d}.md"
        sources = [{"source": name, "title": "", "text": r["passage"]} for r in [asked] + rng.sample(others, KB_K - 1)]
        chats.append({"messages": with_source_message([{"role": "user", "content": asked["query"]},
                                                       {"role": "assistant", "content": asked["passage"]}], sources)})
    paths = {"kb": kb_dir}
    for name, lines in (("kb_eval.jsonl", kb_eval), ("kb_sft.jsonl", chats)):
        paths[name] = os.path.join(out_dir, name)
        write_jsonl(paths[name], lines)
    return paths


# -----------------------------------------------------------------------------
# two tasks unlike the demo, for post-training on a task it was not tuned to: word problems whose replies show their
# working (~40-60 tokens, the final answer last), and short bilingual answers (a word or a number, English or Chinese)

NAMES = ["Tom", "Ann", "Lee", "Mia", "Sam", "Kai"]
ITEMS = ["apples", "pens", "stamps", "cards", "shells", "books"]
DAYS = (["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
        ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"])


def working_problems():
    """(question, reply showing its working, answer) for every word problem of three kinds."""
    problems = []
    for a in range(10, 40):
        for b in range(2, 6):
            for c in range(2, 10):
                d = (a + b + c) % 9 + 1
                n, item = NAMES[(a + c) % 6], ITEMS[(a + b) % 6]
                bc, total = b * c, a + b * c
                problems.append((f"{n} has {a} {item}, buys {b} bags of {c} {item} each and gives away {d}. How many "
                                 f"{item} does {n} have now?",
                                 f"{n} starts with {a} {item}. {b} bags of {c} are {b} x {c} = {bc}, so {n} has "
                                 f"{a} + {bc} = {total}. After giving away {d}, {n} has {total} - {d} = {total - d}. "
                                 f"The answer is {total - d}.", str(total - d)))
    for speed in range(20, 80, 5):
        for hours in range(2, 6):
            for extra in range(3, 30, 2):
                far = speed * hours
                problems.append((f"A bus goes {speed} km an hour for {hours} hours, then {extra} km more. How far does "
                                 "it go in all?",
                                 f"In {hours} hours it goes {speed} x {hours} = {far} km. Then {far} + {extra} = "
                                 f"{far + extra} km. The answer is {far + extra}.", str(far + extra)))
    for people in range(2, 7):
        for each in range(3, 12):
            for eaten in range(1, 3):
                total = people * each
                problems.append((f"{people} friends share {total} sweets equally, and each eats {eaten}. How many "
                                 "sweets does each friend have left?",
                                 f"Each friend gets {total} / {people} = {each} sweets. After eating {eaten}, each has "
                                 f"{each} - {eaten} = {each - eaten}. The answer is {each - eaten}.",
                                 str(each - eaten)))
    return problems


def bilingual_problems():
    """(question, short reply, answer) for weekday arithmetic, the larger of two numbers and the next letter, each in
    English and in Chinese; the answer is the reply without its full stop."""
    problems = []
    for chinese, days in enumerate(DAYS):
        for start in range(7):
            for later in range(1, 12):
                q = (f"今天是{days[start]}，{later}天后是星期几？" if chinese else
                     f"If today is {days[start]}, what day is it in {later} days?")
                problems.append((q, days[(start + later) % 7]))
        for a in range(10, 100, 3):
            for b in range(11, 100, 7):
                if a != b:
                    problems.append((f"{a} 和 {b} 哪个大？" if chinese else f"Which is larger, {a} or {b}?",
                                     str(max(a, b))))
        for letter in "ABCDEFGHIJKLMNOPQRSTUVWXY":
            problems.append((f"字母 {letter} 后面是哪个字母？" if chinese else f"Which letter comes after {letter}?",
                             chr(ord(letter) + 1)))
    return [(q, answer + ("。" if "？" in q else "."), answer) for q, answer in problems]


TASKS = {"working": working_problems, "bilingual": bilingual_problems}


def make_task(out_dir, task, seed=0, n_eval=200, demonstrated=0.5, pretrain_docs=4000, sft=4000, grpo=2000):
    """Writes a task's pretrain.txt (solved problems and the demo's sentences), sft.jsonl, grpo.jsonl and eval.jsonl
    (held-out problems, never in the others); DPO pairs come from the SFT model (tasks.py pairs). Returns the paths.
    The setting post-training is for: of the training problems, the share `demonstrated` has worked solutions
    (pretrain.txt and sft.jsonl draw from these), the rest are prompts with a checkable answer only (grpo.jsonl),
    which the SFT model answers as it would a new problem: where GRPO and on-policy DPO have something to learn."""
    if not 0 < demonstrated < 1:
        raise ValueError(f"make_task: demonstrated={demonstrated}: the share of training problems with worked "
                         "solutions must be in (0, 1), leaving some for grpo.jsonl's prompts")
    rng = random.Random(seed)
    problems = TASKS[task]()
    rng.shuffle(problems)
    held_out, train = problems[:n_eval], problems[n_eval:]
    shown, prompts_only = train[:round(len(train) * demonstrated)], train[round(len(train) * demonstrated):]
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("pretrain.txt", "sft.jsonl", "grpo.jsonl", "eval.jsonl")}
    with open(paths["pretrain.txt"] + ".tmp", "w", encoding="utf-8") as f:
        for _ in range(pretrain_docs):
            lines = [" ".join(rng.choice(shown)[:2]) if rng.random() < 0.8
                     else rng.choice(SENTENCES)[rng.random() < 0.5] for _ in range(rng.randint(2, 6))]
            f.write("\n".join(lines) + "\n\n")
    os.replace(paths["pretrain.txt"] + ".tmp", paths["pretrain.txt"])
    records = {
        "sft.jsonl": ({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]}
                      for q, reply, _ in (rng.choice(shown) for _ in range(sft))),
        "grpo.jsonl": ({"prompt": q, "answer": answer} for q, _, answer in
                       (rng.choice(prompts_only) for _ in range(grpo))),
        "eval.jsonl": ({"messages": [{"role": "user", "content": q}], "answer": answer} for q, _, answer in held_out)}
    for name, lines in records.items():
        write_jsonl(paths[name], lines)
    return paths


# -----------------------------------------------------------------------------
# the pipeline


def sh(*args):
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def make_data(data, task):
    if task == "demo":
        sh("pipeline.py", "demo", f"--out={data}")
    else:
        sh("pipeline.py", "task", f"--task={task}", f"--out={data}")
    sh("data.py", "tokenizer", f"--input={data}/pretrain.txt", "--vocab_size=2048", f"--out={data}/tokenizer")
    # the demo's SFT trains on the arithmetic chats (sft.h5), then on them with the retrieval chats (sft_kb.h5)
    kb = [("sft", "sft.jsonl,kb_sft.jsonl", "sft_kb")] if task == "demo" else []
    for stage, sources, name in [("seq", "pretrain.txt", "pretrain"), ("sft", "sft.jsonl", "sft"), *kb,
                                 ("dpo", "dpo.jsonl", "dpo"), ("grpo", "grpo.jsonl", "grpo")]:
        inputs = ",".join(f"{data}/{source}" for source in sources.split(","))
        if os.path.exists(inputs.split(",")[0]):
            sh("data.py", "prepare", f"--stage={stage}", f"--input={inputs}", f"--tokenizer={data}/tokenizer",
               f"--out={data}/{name}.h5")
    if task == "demo":  # held-out preference pairs (problems of eval.jsonl), all in one split, for DPO's accuracy
        sh("data.py", "prepare", "--stage=dpo", f"--input={data}/dpo_eval.jsonl", f"--tokenizer={data}/tokenizer",
           f"--out={data}/dpo_eval.h5", "--val_fraction=0")


ON_POLICY_PROMPTS = 2000  # grpo.jsonl prompts the SFT model answers k=8 times for DPO's on-policy pairs


def on_policy_pairs(data, sft_dir, scale):
    """DPO's pairs from the SFT model's own replies (tasks.py pairs), prepared as data/dpo_onpolicy.h5."""
    sh("tasks.py", "pairs", f"--model={sft_dir}", f"--data={data}/grpo.jsonl", f"--out={data}/dpo_onpolicy.jsonl",
       "--k=8", f"--max_prompts={max(1, round(ON_POLICY_PROMPTS * scale))}")
    with open(f"{data}/dpo_onpolicy.jsonl", encoding="utf-8") as f:
        if not any(line.strip() for line in f):
            sys.exit(f"pipeline.py: {sft_dir} gave no pair (its replies to each prompt all scored alike: all wrong, "
                     "or all right); DPO has nothing to learn from: train SFT longer")
    sh("data.py", "prepare", "--stage=dpo", f"--input={data}/dpo_onpolicy.jsonl", f"--tokenizer={data}/tokenizer",
       f"--out={data}/dpo_onpolicy.h5")
    return f"{data}/dpo_onpolicy.h5"


def scaled_iters(config, scale, max_iters=None):
    """--max_iters=N for max_iters (default: the config's) times scale (none at scale 1 without max_iters: the
    config as it is)."""
    from settings import run_config_file

    if scale == 1 and max_iters is None:
        return []
    return [f"--max_iters={max(2, round((max_iters or run_config_file(config)['max_iters']) * scale))}"]


def answer_results(model_dir, task):
    """Per problem, right or wrong: what `python sample.py --model=MODEL_DIR --eval=TASK` averages."""
    from sample import load
    from tasks import task_results

    model, tokenizer = load(model_dir)
    return task_results(model, tokenizer, task, batch_size=256)  # 256 rows a generate() call: fewer decode steps


def preference_accuracy(policy_dir, reference_dir, pairs_path, split="train"):
    """(share, count) of preference pairs (a split of a dpo .h5) where DPO's implicit reward, beta * log(policy /
    reference), is higher for the chosen reply than for the rejected one."""
    import torch

    from data import load_dataset
    from sample import load
    from strategies import DPO

    policy, _ = load(policy_dir)
    dpo = DPO(Settings(beta=1.0, rpo_alpha=0.0), load(reference_dir)[0], None)  # the margin's sign: any beta
    pairs = load_dataset(pairs_path, split, policy.config.max_len - 1, stage="dpo")
    correct = 0.0
    with torch.no_grad():
        for start in range(0, len(pairs), 64):
            indices = list(range(start, min(start + 64, len(pairs))))
            _, metrics = dpo.loss(policy, pairs.get_batch(indices), step=0, evaluating=True)
            correct += metrics["pref_accuracy"] * len(indices)
    return correct / len(pairs), len(pairs)


def kb_results(data, model_dir):
    """[(retrieval, per-question results, per-question recall@5 or None)] on kb_eval.jsonl: without retrieval, then
    each of dense, bm25 and hybrid retrieving KB_K chunks of an index of kb/ made with the model itself (what
    `sample.py --eval=kb_eval.jsonl --rag=INDEX --rag_k=KB_K --retrieval=R` averages); recall@5: a question's
    passage is in one of the 5 chunks retrieved for it."""
    from rag import Retriever, last_user_text
    from sample import load
    from tasks import task_results

    index = os.path.join(os.path.dirname(model_dir), "kb.h5")
    sh("data.py", "index", f"--docs={data}/kb", f"--model={model_dir}", f"--out={index}", "--merge_threshold=2",
       "--retrieval=hybrid")
    model, tokenizer = load(model_dir)
    task = f"{data}/kb_eval.jsonl"
    with open(task, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    rows = [("none", task_results(model, tokenizer, task, batch_size=256), None)]
    for retrieval in ("dense", "bm25", "hybrid"):
        retriever = Retriever(index, model, tokenizer, KB_K, retrieval=retrieval)
        recall = [any(r["passage"] in hit["text"] for hit in retriever.search(last_user_text(r["messages"]), 5))
                  for r in records]
        rows.append((retrieval, task_results(model, tokenizer, task, batch_size=256, retriever=retriever), recall))
    return rows


def print_kb(data, results):
    """The knowledge-base table: a column of accuracy (± its 95% interval) per model, and recall@5."""
    from tasks import interval95

    names = list(results)
    print(f"\nknowledge base: exact-answer accuracy on {data}/kb_eval.jsonl (questions about the made-up facts of "
          f"{data}/kb/, greedy, {KB_K} chunks retrieved; ± its 95% interval) and the retriever's recall@5:")
    print(f"{'retrieval':<10}" + "".join(f"{name:>16}" for name in names) +
          "".join(f"{'recall@5 ' + name:>18}" for name in names))
    for n, (retrieval, _, _) in enumerate(results[names[0]]):
        line = f"{retrieval:<10}"
        for name in names:
            correct = results[name][n][1]
            line += f"{f'{sum(correct) / len(correct):.3f} ± {interval95(correct):.3f}':>16}"
        for name in names:
            recall = results[name][n][2]
            line += f"{'-' if recall is None else f'{sum(recall) / len(recall):.3f} ± {interval95(recall):.3f}':>18}"
        print(line)


def write_demo(argv):
    """python pipeline.py demo --out=DIR [--seed=0 ...]"""
    args = load_settings({"out": "data/demo", "seed": 0, "max_operand": 49, "n_eval": 200, "pretrain_docs": 8000,
                          "sft": 5000, "dpo": 3000, "grpo": 2000}, argv, "pipeline.py demo")
    for name, path in make_demo(args.pop("out"), **args).items():
        if name == "kb":
            print(f"wrote {path}: {len(os.listdir(path))} files")
            continue
        with open(path, encoding="utf-8") as f:
            count = sum(1 for line in f if line.strip()) if name.endswith(".jsonl") else f.read().count("\n\n")
        print(f"wrote {path}: {count:,} {'records' if name.endswith('.jsonl') else 'documents'}, "
              f"{os.path.getsize(path) / 1e6:.2f} MB")


# -----------------------------------------------------------------------------
# the quickstart: the README's five commands after pip install, each reused when its output is up to date

QUICKSTART = [  # step, what it writes, the file in that written last (whole when there), the command
    ("demo data", "data/demo", "data/demo/dpo_eval.jsonl", ["pipeline.py", "demo", "--out=data/demo"]),
    ("tokenizer", "data/demo/tokenizer", "data/demo/tokenizer/tokenizer_config.json",
     ["data.py", "tokenizer", "--input=data/demo/pretrain.txt", "--vocab_size=2048", "--out=data/demo/tokenizer"]),
    ("prepare", "data/demo/pretrain.h5", "data/demo/pretrain.h5", ["data.py", "prepare", "--stage=seq",
     "--input=data/demo/pretrain.txt", "--tokenizer=data/demo/tokenizer", "--out=data/demo/pretrain.h5"]),
    ("train", "out/demo/final", "out/demo/final", ["train.py", "configs/demo.py"]),  # its out_dir is out/demo
    ("sample", None, None, ["sample.py", "--model=out/demo/final", "--prompt=23 + 45 =", "--temperature=0",
                            "--max_new_tokens=40"]),
]


def quickstart(argv):
    """python pipeline.py quickstart: demo data -> tokenizer -> prepare -> pretrain -> a greedy sample, one progress
    line a step. Make's rule: a step whose output exists and is newer than the step before's is reused; delete
    the output (or `data/` and `out/`) to run it again. Training killed halfway continues from its newest checkpoint."""
    load_settings({}, argv, "pipeline.py quickstart")  # takes no options: an unknown one is an error
    t_start, before = time.time(), None
    for number, (step, output, last_file, command) in enumerate(QUICKSTART, 1):
        head = f"[{number}/{len(QUICKSTART)}] {step}:"
        if last_file and os.path.exists(last_file) and (before is None or os.path.getmtime(last_file) >= before):
            print(f"{head} reused {output} (delete it to run `python {shlex.join(command)}` again)", flush=True)
        else:
            checkpoints = glob.glob("out/demo/ckpt-*[0-9]") if step == "train" else []
            if [path for path in checkpoints if os.path.getmtime(path) >= before]:
                command = command + ["--resume=auto"]  # an interrupted run on the same data: continue it
            print(f"{head} python {shlex.join(command)}", flush=True)
            t0 = time.time()
            subprocess.run([sys.executable, *command], check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            print(f"{head} done in {time.time() - t0:.0f} s", flush=True)
        before = os.path.getmtime(last_file) if last_file else before
    print(f"quickstart: {(time.time() - t_start) / 60:.1f} minutes. Next: `python pipeline.py` for the whole demo "
          "(its data and pretraining again, then SFT, DPO and GRPO), or README.md's recipes for your own data.")


def write_task(argv):
    """python pipeline.py task --task=working|bilingual --out=DIR [--seed=0 ...]"""
    args = load_settings({"task": "working", "out": "", "seed": 0, "n_eval": 200, "demonstrated": 0.5,
                          "pretrain_docs": 4000, "sft": 4000, "grpo": 2000}, argv, "pipeline.py task")
    if args.task not in TASKS:
        sys.exit(f"pipeline.py task: --task={args.task!r}: choose from {', '.join(TASKS)}")
    for name, path in make_task(args.pop("out") or f"data/{args.task}", **args).items():
        print(f"wrote {path}: {os.path.getsize(path) / 1e6:.2f} MB")


def distill_demo(argv):
    """python pipeline.py distill: configs/distill.py's student (half the teacher's depth) distilled from the final
    model of the pipeline, beside the same student trained on the same data by SFT alone, and the teacher. The data:
    --replies=teacher (default), the SFT prompts with the teacher's greedy replies (tasks.py replies), so the teacher's
    distributions are taken where it is on its own path; --replies=data, the SFT data's own replies."""
    args = load_settings({"data": "data/demo", "out": "out", "teacher": "", "scale": 1.0, "replies": "teacher"}, argv,
                         "pipeline.py distill")
    if args.replies not in ("teacher", "data"):
        sys.exit(f"pipeline.py distill: --replies={args.replies!r}: choose from teacher, data")
    from settings import run_config_file
    from tasks import interval95

    config = run_config_file("configs/distill.py")
    teacher = args.teacher or f"{args.out}/grpo/final"
    sft_data = f"{args.data}/sft.h5"
    if args.replies == "teacher":  # the teacher's own replies to the SFT prompts: what its distributions are about
        os.makedirs(f"{args.out}/distill-data", exist_ok=True)
        sft_data = f"{args.out}/distill-data/teacher_sft.h5"
        sh("tasks.py", "replies", f"--model={teacher}", f"--data={args.data}/sft.jsonl",
           f"--out={args.out}/distill-data/teacher_sft.jsonl")
        sh("data.py", "prepare", "--stage=sft", f"--input={args.out}/distill-data/teacher_sft.jsonl",
           f"--tokenizer={args.data}/tokenizer", f"--out={sft_data}")
    same = [f"--data={sft_data}", f"--tokenizer={args.data}/tokenizer", *scaled_iters("configs/distill.py", args.scale)]
    t0 = time.time()
    sh("train.py", "configs/distill.py", f"--teacher={teacher}", f"--out_dir={args.out}/distill", *same)
    minutes = {"distill": (time.time() - t0) / 60}
    student = [f"--{key}={config[key]}" for key in ("init_from", "model_config", "n_layers", "vocab_size", "max_iters",
                                                       "batch_size", "block_size", "lr", "min_lr", "warmup_iters")
               if key != "max_iters" or args.scale == 1]  # scaled: in `same`
    t0 = time.time()
    sh("train.py", "configs/sft.py", *student, f"--out_dir={args.out}/distill-sft", *same)
    minutes["sft"] = (time.time() - t0) / 60
    task = f"{args.data}/eval.jsonl"
    models = [("teacher", teacher), ("sft", f"{args.out}/distill-sft/final"), ("distill", f"{args.out}/distill/final")]
    results = {name: answer_results(path, task) for name, path in models}
    print(f"\nexact-answer accuracy on {task} (greedy; ± its 95% interval):")
    for name, correct in results.items():
        note = ""
        if name == "distill":
            change = (sum(correct) - sum(results["sft"])) / len(correct)
            note = f"  {change:+.3f} ± {interval95(correct, results['sft']):.3f} on sft"
        shown = f"{minutes[name]:.1f}" if name in minutes else "-"
        print(f"{name:<8} {sum(correct) / len(correct):.3f} ± {interval95(correct):.3f} {shown:>6} min{note}")


def main(argv):
    if argv[:1] == ["demo"]:
        return write_demo(argv[1:])
    if argv[:1] == ["task"]:
        return write_task(argv[1:])
    if argv[:1] == ["distill"]:
        return distill_demo(argv[1:])
    if argv[:1] == ["quickstart"]:
        return quickstart(argv[1:])
    from tasks import interval95  # torch with it: only the pipeline needs it

    args = load_settings(DEFAULTS, argv, "pipeline.py")
    problems = [f"--{key}={args[key]!r}: {rule}" for key, ok, rule in [
        ("task", args.task in ("demo", *TASKS), f"choose from demo, {', '.join(TASKS)}"),
        ("pairs", args.pairs in ("auto", "file", "onpolicy"), "choose from auto, onpolicy, file"),
        ("pairs", not (args.pairs == "file" and args.task != "demo"), "only the demo writes a dpo.jsonl"),
        ("scale", 0 < args.scale <= 1, "must be in (0, 1]")] if not ok]
    if problems:
        sys.exit("pipeline.py: " + "; ".join(problems))
    on_policy = args.pairs == "onpolicy" or (args.pairs == "auto" and args.task != "demo")
    stages = stage_list(args.lora_rank)
    names = ["data"] + [label for label, *_ in stages]
    if args.from_stage not in names:
        sys.exit(f"pipeline.py: --from_stage={args.from_stage!r}: choose from {', '.join(names)}")
    first = names.index(args.from_stage)
    data = args.data or f"data/{args.task}"
    out = args.out or ("out" if args.task == "demo" else f"out/{args.task}")
    task = os.path.join(data, "eval.jsonl")
    rows, results, t_start = [], {}, time.time()
    if first == 0:
        make_data(data, args.task)
    for i, (label, stage, config, name, parent, extra) in enumerate(stages, 1):
        t0 = time.time()
        model_dir = os.path.join(out, name, "final")
        if i >= first:
            data_file = f"{data}/pretrain.h5" if stage == "pretrain" else f"{data}/{stage}.h5"
            if stage == "dpo" and on_policy:
                data_file = on_policy_pairs(data, f"{out}/{parent}/final", args.scale)
            start = [f"--tokenizer={data}/tokenizer"] if parent is None else [f"--init_from={out}/{parent}/final"]
            if stage == "dpo" and not on_policy:  # digit-changed pairs: the chosen replies' NLL keeps them likely
                start += ["--rpo_alpha=5", "--lr=1e-4", "--min_lr=1e-5"]
            iters = None  # the config's max_iters
            if stage == "sft" and args.task == "demo":  # the arithmetic chats alone, then with the retrieval chats
                sh("train.py", config, f"--data={data_file}", f"--out_dir={out}/{name}-arith", *start, *extra,
                   *scaled_iters(config, args.scale))
                data_file, start = f"{data}/sft_kb.h5", [f"--init_from={out}/{name}-arith/final", *KB_SFT]
                iters = KB_SFT_ITERS
            sh("train.py", config, f"--data={data_file}", f"--out_dir={out}/{name}", *start, *extra,
               *scaled_iters(config, args.scale, iters))
        elif not os.path.isdir(model_dir):
            sys.exit(f"pipeline.py: --from_stage={args.from_stage} reuses {model_dir}, which does not exist")
        print(f"$ python sample.py --model={model_dir} --eval={task}", flush=True)
        results[name] = answer_results(model_dir, task)
        accuracy = sum(results[name]) / len(results[name])
        note = f"± {interval95(results[name]):.3f}"
        if parent is not None:
            change = accuracy - sum(results[parent]) / len(results[parent])
            note += f"; {change:+.3f} ± {interval95(results[name], results[parent]):.3f} on {parent.split('-')[-1]}"
        if stage == "grpo" and name.replace("grpo", "sft") in results:  # the bar: GRPO against SFT as well
            before = results[name.replace("grpo", "sft")]
            change = accuracy - sum(before) / len(before)
            note += f"; {change:+.3f} ± {interval95(results[name], before):.3f} on sft"
        if stage == "dpo":  # on-policy: the val split's pairs, from prompts DPO did not train on
            pairs_file, split = (f"{data}/dpo_onpolicy.h5", "val") if on_policy else (f"{data}/dpo_eval.h5", "train")
            share, n = preference_accuracy(model_dir, os.path.join(out, parent, "final"), pairs_file, split)
            note += f"; preference accuracy {share:.3f} on {pairs_file}'s {split} split ({n} pairs)"
        rows.append((label, accuracy, (time.time() - t0) / 60 if i >= first else None, note))
        print(f"{label}: accuracy {accuracy:.3f} {note}", flush=True)

    print(f"\nexact-answer accuracy on {task} (greedy; ± its 95% interval; the change from the stage before ± its "
          "paired 95% interval), after each stage:")
    print_table(rows, args.lora_rank)
    if args.task == "demo":  # the knowledge base, after SFT (which trained on retrieval chats) and the last stage
        print_kb(data, {name: kb_results(data, os.path.join(out, name, "final")) for name in ("sft", stages[-1][3])})
    print(f"total {(time.time() - t_start) / 60:.1f} minutes")


def print_table(rows, lora_rank):
    """One line a stage; with LoRA stages, their accuracy and minutes beside the full-weight ones."""
    found = {label: (f"{accuracy:.3f}", "-" if minutes is None else f"{minutes:.1f}", note)
             for label, accuracy, minutes, note in rows}
    lora = f"LoRA r={lora_rank}"
    print(f"{'stage':<9} {'accuracy':>8} {'minutes':>8}" + (f" {lora:>9} {'minutes':>8}" if lora_rank else ""))
    for stage, *_ in STAGES:
        accuracy, minutes, note = found[stage]
        line = f"{stage:<9} {accuracy:>8} {minutes:>8}"
        if lora_rank:
            lora_accuracy, lora_minutes, lora_note = found.get("lora-" + stage, ("-", "-", ""))
            line += f" {lora_accuracy:>9} {lora_minutes:>8}"
            note = note + (f"; LoRA: {lora_note}" if lora_note else "")
        print(f"{line}  {note}".rstrip())


if __name__ == "__main__":
    main(sys.argv[1:])
