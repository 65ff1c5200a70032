"""
Settings for every script and model preset, read one way: a script's table of defaults (a comment per key),
then config files (plain Python assignments, in the order given), then `--key=value` or `--key value`.

    cfg = load_settings(DEFAULTS, sys.argv[1:])    # cfg.lr, cfg.max_iters, ...

One type rule: a value takes its default's type. A config file may give an int where the default is a float;
the command line converts text (true/false/1/0/yes/no for booleans, a bare --flag is true). A None default is
an optional table (ModelConfig.rope_scaling): None or a dict, given on the command line as JSON; its owner checks
what is in it. An unknown key or a value of the wrong type is an error naming the key, the value and the file it
came from. Beside them, what every command shares: the device and dtype it runs on (pick_device) and how it ends
under torchrun (exit_torchrun).
"""
import json
import os
import sys
import types

import torch


class Settings(dict):
    """A dict whose keys read as attributes: cfg.lr is cfg["lr"]."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no setting {key!r}") from None

    def __setattr__(self, key, value):
        self[key] = value


def write_jsonl(path, records):
    """records as jsonl at path, written to path.tmp first and moved into place: a stopped run leaves no half file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.replace(path + ".tmp", path)


def run_config_file(path):
    """The assignments of a config file (a plain Python file): every name but modules and those starting with _."""
    if not os.path.isfile(path):
        raise SystemExit(f"config file {path} not found")
    values = {}
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), values)
    return {k: v for k, v in values.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def from_text(key, text, default, where):
    """A command-line value converted to the default's type."""
    kind = type(default)
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if default is None:
        try:
            return typed(key, json.loads(text), default, where)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{where}: --{key}={text!r}: expected JSON, null or an object ({e})") from None
    try:
        return words[text.lower()] if kind is bool else kind(text)
    except (KeyError, ValueError):
        expected = "true/false" if kind is bool else kind.__name__
        raise SystemExit(f"{where}: --{key}={text!r}: expected a {expected} value (default {default!r})") from None


def typed(key, value, default, where):
    """value, if it has the default's type (an int stands for a float), else SystemExit naming the key."""
    kind = type(default)
    if kind is float and type(value) is int:
        value = float(value)
    if default is None and (value is None or type(value) is dict):
        return value
    if type(value) is not kind:
        expected = "None or a dict" if default is None else f"a {kind.__name__}"
        raise SystemExit(f"{where}: {key} = {value!r} should be {expected} (default {default!r})")
    return value


def load_settings(defaults, argv, where="settings", given=None):
    """defaults <- config files (argv entries not starting with --) <- --key=value overrides -> Settings.
    given: a dict that learns each key a config file or the command line set: key -> the file or "the command line"."""
    cfg, i = Settings(defaults), 0
    known = " ".join(f"--{k}" for k in defaults)
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("-h", "--help"):
            print("options (default values):\n" + "\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
            raise SystemExit(0)
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise SystemExit(f"unexpected argument {arg!r}: options look like --key=value, config files end in .py")
            for key, value in run_config_file(arg).items():
                if key not in defaults:
                    raise SystemExit(f"{arg}: unknown setting {key!r}; known: {known}")
                cfg[key] = typed(key, value, defaults[key], arg)
                if given is not None:
                    given[key] = arg
            continue
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in defaults:
            raise SystemExit(f"unknown option --{key}; known options: {known}")
        if not has_value:
            bool_word = i < len(argv) and argv[i].lower() in ("true", "false", "1", "0", "yes", "no")
            if isinstance(defaults[key], bool) and not bool_word:
                value = "true"  # a bare --flag
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                raise SystemExit(f"option --{key} needs a value")
        cfg[key] = from_text(key, value, defaults[key], where)
        if given is not None:
            given[key] = "the command line"
    return cfg


def pick_device(device="auto", dtype="auto", inference=False):
    """What "auto" means, for every script: (device, dtype name). auto device: cuda when available, else cpu;
    auto dtype: bfloat16 on a GPU that has it, and for inference also on a CPU that computes it natively
    (AVX512-BF16 or AMX), else float32. inference: "int8" and "int4" (weight-only: quant.py) are choices too."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            dtype = "bfloat16" if inference and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    from model import QUANTIZED

    choices = list(DTYPES) + (list(QUANTIZED) if inference else [])
    if dtype not in choices:
        raise SystemExit(f"--dtype={dtype}: choose from auto, {', '.join(choices)}")
    if dtype == "int4" and device != "cpu":
        raise SystemExit(f"--dtype=int4 runs on a CPU only (torch's int4 CPU kernel), not --device={device}")
    return device, dtype


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def exit_torchrun():
    """A command's last call: under torchrun (WORLD_SIZE > 1), with its work done and saved, the process exits now
    (code 0, stdout and stderr flushed), without the interpreter's teardown. There, freeing the last object that
    holds the gloo process group (DDP's reducer, a split model's mesh) joins gloo's worker threads while holding the
    GIL, and a worker that needs the GIL to free a tensor of a collective waits for it forever: train.py's exit hung
    so about once in 100 runs. One process: nothing happens."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
