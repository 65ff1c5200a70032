"""
LoRA (Hu et al. 2021): train a low-rank update beside chosen linear layers of a frozen model and keep only the
update. A layer computes W x + scaling * B A dropout(x), A (r, in) random, B (out, r) zero, so training starts
from exactly the base model; scaling = lora_alpha / r (lora_alpha / sqrt(r) with peft's use_rslora).

    python train.py configs/sft.py --lora_rank=8                       # final/: the adapter
    python sample.py --model=out/demo/final --adapter=out/sft/final    # merged into the weights on load

An adapter directory is what peft writes, adapter_config.json + adapter_model.safetensors with transformers'
names (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight), so peft.PeftModel.from_pretrained
loads ours on the transformers model and ours load peft's. base_model.json adds the base MODELDIR's path and the
sha256 of its weight files: an adapter means something only on the weights it was trained on.
"""
import hashlib
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

# what lora_targets' words "attention" and "mlp" stand for: every linear layer of model.py's blocks but kv_b_proj,
# whose weight MLA decoding reads directly (absorbed into the query and output), past any adapter
KINDS = {"attention": ".self_attn.", "mlp": ".mlp."}
TOKEN_ROWS = "embed_tokens.token_adapter.rows"  # TokenRows' values, our name
PEFT_TOKEN_ROWS = "embed_tokens.token_adapter.trainable_tokens_delta"  # and peft's, in adapter files
UNADAPTABLE = {"kv_b_proj": "MLA decoding reads its weight directly (model.py), so an adapter there would be "
                            "skipped in generation"}


class LoRALinear(nn.Linear):
    """A linear layer's own weight and bias (frozen, names unchanged: q_proj.weight) plus lora_A and lora_B."""

    def __init__(self, base, rank, scaling, dropout=0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling, self.enabled = scaling, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def target_names(model, targets):
    """lora_targets, comma-separated words ("attention", "mlp") or layer names ("q_proj", "self_attn.o_proj",
    "lm_head"), -> the names of the linear layers to adapt, in model order."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = set()
    for target in [t.strip() for t in targets.split(",") if t.strip()]:
        if target == "mlp" and getattr(model.config, "n_experts", 0):
            raise ValueError("lora_targets: mlp on a mixture-of-experts model: its routed experts (mlp.experts, "
                             "stacked weights) take no adapter here; adapt attention, or name the dense layers' and "
                             "shared experts' projections (gate_proj, up_proj, down_proj)")
        if target in KINDS:
            hits = [n for n in linears if KINDS[target] in "." + n and n.rsplit(".", 1)[-1] not in UNADAPTABLE]
        else:
            hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            known = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"lora_targets: {target!r} matches no linear layer; choose from attention, mlp, {known}")
        chosen.update(hits)
    for name in chosen:
        if name.rsplit(".", 1)[-1] in UNADAPTABLE:
            raise ValueError(f"lora_targets: {name} cannot be adapted: {UNADAPTABLE[name.rsplit('.', 1)[-1]]}")
        if name == "lm_head" and model.config.tie_weight:
            raise ValueError("lora_targets: lm_head shares its weight with embed_tokens (tie_weight); merging an "
                             "adapter into it would change the embeddings too")
    if not chosen:
        raise ValueError(f"lora_targets={targets!r}: no layer chosen")
    return [n for n in linears if n in chosen]


class TokenRows(nn.Module):
    """peft's trainable tokens (LoraConfig's trainable_token_indices): new values for some rows of the token
    embedding, and of the output head when it shares that weight. Tokens a base model never saw (a chat template's
    <|im_end|> on a plain-text base) end pretraining with nearly identical rows, which attention and MLP adapters
    cannot tell apart; these rows let LoRA teach them. `rows` holds the rows' values (not a difference from the
    base's), as peft's trainable_tokens_delta does (the name in its files: peft_name)."""

    def __init__(self, weight, ids):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        self.rows = nn.Parameter(weight.detach()[self.ids].clone())
        self.enabled = True

    def merged(self, weight):
        """weight (vocab, dim) with the trained rows in place (weight itself when switched off): the chunked
        head's weight in training, where the weight's gradient is as large anyway."""
        if not self.enabled:
            return weight
        return weight.index_copy(0, self.ids, self.rows.to(weight.dtype))

    def embed(self, x, weight):
        """F.embedding(x, merged(weight)) without copying the embedding (a decode step reads a few rows)."""
        y = F.embedding(x, weight)
        if not self.enabled:
            return y
        hits = x[..., None] == self.ids  # (..., tokens)
        return torch.where(hits.any(-1, keepdim=True), hits.to(y.dtype) @ self.rows.to(y.dtype), y)

    def logits(self, x, weight):
        """F.linear(x, merged(weight)) without copying the head: its logits, the trained rows' columns replaced."""
        y = F.linear(x, weight)
        if not self.enabled:
            return y
        return y.index_copy(-1, self.ids, F.linear(x, self.rows.to(x.dtype)).to(y.dtype))


