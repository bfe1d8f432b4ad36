"""On CUDA (marker ``cuda``, skipped without): the compiled Triton kernels and the ``gather``
backend against ``torchvision.ops.deform_conv2d``, forward and every gradient.

fp32 agrees to 1e-4 of each tensor's scale. bf16 / fp16 bounds are derived below from the
dtype's rounding (``torch.finfo(dtype).eps``) and the fp32 accumulation over the reduction.
"""

import importlib

import pytest
import torch
from test_triton_deform import _assert_close_to_scale, _case, _torchvision

from saltnet.layers.gather_deform import gather_deform_conv2d

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
]
FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def triton_deform():
    pytest.importorskip("triton")
    module = importlib.import_module("saltnet.layers.triton_deform")
    assert not module.INTERPRETED, "compiled kernels: run without TRITON_INTERPRET"
    return module


def _cuda(case, dtype=None):
    return [None if t is None else t.detach().to("cuda", dtype).requires_grad_(True)
            for t in case]


def _grads(fn, x, offset, mask, weight, bias, stride, grad_out):
    """Output and the gradients of (x, offset, weight, bias[, mask])."""
    inputs = [x, offset, weight, bias] + ([mask] if mask is not None else [])
    out = fn(x, offset, mask, weight, bias, stride)
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


def _triton_fn(module):
    def fn(x, offset, mask, weight, bias, stride):
        return module.triton_deform_conv2d(
            x, offset, mask, weight, bias, (stride, stride), (1, 1), (1, 1)
        )

    return fn


def _gather_fn(x, offset, mask, weight, bias, stride):
    groups = x.shape[1] // weight.shape[1]
    return gather_deform_conv2d(x, offset, mask, weight, bias, (stride, stride), (1, 1), (1, 1),
                                groups)


NAMES = ["input", "offset", "weight", "bias", "mask"]


def _compare_fp32(fn, case, stride=1, rel=1e-4):
    case = _cuda(case)
    with torch.no_grad():
        shape = _torchvision(*case, stride).shape
    grad_out = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    want, want_grads = _grads(_torchvision, *case, stride, grad_out)
    got, got_grads = _grads(fn, *case, stride, grad_out)
    _assert_close_to_scale(got.float(), want, rel, "output")
    for name, a, b in zip(NAMES, got_grads, want_grads):
        _assert_close_to_scale(a.float(), b, rel, f"gradient w.r.t. {name}")


CASES = {
    "modulated": (dict(), 1),
    "stride2": (dict(n=1), 2),
    "groups32": (dict(n=1, c_in=64, c_out=64, groups=32), 1),
    "one-channel-per-group": (dict(n=1, c_in=32, c_out=32, groups=32), 2),
    "no-mask": (dict(modulated=False), 1),
    "integer-offsets": (dict(offsets="integer"), 1),
    "far-offsets": (dict(offsets="far"), 1),
    "P3-8x256x100x168": (dict(n=8, c_in=256, c_out=256, size=(100, 168)), 1),
}
# The cases also run in bf16 and fp16 (tools/device/compile_kernels.py compiles what they launch).
HALF_CASES = ["modulated", "stride2", "groups32", "no-mask"]


@pytest.mark.parametrize("name", list(CASES))
def test_triton_fp32_matches_torchvision(triton_deform, name):
    kwargs, stride = CASES[name]
    _compare_fp32(_triton_fn(triton_deform), _case(stride=stride, **kwargs), stride)


@pytest.mark.parametrize("name", ["modulated", "groups32", "one-channel-per-group", "no-mask"])
def test_gather_fp32_matches_torchvision(name):
    kwargs, stride = CASES[name]
    _compare_fp32(_gather_fn, _case(stride=stride, **kwargs), stride)


def test_triton_non_contiguous_input(triton_deform):
    x, offset, mask, weight, bias = _case(n=1)
    strided = torch.stack([x.detach(), torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
    assert not strided.is_contiguous()
    _compare_fp32(_triton_fn(triton_deform), [strided, offset, mask, weight, bias])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", HALF_CASES)
def test_triton_half_error_is_bounded(triton_deform, dtype, name):
    """x, weight and grad_out in ``dtype``; the exact answer (float64) uses the same rounded
    values. The kernels round each bilinear sample and the output to ``dtype`` (relative error
    <= eps / 2 each) and accumulate the products (exact in fp32) in fp32 over at most
    L = max(9 x C / groups, N x H_out x W_out) terms (the weight gradient's reduction). So
    elementwise |got - exact| <= (eps + L x fp32 eps) x M + eps x |exact|, with M the same
    quantity of the problem in absolute values (|x|, |weight|, |grad_out|; bilinear weights and
    masks are non-negative): for the output and the input, weight, bias and mask gradients.
    The offset gradient (differences of corner values) has no such bound: it is held to the
    same factor times its largest reference value."""
    kwargs, stride = CASES[name]
    x, offset, mask, weight, bias = _case(stride=stride, **kwargs)
    x16, w16 = x.detach().to(dtype), weight.detach().to(dtype)
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        shape = _torchvision(x, offset, mask, weight, bias, stride).shape
    length = max(9 * w16.shape[1], shape[0] * shape[2] * shape[3])
    factor = eps + length * FP32_EPS
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)

    got, got_grads = _grads(_triton_fn(triton_deform), *_cuda([x16, offset, mask, w16, bias]),
                            stride, grad_out.cuda())
    exact_case = _cuda([x16, offset, mask, w16, bias], torch.float64)
    exact, exact_grads = _grads(_torchvision, *exact_case, stride, grad_out.cuda())
    abs_case = [None if t is None else t.detach().abs().requires_grad_(True) for t in exact_case]
    magnitude, magnitude_grads = _grads(_torchvision, *abs_case, stride, grad_out.cuda().abs())

    assert got.dtype == dtype
    error = (got.double() - exact).abs()
    assert (error <= factor * magnitude + eps * exact.abs() + 1e-6).all(), error.max()
    for name, a, b, m in zip(NAMES, got_grads, exact_grads, magnitude_grads):
        error = (a.double() - b).abs()
        bound = factor * (b.abs().max() if name == "offset" else m) + 1e-6
        assert (error <= bound).all(), f"gradient w.r.t. {name}: {error.max()}"
