"""
The loss of each training strategy; `--strategy=NAME` picks a class from STRATEGIES, and train.py's loop calls
every strategy the same way. The interface (Strategy below has the defaults):

    data_stage                         which `data.py prepare --stage` its .h5 must be
    settings                           its own settings, {name: default} with a comment each: train.py adds the
                                       chosen strategy's to its table (config files, --key=value, --help); a
                                       setting of another strategy is an error. Strategies may share a name (and
                                       its type), each with its own default; a subclass inherits its parent's
    __init__(cfg, model, tokenizer, rank=0, world_size=1)
                                       cfg: train.py's settings with this strategy's (cfg.beta); model: the
                                       unwrapped policy (e.g. to make a reference_model); tokenizer: the one
                                       train.py found. Bad settings raise ValueError, which train.py reports before
                                       training starts.
    check_data(dataset)                called once on the train split before training (GRPO probes its reward)
    normalizers(batch) -> {name: count}
                                       what the loss is a mean over, counted in one micro-batch before any forward
                                       (seq/sft: scored tokens; dpo: pairs and chosen reply tokens; grpo:
                                       micro-batches). train.py sums them over the micro-batches of an optimizer
                                       step and over processes: `totals`.
    loss(model, batch, step, micro_step=0, evaluating=False, totals=None) -> (loss, metrics)
                                       step: the optimizer step; micro_step: which of its grad_accum micro-batches
                                       this is; evaluating: the val split, no gradients. totals: the loss is this
                                       micro-batch's share of the step's mean (its sum / the totals), so the shares
                                       of every micro-batch and process add up to the mean over every scored token
                                       of the step, whatever the batch split; None: the micro-batch's own mean.
                                       metrics: floats for the log ("tokens", when present, is the token count
                                       behind tokens/s). `model` may be DDP-wrapped: each loss() calls it once, so
                                       gradients sync once. model(ids, TokenLogprobs(targets)) gives per-token
                                       log-probs and model(ids, CrossEntropy(targets)) the summed loss, without
                                       full-vocabulary logits (model.py's chunked head).
    state_dict() / load_state_dict(states)
                                       what a checkpoint needs of each process beyond the weights (GRPO's cached
                                       rollouts); load_state_dict gets every saved process's, in rank order, so a
                                       run resumed on another number of processes finds its micro-batches'
    ref_model                          a frozen reference model or None; train.py shards it like the policy
    reference_to_save() / load_reference(model)
                                       weights alike on every process that a checkpoint must carry (GRPO's
                                       reference once synced), or None; train.py writes them once

    seq   next-token cross-entropy on every token (pretraining)
    sft   the same, only on assistant replies
    dpo   direct preference optimisation against a frozen copy of the initial model (Rafailov et al. 2023),
          optionally plus the chosen replies' next-token loss (rpo_alpha)
    grpo  group relative policy optimisation (Shao et al. 2024): sampled groups, PPO clip, k3 KL; DAPO's dynamic
          sampling, token-level loss and overlong shaping as settings
    distill  a student trained on a teacher's token distributions (KL at a temperature; distill.py)
    embed contrastive (InfoNCE, in-batch negatives) on query/passage pairs: pooled embeddings for retrieval (rag.py)
"""
import copy
import importlib
import math
import numbers
import os
import sys

import torch
import torch.nn.functional as F

from model import CrossEntropy, TokenLogprobs


class Strategy:
    """The defaults of the interface above."""

    data_stage = "seq"
    settings = {}  # {name: default}: none of its own
    ref_model = None  # a frozen reference; train.py shards it like the policy under FSDP when it is a module

    def __init__(self, cfg, model, tokenizer, rank=0, world_size=1):
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size

    def check_data(self, dataset):
        pass

    def normalizers(self, batch):
        return {"micro_batches": 1}

    def state_dict(self):
        return {}

    def load_state_dict(self, states):
        pass

    def reference_to_save(self):
        return None

    def load_reference(self, model):
        pass


# -----------------------------------------------------------------------------
# seq and sft: next-token cross-entropy where targets != -100


def scored_tokens(targets):
    return int((targets != -100).sum())


