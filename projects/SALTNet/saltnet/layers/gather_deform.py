"""Deformable convolution as a sparse bilinear sampling plus matrix products, in plain PyTorch.

Backend ``"gather"`` (the CPU default). The offsets are shared by every channel of a deformable
group, so each kernel point of each output pixel samples one whole channel vector: the input,
as channels-last rows (one row per pixel and deformable group), is sampled by
:func:`torch.nn.functional.embedding_bag` -- each bag the four bilinear corners of one kernel
point, their bilinear weights (times the modulation mask) as ``per_sample_weights`` -- and a
matrix product with the weight (a batched one per convolution group) finishes the convolution.
The result and every gradient are torchvision's
(:func:`torchvision.ops.deform_conv2d`): the kernel point (i, j) of output (y, x) samples the
input at (y * stride - padding + i * dilation + dy, x * stride - padding + j * dilation + dx),
bilinearly, with zero for corners outside the image; at integer positions the offset gradient
is the forward difference, as in torchvision's kernel.

Output pixels are processed in chunks of at most ``_CHUNK_ELEMENTS`` sampled values: a chunk's
columns stay in the cache and are reused by the allocator instead of one large buffer of
N x H_out x W_out x C_in x kH x kW values (which costs more in page faults than the sampling
itself). The sampling positions and bilinear weights are differentiated by autograd; the
sampling and the product are one autograd function (``_SampledProduct``) whose backward samples
each chunk again rather than keeping the columns, so the extra memory is the positions, the
weights and one chunk, in training too.

Precision: sampling positions and bilinear weights are computed in the offsets' precision, at
least float32: in bfloat16 a position of 200 px is only known to +-0.5 px, which no bound on the
sampled value survives. With ``reduced=torch.bfloat16`` the input, the bilinear weights, the
sampled values, the weight and the bias are rounded to bfloat16 and multiplied with float32
accumulation, and the output is rounded to bfloat16. Five roundings of relative error at most
u = 2^-8 (bfloat16's unit roundoff) reach each product ((1 + u)^5 - 1 <= 5.04 u), float32
accumulation of n <= 2^16 terms adds at most n 2^-24 <= u, so every output element is within

    |out - exact| <= 6.1 u A,   A = sum |weight| x (bilinear sample of |x|, times the mask) + |bias|

of the exact convolution of the given tensors (A: the same convolution of |x| with |weight| and
|bias|; relative to A, not to |out|, because the sum may cancel). float16 has no such bound (its
range ends at 65504, so a sum can overflow): it is computed in float32.
"""

import torch
from torch.nn import functional as F

__all__ = ["BFLOAT16_ERROR_BOUND", "gather_deform_conv2d"]

# Sampled values per chunk of output pixels (4 MiB of float32 columns).
_CHUNK_ELEMENTS = 1 << 20
# |out - exact| <= BFLOAT16_ERROR_BOUND x A (module docstring) for reduced=torch.bfloat16.
BFLOAT16_ERROR_BOUND = 6.1 * 2.0**-8


def _sampling_positions(offset, kernel_size, stride, padding, dilation):
    """Input-pixel positions (y, x), each (N, H_out, W_out, kH x kW, dg), of every kernel
    point; offset (N, 2 x dg x kH x kW, H_out, W_out) of (dy, dx) pairs, in its own dtype."""
    n, _, h_out, w_out = offset.shape
    kh, kw = kernel_size
    offset = offset.view(n, -1, kh * kw, 2, h_out, w_out).permute(0, 4, 5, 2, 1, 3).contiguous()
    positions = []
    for axis, (size_out, kernel_pos) in enumerate(
        ((h_out, torch.arange(kh).repeat_interleave(kw)), (w_out, torch.arange(kw).repeat(kh)))
    ):
        out_pos = torch.arange(size_out, dtype=offset.dtype, device=offset.device)
        kernel_pos = kernel_pos.to(offset.device, offset.dtype) * dilation[axis]
        base = out_pos[:, None] * stride[axis] - padding[axis] + kernel_pos  # (size_out, K)
        base = base[:, None, :, None] if axis == 0 else base[None, :, :, None]
        positions.append(offset[..., axis] + base)
    return positions


