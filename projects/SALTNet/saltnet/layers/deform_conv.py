"""Deformable convolution layers that run wherever torchvision runs.

:class:`DeformConv` and :class:`ModulatedDeformConv` take the same constructor arguments and hold
the same parameters (``weight`` of shape (C_out, C_in / groups, kH, kW), ``bias`` of shape
(C_out,) or None) as :class:`detectron2.layers.DeformConv` / ``ModulatedDeformConv``, so state
dicts move between the two in either direction. Offsets follow detectron2's layout too:
(N, 2 x deformable_groups x kH x kW, H_out, W_out), each pair (dy, dx) in input-pixel units, in
the raster order of the kernel; masks are (N, deformable_groups x kH x kW, H_out, W_out).

Two backends compute the convolution:

* ``"torchvision"`` (default): :func:`torchvision.ops.deform_conv2d`, on CPU and CUDA. Half and
  bfloat16 inputs (e.g. under autocast) are computed in float32 and returned in the input dtype.
* ``"detectron2"``: detectron2's compiled CUDA kernel, available only where detectron2 was built
  with its ``_C`` extension; CUDA only, float32 only.

The backend of a layer is fixed at construction (``backend=None`` takes the process default, see
:func:`set_default_backend` and the ``SALTNET_DEFORM_CONV_BACKEND`` environment variable).
"""

import os
from typing import Optional

import torch
from detectron2.layers.wrappers import _NewEmptyTensorOp
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

__all__ = [
    "DeformConv",
    "ModulatedDeformConv",
    "available_backends",
    "get_default_backend",
    "set_default_backend",
]

BACKENDS = ("torchvision", "detectron2")
_default_backend = os.environ.get("SALTNET_DEFORM_CONV_BACKEND", "torchvision")


def detectron2_ops_available() -> bool:
    """True if detectron2 was built with its compiled ``_C`` extension (and so its deform conv)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends():
    """The backends that can run in this process, the default first."""
    names = ["torchvision"]
    if detectron2_ops_available():
        names.append("detectron2")
    return names


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Unknown deformable-conv backend {name!r}; choose one of {BACKENDS}.")
    if name == "detectron2" and not detectron2_ops_available():
        raise RuntimeError(
            "Deformable-conv backend 'detectron2' needs detectron2's compiled ops (detectron2._C), "
            "which this detectron2 does not have. Use backend 'torchvision', or build detectron2 "
            "from source (see README, Installation)."
        )
    return name


def get_default_backend() -> str:
    """The backend that layers built with ``backend=None`` use."""
    return _check_backend(_default_backend)


def set_default_backend(name: str) -> None:
    """Set the backend for layers constructed from now on with ``backend=None``."""
    global _default_backend
    _default_backend = _check_backend(name)


def _empty_output(x, weight, stride, padding, dilation):
    """The (N, C_out, H_out, W_out) empty output of a convolution over an empty batch."""
    kernel_size = weight.shape[-2:]
    spatial = [
        (size + 2 * p - (d * (k - 1) + 1)) // s + 1
        for size, p, d, k, s in zip(x.shape[-2:], padding, dilation, kernel_size, stride)
    ]
    return _NewEmptyTensorOp.apply(x, [x.shape[0], weight.shape[0]] + spatial)


def _torchvision_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation):
    """torchvision's kernel, in float32 for reduced-precision inputs; output in x's dtype."""
    reduced = (torch.float16, torch.bfloat16)
    if x.dtype in reduced or offset.dtype in reduced or weight.dtype in reduced:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = deform_conv2d(
                x.float(),
                offset.float(),
                weight.float(),
                None if bias is None else bias.float(),
                stride=stride,
                padding=padding,
                dilation=dilation,
                mask=None if mask is None else mask.float(),
            )
        return out.to(x.dtype)
    return deform_conv2d(
        x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _detectron2_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation, groups, dg):
    """detectron2's compiled CUDA kernel (float32, CUDA only)."""
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
    """Parameters, checks and dispatch shared by the plain and the modulated layer."""

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
        bias: bool = False,
        norm: Optional[nn.Module] = None,
        activation=None,
        backend: Optional[str] = None,
    ):
        super().__init__()
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
        self.backend = get_default_backend() if backend is None else _check_backend(backend)

        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def _check_inputs(self, x, offset, mask):
        kh, kw = self.kernel_size
        points = self.deformable_groups * kh * kw
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}."
            )
        if offset.dim() != 4 or offset.shape[1] != 2 * points:
            raise ValueError(
                f"{type(self).__name__} expects offset (N, {2 * points}, H_out, W_out) "
                f"(2 x deformable_groups x kH x kW channels), got {tuple(offset.shape)}."
            )
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != points):
            raise ValueError(
                f"{type(self).__name__} expects mask (N, {points}, H_out, W_out), "
                f"got {tuple(mask.shape)}."
            )

    def _deform_conv(self, x, offset, mask):
        self._check_inputs(x, offset, mask)
        if x.numel() == 0:
            out = _empty_output(x, self.weight, self.stride, self.padding, self.dilation)
        elif self.backend == "torchvision":
            out = _torchvision_deform_conv(
                x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation
            )
        else:
            out = _detectron2_deform_conv(
                x,
                offset,
                mask,
                self.weight,
                self.bias,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.deformable_groups,
            )
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

    def forward(self, x, offset):
        return self._deform_conv(x, offset, None)


class ModulatedDeformConv(_DeformConvBase):
    """Modulated deformable convolution v2 (Zhu et al. 2019); drop-in for detectron2's.

    ``forward(x, offset, mask)``: mask (N, dg x kH x kW, H_out, W_out), usually a sigmoid.
    Has a bias by default, as detectron2's.
    """

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
        bias: bool = True,
        norm: Optional[nn.Module] = None,
        activation=None,
        backend: Optional[str] = None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deformable_groups,
            bias,
            norm,
            activation,
            backend,
        )

    def forward(self, x, offset, mask):
        return self._deform_conv(x, offset, mask)
