"""
Weights stored for decoding: weight-only quantization (every projection's weight in int8 or int4, the activations
in bfloat16, through torch's own weight-only matmuls: gpt-fast's CPU path), and float32/bfloat16 weights laid out
for a CPU's matmuls (at the end). Imported by sample.py and serve.py, never by training:

    model = Transformer.from_pretrained(MODELDIR, dtype="int8")   # or "int4"; sample.py/serve.py/bench.py --dtype
    model = quantize(Transformer(config), "int4")                 # a float model quantized in place

int8: one scale per output channel (torch.ops.aten._weight_int8pack_mm); half the bytes of bfloat16 per token.
int4: groups of 32 input channels with a scale and a zero point each (torch.ops.aten._weight_int4pack_mm_for_cpu),
a quarter of bfloat16's bytes (5 bits a weight with the bfloat16 scales; llama.cpp's q4_0 takes 4.5). The output
head stays int8 in an int4 model, as llama.cpp's q4_0 files keep theirs at 6 bits. MLA's kv_b_proj stays
bfloat16 in both: its weight is read whole, absorbed into the query and output.

float32 and bfloat16 weights laid out for a CPU's matmuls (relayout, --weight_layout): "transposed" (in, out), which a
one-row matmul streams fastest, or "packed" in oneDNN's blocked layout, never repacked per call. bench.py's 82M model,
one thread, its projections alone against nn.Linear's layout: float32 transposed 1.06x at 1 row, packed 1.27-1.65x at
4-16 rows (0.95x at 1); bfloat16 packed 1.37-1.44x at 1 and 16 rows. Small weights stay transposed (PACK_MIN_WEIGHTS).
"""
import torch
import torch.nn as nn

from model import QUANTIZED
INT4_GROUP = 32  # input channels per int4 scale and zero point (llama.cpp's q4_0 blocks are 32 too)


