"""The gather backend (saltnet.layers.gather_deform) beyond tests/test_deform_conv.py: many
chunks of output pixels against torchvision, its bfloat16 error bound, the precision the layer
picks under autocast, and tracing."""

import pytest
import torch
from test_deform_conv import _case, _compare_with_torchvision, make_case, run_reference
from torchvision.ops import deform_conv2d

from saltnet.layers import ModulatedDeformConv
from saltnet.layers import deform_conv as deform_conv_module
from saltnet.layers import gather_deform
from saltnet.layers.gather_deform import BFLOAT16_ERROR_BOUND, gather_deform_conv2d


@pytest.mark.parametrize("offsets", ["fractional", "far"])
@pytest.mark.parametrize("chunk_elements", [1, 1000])
@pytest.mark.parametrize("groups, dg, stride", [(1, 1, 1), (2, 2, 2), (4, 1, 1)])
def test_chunks_match_torchvision(monkeypatch, chunk_elements, groups, dg, stride, offsets):
    """Chunks of one output pixel, and of 13 pixels (1000 // (9 x 8)), which neither divide the
    image nor stop at its end, each differentiated on the input rows it reads (all of them for
    far offsets): outputs and every gradient are torchvision's."""
    monkeypatch.setattr(gather_deform, "_CHUNK_ELEMENTS", chunk_elements)
    x, offset, mask, weight, bias = _case(n=2, stride=stride, groups=groups, dg=dg, offsets=offsets)
    _compare_with_torchvision(x, offset, mask, weight, bias, stride, groups)


@pytest.mark.parametrize("groups, dg", [(1, 1), (2, 2)])
def test_gradcheck_over_many_chunks(monkeypatch, groups, dg):
    """Every gradient against finite differences (float64), one output pixel per chunk."""
    monkeypatch.setattr(gather_deform, "_CHUNK_ELEMENTS", 1)
    x, offset, mask, weight, bias = (
        t.detach().double().requires_grad_(True)
        for t in _case(n=2, c_in=4, c_out=2, size=(2, 3), groups=groups, dg=dg)
    )

    def fn(x, offset, mask, weight, bias):
        return gather_deform_conv2d(x, offset, mask, weight, bias, (1, 1), (1, 1), (1, 1), groups)

    args = (x, offset, mask, weight, bias)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


def test_channels_last_input_gives_channels_last_output():
    x, offset, mask, weight, bias = (t.detach() for t in _case())
    out = gather_deform_conv2d(
        x.contiguous(memory_format=torch.channels_last), offset, mask, weight, bias,
        (1, 1), (1, 1), (1, 1), 1,
    )
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    expected = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _bound_case(scale_spread):
    """float32 tensors whose products cancel: positive and negative inputs over
    ``scale_spread`` decades, weights of both signs."""
    gen = torch.Generator().manual_seed(3)
    x, offset, mask, weight, bias = (t.detach() for t in _case(n=2, c_in=16, c_out=8, dg=2))
    x = x * 10 ** (torch.rand(x.shape, generator=gen) * scale_spread)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("scale_spread", [0, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_bfloat16_error_bound(scale_spread, groups):
    """|out - exact| <= BFLOAT16_ERROR_BOUND x A elementwise, with A the convolution of |x|
    with |weight| (same positions, bilinear weights, mask) plus |bias|: the bound of the
    module docstring, checked against float64 with the same float32 tensors."""
    x, offset, mask, weight, bias = _bound_case(scale_spread)
    weight = weight[: weight.shape[0], : 16 // groups].contiguous()
    geometry = ((1, 1), (1, 1), (1, 1), groups)
    out = gather_deform_conv2d(x, offset, mask, weight, bias, *geometry, reduced=torch.bfloat16)
    assert out.dtype == torch.float32  # x's dtype; computed in bfloat16
    exact = gather_deform_conv2d(*(t.double() for t in (x, offset, mask, weight, bias)), *geometry)
    bound_scale = gather_deform_conv2d(
        *(t.double() for t in (x.abs(), offset, mask, weight.abs(), bias.abs())), *geometry
    )
    error = (out.double() - exact).abs()
    assert (error <= BFLOAT16_ERROR_BOUND * bound_scale).all()
    # Not vacuous: bfloat16 rounding is visible, and the bound is within a factor 100 of it.
    assert (error / bound_scale).max() > BFLOAT16_ERROR_BOUND / 100
    # float32 is ~2^16 times closer.
    fp32 = gather_deform_conv2d(x, offset, mask, weight, bias, *geometry)
    assert ((fp32.double() - exact).abs() <= 1e-5 * bound_scale).all()


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_precision_under_autocast(monkeypatch, native, dtype):
    """Under autocast the layer computes in bfloat16 only for bfloat16 and where the device
    multiplies it natively; otherwise in float32, which equals the float32 layer's result."""
    monkeypatch.setattr(deform_conv_module, "multiplies_bfloat16", lambda device: native)
    calls = []
    real = deform_conv_module.gather_deform_conv2d

    def spy(*args, **kwargs):
        calls.append(kwargs.get("reduced"))
        return real(*args, **kwargs)

    monkeypatch.setattr(deform_conv_module, "gather_deform_conv2d", spy)
    layer, x, offset, mask = make_case(True, dtype=torch.float, backend="gather")
    fp32 = layer(x, offset, mask)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x, offset, mask)
    bf16 = native and dtype == torch.bfloat16
    assert calls == [None, torch.bfloat16 if bf16 else None]
    if not bf16:
        torch.testing.assert_close(out, fp32)
    else:
        scale = run_reference(layer, x.abs(), offset, mask).abs() + layer.bias.abs()[:, None, None]
        assert ((out - fp32).abs() <= BFLOAT16_ERROR_BOUND * scale).all()
        assert not torch.equal(out, fp32)


def test_traces_and_replays():
    """torch.jit.trace (what detectron2's FLOP counter runs) records the gather backend, and the
    trace replays other inputs of the same shape."""
    layer = ModulatedDeformConv(8, 8, 3, padding=1, backend="gather")
    x, offset, mask, _, _ = (t.detach() for t in _case())
    traced = torch.jit.trace(layer, (x, offset, mask))
    x2, offset2, mask2 = x.flip(-1), offset.flip(-1) * 0.5, mask.flip(-1)
    torch.testing.assert_close(traced(x2, offset2, mask2), layer(x2, offset2, mask2))