def _bilinear_corners(y, x, mask, height, width):
    """The four bilinear corners of positions y, x (N, H_out, W_out, K, dg) as rows of the
    channels-last input: indices (..., 4) into (N x H x W x dg) rows, weights (..., 4), zero
    for corners outside the image; times the mask (N, dg x K, H_out, W_out) if given.
    Differentiable in y, x and mask."""
    n, _, _, _, dg = y.shape
    y0, x0 = y.detach().floor(), x.detach().floor()
    fy, fx = y - y0, x - x0
    wy = torch.stack((1 - fy, fy), dim=-1)[..., :, None]  # (..., 2, 1): top, bottom
    wx = torch.stack((1 - fx, fx), dim=-1)[..., None, :]  # (..., 1, 2): left, right
    step = torch.arange(2, device=y.device)
    yi = y0.long()[..., None] + step
    xi = x0.long()[..., None] + step
    valid = ((yi >= 0) & (yi < height))[..., :, None] & ((xi >= 0) & (xi < width))[..., None, :]
    image = torch.arange(n, device=y.device).view(n, 1, 1, 1, 1, 1, 1) * (height * width)
    pixel = image + (yi.clamp(0, height - 1) * width)[..., :, None] + xi.clamp(0, width - 1)[
        ..., None, :
    ]
    group = torch.arange(dg, device=y.device).view(dg, 1, 1)
    weights = wy * wx * valid
    if mask is not None:
        h_out, w_out = y.shape[1:3]
        mask = mask.view(n, dg, -1, h_out, w_out).permute(0, 3, 4, 2, 1).contiguous()
        weights = weights * mask[..., None, None]
    return (pixel * dg + group).flatten(-2), weights.flatten(-2)