class NextToken(Strategy):
    """Pretraining (seq): every token is a target. SFT uses the same loss; data.py puts -100 on every
    target outside assistant replies, and pads each conversation into its own row (or, with pack=true, packs several
    into a row, the batch's `documents` keeping attention and positions within each). The loss is the mean
    over every scored token of the step: a token of a short reply weighs what one of a long reply does."""

    settings = dict(
        label_smoothing=0.0,  # this share of each target's probability spread over the whole vocabulary (0 = off)
    )

    def normalizers(self, batch):
        return {"tokens": scored_tokens(batch["targets"])}

    def loss(self, model, batch, step, micro_step=0, evaluating=False, totals=None):
        totals = totals or self.normalizers(batch)
        loss = model(batch["input_ids"], CrossEntropy(batch["targets"], self.cfg.label_smoothing),  # summed
                     documents=batch.get("documents"))  # packed rows (data.py, pack=true): None otherwise
        return loss / max(1, totals["tokens"]), {}


class SFT(NextToken):
    data_stage = "sft"


# -----------------------------------------------------------------------------
# pieces shared by dpo and grpo


def reference_model(model, cfg=None):
    """The reference policy: the model as it is now, in eval mode, never trained. A frozen copy; with LoRA
    (cfg.lora_rank) the model itself wrapped with its adapters switched off: the same, without a second copy."""
    if cfg is not None and cfg.get("lora_rank"):
        from lora import BaseModel

        return BaseModel(model)
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


# -----------------------------------------------------------------------------
# dpo: -log sigmoid(beta * (how much more the policy than the reference prefers chosen over rejected))


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Summed reply log-probs (B,) under the policy and the reference -> (losses (B,), margins (B,)).
    The margin is the implicit reward of chosen minus that of rejected, beta * log(policy / reference)
    each; when policy == reference it is 0 and the loss log 2 = 0.693."""
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margins), margins


class DPO(Strategy):
    """Batches hold chosen and rejected conversations padded to one width, targets -100 outside the reply.
    rpo_alpha > 0 adds that much of the chosen replies' next-token loss (RPO, Pang et al. 2024): plain DPO
    may lower the chosen replies' likelihood along with the rejected ones', which costs exact answers."""

    data_stage = "dpo"
    settings = dict(
        beta=0.1,  # strength of the implicit KL to the reference (smaller lets the policy drift further)
        rpo_alpha=0.0,  # weight of the chosen replies' next-token loss added to DPO's (RPO; 0 = plain DPO)
    )

    def __init__(self, cfg, model, tokenizer, rank=0, world_size=1):
        super().__init__(cfg, model, tokenizer, rank, world_size)
        if not cfg.beta > 0:
            raise ValueError(f"beta={cfg.beta}: must be > 0 (typical 0.1; smaller lets the policy drift further)")
        if cfg.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha={cfg.rpo_alpha}: must be >= 0 (0 = plain DPO)")
        self.beta, self.rpo_alpha = cfg.beta, cfg.rpo_alpha
        self.ref_model = reference_model(model, cfg)

    def normalizers(self, batch):
        return {"pairs": batch["chosen_ids"].size(0), "chosen_tokens": scored_tokens(batch["chosen_targets"])}

    def loss(self, model, batch, step, micro_step=0, evaluating=False, totals=None):
        totals = totals or self.normalizers(batch)
        B = batch["chosen_ids"].size(0)
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T): one forward for both sides
        targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
        token_logprobs = model(ids, TokenLogprobs(targets))  # (2B, T)
        policy = token_logprobs.sum(-1)  # (2B,)
        with torch.no_grad():
            ref = self.ref_model(ids, TokenLogprobs(targets)).sum(-1)
        losses, margins = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], self.beta)
        loss = losses.sum() / totals["pairs"]
        metrics = {
            "margin": margins.mean().item(),
            "pref_accuracy": (margins > 0).float().mean().item(),  # 0 at the start: policy == reference
            "chosen_reward": self.beta * (policy[:B] - ref[:B]).mean().item(),  # < 0: chosen replies unlearned too
            "rejected_reward": self.beta * (policy[B:] - ref[B:]).mean().item(),
            # both replies' log-probs falling while the margin grows: mass moves to replies in neither (displacement)
            "chosen_logp": policy[:B].mean().item(), "rejected_logp": policy[B:].mean().item(),
        }
        if self.rpo_alpha:
            chosen_nll = -token_logprobs[:B].sum() / max(1, totals["chosen_tokens"])  # a token mean, as sft's
            metrics["dpo_loss"] = losses.mean().item()  # log 2 = 0.693 at the start, as without rpo_alpha
            loss = loss + self.rpo_alpha * chosen_nll
        return loss, metrics


# -----------------------------------------------------------------------------
# grpo: the loss on groups of completions of one prompt


def group_advantages(rewards, eps=1e-4, scale=True):
    """rewards (B, G): G completions of each of B prompts -> (r - group mean) / (group std + eps),
    std with Bessel's correction (as TRL); scale=False: r - group mean (Dr. GRPO). A group whose rewards are all
    equal teaches nothing: 0."""
    if rewards.size(-1) < 2:
        return torch.zeros_like(rewards)
    centered = rewards - rewards.mean(-1, keepdim=True)
    return centered / (rewards.std(-1, keepdim=True) + eps) if scale else centered


def clipped_policy_loss(logprobs, old_logprobs, advantages, clip_eps):
    """PPO's per-token loss -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = p / p_old.
    Returns (loss, clipped): clipped marks tokens where the clip is in force (no gradient)."""
    ratio = (logprobs - old_logprobs).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.min(unclipped, clipped), clipped < unclipped


def k3_kl(logprobs, ref_logprobs):
    """Schulman's k3 estimate of KL(policy || reference) from tokens sampled from the policy:
    q/p - log(q/p) - 1 with q/p = reference / policy. Never negative; its expectation is the KL."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - log_ratio - 1


