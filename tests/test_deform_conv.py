"""saltnet.layers deformable convs: every CPU backend against an explicit bilinear-sampling
reference, the gather backend against torchvision, and the backend choice."""

import ast
import inspect
import itertools

import detectron2.layers.deform_conv as d2_deform_conv
import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

from saltnet.layers import BACKENDS, DeformConv, ModulatedDeformConv, available_backends
from saltnet.layers import deform_conv as deform_conv_module
from saltnet.layers.deform_conv import detectron2_ops_available
from saltnet.layers.gather_deform import gather_deform_conv2d

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bilinear_zero_padded(image, y, x):
    """Sample image (C, H, W) at real positions y, x (P,) -> (C, P); zero outside the image."""
    _, height, width = image.shape
    y0, x0 = torch.floor(y), torch.floor(x)
    out = image.new_zeros(image.shape[0], y.shape[0])
    for dy, dx in itertools.product((0, 1), (0, 1)):
        yy, xx = y0 + dy, x0 + dx
        weight = (1 - (y - yy).abs()) * (1 - (x - xx).abs())
        inside = (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
        yi = yy.clamp(0, height - 1).long()
        xi = xx.clamp(0, width - 1).long()
        out = out + image[:, yi, xi] * (weight * inside)
    return out


def reference_deform_conv(x, offset, weight, bias, mask, stride, padding, dilation, groups, dg):
    """Slow deformable conv: explicit sampling point by point, then a grouped matmul."""
    n, c_in, _, _ = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    h_out, w_out = offset.shape[-2:]
    oy, ox = torch.meshgrid(
        torch.arange(h_out, dtype=x.dtype), torch.arange(w_out, dtype=x.dtype), indexing="ij"
    )
    out = x.new_zeros(n, c_out, h_out, w_out)
    channels_per_dg = c_in // dg
    for b in range(n):
        # columns[c, k, p]: input channel c sampled at kernel point k for output position p.
        columns = x.new_zeros(c_in, kh * kw, h_out * w_out)
        for g, (ki, kj) in itertools.product(range(dg), itertools.product(range(kh), range(kw))):
            k = ki * kw + kj
            dy = offset[b, 2 * (g * kh * kw + k)].flatten()
            dx = offset[b, 2 * (g * kh * kw + k) + 1].flatten()
            py = (oy * stride - padding + ki * dilation).flatten() + dy
            px = (ox * stride - padding + kj * dilation).flatten() + dx
            chans = slice(g * channels_per_dg, (g + 1) * channels_per_dg)
            sampled = bilinear_zero_padded(x[b, chans], py, px)
            if mask is not None:
                sampled = sampled * mask[b, g * kh * kw + k].flatten()
            columns[chans, k] = sampled
        for grp in range(groups):
            cols = columns[grp * c_per_group : (grp + 1) * c_per_group].reshape(-1, h_out * w_out)
            outs = slice(grp * (c_out // groups), (grp + 1) * (c_out // groups))
            w = weight[outs].reshape(c_out // groups, -1)
            out[b, outs] = (w @ cols).view(-1, h_out, w_out)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


CPU_BACKENDS = ["gather", "torchvision"]


def make_case(
    modulated,
    stride=1,
    padding=1,
    dilation=1,
    groups=2,
    dg=2,
    n=2,
    dtype=torch.double,
    backend="auto",
):
    gen = torch.Generator().manual_seed(0)
    c_in, c_out, h, w = 4, 6, 6, 7
    layer_cls = ModulatedDeformConv if modulated else DeformConv
    layer = layer_cls(
        c_in,
        c_out,
        3,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        deformable_groups=dg,
        bias=modulated,
        backend=backend,
    ).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    h_out = (h + 2 * padding - dilation * 2 - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * 2 - 1) // stride + 1
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=dtype)
    # Offsets up to +-2.5 px: many samples land between pixels, some outside the image.
    offset = (torch.rand(n, 2 * dg * 9, h_out, w_out, generator=gen, dtype=dtype) - 0.5) * 5
    mask = torch.rand(n, dg * 9, h_out, w_out, generator=gen, dtype=dtype) if modulated else None
    return layer, x, offset, mask


def run_layer(layer, x, offset, mask):
    return layer(x, offset) if mask is None else layer(x, offset, mask)


def run_reference(layer, x, offset, mask):
    return reference_deform_conv(
        x,
        offset,
        layer.weight,
        layer.bias,
        mask,
        layer.stride[0],
        layer.padding[0],
        layer.dilation[0],
        layer.groups,
        layer.deformable_groups,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize(
    "geometry", [dict(), dict(stride=2), dict(dilation=2, padding=2), dict(groups=1, dg=1)]
)
def test_forward_matches_reference(modulated, geometry, backend):
    layer, x, offset, mask = make_case(modulated, backend=backend, **geometry)
    expected = run_reference(layer, x, offset, mask)
    torch.testing.assert_close(run_layer(layer, x, offset, mask), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("modulated", [False, True])
def test_gradients_match_reference(modulated, backend):
    layer, x, offset, mask = make_case(modulated, backend=backend)
    inputs = [x, offset] + ([mask] if modulated else [])
    for t in inputs:
        t.requires_grad_(True)
    params = [layer.weight] + ([layer.bias] if modulated else [])
    grad_out = torch.randn(run_layer(layer, x, offset, mask).shape, dtype=torch.double)

    ours = torch.autograd.grad(run_layer(layer, x, offset, mask), inputs + params, grad_out)
    ref = torch.autograd.grad(run_reference(layer, x, offset, mask), inputs + params, grad_out)
    for name, a, b in zip(["input", "offset", "mask", "weight", "bias"], ours, ref):
        torch.testing.assert_close(a, b, msg=lambda m: f"gradient w.r.t. {name}: {m}")


@pytest.mark.parametrize("modulated", [False, True])
def test_gradcheck(modulated):
    """Analytical gradients (input, offset, mask, weight) of the CPU default (gather) against
    finite differences; torchvision's are compared with the reference above."""
    layer, x, offset, mask = make_case(modulated, n=1, groups=1, dg=1, backend="gather")
    args = [x, offset, layer.weight.detach().clone()] + ([mask] if modulated else [])
    for t in args:
        t.requires_grad_(True)

    def fn(x, offset, weight, mask=None):
        params = {"weight": weight}
        if layer.bias is not None:
            params["bias"] = layer.bias
        inputs = (x, offset) if mask is None else (x, offset, mask)
        return torch.func.functional_call(layer, params, inputs)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
def test_zero_offsets_and_unit_mask_reproduce_conv2d(groups, backend):
    layer, x, offset, mask = make_case(True, groups=groups, dg=1, backend=backend)
    offset = torch.zeros_like(offset)
    mask = torch.ones_like(mask)
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1, groups=groups)
    torch.testing.assert_close(layer(x, offset, mask), expected)
    plain = DeformConv(4, 6, 3, padding=1, groups=groups, backend=backend).double()
    plain.weight.data.copy_(layer.weight.data)
    torch.testing.assert_close(
        plain(x, offset), F.conv2d(x, layer.weight, padding=1, groups=groups)
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("modulated", [False, True])
def test_empty_batch(modulated, backend):
    layer, x, offset, mask = make_case(modulated, stride=2, dtype=torch.float, backend=backend)
    x = x[:0].requires_grad_(True)
    out = run_layer(layer, x, offset[:0], None if mask is None else mask[:0])
    assert out.shape == (0, 6, 3, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_under_autocast(dtype, backend):
    layer, x, offset, mask = make_case(True, dtype=torch.float, backend=backend)
    # The exact answer for the rounded input; only the output's own rounding may differ.
    expected = run_reference(layer.double(), x.to(dtype).double(), offset.double(), mask.double())
    layer.float()
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x.to(dtype), offset, mask)
    assert out.dtype == dtype
    scale = expected.abs().max()
    assert ((out.double() - expected).abs().max() / scale) < 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reduced_precision_offsets_accepted(backend):
    layer, x, offset, mask = make_case(False, dtype=torch.float, backend=backend)
    out = layer(x.bfloat16(), offset.bfloat16())
    expected = run_reference(layer, x.bfloat16().float(), offset.bfloat16().float(), None)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() / expected.abs().max() < 1e-2


def _detectron2_layer_class(name):
    """detectron2's own layer class; without detectron2._C its module replaces the class with a
    placeholder after defining it, so compile the real definition from detectron2's source."""
    if detectron2_ops_available():
        return getattr(d2_deform_conv, name)
    tree = ast.parse(inspect.getsource(d2_deform_conv))
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    namespace = dict(vars(d2_deform_conv))
    exec(
        compile(ast.Module(body=[node], type_ignores=[]), d2_deform_conv.__file__, "exec"),
        namespace,
    )
    return namespace[name]


@pytest.mark.parametrize(
    "ours_cls, name, kwargs",
    [
        (DeformConv, "DeformConv", dict(groups=2, deformable_groups=2)),
        (ModulatedDeformConv, "ModulatedDeformConv", dict(deformable_groups=2, bias=True)),
        (ModulatedDeformConv, "ModulatedDeformConv", dict(bias=False)),
    ],
)
def test_state_dict_moves_between_detectron2_and_saltnet(ours_cls, name, kwargs):
    d2_cls = _detectron2_layer_class(name)
    args = (8, 16, 3)
    ours = ours_cls(*args, stride=1, padding=1, **kwargs)
    theirs = d2_cls(*args, stride=1, padding=1, **kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    theirs.load_state_dict(ours.state_dict(), strict=True)
    back = ours_cls(*args, stride=1, padding=1, **kwargs)
    back.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_wrong_offset_or_mask_raises_what_detectron2_raises(error):
    """detectron2's kernels raise RuntimeError for wrong channel counts, its Python ValueError
    for wrong ranks: code catching either catches ours."""
    layer = ModulatedDeformConv(4, 6, 3, padding=1)
    x, offset, mask = torch.zeros(1, 4, 5, 5), torch.zeros(1, 18, 5, 5), torch.zeros(1, 9, 5, 5)
    with pytest.raises(error, match=r"expects offset \(N, 18"):
        layer(x, offset[:, :9], mask)
    with pytest.raises(error, match=r"expects mask \(N, 9"):
        layer(x, offset, mask[:, :3])
    with pytest.raises(error, match=r"expects input \(N, 4"):
        layer(x[0], offset, mask)


def test_bias_defaults_are_detectron2s():
    assert DeformConv(4, 6, 3).bias is None and DeformConv(4, 6, 3, bias=True).bias is not None
    assert ModulatedDeformConv(4, 6, 3).bias.shape == (6,)
    assert ModulatedDeformConv(4, 6, 3, 1, 1, 1, 1, 1, False).bias is None  # positional, too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_detectron2_backend_runs_reduced_precision_in_float32(monkeypatch, dtype):
    """The layer's dispatch hands detectron2's kernel (float32 only) float32 tensors and returns
    the input's dtype, as for the other backends. The kernel itself needs CUDA and
    detectron2._C: here torchvision's stands in for it, recording what it is given."""
    given = []

    def kernel(x, offset, mask, weight, bias, stride, padding, dilation, groups, dg):
        given.extend(t.dtype for t in (x, offset, mask, weight, bias))
        return deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)

    monkeypatch.setattr(deform_conv_module, "_detectron2_deform_conv", kernel)
    layer, x, offset, mask = make_case(True, dtype=torch.float, backend="torchvision")
    x, offset, mask = x.to(dtype), offset.to(dtype), mask.to(dtype)
    expected = run_reference(layer, x.float(), offset.float(), mask.float())
    layer.backend = "detectron2"
    out = layer(x, offset, mask)
    assert given == [torch.float32] * 5
    assert out.dtype == dtype
    assert (out.float() - expected).abs().max() / expected.abs().max() < 1e-2


def test_bad_shapes_and_backends_give_clear_errors():
    layer = DeformConv(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"expects offset \(N, 18"):
        layer(torch.zeros(1, 4, 5, 5), torch.zeros(1, 9, 5, 5))
    with pytest.raises(ValueError, match=r"expects input \(N, 4"):
        layer(torch.zeros(1, 3, 5, 5), torch.zeros(1, 18, 5, 5))
    with pytest.raises(ValueError, match="Unknown deformable-conv backend 'cudnn'"):
        DeformConv(4, 6, 3, backend="cudnn")
    with pytest.raises(ValueError, match="divisible by groups"):
        DeformConv(4, 6, 3, groups=4)
    if not detectron2_ops_available():
        with pytest.raises(RuntimeError, match="compiled ops"):
            DeformConv(4, 6, 3, backend="detectron2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("modulated", [False, True])
def test_cuda_matches_cpu(modulated):
    layer, x, offset, mask = make_case(modulated, dtype=torch.float)
    args = [t.requires_grad_(True) for t in [x, offset] + ([mask] if modulated else [])]
    cpu_out = run_layer(layer, *args[:2], args[2] if modulated else None)
    cpu_grads = torch.autograd.grad(cpu_out.sum(), args + [layer.weight])
    layer_cuda = layer.cuda()
    cuda_args = [t.detach().cuda().requires_grad_(True) for t in args]
    cuda_out = run_layer(layer_cuda, *cuda_args[:2], cuda_args[2] if modulated else None)
    cuda_grads = torch.autograd.grad(cuda_out.sum(), cuda_args + [layer_cuda.weight])
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)
    for a, b in zip(cuda_grads, cpu_grads):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)


def _case(n=2, c_in=8, c_out=8, size=(9, 11), stride=1, groups=1, dg=1, offsets="fractional"):
    """fp32 tensors for deform_conv2d: x, offset, mask, weight, bias (each requiring grad)."""
    gen = torch.Generator().manual_seed(1)
    h_out, w_out = ((s + 2 - 3) // stride + 1 for s in size)
    shape = (n, 2 * dg * 9, h_out, w_out)
    offset = {
        "fractional": (torch.rand(shape, generator=gen) - 0.5) * 5,
        "zero": torch.zeros(shape),
        "integer": torch.randint(-3, 4, shape, generator=gen).float(),
        # Most samples far outside the image (up to 40 px), some still inside.
        "far": (torch.rand(shape, generator=gen) - 0.5) * 80,
    }[offsets]
    tensors = [
        torch.randn(n, c_in, *size, generator=gen),
        offset,
        torch.rand(n, dg * 9, h_out, w_out, generator=gen),
        torch.randn(c_out, c_in // groups, 3, 3, generator=gen),
        torch.randn(c_out, generator=gen),
    ]
    return [t.requires_grad_(True) for t in tensors]


def _assert_close_to_scale(actual, expected, rel=1e-4, what=""):
    """|actual - expected| <= rel x max |expected| (and the relative tolerance elementwise)."""
    scale = expected.abs().max().clamp(min=1e-12).item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=what or None)


def _compare_with_torchvision(x, offset, mask, weight, bias, stride, groups):
    """gather_deform_conv2d against torchvision's deform_conv2d: output and all gradients."""
    inputs = [x, offset, weight, bias] + ([mask] if mask is not None else [])
    expected = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    pair = (stride, stride)
    out = gather_deform_conv2d(x, offset, mask, weight, bias, pair, (1, 1), (1, 1), groups)
    _assert_close_to_scale(out, expected, what="output")
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    want = torch.autograd.grad(expected, inputs, grad_out)
    got = torch.autograd.grad(out, inputs, grad_out)
    for name, a, b in zip(["input", "offset", "weight", "bias", "mask"], got, want):
        _assert_close_to_scale(a, b, what=f"gradient w.r.t. {name}")


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups, dg", [(1, 1), (2, 2), (4, 1)])
def test_gather_matches_torchvision(modulated, stride, groups, dg):
    x, offset, mask, weight, bias = _case(stride=stride, groups=groups, dg=dg)
    _compare_with_torchvision(x, offset, mask if modulated else None, weight, bias, stride, groups)


@pytest.mark.parametrize("offsets", ["zero", "integer", "far"])
@pytest.mark.parametrize("n", [1, 3])
def test_gather_matches_torchvision_at_integer_and_far_positions(offsets, n):
    """Integer positions (zero offsets included) are where bilinear sampling has a kink: the
    offset gradient must take torchvision's side (the forward difference)."""
    x, offset, mask, weight, bias = _case(n=n, offsets=offsets)
    _compare_with_torchvision(x, offset, mask, weight, bias, 1, 1)


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (16, 17)])
def test_gather_matches_torchvision_at_small_and_power_of_two_sizes(size):
    x, offset, mask, weight, bias = _case(size=size)
    _compare_with_torchvision(x, offset, mask, weight, bias, 1, 1)


def test_gather_matches_torchvision_for_non_contiguous_input():
    x, offset, mask, weight, bias = _case()
    # The same values as x: every other column of a twice-as-wide tensor, and channels-last.
    strided = torch.stack([x.detach(), torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
    channels_last = x.detach().contiguous(memory_format=torch.channels_last)
    for view in (strided.requires_grad_(True), channels_last.requires_grad_(True)):
        assert not view.is_contiguous()
        _compare_with_torchvision(view, offset, mask, weight, bias, 1, 1)


def test_auto_backend_runs_gather_on_cpu_tensors(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[0].device.type)
        return gather_deform_conv2d(*args)

    monkeypatch.setattr(deform_conv_module, "gather_deform_conv2d", spy)
    x, offset, _, _, _ = _case()
    DeformConv(8, 8, 3, padding=1)(x, offset)
    DeformConv(8, 8, 3, padding=1, backend="auto")(x, offset)
    assert calls == ["cpu", "cpu"]
    DeformConv(8, 8, 3, padding=1, backend="torchvision")(x, offset)
    assert calls == ["cpu", "cpu"]


def test_backend_choices():
    assert BACKENDS == ("auto", "gather", "triton", "torchvision", "detectron2")
    assert {"auto", "gather", "torchvision"} <= set(available_backends()) <= set(BACKENDS)
    assert ("detectron2" in available_backends()) == detectron2_ops_available()
