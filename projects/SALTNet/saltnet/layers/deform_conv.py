"""Deformable convolution layers with a choice of backend per layer.

:class:`DeformConv` and :class:`ModulatedDeformConv` take the same constructor arguments and hold
the same parameters (``weight`` of shape (C_out, C_in / groups, kH, kW), ``bias`` of shape
(C_out,) or None) as :class:`detectron2.layers.DeformConv` / ``ModulatedDeformConv``, so state
dicts move between the two in either direction. Offsets follow detectron2's layout too:
(N, 2 x deformable_groups x kH x kW, H_out, W_out), each pair (dy, dx) in input-pixel units, in
the raster order of the kernel; masks are (N, deformable_groups x kH x kW, H_out, W_out).

The backend (``MODEL.SALTNET.DEFORM_BACKEND``, the layers' ``backend`` argument) is one of:

* ``"auto"`` (default, also ``backend=None``): ``"gather"`` for CPU tensors, ``"torchvision"``
  for CUDA tensors, decided at each call from the input's device.
* ``"gather"``: bilinear sampling + one matrix product in plain PyTorch
  (:mod:`saltnet.layers.gather_deform`), any device; several times faster than torchvision's
  kernel on the CPU (docs/BENCHMARKS.md, "Deformable convolution").
* ``"torchvision"``: :func:`torchvision.ops.deform_conv2d`, on CPU and CUDA; ONNX export
  relies on this plain call.
* ``"triton"``: a fused Triton kernel (:mod:`saltnet.layers.triton_deform`) on CUDA, or under
  Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU. Geometries it does not cover run
  on torchvision; CPU tensors without the interpreter, or a process without Triton, run on
  ``"gather"``; each fallback says so once in the log.
* ``"detectron2"``: detectron2's compiled CUDA kernel, available only where detectron2 was
  built with its ``_C`` extension; CUDA only.

Half and bfloat16 inputs (e.g. under autocast) are computed in float32 by the ``torchvision``
and ``detectron2`` backends and returned in the input dtype. ``gather`` computes in bfloat16
(positions in float32; the error bound of :mod:`saltnet.layers.gather_deform`) where bfloat16 is
asked for (bfloat16 inputs or bfloat16 autocast) and the device multiplies bfloat16 natively
(CUDA, CPUs with AVX512-BF16 / AMX); in float32 otherwise, float16 included (no bound holds
there), which on CPUs without bfloat16 arithmetic is also the faster choice.

Inputs, offsets or masks of the wrong shape raise :class:`DeformConvInputError`, both a
``ValueError`` and the ``RuntimeError`` that detectron2's layers raise.
"""

import functools
import importlib
import logging
from typing import Optional

import torch
from detectron2.layers.wrappers import _NewEmptyTensorOp
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

from .gather_deform import gather_deform_conv2d

__all__ = [
    "BACKENDS",
    "DeformConv",
    "DeformConvInputError",
    "ModulatedDeformConv",
    "available_backends",
]

BACKENDS = ("auto", "gather", "triton", "torchvision", "detectron2")
_TRITON_MODULE = "saltnet.layers.triton_deform"
_FALLBACKS_LOGGED = set()  # each fallback message is logged once per process
logger = logging.getLogger(__name__)


class DeformConvInputError(ValueError, RuntimeError):
    """An input, offset or mask of the wrong shape for the layer. A ``RuntimeError`` as
    detectron2's deformable convs raise for wrong channel counts, and a ``ValueError``."""


