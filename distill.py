"""
Distillation (`--strategy=distill`, strategies.Distill): a student trained on a teacher model's token
distributions over the replies of SFT data (Hinton et al. 2015; for language models, Kim & Rush 2016 and
MiniLLM's reverse KL, Gu et al. 2024). Imported only when that strategy runs.

    python train.py configs/distill.py --teacher=out/sft/final --init_from=scratch ...

At each scored position t (a target != -100), with p = softmax(teacher logits / T), q = softmax(student logits / T):

    kl=forward   T^2 * KL(p || q) = T^2 * sum_v p_v (log p_v - log q_v)     (mass-covering: the usual choice)
    kl=reverse   T^2 * KL(q || p) = T^2 * sum_v q_v (log q_v - log p_v)     (mode-seeking)

(T^2 keeps the gradient's size independent of T), plus ce_weight times the next-token loss at temperature 1.
Logits are made `head_chunk_rows` positions at a time, the teacher's and the student's side by side, and the
student's are recomputed in backward: never (tokens x vocabulary) floats for the whole batch.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import head_chunk_rows

KL_KINDS = ("forward", "reverse")


def token_kl(student_logits, teacher_logits, kind="forward", temperature=1.0):
    """(N, V) logits each -> (N,) T^2 * KL at temperature T, per position (see the module's docstring)."""
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
    if kind == "forward":
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse":
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        raise ValueError(f"kl={kind!r}: choose from {', '.join(KL_KINDS)}")
    return kl * temperature ** 2


class NormedHidden:
    """A Transformer output (model.py's Logits, TokenLogprobs...): the final-norm hidden states (B, T, dim)."""

    def __call__(self, model, hidden, index):
        return model.norm(hidden)


class DistillLoss:
    """A Transformer output: summed (T^2-scaled KL, next-token loss) over the positions where targets != -100, the
    student's head (model.lm_head, LoRA's too) and the teacher's applied chunk by chunk to the final-norm hidden
    states; both over the tokenizer's vocab_size ids (a padded head's extra rows have no text)."""

    def __init__(self, teacher, teacher_hidden, targets, vocab_size, kind, temperature, with_ce):
        self.teacher, self.teacher_hidden, self.targets = teacher, teacher_hidden, targets
        self.vocab_size, self.kind, self.temperature, self.with_ce = vocab_size, kind, temperature, with_ce

    def chunk_losses(self, student_head, hidden, teacher_hidden, targets):
        student = student_head(hidden)[:, :self.vocab_size]  # (chunk, V)
        with torch.no_grad():
            teacher = self.teacher.lm_head(teacher_hidden)[:, :self.vocab_size]  # (chunk, V), recomputed in backward
        kl = token_kl(student, teacher, self.kind, self.temperature).sum()
        ce = F.cross_entropy(student.float(), targets, reduction="sum") if self.with_ce else torch.zeros_like(kl)
        return torch.stack([kl, ce])

    def __call__(self, model, hidden, index):
        scored = (self.targets != -100).flatten()
        hidden = model.norm(hidden).flatten(0, 1)[scored]  # (N, dim): only the scored positions
        teacher_hidden = self.teacher_hidden.flatten(0, 1)[scored]  # (N, teacher dim)
        targets, chunk = self.targets.flatten()[scored], head_chunk_rows(self.vocab_size)
        total = hidden.new_zeros(2, dtype=torch.float32)
        for i in range(0, hidden.size(0), chunk):
            total = total + checkpoint(self.chunk_losses, model.lm_head, hidden[i:i + chunk],
                                       teacher_hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
        return total  # (2,): summed KL, summed next-token loss


def load_teacher(path, tokenizer, device):
    """The teacher (eval mode, frozen) from any model this project loads (a MODELDIR, a Hugging Face directory or a
    .gguf file), refused unless its tokenizer is the student's: the same ids must mean the same text."""
    from sample import load

    teacher, teacher_tokenizer = load(path, device=device)
    if teacher_tokenizer.hash != tokenizer.hash:
        raise ValueError(f"teacher={path}: its tokenizer (hash {teacher_tokenizer.hash[:12]}, "
                         f"{teacher_tokenizer.vocab_size} tokens) is not the student's (hash {tokenizer.hash[:12]}, "
                         f"{tokenizer.vocab_size} tokens); distillation compares distributions over the same ids")
    teacher.requires_grad_(False)
    return teacher


def distill_losses(model, teacher, batch, vocab_size, kind, temperature, with_ce):
    """(summed KL, summed next-token loss) over the batch's scored positions; model may be DDP-wrapped (one call)."""
    with torch.no_grad():
        teacher_hidden = teacher(batch["input_ids"], NormedHidden(), documents=batch.get("documents"))
    output = DistillLoss(teacher, teacher_hidden, batch["targets"], vocab_size, kind, temperature, with_ce)
    return model(batch["input_ids"], output, documents=batch.get("documents"))
