# Distillation of the demo's final model into a student half its depth (see README.md, Distillation):
#   python train.py configs/distill.py
# The student (configs/tiny.py with 2 blocks instead of 4: ~0.6M parameters to the teacher's 1.05M) starts from
# scratch and learns, on SFT conversations' replies, the teacher's whole next-token distribution at each position
# instead of the one token the data holds: a softer, richer target than SFT's. The replies are best the teacher's own
# (python tasks.py replies --model=TEACHER --data=sft.jsonl --out=teacher_sft.jsonl, then data.py prepare --stage=sft):
# on replies it would not give, its distributions are about contexts it never reaches. `python pipeline.py distill`
# does that and trains the same student on the same file by SFT alone (configs/sft.py with these model and schedule
# settings) beside it.
out_dir = "out/distill"
teacher = "out/grpo/final"  # the teacher: any model this project loads with the same tokenizer (checked at start)
init_from = "scratch"
tokenizer = "data/demo/tokenizer"
model_config = "configs/tiny.py"
n_layers = 2  # half the teacher's 4 blocks
vocab_size = 2048  # the teacher's (configs/demo.py): the same ids, the same rows
data = "data/demo/sft.h5"
strategy = "distill"
kl = "forward"  # KL(teacher || student): the student covers every token the teacher finds likely
distill_temperature = 1.0
ce_weight = 0.0  # the teacher's distributions only: on this data they hold the right answers (its accuracy ~0.9)
max_iters = 600
batch_size = 32
block_size = 128
lr = 3e-3  # pretraining's: the student starts from scratch
min_lr = 3e-4
warmup_iters = 20
eval_interval = 200
eval_iters = 8
log_interval = 20
ckpt_interval = 600
