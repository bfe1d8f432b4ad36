"""The Triton deformable-conv kernels, run on the CPU by Triton's interpreter, against
torchvision's deform_conv2d; the backend's fallbacks; a whole SALT-Net step on ``triton``.

Triton decides when it is imported whether kernels run interpreted, and importing torchvision
imports Triton. So, unless the whole session runs with ``TRITON_INTERPRET=1``, the kernel tests
are skipped here and ``test_kernels_under_the_interpreter`` runs this file again in a fresh
process with the variable set.
"""

import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import ONE_IMAGE_OPTS, REPO_ROOT, tiny_model
from torchvision.ops import deform_conv2d

from saltnet.layers import DeformConv, ModulatedDeformConv
from saltnet.layers import deform_conv as deform_conv_module

triton = pytest.importorskip("triton")

MODULE = "saltnet.layers.triton_deform"
INTERPRETED_RUN = os.environ.get("TRITON_INTERPRET") == "1"
interpreted_only = pytest.mark.skipif(
    not INTERPRETED_RUN, reason="run by test_kernels_under_the_interpreter in a fresh process"
)
BF16_EPS = 2.0**-8  # bfloat16's relative rounding error is at most 2^-9; twice that as margin


@pytest.mark.skipif(INTERPRETED_RUN, reason="this is the interpreted run")
def test_kernels_under_the_interpreter():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=REPO_ROOT,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.fixture(scope="module")
def triton_deform():
    module = importlib.import_module(MODULE)
    assert module.INTERPRETED
    return module


@pytest.fixture
def fresh_fallback_log(monkeypatch, caplog):
    monkeypatch.setattr(deform_conv_module, "_FALLBACKS_LOGGED", set())
    caplog.set_level(logging.WARNING, logger=deform_conv_module.__name__)
    return caplog


def _case(n=2, c_in=20, c_out=24, size=(7, 9), stride=1, groups=1, offsets="fractional",
          dtype=torch.float32, modulated=True):
    """x, offset, mask (or None), weight, bias, each requiring grad. 20 / 24 channels: neither
    a multiple of the kernels' channel tiles, so their edges are exercised."""
    gen = torch.Generator().manual_seed(3)
    h_out, w_out = ((s + 2 - 3) // stride + 1 for s in size)
    shape = (n, 18, h_out, w_out)
    offset = {
        "fractional": (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5) * 5,
        "zero": torch.zeros(shape, dtype=torch.float64),
        "integer": torch.randint(-3, 4, shape, generator=gen).double(),
        "far": (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5) * 80,
    }[offsets]
    tensors = [
        torch.randn(n, c_in, *size, generator=gen, dtype=torch.float64),
        offset,
        torch.rand(n, 9, h_out, w_out, generator=gen, dtype=torch.float64) if modulated else None,
        torch.randn(c_out, c_in // groups, 3, 3, generator=gen, dtype=torch.float64),
        torch.randn(c_out, generator=gen, dtype=torch.float64),
    ]
    return [None if t is None else t.to(dtype).requires_grad_(True) for t in tensors]


def _run(fn, x, offset, mask, weight, bias, stride, grad_out=None):
    """Output and the gradients of (x, offset, weight, bias[, mask]) for ``grad_out``."""
    inputs = [x, offset, weight, bias] + ([mask] if mask is not None else [])
    out = fn(x, offset, mask, weight, bias, stride)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype)), grad_out


def _torchvision(x, offset, mask, weight, bias, stride):
    return deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)


def _triton(module):
    def fn(x, offset, mask, weight, bias, stride):
        return module.triton_deform_conv2d(
            x, offset, mask, weight, bias, (stride, stride), (1, 1), (1, 1)
        )

    return fn


def _assert_close_to_scale(actual, expected, rel, what):
    """|actual - expected| <= rel x max |expected| elementwise."""
    scale = expected.abs().max().clamp(min=1e-12).item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=what)


def _compare(triton_deform, case, stride=1, rel=1e-4):
    want, want_grads, grad_out = _run(_torchvision, *case, stride)
    got, got_grads, _ = _run(_triton(triton_deform), *case, stride, grad_out)
    _assert_close_to_scale(got, want, rel, "output")
    for name, a, b in zip(["input", "offset", "weight", "bias", "mask"], got_grads, want_grads):
        _assert_close_to_scale(a, b, rel, f"gradient w.r.t. {name}")


