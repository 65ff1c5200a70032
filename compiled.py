"""
The decode step compiled ahead of time (--compile): model.run for one new token per row over the paged KV cache,
exported once (torch.export) and compiled by AOTInductor into a shared library that runs a whole step in C++,
with no Python, no Dynamo guards and no wrappers between the calls (torch.compile spent ~0.2 ms a step in those at
the tiny preset, where llama.cpp's whole step takes 0.25 ms). sample.Engine decodes through it; prefill stays eager.

    step = CompiledStep(model, cache.layers)     # compiles at its first call, unless a library fits already
    logits = step(ids, cache.layers, index)      # (b, 1, vocab_size), any batch size and cache length

The weights, the cache's pools and the index are the library's inputs: it holds no copy of the weights, and models
of one structure (config, modules and their settings, every tensor's name, shape, dtype and layout) share one
library in a process. A model changed in place (another dtype, layout, an adapter switched off) has another
structure: the next engine compiles for it.
One library serves every batch size, but an MoE model takes two: its layers compute a few rows otherwise than many
(moe.Experts.forward), so rows up to n_experts // n_active_experts get one library and more rows the other.
"""
import functools
import os
import sys
import tempfile
import warnings

import torch
import torch.nn as nn

from kv_cache import BLOCK, CacheIndex

# decode steps after which compiling pays on a CPU, measured on configs/tiny.py's shape with one thread: compiling
# took 23 s (15 s with Inductor's cache warm), and saved 0.78 ms a step for 1 row, 0.86 ms for 8 (eager 1.15 /
# 1.65 ms, compiled 0.37 / 0.79 ms): 23 s / 0.86 ms = 27,000 steps. A server (serve.py) gets there; one sample.py
# call rarely does.
COMPILE_BREAK_EVEN_STEPS = 27_000


def compile_setting(setting, decode_steps, where="sample.py", tp=1):
    """--compile's value -> whether to compile the decode step: "true" or "false" as said, "auto" when the call
    decodes at least COMPILE_BREAK_EVEN_STEPS steps. Compiling needs a C++ compiler (the library is C++, on a GPU
    too): without a working one, eager, said in one line on stderr. A model split over tp > 1 processes decodes
    eager: its DTensor layers are not exported (true is refused)."""
    choice = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "auto": "auto"}.get(
        str(setting).lower())
    if choice is None:
        raise ValueError(f"--compile={setting!r}: expected auto, true or false")
    if tp > 1:
        if choice is True:
            raise ValueError(f"--compile=true with --tp={tp}: a tensor-parallel model decodes eager (its DTensor "
                             "layers are not compiled here); use --compile=false or auto")
        return False
    if choice == "auto":
        choice = decode_steps >= COMPILE_BREAK_EVEN_STEPS
    if choice and cpp_compiler() is None:
        from torch._inductor import config

        print(f"{where}: no working C++ compiler for the compiled decode step (tried {config.cpp.cxx}): decoding "
              "eager", file=sys.stderr, flush=True)
        return False
    return choice


@functools.cache
def cpp_compiler():
    """The C++ compiler Inductor would use (torch's own search: each name of its cpp.cxx setting run with
    --version), or None."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        return get_cpp_compiler()
    except (InvalidCxxCompiler, OSError):
        return None


class _Run(nn.Module):
    """model.run as a forward, over an index made of the step's input tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, positions, slots, read_slots, layers):
        return self.model.run(ids, layers, CacheIndex.of_tensors(positions, slots, read_slots))


class _Step(nn.Module):
    """What torch.export traces: _Run with every tensor of the model swapped for an input (functional_call). It
    holds the model outside its own module tree, so export lifts none of them into the library as a constant."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "run", _Run(model))  # not a submodule

    def forward(self, ids, positions, slots, read_slots, layers, tensors):
        return torch.func.functional_call(self.run, tensors, (ids, positions, slots, read_slots, layers))


def model_tensors(model):
    """{name: tensor} of every parameter and buffer, tied ones once, named as _Step's inputs."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {f"model.{name}": t.detach() for name, t in named}


