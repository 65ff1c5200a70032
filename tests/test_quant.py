"""quant.py's int8 and int4 layers against llama.cpp's own quantizers (the gguf package's q8_0 and q4_0) and
torch's float matmul on the weights they hold."""
import pytest
import torch
import torch.nn as nn

from quant import Int4Linear, Int8Linear, quantize

quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402


def held_weight(layer, in_features):
    """The float weight (out, in) a quantized layer multiplies by: its output for each unit input row, less its
    output for zeros (the bias)."""
    with torch.no_grad():
        held = layer(torch.eye(in_features, dtype=torch.bfloat16)) - layer(torch.zeros(1, in_features).bfloat16())
        return held.float().t()


@pytest.mark.parametrize("cls,qtype,most", [(Int4Linear, "Q4_0", 1.0), (Int8Linear, "Q4_0", 0.15)])
def test_quantized_weights_are_as_close_as_llamacpps(cls, qtype, most):
    """Gaussian weights with an outlier: int4 (groups of 32, scale and zero point) is no further from the float
    weights than llama.cpp's q4_0 (groups of 32, a scale alone); int8 (a scale per row) under a sixth of it (16
    levels against 255)."""
    torch.manual_seed(0)
    weight = torch.randn(256, 512)
    weight[3, 7] = 9.0
    linear = nn.Linear(512, 256, bias=False)
    linear.weight.data.copy_(weight)
    layer = cls(linear)
    qt = getattr(GGMLQuantizationType, qtype)
    theirs = torch.from_numpy(quants.dequantize(quants.quantize(weight.numpy(), qt), qt))
    rms = lambda w: (w - weight).pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(held_weight(layer, 512)) <= most * rms(theirs)


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_quantized_matmul_is_the_float_matmul_of_its_weights(cls):
    """The packed matmul over (B, T, in) bfloat16 activations with a bias equals F.linear in float32 on the
    weights the layer holds, within bfloat16's rounding of the output."""
    torch.manual_seed(1)
    layer = cls(nn.Linear(96, 48))
    x = torch.randn(2, 3, 96).bfloat16()
    expected = nn.functional.linear(x.float(), held_weight(layer, 96), layer.bias.float())
    got = layer(x)
    assert got.shape == (2, 3, 48) and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() < 2e-2 * expected.abs().max().item()


def test_int4_refuses_shapes_the_kernel_cannot_take():
    model = nn.Sequential()
    model.proj = nn.Linear(40, 64)
    with pytest.raises(ValueError, match="proj: int4 needs in_features a multiple of 32"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="'int3'"):
        quantize(nn.Sequential(), "int3")