class TokenEmbedding(nn.Embedding):
    """The token embedding's frozen weight (name unchanged: embed_tokens.weight) plus token_adapter, a TokenRows."""

    def __init__(self, base, ids):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.weight = base.num_embeddings, base.embedding_dim, base.weight
        self.padding_idx, self.max_norm = None, None  # (nn.Embedding's repr reads them)
        self.token_adapter = TokenRows(base.weight, ids)

    def forward(self, x):
        return self.token_adapter.embed(x, self.weight)


class TokenHead(nn.Linear):
    """A tied output head with the embedding's trained rows: head_weight() is what model.py's score() multiplies."""

    def __init__(self, base, rows):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, None
        self.rows = [rows]  # a list, not a submodule: the parameter is the embedding's, saved once under its name

    def head_weight(self):
        return self.rows[0].merged(self.weight)

    def forward(self, x):
        return self.rows[0].logits(x, self.weight)


def add_token_rows(model, ids):
    """Train the rows of these token ids (embedding, and the head when tied) beside the adapters."""
    model.embed_tokens = TokenEmbedding(model.embed_tokens, ids)
    if model.config.tie_weight:
        model.lm_head = TokenHead(model.lm_head, model.embed_tokens.token_adapter)


def parse_tokens(tokens, tokenizer, vocab_size):
    """lora_tokens, comma-separated token strings ("<|im_start|>,<|im_end|>", each one token of the tokenizer
    with special tokens read as such) or ids, -> sorted ids."""
    ids = set()
    for token in (t.strip() for t in tokens.split(",") if t.strip()):
        found = [int(token)] if token.isdigit() else tokenizer.encode_with_special(token)
        if len(found) != 1:
            raise ValueError(f"lora_tokens: {token!r} is {len(found)} tokens of the tokenizer, not one")
        if not 0 <= found[0] < vocab_size:
            raise ValueError(f"lora_tokens: id {found[0]} is past the model's {vocab_size} embedding rows")
        ids.add(found[0])
    return sorted(ids)


def add_adapters(model, names, rank, scaling, dropout=0.0):
    """Replace each named linear layer by a LoRALinear around it, in place; the caller freezes the rest."""
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, scaling, dropout))