def structure(model, tensors, layers):
    """What a library is compiled for: the model's config, its modules with their plain settings (a LoRA layer's
    `enabled` and scaling, a layout: what the traced code branched on), its tensors, and the cache pools' shapes past
    the slots (their count is an input), with dtypes, layouts and devices. tensors: model_tensors(model)."""
    def describe(t):
        return t.dtype, t.layout, t.device, t.stride() if t.layout == torch.strided else None

    plain = (bool, int, float, str)
    modules = tuple((name, type(m), tuple((k, v) for k, v in vars(m).items() if isinstance(v, plain)))
                    for name, m in model.named_modules())
    shapes = tuple((name, tuple(t.shape), *describe(t)) for name, t in tensors.items())
    pools = tuple((tuple(t.shape[1:]), *describe(t)[:3]) for layer in layers for t in layer)
    return repr(model.config), modules, shapes, pools


def batch_ranges(config):
    """(first, last) rows of each library a model needs; last None: no bound."""
    if not config.n_experts:
        return [(1, None)]
    few = config.n_experts // config.n_active_experts  # moe.Experts.forward's gathered path up to here
    return [(1, few), (few + 1, None)]


_libraries = {}  # (structure, (first, last)) -> the loaded library's run (a list of inputs -> a list of outputs)


@torch.inference_mode(False)  # export makes its own tensors: not inference tensors, even within an engine's step
@torch.no_grad()
def compile_library(model, layers, first, last):
    """Export model.run on example inputs of the step's shapes (batch and slot counts left free) and compile it."""
    rows = first if first == last else max(first, 2)  # an example of 1 row would fix the batch size at 1
    zeros = functools.partial(torch.zeros, dtype=torch.long, device=model.embed_tokens.weight.device)
    ids, positions, slots, read_slots = zeros(rows, 1), zeros(rows, 1), zeros(rows), zeros(rows, 2 * BLOCK)
    pools = [tuple(t.new_zeros(4 * BLOCK, *t.shape[1:]) for t in layer) for layer in layers]
    tensors = model_tensors(model)
    batch = None if first == last else torch.export.Dim("rows", min=first, max=last)
    keys, slot_count = torch.export.Dim("keys", min=1), torch.export.Dim("slots", min=BLOCK)
    dynamic = ({0: batch}, {0: batch}, {0: batch}, {0: batch, 1: keys},
               [tuple({0: slot_count} for _ in layer) for layer in pools], {name: None for name in tensors})
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as directory:
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        program = torch.export.export(_Step(model), (ids, positions, slots, read_slots, pools, tensors),
                                      dynamic_shapes=dynamic)
        path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(directory, "step.pt2"))
        return torch._inductor.aoti_load_package(path).loader.boxed_run  # the call without pytree's per-call work


class CompiledStep:
    """model.run (input_ids, cache_layers, index) for one new token per row over one cache's layers, through the
    library for the model's structure, on the tensors the model holds when made (sample.Engine makes one an
    engine, so a model whose tensors are replaced between engines is seen by the next)."""

    def __init__(self, model, cache_layers):
        tensors = model_tensors(model)
        self.model, self.tensors = model, list(tensors.values())
        self.structure = structure(model, tensors, cache_layers)
        self.runs = {}  # (first, last) -> the library
        self.ranges = batch_ranges(model.config)

    def __call__(self, input_ids, cache_layers, index):
        rows = input_ids.shape[0]
        span = next(r for r in self.ranges if r[1] is None or rows <= r[1])
        run = self.runs.get(span)
        if run is None:
            if (self.structure, span) not in _libraries:
                _libraries[self.structure, span] = compile_library(self.model, cache_layers, *span)
            run = self.runs[span] = _libraries[self.structure, span]
        pools = [t for layer in cache_layers for t in layer]
        return run([input_ids, index.positions, index.slots, index.read_slots, *pools, *self.tensors])[0]