LOSS_NORMS = ("token", "sequence", "constant")


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps, kl_coef, norm="sequence",
              max_tokens=None):
    """(N, T) per-token log-probs of N completions, advantages (N,), mask (N, T) 1 on completion tokens ->
    (loss, kl per token (N, T), clipped (N, T)). Per token: clipped policy loss + kl_coef * k3 KL, then
    norm="sequence": averaged over each completion's tokens, then over completions (the GRPO paper's
    1/G sum_i 1/|o_i| sum_t: a token of a short completion weighs more than one of a long one); "token": summed
    over every completion token and divided by their count (DAPO: each token weighs alike); "constant": summed and
    divided by N * max_tokens (Dr. GRPO: no dependence on lengths at all)."""
    policy_loss, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages[:, None], clip_eps)
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = (policy_loss + kl_coef * kl) * mask
    if norm == "sequence":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif norm == "token":
        loss = per_token.sum() / mask.sum().clamp(min=1)
    elif norm == "constant":
        loss = per_token.sum() / (mask.size(0) * max_tokens)
    else:
        raise ValueError(f"norm={norm!r}: choose from {', '.join(LOSS_NORMS)}")
    return loss, kl, clipped


def overlong_rewards(rewards, lengths, finished, max_tokens, truncated, buffer, penalty):
    """Rewards (N,) of completions of lengths (N,) tokens (stop token included), finished (N,) True where the
    completion ended with a stop token before max_tokens. truncated="zero": an unfinished completion's reward is 0
    (its last number so far is not its answer); "grade": kept as the reward function gave it. buffer > 0: DAPO's
    soft overlong punishment, minus penalty * (length - (max_tokens - buffer)) / buffer over the last buffer
    tokens, the full penalty for an unfinished completion."""
    rewards = torch.where(finished, rewards, torch.zeros_like(rewards)) if truncated == "zero" else rewards.clone()
    if buffer > 0:
        over = ((lengths - (max_tokens - buffer)).clamp(min=0) / buffer).clamp(max=1)
        rewards = rewards - penalty * torch.where(finished, over, torch.ones_like(over))
    return rewards


# -----------------------------------------------------------------------------
# grpo rewards: (prompt, completion, record) -> float


def exact_answer(prompt, completion, record):
    """1 when the completion's final answer equals the record's "answer" (the check sample.py --eval uses)."""
    from tasks import answer_is_correct

    return float(answer_is_correct(completion, str(record["answer"])))


REWARDS = {"exact_answer": exact_answer}


def load_reward(name):
    """A built-in name from REWARDS or "module:function", importable from the working directory or PYTHONPATH."""
    if name in REWARDS:
        return REWARDS[name]
    module_name, _, function_name = name.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"reward={name!r}: expected a built-in ({', '.join(REWARDS)}) or module:function")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a missing module, or one that fails while importing
        raise ValueError(f"reward={name!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward={name!r}: module {module_name!r} ({module.__file__}) has no function "
                         f"{function_name!r}")
    return function


def check_reward(value, name, prompt, completion):
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"reward {name!r} returned {value!r} (a {type(value).__name__}) for completion "
                         f"{completion[:60]!r} of prompt {prompt[-60:]!r}; it must return a finite number")
    return float(value)


# -----------------------------------------------------------------------------
# grpo: rollouts, then PPO-style updates on them