def detectron2_ops_available() -> bool:
    """True if detectron2 was built with its compiled ``_C`` extension (and so its deform conv)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_module():
    """:mod:`saltnet.layers.triton_deform`, or None where Triton cannot be imported. Imported
    on first use: Triton decides at import whether its kernels run interpreted."""
    try:
        return importlib.import_module(_TRITON_MODULE)
    except ImportError:
        return None


def available_backends():
    """The backends that can run in this process."""
    names = ["auto", "gather", "torchvision"]
    triton_deform = _triton_module()
    if triton_deform is not None and (torch.cuda.is_available() or triton_deform.INTERPRETED):
        names.append("triton")
    if detectron2_ops_available():
        names.append("detectron2")
    return names


def _check_backend(name: Optional[str]) -> str:
    name = "auto" if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"Unknown deformable-conv backend {name!r}; choose one of {BACKENDS}.")
    if name == "detectron2" and not detectron2_ops_available():
        raise RuntimeError(
            "Deformable-conv backend 'detectron2' needs detectron2's compiled ops (detectron2._C), "
            "which this detectron2 does not have. Use backend 'auto', or build detectron2 "
            "from source (see README, Installation)."
        )
    return name


def _fallback(message: str) -> None:
    if message not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(message)
        logger.warning(message)


def _resolve_backend(backend: str, x, geometry) -> str:
    """The backend that runs this call: ``auto`` by device, ``triton`` where it can run."""
    if backend == "auto":
        return "torchvision" if x.is_cuda else "gather"
    if backend != "triton":
        return backend
    triton_deform = _triton_module()
    if triton_deform is None:
        _fallback("Deformable-conv backend 'triton': Triton is not installed; using 'gather'.")
        return "gather"
    if not x.is_cuda and not triton_deform.INTERPRETED:
        _fallback(
            "Deformable-conv backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 before "
            "Triton is imported; using 'gather'."
        )
        return "gather"
    problem = triton_deform.unsupported(x, *geometry)
    if problem:
        _fallback(f"Deformable-conv backend 'triton' does not cover {problem}; using torchvision.")
        return "torchvision"
    return "triton"


def _empty_output(x, weight, stride, padding, dilation):
    """The (N, C_out, H_out, W_out) empty output of a convolution over an empty batch."""
    kernel_size = weight.shape[-2:]
    spatial = [
        (size + 2 * p - (d * (k - 1) + 1)) // s + 1
        for size, p, d, k, s in zip(x.shape[-2:], padding, dilation, kernel_size, stride)
    ]
    return _NewEmptyTensorOp.apply(x, [x.shape[0], weight.shape[0]] + spatial)


_REDUCED = (torch.float16, torch.bfloat16)


def _in_float32(fn, x, offset, mask, weight, bias, *args):
    """``fn(x, offset, mask, weight, bias, *args)`` with autocast off, in float32 for
    reduced-precision inputs; output in x's dtype."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if all(t.dtype not in _REDUCED for t in (x, offset, weight)):
            return fn(x, offset, mask, weight, bias, *args)
        tensors = [None if t is None else t.float() for t in (x, offset, mask, weight, bias)]
        return fn(*tensors, *args).to(x.dtype)


@functools.lru_cache(maxsize=None)
def multiplies_bfloat16(device_type: str) -> bool:
    """True if this process's ``device_type`` ("cpu", "cuda") multiplies bfloat16 natively (on
    the CPU: oneDNN's bfloat16 kernels, AVX512-BF16 or AMX); elsewhere bfloat16 products are
    emulated and slower than float32."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _gather_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation, groups):
    """The gather backend, in bfloat16 where bfloat16 is asked for (bfloat16 inputs or bfloat16
    autocast) and :func:`multiplies_bfloat16`, else in float32; output in x's dtype."""
    device = x.device.type
    asked = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    asked = asked or next((t.dtype for t in (x, offset, weight) if t.dtype in _REDUCED), None)
    if asked != torch.bfloat16 or not multiplies_bfloat16(device):
        return _in_float32(gather_deform_conv2d, x, offset, mask, weight, bias, stride, padding,
                           dilation, groups)
    with torch.autocast(device_type=device, enabled=False):
        return gather_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation,
                                    groups, reduced=torch.bfloat16)


