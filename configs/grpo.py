# Group relative policy optimisation of the demo model on arithmetic prompts, rewarded for the exact
# answer (see README.md):   python train.py configs/grpo.py
# Each rollout samples group_size completions of each of batch_size prompts (32 * 8 = 256) and scores them;
# a completion's advantage is its reward against its group's mean, in units of the group's std, so only
# prompts the model sometimes gets right and sometimes wrong teach anything (reward_std in the log).
# Measured in the demo pipeline: the rollout reward moves 0.76-0.93 from step 10 on and the greedy val reward
# 0.87 -> 0.89; held-out accuracy (problems never trained on) moves by a few problems from where DPO left it.
out_dir = "out/grpo"
init_from = "out/dpo/final"
data = "data/demo/grpo.h5"
strategy = "grpo"
max_iters = 150  # optimizer steps: with ppo_epochs = 2, 75 rollouts of 32 prompts
batch_size = 32  # prompts per rollout; 8 prompts a rollout were too noisy to learn from
block_size = 128
group_size = 8
ppo_epochs = 2  # the second update on a rollout sees a policy that moved: clip_fraction > 0 there
clip_eps = 0.2
kl_coef = 0.04
reward = "exact_answer"  # 1 when the completion's final number is the answer, else 0
max_new_tokens = 0  # from the data: block_size minus the longest prompt (the demo's: ~110 tokens, its replies ~12)
truncated = "zero"  # a completion that has not reached <|im_end|> by then scores 0: its last number is not an answer
dynamic_sampling = True  # all-right and all-wrong groups teach nothing: drop them, refill from further prompts
max_refills = 2  # at most 2 more rollouts per micro-batch (a weak model's groups are mostly all-wrong)
loss_norm = "token"  # every completion token weighs alike (DAPO): long wrong replies are not discounted
rollout_temperature = 1.0
lr = 1e-4  # 3e-4 raised the reward on training prompts but lost held-out accuracy
min_lr = 1e-5
warmup_iters = 5
weight_decay = 0.0
eval_interval = 50  # val loss = minus the mean reward of greedy completions of the val prompts
eval_iters = 4  # 4 * 32 covers the demo's 100 val prompts
log_interval = 10
ckpt_interval = 150