def pack_completions(prompts, completions, pad_id, device):
    """Rows prompt + completion -> input_ids (N, T), targets (N, T): each completion token is the target
    at the position that predicts it; prompt and padding are -100. T = longest row - 1."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    targets = torch.full((len(prompts), width), -100, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        row = prompt + completion
        input_ids[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, len(prompt) - 1 : len(row) - 1] = torch.tensor(completion)
    return input_ids.to(device), targets.to(device)


class GRPO(Strategy):
    """Online (the .h5 holds prompts and answers): every ppo_epochs steps, sample group_size completions of
    each prompt of the batch from the current policy, score them with the reward and keep them with their
    sampling log-probs; that step and the next ppo_epochs - 1 train on them (their own batches are not
    used), so later epochs see a policy that has moved and the PPO clip matters. With dynamic_sampling, groups
    whose rewards are all equal (no advantage: every completion right, or every one wrong) are dropped and
    refilled from further prompts of the train split (DAPO, Yu et al. 2025). A completion that has not ended
    by the rollout length is rewarded 0 (truncated). Offline (the .h5 also holds responses and rewards): the same,
    on the stored responses, the old log-probs being the policy's own at first use, with no importance
    correction for the policy that wrote them.

    Val loss: online, minus the mean reward of greedy completions of the val prompts, EVAL_MAX_NEW_TOKENS long
    as every accuracy (tasks.py); offline, the loss. Resume is exact: a checkpoint holds each rank's cached
    rollouts and, once synced, the reference."""

    data_stage = "grpo"
    settings = dict(
        group_size=8,  # completions per prompt
        ppo_epochs=2,  # updates per rollout
        clip_eps=0.2,  # PPO ratio clip
        kl_coef=0.04,  # weight of the k3 KL to the reference
        sync_interval=0,  # copy the policy into the reference every N steps (0 = never)
        reward="exact_answer",  # built-in name or module:function(prompt, completion, record) -> float
        max_new_tokens=0,  # rollout length; 0 = from the data: block_size minus the train split's longest prompt
        rollout_temperature=1.0,  # sampling temperature of rollouts
        truncated="zero",  # a completion unfinished at max_new_tokens: zero = reward 0, grade = as the reward says
        overlong_buffer=0,  # > 0: DAPO's soft penalty over the last this many tokens before max_new_tokens
        overlong_penalty=1.0,  # that penalty at max_new_tokens (and on an unfinished completion)
        dynamic_sampling=True,  # drop groups whose rewards are all equal and refill from further prompts (DAPO)
        max_refills=2,  # extra rollouts of batch_size prompts a micro-batch may take to refill its groups
        loss_norm="token",  # token (DAPO) | sequence (the GRPO paper) | constant (Dr. GRPO): see grpo_loss
        scale_rewards=True,  # divide advantages by their group's std (false: Dr. GRPO's centred rewards)
    )

    def __init__(self, cfg, model, tokenizer, rank=0, world_size=1):
        super().__init__(cfg, model, tokenizer, rank, world_size)
        checks = [  # (setting is fine, what is wrong)
            (cfg.group_size >= 2, f"group_size={cfg.group_size} must be >= 2: advantages compare completions "
                                  "of one prompt"),
            (cfg.ppo_epochs >= 1, f"ppo_epochs={cfg.ppo_epochs} must be >= 1"),
            (cfg.clip_eps > 0, f"clip_eps={cfg.clip_eps} must be > 0 (typical 0.2)"),
            (cfg.kl_coef >= 0, f"kl_coef={cfg.kl_coef} must be >= 0"),
            (cfg.sync_interval >= 0, f"sync_interval={cfg.sync_interval} must be >= 0 (0 = never)"),
            (cfg.max_new_tokens >= 0, f"max_new_tokens={cfg.max_new_tokens} must be >= 1, or 0 = from the data"),
            (cfg.rollout_temperature > 0, f"rollout_temperature={cfg.rollout_temperature} must be > 0: greedy "
                                          "groups are all alike"),
            (cfg.truncated in ("zero", "grade"), f"truncated={cfg.truncated!r}: choose zero or grade"),
            (0 <= cfg.overlong_buffer < max(cfg.max_new_tokens, 1) or not cfg.max_new_tokens,
             f"overlong_buffer={cfg.overlong_buffer} must be >= 0 and < max_new_tokens={cfg.max_new_tokens}"),
            (cfg.overlong_penalty >= 0, f"overlong_penalty={cfg.overlong_penalty} must be >= 0"),
            (cfg.max_refills >= 0, f"max_refills={cfg.max_refills} must be >= 0"),
            (cfg.loss_norm in LOSS_NORMS, f"loss_norm={cfg.loss_norm!r}: choose from {', '.join(LOSS_NORMS)}"),
            (not (cfg.get("lora_rank") and cfg.sync_interval), f"sync_interval={cfg.sync_interval} with LoRA: the "
             "reference is the base model under the adapters, which never changes; use 0"),
            (world_size == 1 or cfg.parallel != "fsdp",
             "parallel=fsdp: grpo rolls out with the whole model on every rank; use parallel=ddp"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))
        self.reward_name = cfg.reward
        self.reward_fn = load_reward(self.reward_name)
        self.stop_ids = list(tokenizer.stop_ids)  # Tokenizer.load's: the model's generation_config ids too
        self.policy = model  # unwrapped: generate() runs on it, outside DDP
        self.ref_model = reference_model(model, cfg)
        self.rollouts = []  # one per micro-step of the step that made them
        self.synced_at = 0
        self.max_new_tokens = cfg.max_new_tokens  # 0: check_data sets it from the data
        self.dataset = None  # the train split (check_data): where dynamic sampling refills from

    def check_data(self, dataset):
        """Call the reward once on the first training record (its answer as the completion), so a reward
        that fails or returns a non-number stops the run before training, not at its first step. Sets the rollout
        length when max_new_tokens=0: the room block_size leaves after the longest prompt."""
        batch = dataset.get_batch([0])
        prompt, record = self.tokenizer.decode(batch["prompt_ids"][0]), batch["records"][0]
        try:
            value = self.reward_fn(prompt, batch["answers"][0], record)
        except Exception as e:
            raise ValueError(f"reward {self.reward_name!r} raised {type(e).__name__}: {e} on the first record "
                             f"of {dataset.files[0]} ({record})") from None
        check_reward(value, self.reward_name, prompt, batch["answers"][0])
        self.dataset = dataset
        if not self.cfg.max_new_tokens:
            longest = dataset.longest_prompt()
            self.max_new_tokens = self.cfg.block_size - longest
            if self.max_new_tokens <= self.cfg.overlong_buffer:
                raise ValueError(f"max_new_tokens=0 takes block_size={self.cfg.block_size} minus the longest prompt "
                                 f"of {dataset.files[0]} ({longest} tokens): {self.max_new_tokens} tokens, too few "
                                 f"(overlong_buffer={self.cfg.overlong_buffer}); raise block_size")

    # --- rollouts -------------------------------------------------------------

    @torch.no_grad()
    def sample_groups(self, prompts, records, seed):
        """group_size completions of each prompt -> (completions, sampling log-probs, rewards (B, G)). generate()
        puts the policy in eval mode; its mode before is restored (training's: dropout, checkpointing)."""
        from sample import generate

        if not self.max_new_tokens:
            raise ValueError("max_new_tokens=0 (from the data) needs check_data(train split) before a rollout")
        G, training = self.cfg.group_size, self.policy.training
        rows = [p for p in prompts for _ in range(G)]  # (B * G) rows, a group adjacent
        try:
            completions, logprobs = generate(self.policy, rows, self.max_new_tokens, stop_ids=self.stop_ids,
                                             temperature=self.cfg.rollout_temperature, seed=seed, return_logprobs=True)
        finally:
            self.policy.train(training)
        scores = torch.tensor([self.reward(prompt, completion, records[i // G])
                               for i, (prompt, completion) in enumerate(zip(rows, completions))])
        finished = torch.tensor([bool(c) and c[-1] in self.stop_ids for c in completions])
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        scores = overlong_rewards(scores, lengths, finished, self.max_new_tokens, self.cfg.truncated,
                                  self.cfg.overlong_buffer, self.cfg.overlong_penalty)
        return completions, logprobs, scores.view(-1, G), finished.float().mean().item()

    def refill_batch(self, step, micro_batch, refill, size):
        """A further batch of size prompts of the train split, picked by a generator seeded like the rollout."""
        generator = torch.Generator().manual_seed(self.cfg.seed + 1_000_003 * step + 7919 * micro_batch + refill)
        indices = torch.randint(len(self.dataset), (size,), generator=generator).tolist()
        return self.dataset.get_batch(indices)

    @torch.no_grad()
    def rollout(self, batch, step, micro_step):
        """Completions, rewards and advantages for one micro-batch, with the log-probs the loss compares to."""
        cfg, device = self.cfg, self.policy.lm_head.weight.device
        metrics = {}
        if "responses" in batch:  # offline: stored responses (each ends with <|im_end|>) and rewards
            prompts = [p for p, group in zip(batch["prompt_ids"], batch["responses"]) for _ in group]
            completions = [c for group in batch["responses"] for c in group]
            rewards = [torch.tensor(group, dtype=torch.float32) for group in batch["rewards"]]
            sample_logprobs = None  # the policy's own become the old log-probs at first use
        else:
            prompts, completions, sample_logprobs, rewards, metrics = self.online_groups(batch, step, micro_step)
        input_ids, targets = pack_completions(prompts, completions, self.tokenizer.eot_id or 0, device)
        old_logprobs = None
        if sample_logprobs is not None:
            old_logprobs = torch.zeros(targets.shape, device=device)  # (N, T), aligned with targets
            for i, (prompt, logprobs) in enumerate(zip(prompts, sample_logprobs)):
                old_logprobs[i, len(prompt) - 1:len(prompt) - 1 + len(logprobs)] = torch.tensor(logprobs)
        advantages = [group_advantages(r, scale=cfg.scale_rewards) for r in rewards]
        return {
            "input_ids": input_ids, "targets": targets, "old_logprobs": old_logprobs,
            "advantages": torch.cat(advantages).to(device),  # (N,)
            "reward_mean": metrics.pop("reward_mean", torch.cat(rewards).mean().item()),
            "reward_std": sum(r.std().item() if len(r) > 1 else 0.0 for r in rewards) / len(rewards),
            "tokens": sum(len(p) + len(c) - 1 for p, c in zip(prompts, completions)),
            "metrics": metrics,
        }

    def online_groups(self, batch, step, micro_step):
        """Sampled groups of one micro-batch: with dynamic_sampling, all-equal groups dropped and refilled from
        up to max_refills further batches, as many groups kept as the batch has prompts (all of them when none
        differs: they still carry the KL term). -> (prompts, completions, log-probs, rewards per group, metrics)."""
        cfg, G, B = self.cfg, self.cfg.group_size, len(batch["prompt_ids"])
        # seeded by step and global micro-batch: 2 ranks roll out what 1 rank does with grad_accum 2
        micro_batch = self.rank * cfg.grad_accum + micro_step
        seed = cfg.seed + 1_000_003 * step + 7919 * micro_batch
        groups, all_groups, refills, finished = [], [], 0, []
        while True:
            completions, logprobs, rewards, done = self.sample_groups(batch["prompt_ids"], batch["records"], seed)
            finished.append(done)
            for b, prompt in enumerate(batch["prompt_ids"]):
                group = (prompt, completions[b * G:(b + 1) * G], logprobs[b * G:(b + 1) * G], rewards[b])
                all_groups.append(group)
                if not cfg.dynamic_sampling or rewards[b].max() > rewards[b].min():
                    groups.append(group)
            if not cfg.dynamic_sampling or len(groups) >= B or refills >= cfg.max_refills or self.dataset is None:
                break
            refills += 1
            batch = self.refill_batch(step, micro_batch, refills, B)
            seed += 104_729 * refills
        sampled = torch.stack([g[3] for g in all_groups])  # (groups sampled, G)
        metrics = {"reward_mean": sampled.mean().item(), "kept_groups": len(groups) / len(all_groups),
                   "refills": refills, "finished": sum(finished) / len(finished)}
        groups = groups[:B] or all_groups[:B]
        return ([g[0] for g in groups for _ in range(G)], [c for g in groups for c in g[1]],
                [lp for g in groups for lp in g[2]], [g[3] for g in groups], metrics)

    def reward(self, prompt_ids, completion_ids, record):
        from sample import strip_stop

        prompt = self.tokenizer.decode(prompt_ids)
        # a model's vocab may be larger than its tokenizer's: ids past the tokenizer have no text
        completion_ids = [t for t in strip_stop(completion_ids, self.stop_ids) if t < self.tokenizer.vocab_size]
        completion = self.tokenizer.decode(completion_ids)
        return check_reward(self.reward_fn(prompt, completion, record), self.reward_name, prompt, completion)

    # --- the loss -------------------------------------------------------------

    def loss(self, model, batch, step, micro_step=0, evaluating=False, totals=None):
        """Each micro-batch's loss is its own mean (loss_norm: over its completion tokens, or completions), the
        step's the mean of these (totals: micro_batches)."""
        if evaluating:
            return self.val_loss(model, batch, step)
        cfg = self.cfg
        if cfg.sync_interval and step % cfg.sync_interval == 0 and step > self.synced_at:
            self.ref_model.load_state_dict(self.policy.state_dict())
            self.synced_at = step
        if step % cfg.ppo_epochs == 0 or micro_step >= len(self.rollouts):  # a new rollout
            if micro_step == 0:
                self.rollouts = []
            self.rollouts.append(self.rollout(batch, step, micro_step))
        rollout = self.rollouts[micro_step]

        mask = (rollout["targets"] != -100).float()
        logprobs = model(rollout["input_ids"], TokenLogprobs(rollout["targets"], cfg.rollout_temperature))
        if rollout["old_logprobs"] is None:
            rollout["old_logprobs"] = logprobs.detach()
        loss, kl, clipped = grpo_loss(logprobs, rollout["old_logprobs"], self.reference_logprobs(rollout),
                                      rollout["advantages"], mask, cfg.clip_eps, cfg.kl_coef, cfg.loss_norm,
                                      self.max_new_tokens or mask.size(1))
        loss = loss / (totals or {"micro_batches": 1})["micro_batches"]
        n_tokens = mask.sum().clamp(min=1)
        return loss, {
            "reward_mean": rollout["reward_mean"],
            "reward_std": rollout["reward_std"],  # within groups; 0 everywhere means no learning signal
            "kl": ((kl * mask).sum() / n_tokens).item(),
            "clip_fraction": ((clipped.float() * mask).sum() / n_tokens).item(),
            "completion_tokens": (mask.sum() / mask.size(0)).item(),  # mean completion length
            "tokens": rollout["tokens"],
            **rollout.get("metrics", {}),  # online: kept_groups, refills, finished (share that reached a stop)
        }

    @torch.no_grad()
    def reference_logprobs(self, rollout):
        """Each step anew, not cached with the rollout: the reference may have been re-synced since."""
        return self.ref_model(rollout["input_ids"], TokenLogprobs(rollout["targets"], self.cfg.rollout_temperature))

    @torch.no_grad()
    def val_loss(self, model, batch, step):
        from sample import EVAL_MAX_NEW_TOKENS, generate

        if "responses" in batch:
            rollout = self.rollout(batch, step, 0)
            mask = (rollout["targets"] != -100).float()
            logprobs = model(rollout["input_ids"], TokenLogprobs(rollout["targets"], self.cfg.rollout_temperature))
            loss, _, _ = grpo_loss(logprobs, logprobs, self.reference_logprobs(rollout), rollout["advantages"], mask,
                                   self.cfg.clip_eps, self.cfg.kl_coef, self.cfg.loss_norm, mask.size(1))
            return loss, {}
        training = self.policy.training
        try:  # the accuracy's greedy replies, as long as sample.py --eval's and pipeline.py's
            completions = generate(self.policy, batch["prompt_ids"], EVAL_MAX_NEW_TOKENS, temperature=0.0,
                                   stop_ids=self.stop_ids, vocab_size=self.tokenizer.vocab_size)
        finally:
            self.policy.train(training)
        rewards = [self.reward(*row) for row in zip(batch["prompt_ids"], completions, batch["records"])]
        return torch.tensor(-sum(rewards) / len(rewards)), {}

    # --- resume ---------------------------------------------------------------

    def state_dict(self):
        """What resuming mid-way through ppo_epochs or sync_interval needs (train.py saves it per process). Rollouts
        are keyed by global micro-batch (rank * grad_accum + micro_step), as their data and seeds are."""
        first = self.rank * self.cfg.grad_accum
        return {"synced_at": self.synced_at, "rollouts": {first + m: r for m, r in enumerate(self.rollouts)}}

    def load_state_dict(self, states):
        rollouts = {k: v for state in states for k, v in state["rollouts"].items()}
        first = self.rank * self.cfg.grad_accum
        self.synced_at = states[0]["synced_at"]
        device = self.policy.lm_head.weight.device  # saved from the CPU
        self.rollouts = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in rollouts[first + m].items()}
                         for m in range(self.cfg.grad_accum) if first + m in rollouts]

    def reference_to_save(self):
        """Once synced, the reference is the policy of step synced_at, no longer on disk elsewhere."""
        return self.ref_model if self.synced_at else None

    def load_reference(self, model):
        self.ref_model.load_state_dict(model.state_dict())


# -----------------------------------------------------------------------------
# distill: the student learns the teacher's token distributions over the replies (distill.py does the work)


class Distill(Strategy):
    """SFT data (targets -100 outside the replies); at each scored position, the KL between the teacher's and the
    student's next-token distributions at a temperature (distill.py), plus ce_weight times the next-token loss. A
    mean over the step's scored tokens, as sft's. The teacher is any model the project loads with the student's
    tokenizer (checked at start); the student may be LoRA-adapted (--lora_rank)."""

    data_stage = "sft"
    settings = dict(
        teacher="",  # the teacher: a MODELDIR, Hugging Face directory or .gguf file with the student's tokenizer
        kl="forward",  # forward = KL(teacher || student), mass-covering; reverse = KL(student || teacher)
        distill_temperature=1.0,  # both distributions softened by it; the KL is scaled by its square
        ce_weight=0.0,  # weight of the next-token (sft) loss added to the KL (0 = the teacher's distributions only)
    )

    def __init__(self, cfg, model, tokenizer, rank=0, world_size=1):
        super().__init__(cfg, model, tokenizer, rank, world_size)
        from distill import KL_KINDS, load_teacher

        checks = [(bool(cfg.teacher), "teacher= is required: the model whose distributions the student learns"),
                  (cfg.kl in KL_KINDS, f"kl={cfg.kl!r}: choose from {', '.join(KL_KINDS)}"),
                  (cfg.distill_temperature > 0, f"distill_temperature={cfg.distill_temperature} must be > 0"),
                  (cfg.ce_weight >= 0, f"ce_weight={cfg.ce_weight} must be >= 0 (0 = KL only)")]
        if problems := [message for ok, message in checks if not ok]:
            raise ValueError("; ".join(problems))
        try:
            self.teacher = load_teacher(cfg.teacher, tokenizer, model.lm_head.weight.device)
        except OSError as e:
            raise ValueError(f"teacher={cfg.teacher}: {e}") from None

    def normalizers(self, batch):
        return {"tokens": scored_tokens(batch["targets"])}

    def loss(self, model, batch, step, micro_step=0, evaluating=False, totals=None):
        from distill import distill_losses

        totals = totals or self.normalizers(batch)
        cfg, n = self.cfg, max(1, totals["tokens"])
        kl, ce = distill_losses(model, self.teacher, batch, self.tokenizer.vocab_size, cfg.kl,
                                cfg.distill_temperature, cfg.ce_weight > 0) / n
        metrics = {"kl": kl.item() * n / max(1, scored_tokens(batch["targets"]))}
        if cfg.ce_weight:
            metrics["ce"] = ce.item() * n / max(1, scored_tokens(batch["targets"]))
        return kl + cfg.ce_weight * ce, metrics


# -----------------------------------------------------------------------------
# embed: contrastive pairs for retrieval (rag.py does the work)


class Embed(Strategy):
    """Contrastive training of the pooled embeddings rag.py retrieves with: InfoNCE on query/passage pairs (data.py
    prepare --stage=embed), each query's own passage against the other passages of the micro-batch, under DDP those
    of every process's micro-batch (gathered with their gradients: the loss is one process's on the joined batch)."""
    data_stage = "embed"
    settings = dict(
        embed_temperature=0.05,  # divides the cosines before the softmax (0.05 as E5 and GTE train)
        pooling="mean",  # mean or last: what data.py index --pooling will use
    )

    def normalizers(self, batch):
        return {"pairs": batch["lengths"].size(0) // 2}

    def loss(self, model, batch, step, micro_step=0, evaluating=False, totals=None):
        from rag import Pooled, info_nce

        totals = totals or self.normalizers(batch)
        vectors = model(batch["ids"], Pooled(batch["lengths"], self.cfg.pooling))  # (2B, dim): queries, passages
        B = vectors.size(0) // 2
        queries, passages = vectors[:B], vectors[B:]
        if self.world_size > 1 and not evaluating:  # (validation: every process has the same batch)
            from torch.distributed.nn.functional import all_gather  # backward sums each rank's gradient to its own

            queries, passages = torch.cat(all_gather(queries)), torch.cat(all_gather(passages))  # (world * B, dim)
        loss, accuracy = info_nce(queries, passages, self.cfg.embed_temperature)
        return loss * B / totals["pairs"], {"accuracy": accuracy, "tokens": float(batch["lengths"].sum())}


STRATEGIES = {"seq": NextToken, "sft": SFT, "dpo": DPO, "grpo": GRPO, "distill": Distill, "embed": Embed}