def _torchvision_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation):
    """torchvision's kernel: a plain ``deform_conv2d`` call (what ONNX export traces)."""
    return deform_conv2d(
        x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _detectron2_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation, groups, dg):
    """detectron2's compiled CUDA kernel (CUDA only; the layer calls it in float32)."""
    from detectron2.layers.deform_conv import deform_conv, modulated_deform_conv

    if not x.is_cuda:
        raise RuntimeError("Deformable-conv backend 'detectron2' runs on CUDA only.")
    if mask is None:
        out = deform_conv(x, offset, weight, stride, padding, dilation, groups, dg)
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    return modulated_deform_conv(
        x, offset, mask, weight, bias, stride, padding, dilation, groups, dg
    )


class _DeformConvBase(nn.Module):
    """Parameters, checks and dispatch shared by the plain and the modulated layer.
    ``bias=None``: the layer's :attr:`bias_default`, as detectron2's."""

    bias_default: bool

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: Optional[bool] = None,
        norm: Optional[nn.Module] = None,
        activation=None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        bias = self.bias_default if bias is None else bias
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                f"divisible by groups ({groups})."
            )
        if in_channels % deformable_groups:
            raise ValueError(
                f"in_channels ({in_channels}) must be divisible by deformable_groups "
                f"({deformable_groups})."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.norm = norm
        self.activation = activation
        self.backend = _check_backend(backend)

        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def _check_inputs(self, x, offset, mask):
        kh, kw = self.kernel_size
        points = self.deformable_groups * kh * kw
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise DeformConvInputError(
                f"{type(self).__name__} expects input (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}."
            )
        if offset.dim() != 4 or offset.shape[1] != 2 * points:
            raise DeformConvInputError(
                f"{type(self).__name__} expects offset (N, {2 * points}, H_out, W_out) "
                f"(2 x deformable_groups x kH x kW channels), got {tuple(offset.shape)}."
            )
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != points):
            raise DeformConvInputError(
                f"{type(self).__name__} expects mask (N, {points}, H_out, W_out), "
                f"got {tuple(mask.shape)}."
            )

    def _deform_conv(self, x, offset, mask):
        self._check_inputs(x, offset, mask)
        geometry = (self.weight, self.stride, self.padding, self.dilation)
        if x.numel() == 0:
            return self._norm_activation(_empty_output(x, *geometry))
        backend = _resolve_backend(self.backend, x, geometry + (self.deformable_groups,))
        if backend == "gather":
            out = _gather_deform_conv(x, offset, mask, *self._params(), self.groups)
        elif backend == "torchvision":
            out = _in_float32(_torchvision_deform_conv, x, offset, mask, *self._params())
        elif backend == "triton":
            out = _triton_module().triton_deform_conv2d(x, offset, mask, *self._params())
        else:
            out = _in_float32(
                _detectron2_deform_conv,
                x,
                offset,
                mask,
                *self._params(),
                self.groups,
                self.deformable_groups,
            )
        return self._norm_activation(out)

    def _params(self):
        """(weight, bias, stride, padding, dilation): the convolution's own arguments."""
        return self.weight, self.bias, self.stride, self.padding, self.dilation

    def _norm_activation(self, out):
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self):
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, "
            f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}, "
            f"backend={self.backend}"
        )


class DeformConv(_DeformConvBase):
    """Deformable convolution v1 (Dai et al. 2017); drop-in for detectron2's ``DeformConv``.

    ``forward(x, offset)``: x (N, C_in, H, W), offset (N, 2 x dg x kH x kW, H_out, W_out) in
    input-pixel units -> (N, C_out, H_out, W_out). Like detectron2's, it has no bias by default;
    ``bias=True`` is accepted too.
    """

    bias_default = False

    def forward(self, x, offset):
        return self._deform_conv(x, offset, None)


class ModulatedDeformConv(_DeformConvBase):
    """Modulated deformable convolution v2 (Zhu et al. 2019); drop-in for detectron2's.

    ``forward(x, offset, mask)``: mask (N, dg x kH x kW, H_out, W_out), usually a sigmoid.
    Has a bias by default, as detectron2's.
    """

    bias_default = True

    def forward(self, x, offset, mask):
        return self._deform_conv(x, offset, mask)