def adapter_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model):
    layers = adapter_layers(model) + [m for m in model.modules() if isinstance(m, TokenRows)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


class BaseModel:
    """DPO's and GRPO's reference under LoRA: the policy's own module called with its adapters switched off, the
    base model it started from, without a second copy of the weights (TRL does the same)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)


# -----------------------------------------------------------------------------
# peft's format: adapter_config.json + adapter_model.safetensors, and base_model.json


def peft_name(name):
    """our parameter name -> peft's on the transformers model (model.py saves ours under "model." but lm_head)."""
    name = name.replace(TOKEN_ROWS, PEFT_TOKEN_ROWS)
    return "base_model.model." + (name if name.startswith("lm_head") else "model." + name)


def our_name(key):
    return key.removeprefix("base_model.model.").removeprefix("model.").replace(PEFT_TOKEN_ROWS, TOKEN_ROWS)



def weights_hash(model_dir):
    """sha256 of a MODELDIR's safetensors weight files, in name order (of a .gguf file: the file)."""
    if str(model_dir).endswith(".gguf"):
        model_dir, files = os.path.dirname(model_dir), [os.path.basename(model_dir)]
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights to adapt")
    digest = hashlib.sha256()
    for name in files:
        with open(os.path.join(model_dir, name), "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def peft_config(names, rank, alpha, dropout, base_path, n_layers, tokens=()):
    """adapter_config.json. target_modules as "self_attn.q_proj"-style suffixes when the same layers are adapted in
    each of the n_layers blocks, else as full transformers names (peft matches a suffix in every block); tokens:
    the ids of trained embedding rows (TokenRows)."""
    suffixes = sorted({".".join(n.split(".")[-2:]) if "." in n else n for n in names})
    exact = len(names) == sum(n_layers if s != "lm_head" else 1 for s in suffixes)
    targets = suffixes if exact else [peft_name(n).removeprefix("base_model.model.") for n in names]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": rank,
            "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
            "trainable_token_indices": list(tokens) or None}


def save_adapter(path, state, config, base=None):
    """Write state ({our name: lora_A/lora_B weight}) and config into path in peft's format, plus
    base_model.json ({"path", "sha256"}) when base is given."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {peft_name(k): v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if base:
        with open(os.path.join(path, "base_model.json"), "w") as f:
            json.dump(base, f, indent=2)


def read_adapter(path):
    """(config, {our name: tensor}, scaling) of an adapter directory, ours or peft's (LoRA without DoRA, biases
    or extra saved modules, one rank and alpha for every layer)."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    for file in (config_path, weights_path):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: missing (an adapter directory holds adapter_config.json and "
                                    "adapter_model.safetensors)")
    with open(config_path) as f:
        config = json.load(f)
    unsupported = {"peft_type": config.get("peft_type") != "LORA", "use_dora": config.get("use_dora"),
                   "bias": config.get("bias", "none") != "none", "modules_to_save": config.get("modules_to_save"),
                   "fan_in_fan_out": config.get("fan_in_fan_out"), "rank_pattern": config.get("rank_pattern"),
                   "alpha_pattern": config.get("alpha_pattern")}
    wrong = [f"{k}={config.get(k)!r}" for k, bad in unsupported.items() if bad]
    if wrong:
        raise ValueError(f"{config_path}: {', '.join(wrong)} is not supported (plain LoRA only)")
    state = {our_name(k): v for k, v in load_file(weights_path).items()}
    bad = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight")) and k != TOKEN_ROWS]
    tokens = config.get("trainable_token_indices") or []
    if isinstance(tokens, dict):  # peft's {"embed_tokens": [...]} form; other modules' rows are not supported
        bad += [f"trainable_token_indices of {k}" for k in tokens if k != "embed_tokens"]
        tokens = tokens.get("embed_tokens", [])
    rows = state.get(TOKEN_ROWS)
    if (rows is None) != (not tokens) or rows is not None and rows.shape[0] != len(tokens):
        bad.append(f"{0 if rows is None else rows.shape[0]} trained token rows, {len(tokens)} trainable_token_indices")
    config["trainable_token_indices"] = tokens
    layers = {k.rsplit(".", 2)[0] for k in state if k != TOKEN_ROWS}
    bad += [f"{n} lacks lora_A or lora_B" for n in layers if {n + ".lora_A.weight", n + ".lora_B.weight"} - set(state)]
    bad += [f"{n}: rank {state[n + '.lora_A.weight'].shape[0]}, r={config['r']} in adapter_config.json"
            for n in layers if n + ".lora_A.weight" in state and state[n + ".lora_A.weight"].shape[0] != config["r"]]
    if bad or not state:
        raise ValueError(f"{weights_path}: not a LoRA adapter of rank {config['r']}: {'; '.join(bad[:4]) or 'empty'}")
    rank = config["r"]
    return config, state, config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)


