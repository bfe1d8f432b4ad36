"""Deformable convolution as bilinear sampling plus one matrix product, in plain PyTorch.

The fast CPU path (backend ``"gather"``): the sampling positions of all kernel points are
computed in the offsets' dtype (float32 or float64, never a reduced precision), sampled at once
with :func:`torch.nn.functional.grid_sample`, and one batched matrix product with the weight
gives the output; autograd differentiates it. Same numbers as
:func:`torchvision.ops.deform_conv2d`, gradients included: the kernel point (i, j) of output
(y, x) samples the input at (y * stride - padding + i * dilation + dy,
x * stride - padding + j * dilation + dx), bilinearly, with zero for corners outside the image.

``grid_sample`` takes positions normalised by the image size. The input is zero-padded at the
bottom and right to power-of-two sizes, so normalising is exact: an integer position stays
exactly an integer, and the offset gradient there takes the same side (the forward difference
along each axis) as torchvision's. The padding holds zeros, as the outside of the image does.
"""

import torch
from torch.nn import functional as F

__all__ = ["gather_deform_conv2d"]


def _power_of_two_at_least(size: int) -> int:
    return 1 << (size - 1).bit_length()


def _sampling_grid(offset, padded_size, kernel_size, stride, padding, dilation):
    """grid_sample's (x, y) grid of every kernel point (``align_corners=False``).

    offset (N, 2 x dg x kH x kW, H_out, W_out), (dy, dx) pairs in input pixels ->
    (N x dg, kH x kW x H_out, W_out, 2); pixel p of a padded side of size s is at (2p + 1) / s - 1.
    """
    n, _, h_out, w_out = offset.shape
    kh, kw = kernel_size
    offset = offset.view(n, -1, kh, kw, 2, h_out, w_out)
    normalised = []
    for axis, (k, size_out) in enumerate(((kh, h_out), (kw, w_out))):
        out_pos = torch.arange(size_out, dtype=offset.dtype, device=offset.device) * stride[axis]
        kernel_pos = torch.arange(k, dtype=offset.dtype, device=offset.device) * dilation[axis]
        base = kernel_pos[:, None] + (out_pos[None, :] - padding[axis])  # (k, size_out)
        base = base[:, None, :, None] if axis == 0 else base[None, :, None, :]
        pos = offset[:, :, :, :, axis] + base  # (N, dg, kH, kW, H_out, W_out)
        normalised.append((2 * pos + 1) / padded_size[axis] - 1)
    return torch.stack(normalised[::-1], dim=-1).view(-1, kh * kw * h_out, w_out, 2)


def gather_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation, groups):
    """(Modulated) deformable convolution; the arguments of ``torchvision.ops.deform_conv2d``.

    x (N, C_in, H, W); offset (N, 2 x dg x kH x kW, H_out, W_out) in input pixels; mask
    (N, dg x kH x kW, H_out, W_out) or None; weight (C_out, C_in / groups, kH, kW); bias
    (C_out,) or None; stride, padding, dilation: (y, x) pairs -> (N, C_out, H_out, W_out).
    All tensors share one dtype of at least float32 precision. Autograd keeps the sampled
    columns, N x C_in x kH x kW x H_out x W_out values, for the backward pass.
    """
    n, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[-2:]
    points = kh * kw
    dg = offset.shape[1] // (2 * points)
    padded_size = (_power_of_two_at_least(height), _power_of_two_at_least(width))
    x = F.pad(x, (0, padded_size[1] - width, 0, padded_size[0] - height))
    grid = _sampling_grid(offset, padded_size, (kh, kw), stride, padding, dilation)
    sampled = F.grid_sample(
        x.reshape(n * dg, c_in // dg, *padded_size),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (N x dg, C_in / dg, kH x kW x H_out, W_out)
    columns = sampled.view(n, dg, c_in // dg, points, h_out * w_out)
    if mask is not None:
        columns = columns * mask.reshape(n, dg, 1, points, h_out * w_out)
    # Row c x kH x kW + k of a group's columns: the layout of its weight rows' flattening.
    columns = columns.reshape(n, groups, -1, h_out * w_out)
    out = torch.matmul(weight.reshape(groups, c_out // groups, -1), columns)
    out = out.view(n, c_out, h_out, w_out)
    return out if bias is None else out + bias.view(1, -1, 1, 1)