@interpreted_only
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(stride=2, n=1),
        dict(modulated=False, groups=4, n=1),
        dict(dtype=torch.float64, stride=2, groups=2),
        dict(c_in=4, c_out=8, groups=4, n=1, size=(5, 6)),
    ],
    ids=["modulated", "stride2-batch1", "unmodulated-groups4", "fp64-stride2-groups2",
         "one-input-channel-per-group"],
)
def test_forward_and_gradients_match_torchvision(triton_deform, kwargs):
    stride = kwargs.get("stride", 1)
    _compare(triton_deform, _case(**kwargs), stride)


@interpreted_only
@pytest.mark.parametrize("offsets", ["zero", "integer", "far"])
def test_integer_and_far_outside_positions(triton_deform, offsets):
    """Integer positions (zero offsets included) take torchvision's side of the kink (forward
    differences); far-outside samples contribute nothing."""
    _compare(triton_deform, _case(n=1, offsets=offsets))


@interpreted_only
def test_non_contiguous_input(triton_deform):
    x, offset, mask, weight, bias = _case(n=1)
    strided = torch.stack([x.detach(), torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
    assert not strided.is_contiguous()
    _compare(triton_deform, [strided.requires_grad_(True), offset, mask, weight, bias])


@interpreted_only
def test_bfloat16_error_is_bounded_by_feature_rounding(triton_deform):
    """bf16 x and weight: the kernel rounds each bilinear sample (exact fp32 positions and
    weights) to bf16 before the product and the output to bf16; each rounding is relative
    error <= 2^-9. So |out - exact| <= BF16_EPS x (sum |w| |sample| + |exact|), where the
    exact answer uses the bf16-rounded x and weight and sum |w| |sample| is the deformable conv
    of |x| with |w| (bilinear weights and masks are non-negative)."""
    x, offset, mask, weight, bias = (t.detach() for t in _case(n=1))
    x16, w16 = x.bfloat16(), weight.bfloat16()
    out = triton_deform.triton_deform_conv2d(x16, offset, mask, w16, bias, (1, 1), (1, 1), (1, 1))
    assert out.dtype == torch.bfloat16
    x64, w64, offset, mask = x16.double(), w16.double(), offset.double(), mask.double()
    exact = _torchvision(x64, offset, mask, w64, bias.double(), 1)
    magnitude = _torchvision(x64.abs(), offset, mask, w64.abs(), None, 1)
    error = (out.double() - exact).abs()
    assert (error <= BF16_EPS * (magnitude + exact.abs()) + 1e-6).all(), error.max()


@interpreted_only
def test_gradcheck_fp64(triton_deform):
    """Finite differences need one forward per input element: one channel, one output pixel
    (3 x 3 input, stride 2, 43 inputs), samples between pixels and outside the image."""
    x, offset, mask, weight, _ = (
        t.detach().requires_grad_(True)
        for t in _case(n=1, c_in=1, c_out=1, size=(2, 2), stride=2, dtype=torch.float64)
    )

    def fn(x, offset, mask, weight):
        return triton_deform.triton_deform_conv2d(x, offset, mask, weight, None, (2, 2), (1, 1),
                                                  (1, 1))

    assert torch.autograd.gradcheck(fn, (x, offset, mask, weight), eps=1e-6, atol=1e-6)


@interpreted_only
def test_uncovered_geometry_runs_torchvision_and_says_so_once(triton_deform, fresh_fallback_log):
    layer = DeformConv(4, 4, 3, padding=2, dilation=2, deformable_groups=2, backend="triton")
    x = torch.randn(1, 4, 5, 5)
    offset = torch.randn(1, 36, 5, 5)
    for _ in range(2):
        out = layer(x, offset)
    torch.testing.assert_close(
        out, deform_conv2d(x, offset, layer.weight, padding=2, dilation=2)
    )
    messages = [r.getMessage() for r in fresh_fallback_log.records]
    assert messages == [
        "Deformable-conv backend 'triton' does not cover dilation (2, 2), 2 deformable groups; "
        "using torchvision."
    ]


@pytest.mark.skipif(INTERPRETED_RUN, reason="needs Triton without the interpreter")
def test_cpu_without_interpreter_runs_gather_and_says_so_once(monkeypatch, fresh_fallback_log):
    assert not importlib.import_module(MODULE).INTERPRETED
    layer = ModulatedDeformConv(4, 4, 3, padding=1, backend="triton")
    x, offset, mask = torch.randn(1, 4, 5, 5), torch.randn(1, 18, 5, 5), torch.rand(1, 9, 5, 5)
    calls = []
    gather = deform_conv_module.gather_deform_conv2d
    monkeypatch.setattr(
        deform_conv_module, "gather_deform_conv2d", lambda *a: calls.append(1) or gather(*a)
    )
    for _ in range(2):
        layer(x, offset, mask)
    assert calls == [1, 1]
    assert [r.getMessage() for r in fresh_fallback_log.records] == [
        "Deformable-conv backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 before "
        "Triton is imported; using 'gather'."
    ]


@pytest.mark.skipif(INTERPRETED_RUN, reason="compiles, needs no interpreter")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_hopper_without_a_gpu(dtype):
    """Triton's code generator and ptxas need no GPU: the compiled kernels, which only a GPU
    runs, at least build for sm_90 (H100 / H200), operands in ``dtype``, coordinates fp32."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(MODULE)
    operands = {"x_ptr", "w_ptr", "gout_ptr", "out_ptr"}
    dot = module._IEEE if dtype == "fp32" else module._NATIVE
    flags = dict(HAS_MASK=True, HAS_BIAS=True, DOT=dot, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    for kernel in (module._forward_kernel, module._grad_weight_kernel, module._grad_input_kernel):
        signature = {
            p.name: "constexpr" if p.is_constexpr
            else ("*" + (dtype if p.name in operands else "fp32")) if p.name.endswith("_ptr")
            else "i32"
            for p in kernel.params
        }
        constexprs = {p.name: flags[p.name] for p in kernel.params if p.is_constexpr}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.fn.__name__


@pytest.mark.skipif(INTERPRETED_RUN, reason="compiles, needs no interpreter")
def test_sizes_and_strides_share_the_compiled_variants():
    """Spatial sizes and strides are unspecialised: a forward and backward of any of them is
    the same three compilations per dtype and mask, which the check compiles ahead; one of
    them compiles for sm_90 the way the check's workers do."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(REPO_ROOT / "tools" / "device"))
    import compile_kernels

    target = GPUTarget("cuda", 90, 32)
    convs = [compile_kernels.Conv(256, 256, 1, stride, True, False, torch.float32, size)
             for stride in (1, 2) for size in (3, 16, 37)]
    found = compile_kernels.variants(convs, target)
    assert sorted(name for name, *_ in found.values()) == [
        "_forward_kernel", "_grad_input_kernel", "_grad_weight_kernel"]
    other = [c._replace(dtype=torch.bfloat16) for c in convs] + [convs[0]._replace(modulated=False)]
    assert len(compile_kernels.variants(convs + other, target)) == 9
    forward = next(v for v in found.values() if v[0] == "_forward_kernel")
    seconds, launcher_built = compile_kernels._compile(*forward, target, launcher=False)
    assert seconds > 0 and not launcher_built


def _quick_model_grads(backend, state=None):
    """Losses and parameter gradients of one SALT-Net training step (the tests' tiny model, one
    64 x 64 image) on the given deformable-conv backend."""
    model = tiny_model(*ONE_IMAGE_OPTS, "MODEL.SALTNET.DEFORM_BACKEND", backend)
    if state is not None:
        model.load_state_dict(state)
    gen = torch.Generator().manual_seed(0)
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 24.0, 60.0, 62.0]]))
    inst.gt_classes = torch.tensor([0, 1])
    image = torch.randint(0, 255, (3, 64, 64), generator=gen, dtype=torch.uint8)
    with EventStorage():
        losses = model([{"image": image, "instances": inst}])
    sum(losses.values()).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return model.state_dict(), losses, grads


@interpreted_only
def test_saltnet_step_on_triton_equals_torchvision(triton_deform):
    """Losses and every parameter gradient to 1e-4 of their scale. A few FPN top-block
    gradients are ~1e-8, sums that cancel to 1e-7 of the largest gradient: there fp32
    rounding alone differs by more, so their scale is at least 1e-3 of the largest gradient."""
    state, want_losses, want_grads = _quick_model_grads("torchvision")
    _, losses, grads = _quick_model_grads("triton", state)
    assert losses.keys() == want_losses.keys() and grads.keys() == want_grads.keys()
    for key, value in want_losses.items():
        _assert_close_to_scale(losses[key], value, 1e-4, key)
    largest = max(g.abs().max().item() for g in want_grads.values())
    for key, value in want_grads.items():
        scale = max(value.abs().max().item(), 1e-3 * largest)
        torch.testing.assert_close(grads[key], value, rtol=1e-4, atol=1e-4 * scale,
                                   msg=f"gradient of {key}")