def check_base(adapter_dir, base_dir):
    """An adapter with base_model.json (ours) must sit on the weights it was trained on; peft's carry no hash."""
    recorded = os.path.join(adapter_dir, "base_model.json")
    if not os.path.isfile(recorded):
        return
    with open(recorded) as f:
        base = json.load(f)
    actual = weights_hash(base_dir)
    if base["sha256"] != actual:
        raise ValueError(f"{adapter_dir} was trained on {base['path']} (weights sha256 {base['sha256'][:12]}), "
                         f"but the base model given, {base_dir}, has different weights (sha256 {actual[:12]})")


def load_adapter(model, path):
    """Add the adapter of an adapter directory to the model as LoRALinear layers (not merged); returns the model."""
    config, state, scaling = read_adapter(path)
    names = sorted({k.rsplit(".", 2)[0] for k in state if k != TOKEN_ROWS})
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"{path}: the adapter has layers the model lacks: {missing[:4]}")
    for name in names:  # merge_adapter can take these; as unmerged layers they would be skipped in decoding
        if name.rsplit(".", 1)[-1] in UNADAPTABLE:
            raise ValueError(f"{path}: {name} cannot be an unmerged adapter layer: merge it (merge_adapter)")
    add_adapters(model, names, config["r"], scaling)
    if config["trainable_token_indices"]:
        add_token_rows(model, config["trainable_token_indices"])
    model.load_state_dict(state, strict=False)
    return model


def merged_weights(weights, adapter, scaling, where="adapter", tokens=()):
    """{name.weight: W + scaling * B @ A} for every layer of the adapter (our names), computed in float64 and
    returned in W's dtype, and the embedding with the trained rows of these token ids in place; weights is a state
    dict of the base model (not changed)."""
    merged = {}
    if tokens:
        embedding = weights["embed_tokens.weight"]
        rows = torch.tensor(tokens, device=embedding.device)
        merged["embed_tokens.weight"] = embedding.index_copy(0, rows, adapter[TOKEN_ROWS].to(embedding))
    for name in sorted({k.rsplit(".", 2)[0] for k in adapter if k != TOKEN_ROWS}):
        w, a, b = weights.get(name + ".weight"), adapter[name + ".lora_A.weight"], adapter[name + ".lora_B.weight"]
        check_layer(name, None if w is None else w.shape, a, b, where)
        merged[name + ".weight"] = (w.double() + scaling * (b.double() @ a.double())).to(w.dtype)
    return merged


def check_layer(name, shape, a, b, where):
    """An adapter layer's lora_A and lora_B against the model's weight shape there (None: no such layer)."""
    if shape is None or tuple(shape) != (b.shape[0], a.shape[1]):
        found = "no such layer" if shape is None else f"weight {tuple(shape)}"
        raise ValueError(f"{where}: {name} is {tuple(b.shape[0:1] + a.shape[1:])} in the adapter; the model has "
                         f"{found}")


def merge_adapter(model, adapter_dir, base_dir=None):
    """Merge an adapter directory into a loaded model's weights, so it runs at the base model's speed. base_dir: the
    base MODELDIR, checked against the adapter's base_model.json. (sample.py's and serve.py's --adapter merge as the
    model loads: merging.)"""
    if base_dir:
        check_base(adapter_dir, base_dir)
    config, adapter, scaling = read_adapter(adapter_dir)
    with torch.no_grad():
        for name, weight in merged_weights(model.state_dict(), adapter, scaling, adapter_dir,
                                           config["trainable_token_indices"]).items():
            model.get_parameter(name).copy_(weight)
    return model