def int8_weights(weight, chunk_rows=1024):
    """weight (out, in), any float dtype -> int8 (out, in) and bfloat16 scales (out,), a scale per output channel.
    Each int8 value rounds weight / scale by the bfloat16 scale the matmul multiplies back with. In row chunks
    through one float32 scratch buffer, so that neither a float32 copy of the weight nor a trail of freed
    temporaries between the loaded weights (the C allocator keeps those) adds to the memory an int8 load takes."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
    scratch = torch.empty(min(chunk_rows, weight.shape[0]), weight.shape[1], device=weight.device)
    for i in range(0, weight.shape[0], chunk_rows):
        w = weight[i:i + chunk_rows]
        low, high = torch.aminmax(w, dim=1)
        scales[i:i + chunk_rows] = torch.maximum(-low, high).float().clamp_(min=1e-12) / 127
        out = torch.div(w, scales[i:i + chunk_rows, None].float(), out=scratch[:len(w)])
        q[i:i + chunk_rows] = out.round_().clamp_(-127, 127)
    return q, scales


def int4_weights(weight, group=INT4_GROUP, chunk_rows=1024):
    """weight (out, in) -> the packed int4 weight torch's CPU kernel reads (out, in / 2 uint8) and its bfloat16
    scales and zero points (in / group, out, 2). Each group of `group` inputs of a row maps its [min, max] onto
    0..15; the kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale. q rounds against the bfloat16
    scale and zero the kernel multiplies back with. Row chunks, as int8_weights."""
    rows, cols = weight.shape
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=weight.device)  # rows pack independently
    scales_zeros = torch.empty(cols // group, rows, 2, dtype=torch.bfloat16, device=weight.device)
    scratch = torch.empty(min(chunk_rows, rows), cols // group, group, device=weight.device)
    for i in range(0, rows, chunk_rows):
        w = weight[i:i + chunk_rows].view(-1, cols // group, group)  # (r, groups, group)
        low, high = torch.aminmax(w, dim=2)
        scale = ((high.float() - low.float()) / 15).clamp_(min=1e-12).bfloat16()
        zero = (low.float() + 8 * scale.float()).bfloat16()
        scales_zeros[:, i:i + chunk_rows] = torch.stack([scale, zero], -1).transpose(0, 1)
        codes = torch.sub(w, zero.float()[..., None], out=scratch[:len(w)])
        codes = codes.div_(scale.float()[..., None]).round_().add_(8).clamp_(0, 15)
        packed[i:i + chunk_rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(-1, cols).int(), 1)
    return packed, scales_zeros


class Int8Linear(nn.Module):
    """Weight-only int8: int8 weights with one scale per output channel, bfloat16 activations."""
    reformatted = True  # Transformer.num_params counts in_features x out_features for it

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.empty(linear.weight.shape, dtype=torch.int8, device="meta"))
        self.register_buffer("scales", torch.empty(linear.weight.shape[0], dtype=torch.bfloat16, device="meta"))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))
        if linear.weight.device.type != "meta":
            self.load_weight(linear.weight.detach(), linear.weight.device)

    def load_weight(self, weight, device):
        self.weight, self.scales = (t.to(device) for t in int8_weights(weight))

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """Weight-only int4: 4-bit weights in groups of INT4_GROUP inputs with a scale and zero point each, bfloat16
    activations. Needs in_features a multiple of INT4_GROUP and out_features a multiple of 16 (the kernel's)."""
    reformatted = True

    def __init__(self, linear, where="a layer"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        rows, cols = linear.weight.shape
        if cols % INT4_GROUP or rows % 16:
            raise ValueError(f"{where}: int4 needs in_features a multiple of {INT4_GROUP} and out_features a "
                             f"multiple of 16, not {cols} and {rows}: use --dtype=int8")
        self.register_buffer("weight", torch.empty(rows, cols // 2, dtype=torch.uint8, device="meta"))
        self.register_buffer("scales_zeros", torch.empty(cols // INT4_GROUP, rows, 2, dtype=torch.bfloat16,
                                                         device="meta"))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))
        if linear.weight.device.type != "meta":
            self.load_weight(linear.weight.detach(), linear.weight.device)

    def load_weight(self, weight, device):
        if torch.device(device or "cpu").type != "cpu":
            raise ValueError(f"--dtype=int4 runs on a CPU only (torch's _weight_int4pack_mm_for_cpu), not {device}")
        self.weight, self.scales_zeros = int4_weights(weight.cpu())

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.weight, INT4_GROUP,
                                                       self.scales_zeros)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize(model, kind):
    """The model in bfloat16 with every projection and the output head as an Int8Linear or Int4Linear (kind
    "int8" or "int4"; see the top of this file for what stays). On a model on the meta device: the structure
    that Transformer.from_pretrained(dtype=kind) fills tensor by tensor through each layer's load_weight."""
    if kind not in QUANTIZED:
        raise ValueError(f"dtype={kind!r}: expected one of {', '.join(QUANTIZED)}")
    model.to(torch.bfloat16)
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "kv_b_proj":
                int4 = kind == "int4" and name != "lm_head"
                where = f"{prefix}.{name}".lstrip(".")
                setattr(module, name, Int4Linear(child, where) if int4 else Int8Linear(child))
    return model



# -----------------------------------------------------------------------------
# float32 and bfloat16 weights in a layout a CPU matmul reads faster (weight_layout)

LAYOUTS = ("auto", "plain", "transposed", "packed")
PACK_MIN_WEIGHTS = 2 ** 17  # a smaller weight is laid out transposed even when packed is asked for: a packed call
# costs a fixed ~30 us (one thread), more than a 384 x 128 matmul's whole time transposed (3-6 us at 1-8 rows)


@torch.library.custom_op("astrai::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (rows, in) @ weight.T with weight in oneDNN's packed layout: a custom op, which the compiled decode step
    (compiled.py) calls as it stands (Inductor lowers mkldnn's linear only for a frozen constant weight, and the
    step takes the weights as inputs)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@packed_linear.register_fake
def _(x, weight, out_features):
    return x.new_empty(x.shape[0], out_features)


class LaidOutLinear(nn.Module):
    """A float32 or bfloat16 projection for decoding on a CPU, its weight (out, in) held as `stored`: "transposed"
    (in, out) contiguous, which a one-row matmul streams fastest, or "packed" (oneDNN's blocked layout, an opaque
    tensor: never repacked per call, fastest from 4 rows; weights under PACK_MIN_WEIGHTS elements are transposed
    instead). Not for training (no gradient) nor saving."""
    reformatted = True  # Transformer.num_params counts in_features x out_features for it

    def __init__(self, linear, layout):
        super().__init__()
        self.in_features, self.out_features, self.layout, self.bias = \
            linear.in_features, linear.out_features, layout, linear.bias
        weight = linear.weight.detach()
        if weight.numel() < PACK_MIN_WEIGHTS:
            self.layout = layout = "transposed"
        stored = weight.t().contiguous() if layout == "transposed" else \
            torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.register_buffer("stored", stored, persistent=False)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        y = rows @ self.stored if self.layout == "transposed" else packed_linear(rows, self.stored, self.out_features)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def pick_layout(setting, device, dtype, rows, tp=1):
    """--weight_layout's value -> the layout the weights load in. auto: on a CPU (oneDNN), bfloat16 packed where the
    CPU computes it natively, float32 packed when rows (the batch a call runs: serve.py's max_batch, sample.py's
    --num_samples or --batch_size with --eval) is 4 or more, else transposed; plain elsewhere (a GPU, int8/int4,
    float16, tp > 1). An explicit layout a path cannot take is an error naming it."""
    if setting not in LAYOUTS:
        raise ValueError(f"--weight_layout={setting!r}: choose from {', '.join(LAYOUTS)}")
    able = torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available() and tp == 1 \
        and dtype in ("float32", "bfloat16")
    if setting == "auto":
        if not able:
            return "plain"
        if dtype == "bfloat16":
            return "packed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "plain"
        return "packed" if rows >= 4 else "transposed"
    if setting != "plain" and not able:
        raise ValueError(f"--weight_layout={setting}: for float32 or bfloat16 weights on a CPU with torch's oneDNN, "
                         f"one process; not --dtype={dtype} on {device}" + (f" with --tp={tp}" if tp > 1 else ""))
    return setting


def relayout(model, layout):
    """The model with every projection of its layers a LaidOutLinear in layout ("plain": as it is). The output head
    stays as it is (scoring reads its weight in row chunks; a tied one is the embedding table), and so does MLA's
    kv_b_proj (read whole, absorbed into the query)."""
    if layout == "plain":
        return model
    for module in list(model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "kv_b_proj":
                setattr(module, name, LaidOutLinear(child, layout))
    return model