def _weight_matrices(weight, groups):
    """weight (C_out, C_in / groups, kH, kW) -> (groups, C_out / groups, kH x kW x C_in /
    groups): the columns in (kernel point, channel) order, as the sampled columns."""
    c_out, c_per_group = weight.shape[:2]
    per_group = weight.view(groups, c_out // groups, c_per_group, -1).transpose(2, 3)
    return per_group.reshape(groups, c_out // groups, -1)


def _per_group(columns, groups, depth):
    """columns (B, kH x kW, C_in) -> (groups, B, depth): each group's columns, a copy."""
    b, points = columns.shape[:2]
    return columns.view(b, points, groups, -1).permute(2, 0, 1, 3).reshape(groups, b, depth)


def _chunk_product(columns, matrices, bias, groups):
    """columns (B, kH x kW, C_in), channels in group order, x the weight's matrices ->
    (B, C_out). The matrices enter transposed: BLAS multiplies (B, depth) x (depth, C_out)
    fastest with the second operand stored (C_out, depth)."""
    depth = matrices.shape[2]
    b = columns.shape[0]
    if groups == 1:
        columns, matrix = columns.view(b, depth), matrices[0].t()
        return columns @ matrix if bias is None else torch.addmm(bias, columns, matrix)
    out = torch.bmm(_per_group(columns, groups, depth), matrices.transpose(1, 2))
    out = out.transpose(0, 1).reshape(b, -1)
    return out if bias is None else out + bias


def _chunk_product_backward(columns, grad_out, matrices, grad_matrices, groups):
    """The gradient of :func:`_chunk_product` w.r.t. its columns (B, kH x kW, C_in); adds the
    matrices' gradient to ``grad_matrices``."""
    depth = matrices.shape[2]
    b, points, c_in = columns.shape
    if groups == 1:
        grad_matrices[0].addmm_(grad_out.t(), columns.view(b, depth))
        return (grad_out @ matrices[0]).view(b, points, c_in)
    grad_out = grad_out.view(b, groups, -1).transpose(0, 1)  # (groups, B, C_out / groups)
    grad_matrices.baddbmm_(grad_out.transpose(1, 2), _per_group(columns, groups, depth))
    grad_columns = torch.bmm(grad_out, matrices).view(groups, b, points, -1)
    return grad_columns.permute(1, 2, 0, 3).reshape(b, points, c_in)


class _SampledProduct(torch.autograd.Function):
    """(P, C_out): the columns of P output pixels, sampled from ``rows`` (N x H x W x dg,
    C_in / dg) by ``embedding_bag`` of ``indices`` and ``weights`` (P x kH x kW x dg bags of 4
    corners, in (pixel, kernel point, deformable group) order), times the weight ``matrices``
    (groups, C_out / groups, kH x kW x C_in / groups), plus ``bias``; ``chunk`` bags at a time.
    The backward samples each chunk again instead of keeping all columns, and differentiates the
    sampling on the rows that the chunk reads only (no gradient of all rows per chunk)."""

    @staticmethod
    def forward(ctx, rows, weights, matrices, bias, indices, chunk, points, bags, groups):
        ctx.save_for_backward(rows, weights, matrices, indices)
        ctx.geometry = chunk, points, bags, groups
        return torch.cat([
            _chunk_product(
                _columns(indices[s : s + chunk], rows, weights[s : s + chunk], points, bags),
                matrices,
                bias,
                groups,
            )
            for s in range(0, indices.shape[0], chunk)
        ])

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights, matrices, indices = ctx.saved_tensors
        chunk, points, bags, groups = ctx.geometry
        need_rows, need_weights = ctx.needs_input_grad[:2]
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_weights = torch.empty_like(weights) if need_weights else None
        grad_matrices = torch.zeros_like(matrices)
        first_pixel = 0
        for s in range(0, indices.shape[0], chunk):
            part = indices[s : s + chunk]
            low, high = int(part.min()), int(part.max()) + 1
            with torch.enable_grad():
                read = rows[low:high].detach().requires_grad_(need_rows)
                part_weights = weights[s : s + chunk].detach().requires_grad_(need_weights)
                columns = _columns(part - low, read, part_weights, points, bags)
            pixels = slice(first_pixel, first_pixel + columns.shape[0])
            first_pixel = pixels.stop
            grad_columns = _chunk_product_backward(
                columns.detach(), grad_out[pixels], matrices, grad_matrices, groups
            )
            wanted = [t for t, need in ((read, need_rows), (part_weights, need_weights)) if need]
            grads = list(torch.autograd.grad(columns, wanted, grad_columns)) if wanted else []
            if need_rows:
                grad_rows[low:high] += grads.pop(0)
            if need_weights:
                grad_weights[s : s + chunk] = grads.pop(0)
        grad_bias = grad_out.sum(0) if ctx.needs_input_grad[3] else None
        return grad_rows, grad_weights, grad_matrices, grad_bias, None, None, None, None, None


def _columns(indices, rows, weights, points, bags):
    """The sampled columns (B, kH x kW, C_in) of ``indices`` / ``weights`` (B x ``bags``, 4;
    ``bags`` = kH x kW x dg) from ``rows`` (N x H x W x dg, C_in / dg)."""
    sampled = F.embedding_bag(indices, rows, per_sample_weights=weights, mode="sum")
    return sampled.view(indices.shape[0] // bags, points, -1)


def gather_deform_conv2d(
    x, offset, mask, weight, bias, stride, padding, dilation, groups, reduced=None
):
    """(Modulated) deformable convolution; the arguments of ``torchvision.ops.deform_conv2d``.

    x (N, C_in, H, W); offset (N, 2 x dg x kH x kW, H_out, W_out) in input pixels; mask
    (N, dg x kH x kW, H_out, W_out) or None; weight (C_out, C_in / groups, kH, kW); bias
    (C_out,) or None; stride, padding, dilation: (y, x) pairs -> (N, C_out, H_out, W_out), in
    x's dtype. Positions and bilinear weights are computed in at least float32; the sampled
    values and the products in x's dtype, or in ``reduced`` (``torch.bfloat16``, with the bound
    of the module docstring) where given.
    """
    n, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[-2:]
    points = kh * kw
    dg = offset.shape[1] // (2 * points)
    dtype = reduced or x.dtype
    position_dtype = torch.promote_types(offset.dtype, torch.float32)
    y, x_pos = _sampling_positions(
        offset.to(position_dtype), (kh, kw), stride, padding, dilation
    )
    if mask is not None:
        mask = mask.to(position_dtype)
    indices, weights = _bilinear_corners(y, x_pos, mask, height, width)
    weights = weights.to(dtype)
    # (N x H x W x dg, C_in / dg), row-major: embedding_bag's fast path needs contiguous rows.
    rows = x.to(dtype).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    rows = rows.reshape(-1, c_in // dg)
    matrices = _weight_matrices(weight.to(dtype), groups)
    bias = None if bias is None else bias.to(dtype)
    bags = points * dg  # bags per output pixel: (kernel point, deformable group), raster order
    chunk = max(1, _CHUNK_ELEMENTS // (points * c_in)) * bags
    indices, weights = indices.view(-1, 4), weights.view(-1, 4)
    # Python ints: under tracing, sizes are tensors, which the traced function must not take.
    geometry = [int(v) for v in (chunk, points, bags, groups)]
    out = _SampledProduct.apply(rows, weights, matrices, bias, indices, *geometry)
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    out = out.view(n, h_out, w_out, c_out).permute(0, 3, 1, 2)
    return out.to(x.dtype).contiguous(memory_format=memory_format)


def _is_channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