def merging(adapter_dir, base_dir, shapes):
    """merge(name, weight) -> the weight with the adapter merged in (float32 at least), for
    Transformer.from_pretrained's adapter=: each weight merged as it loads, before any quantization. shapes: {name:
    shape} of the model's weights, which the adapter is checked against first; base_dir as merge_adapter's."""
    check_base(adapter_dir, base_dir)
    config, adapter, scaling = read_adapter(adapter_dir)
    tokens = config["trainable_token_indices"]
    layers = {k.rsplit(".", 2)[0] for k in adapter if k != TOKEN_ROWS}
    for name in sorted(layers):
        check_layer(name, shapes.get(name + ".weight"), adapter[name + ".lora_A.weight"],
                    adapter[name + ".lora_B.weight"], adapter_dir)

    def merge(name, weight):
        layer = name.removesuffix(".weight")
        if layer not in layers and not (tokens and name == "embed_tokens.weight"):
            return weight
        part = {k: v for k, v in adapter.items() if k.startswith(layer + ".lora_") or k == TOKEN_ROWS}
        # float32 at least: a bfloat16 file loaded as float32 keeps the merge's precision, as merge_adapter would
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        row_ids = tokens if layer == "embed_tokens" else ()
        return merged_weights({name: weight}, part, scaling, adapter_dir, row_ids)[name]

    return merge


# -----------------------------------------------------------------------------
# training: train.py's --lora_* settings


class TrainingAdapter:
    """The adapters of a training run: added to the model (frozen but for them) from train.py's settings, and
    written to / read from checkpoint directories with the base model's path and weights hash."""

    def __init__(self, model, cfg, tokenizer):
        problems = [msg for ok, msg in [
            (cfg.init_from != "scratch", "LoRA adapts an existing model: pass --init_from=MODELDIR"),
            (cfg.lora_alpha > 0, f"lora_alpha={cfg.lora_alpha} must be > 0 (typical: 2 * lora_rank)"),
            (0 <= cfg.lora_dropout < 1, f"lora_dropout={cfg.lora_dropout} must be in [0, 1)"),
            (cfg.lora_rank > 0, f"lora_rank={cfg.lora_rank} must be > 0")] if not ok]
        if problems:
            raise ValueError("; ".join(problems))
        names = target_names(model, cfg.lora_targets)
        self.tokens = parse_tokens(cfg.lora_tokens, tokenizer, model.config.vocab_size)
        self.scaling = cfg.lora_alpha / cfg.lora_rank
        model.requires_grad_(False)
        add_adapters(model, names, cfg.lora_rank, self.scaling, cfg.lora_dropout)
        if self.tokens:
            add_token_rows(model, self.tokens)
        base_path = os.path.abspath(cfg.init_from)
        self.base = {"path": base_path, "sha256": weights_hash(base_path)}
        self.config = peft_config(names, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, base_path,
                                  model.config.n_layers, self.tokens)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def save(self, path, state, merge=False, model=None, token_ids=None):
        """state: the adapter's weights (merge=False), or the whole model's, adapters included (merge=True: write a
        plain MODELDIR with them merged in, through model.save_pretrained)."""
        if not merge:  # (ignore_frozen_params may still hand back a tied weight)
            save_adapter(path, {k: state[k] for k in self.names}, self.config, self.base)
            return
        adapter = {k: state[k] for k in self.names}
        weights = {k: v for k, v in state.items() if k not in adapter}
        merged = merged_weights(weights, adapter, self.scaling, tokens=self.tokens)
        model.save_pretrained(path, state_dict={**weights, **merged}, token_ids=token_ids)

    def load(self, path):
        """The adapter weights of a checkpoint of this run, refused when its base model is not this run's."""
        if not os.path.isfile(os.path.join(path, "base_model.json")):
            raise ValueError(f"{path} is not a LoRA checkpoint (no base_model.json): resume it without --lora_rank")
        with open(os.path.join(path, "base_model.json")) as f:
            base = json.load(f)
        if base["sha256"] != self.base["sha256"]:
            raise ValueError(f"{path} holds an adapter of {base['path']} (weights sha256 {base['sha256'][:12]}); "
                             f"--init_from={self.base['path']} has different weights (sha256 "
                             f"{self.base['sha256'][:12]}): resume with the base the adapter was trained on")
        config, state, _ = read_adapter(path)
        if sorted(state) != sorted(self.names) or config["r"] != self.config["r"] or \
                config["trainable_token_indices"] != self.tokens:
            raise ValueError(f"{path}: its adapter has other layers, rank or token rows than --lora_rank, "
                             "--lora_targets and --lora_tokens give")
        return state
