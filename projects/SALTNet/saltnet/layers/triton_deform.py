"""(Modulated) deformable convolution as fused Triton kernels: backend ``"triton"``.

An implicit GEMM: each program of the forward kernel computes a tile of output pixels x output
channels, reducing over the 3 x 3 kernel points x the input channels of its group. The input is
read channels-last; the bilinear sampling positions and weights are computed in float32
(float64 for float64 inputs) and only the sampled feature values are rounded to the operand
dtype (bfloat16 / float16 / float32 / float64) that ``tl.dot`` multiplies with the weight,
accumulating in float32 (float64). The backward recomputes the samples: one kernel forms each
tile of column gradients (grad_out x weight) and from it the input gradient (atomic adds to the
four bilinear corners), the offset gradient (forward differences of the corners, as
torchvision) and the mask gradient; another forms the weight gradient as a GEMM of the columns
and grad_out; the bias gradient is a sum.

Covers 3 x 3 kernels, dilation 1, one deformable group, any stride, padding and convolution
groups, with or without mask; :func:`unsupported` names anything else (the layer then runs
torchvision). Under autocast, float32 inputs are computed in the autocast dtype, as convolutions
are. Triton decides when this module is imported whether its kernels run compiled (CUDA) or
interpreted on CPU tensors (``TRITON_INTERPRET=1``, for tests).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton import knobs

__all__ = ["INTERPRETED", "kernel_launches", "triton_deform_conv2d", "unsupported"]

# True if this module's kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = bool(knobs.runtime.interpret)

# 3 x 3 kernel points, raster order; a constexpr so that the kernels can read it too.
_POINTS = tl.constexpr(9)
# Triton compiles a kernel again for each new combination of its integer arguments that equal 1
# or divide by 16. The spatial sizes, strides and paddings change with every image size and
# pyramid level and gain nothing from it (they index rows, one offset pair per row): left
# unspecialised, a kernel compiles once per dtype, mask and channel tiling. The channel counts
# stay specialised: divisible by 16, the channel-contiguous loads and stores vectorise.
_UNSPECIALISED = ["M", "H", "W", "HWo", "Wo", "stride_h", "stride_w", "pad_h", "pad_w"]


def unsupported(x, weight, stride, padding, dilation, deformable_groups) -> str:
    """A description of what these kernels do not cover in this call, or "" if they do."""
    problems = []
    if tuple(weight.shape[-2:]) != (3, 3):
        problems.append(f"kernel {tuple(weight.shape[-2:])}")
    if tuple(dilation) != (1, 1):
        problems.append(f"dilation {tuple(dilation)}")
    if deformable_groups != 1:
        problems.append(f"{deformable_groups} deformable groups")
    if x.is_cuda == INTERPRETED:
        problems.append(f"{x.device.type} tensors {'with' if INTERPRETED else 'without'} "
                        "TRITON_INTERPRET")
    if x.is_cuda and x.dtype == torch.float64:
        problems.append("float64 on CUDA")
    return ", ".join(problems)


@triton.jit
def _position(off_ptr, n64, p, oy, ox, m_ok, H, W, HWo, k, stride_h, stride_w, pad_h, pad_w):
    """Sampling position of kernel point k for output rows (n, p), in input pixels: the
    top-left corner (y0, x0) (int32) and the fractions (ly, lx). Positions are clamped to
    [-2, size + 1] first: all four corners stay outside the image when they were."""
    ct = off_ptr.dtype.element_ty
    base = n64 * (HWo * (2 * _POINTS)) + p
    dy = tl.load(off_ptr + base + (2 * k) * HWo, mask=m_ok, other=0.0)
    dx = tl.load(off_ptr + base + (2 * k + 1) * HWo, mask=m_ok, other=0.0)
    py = tl.minimum(tl.maximum((oy * stride_h - pad_h + k // 3).to(ct) + dy, -2.0), H + 1.0)
    px = tl.minimum(tl.maximum((ox * stride_w - pad_w + k % 3).to(ct) + dx, -2.0), W + 1.0)
    y0 = tl.floor(py)
    x0 = tl.floor(px)
    return y0.to(tl.int32), x0.to(tl.int32), py - y0, px - x0


@triton.jit
def _corner(x_ptr, img64, yi, xi, H, W, C, cols, c_ok, m_ok, ct: tl.constexpr):
    """Values (BM, BK) of channels ``cols`` at integer pixels (yi, xi), 0 outside the image;
    also their addresses and validity (for the input gradient's atomic adds)."""
    ok = m_ok & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
    addr = ((img64 + yi * W + xi) * C)[:, None] + cols[None, :]
    ok2 = ok[:, None] & c_ok[None, :]
    return tl.load(x_ptr + addr, mask=ok2, other=0.0).to(ct), addr, ok2


@triton.jit
def _sample(x_ptr, off_ptr, mask_ptr, n64, p, oy, ox, m_ok, k, cols, c_ok,
            H, W, C, HWo, stride_h, stride_w, pad_h, pad_w, HAS_MASK: tl.constexpr):
    """Modulated bilinear samples (BM, BK) of kernel point k, in the coordinate dtype."""
    ct: tl.constexpr = off_ptr.dtype.element_ty
    y0, x0, ly, lx = _position(off_ptr, n64, p, oy, ox, m_ok, H, W, HWo, k,
                               stride_h, stride_w, pad_h, pad_w)
    img64 = n64 * H * W
    v00, _, _ = _corner(x_ptr, img64, y0, x0, H, W, C, cols, c_ok, m_ok, ct)
    v01, _, _ = _corner(x_ptr, img64, y0, x0 + 1, H, W, C, cols, c_ok, m_ok, ct)
    v10, _, _ = _corner(x_ptr, img64, y0 + 1, x0, H, W, C, cols, c_ok, m_ok, ct)
    v11, _, _ = _corner(x_ptr, img64, y0 + 1, x0 + 1, H, W, C, cols, c_ok, m_ok, ct)
    wy = ly[:, None]
    wx = lx[:, None]
    val = (1 - wy) * ((1 - wx) * v00 + wx * v01) + wy * ((1 - wx) * v10 + wx * v11)
    if HAS_MASK:
        val = val * tl.load(mask_ptr + n64 * (HWo * _POINTS) + k * HWo + p, mask=m_ok, other=0.0)[
            :, None
        ]
    return val


# How _mma multiplies: in the operands' dtype (bf16 / fp16 on tensor cores); exactly ("ieee",
# fp32 / fp64: no TF32); or bf16 operands widened to fp32 first, for Triton's CPU interpreter,
# whose tl.dot multiplies bf16 as raw integers. bf16 x bf16 products are exact in fp32, so the
# widened product accumulates the same values.
_NATIVE, _IEEE, _WIDEN_BF16 = 0, 1, 2


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr):
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if DOT == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _rows(pid_m, M, HWo, Wo, BLOCK_M: tl.constexpr):
    """Output rows of a tile: flat index m = (n, p), p = oy x Wo + ox."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n = rm // HWo
    p = rm % HWo
    return n.to(tl.int64), p, p // Wo, p % Wo, m_ok, rm


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _forward_kernel(
    x_ptr, off_ptr, mask_ptr, w_ptr, b_ptr, out_ptr,
    M, H, W, C, Cg, Og, Cout, HWo, Wo, stride_h, stride_w, pad_h, pad_w,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (M, Cout) = columns (M, 9 x Cg) @ w (9 x Cg, Cout) per group (+ bias)."""
    ct: tl.constexpr = off_ptr.dtype.element_ty
    g = tl.program_id(2)
    n64, p, oy, ox, m_ok, rm = _rows(tl.program_id(0), M, HWo, Wo, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < Og
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ct)
    for k in range(_POINTS):
        for c0 in range(0, Cg, BLOCK_K):
            rc = c0 + tl.arange(0, BLOCK_K)
            c_ok = rc < Cg
            a = _sample(x_ptr, off_ptr, mask_ptr, n64, p, oy, ox, m_ok, k, g * Cg + rc, c_ok,
                        H, W, C, HWo, stride_h, stride_w, pad_h, pad_w, HAS_MASK)
            b = tl.load(
                w_ptr + (k * Cg + rc)[:, None] * Cout + (g * Og + rn)[None, :],
                mask=c_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = _mma(a.to(w_ptr.dtype.element_ty), b, acc, DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + g * Og + rn, mask=n_ok, other=0.0).to(ct)[None, :]
    tl.store(
        out_ptr + rm[:, None] * Cout + (g * Og + rn)[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _grad_weight_kernel(
    x_ptr, off_ptr, mask_ptr, gout_ptr, gw_ptr,
    M, H, W, C, Cg, Og, Cout, HWo, Wo, stride_h, stride_w, pad_h, pad_w,
    HAS_MASK: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gw (9 x Cg, Cout) = columns^T (9 x Cg, M) @ grad_out (M, Cout) per group."""
    ct: tl.constexpr = off_ptr.dtype.element_ty
    g = tl.program_id(2)
    c_tiles = tl.cdiv(Cg, BLOCK_K)
    k = tl.program_id(0) // c_tiles
    rc = (tl.program_id(0) % c_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = rc < Cg
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < Og
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ct)
    for m0 in range(0, M, BLOCK_M):
        n64, p, oy, ox, m_ok, rm = _rows(m0 // BLOCK_M, M, HWo, Wo, BLOCK_M)
        a = _sample(x_ptr, off_ptr, mask_ptr, n64, p, oy, ox, m_ok, k, g * Cg + rc, c_ok,
                    H, W, C, HWo, stride_h, stride_w, pad_h, pad_w, HAS_MASK)
        go = tl.load(
            gout_ptr + rm[:, None] * Cout + (g * Og + rn)[None, :],
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = _mma(tl.trans(a.to(gout_ptr.dtype.element_ty)), go, acc, DOT)
    tl.store(
        gw_ptr + (k * Cg + rc)[:, None] * Cout + (g * Og + rn)[None, :],
        acc,
        mask=c_ok[:, None] & n_ok[None, :],
    )


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _grad_input_kernel(
    x_ptr, off_ptr, mask_ptr, w_ptr, gout_ptr, gx_ptr, goff_ptr, gmask_ptr,
    M, H, W, C, Cg, Og, Cout, HWo, Wo, stride_h, stride_w, pad_h, pad_w,
    HAS_MASK: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per (rows, kernel point k, group): column gradients grad_out @ w^T, then the input
    gradient (atomics to the 4 corners), the offset and the mask gradient of point k."""
    ct: tl.constexpr = off_ptr.dtype.element_ty
    k = tl.program_id(1)
    g = tl.program_id(2)
    n64, p, oy, ox, m_ok, rm = _rows(tl.program_id(0), M, HWo, Wo, BLOCK_M)
    y0, x0, ly, lx = _position(off_ptr, n64, p, oy, ox, m_ok, H, W, HWo, k,
                               stride_h, stride_w, pad_h, pad_w)
    wy = ly[:, None]
    wx = lx[:, None]
    img64 = n64 * H * W
    if HAS_MASK:
        mval = tl.load(mask_ptr + n64 * (HWo * _POINTS) + k * HWo + p, mask=m_ok, other=0.0)
    else:
        mval = tl.full((BLOCK_M,), 1.0, ct)
    g_dy = tl.zeros((BLOCK_M,), dtype=ct)
    g_dx = tl.zeros((BLOCK_M,), dtype=ct)
    g_mask = tl.zeros((BLOCK_M,), dtype=ct)
    for c0 in range(0, Cg, BLOCK_K):
        rc = c0 + tl.arange(0, BLOCK_K)
        c_ok = rc < Cg
        cols = g * Cg + rc
        gcol = tl.zeros((BLOCK_M, BLOCK_K), dtype=ct)
        for o0 in range(0, Og, BLOCK_N):
            ro = o0 + tl.arange(0, BLOCK_N)
            o_ok = ro < Og
            go = tl.load(
                gout_ptr + rm[:, None] * Cout + (g * Og + ro)[None, :],
                mask=m_ok[:, None] & o_ok[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + (k * Cg + rc)[None, :] * Cout + (g * Og + ro)[:, None],
                mask=c_ok[None, :] & o_ok[:, None],
                other=0.0,
            )
            gcol = _mma(go, wt, gcol, DOT)
        v00, a00, ok00 = _corner(x_ptr, img64, y0, x0, H, W, C, cols, c_ok, m_ok, ct)
        v01, a01, ok01 = _corner(x_ptr, img64, y0, x0 + 1, H, W, C, cols, c_ok, m_ok, ct)
        v10, a10, ok10 = _corner(x_ptr, img64, y0 + 1, x0, H, W, C, cols, c_ok, m_ok, ct)
        v11, a11, ok11 = _corner(x_ptr, img64, y0 + 1, x0 + 1, H, W, C, cols, c_ok, m_ok, ct)
        sampled = (1 - wy) * ((1 - wx) * v00 + wx * v01) + wy * ((1 - wx) * v10 + wx * v11)
        g_mask += tl.sum(gcol * sampled, axis=1)
        gm = gcol * mval[:, None]
        g_dy += tl.sum(gm * ((1 - wx) * (v10 - v00) + wx * (v11 - v01)), axis=1)
        g_dx += tl.sum(gm * ((1 - wy) * (v01 - v00) + wy * (v11 - v10)), axis=1)
        tl.atomic_add(gx_ptr + a00, gm * (1 - wy) * (1 - wx), mask=ok00)
        tl.atomic_add(gx_ptr + a01, gm * (1 - wy) * wx, mask=ok01)
        tl.atomic_add(gx_ptr + a10, gm * wy * (1 - wx), mask=ok10)
        tl.atomic_add(gx_ptr + a11, gm * wy * wx, mask=ok11)
    base = n64 * (HWo * (2 * _POINTS)) + p
    tl.atomic_add(goff_ptr + base + (2 * k) * HWo, g_dy, mask=m_ok)
    tl.atomic_add(goff_ptr + base + (2 * k + 1) * HWo, g_dx, mask=m_ok)
    if HAS_MASK:
        tl.atomic_add(gmask_ptr + n64 * (HWo * _POINTS) + k * HWo + p, g_mask, mask=m_ok)


def _blocks(c_per_group: int, out_per_group: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K): tl.dot needs powers of two >= 16. The interpreter's cost
    is per operation, not per element: it gets wider tiles, so fewer loop iterations."""
    block_n = max(16, min(128 if INTERPRETED else 64, triton.next_power_of_2(out_per_group)))
    block_k = max(16, min(128 if INTERPRETED else 32, triton.next_power_of_2(c_per_group)))
    return 64, block_n, block_k


class _Plan(NamedTuple):
    """What the kernels of one call share: their integer arguments (``geometry``: M, H, W, C,
    C / groups, C_out / groups, C_out, Ho x Wo, Wo, stride, padding), the number of groups,
    the tiles (BLOCK_M, BLOCK_N, BLOCK_K) and how ``tl.dot`` multiplies (``_NATIVE``...)."""

    geometry: tuple
    groups: int
    blocks: tuple
    dot: int


def _plan(x, offset, w, stride, padding, groups) -> _Plan:
    """The plan of a call with inputs in kernel layout (see :class:`_TritonDeformConv`)."""
    n, height, width, c_in = x.shape
    h_out, w_out = offset.shape[-2:]
    c_out = w.shape[1]
    geometry = (n * h_out * w_out, height, width, c_in, c_in // groups, c_out // groups, c_out,
                h_out * w_out, w_out, *stride, *padding)
    if x.dtype in (torch.float32, torch.float64):
        dot = _IEEE
    else:
        dot = _WIDEN_BF16 if INTERPRETED and x.dtype == torch.bfloat16 else _NATIVE
    return _Plan(geometry, groups, _blocks(c_in // groups, c_out // groups), dot)


def _forward_launch(plan, x, offset, mask, w, bias, out):
    """(kernel, grid, arguments, constexprs) of the forward kernel."""
    rows, out_per_group = plan.geometry[0], plan.geometry[5]
    block_m, block_n, block_k = plan.blocks
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_per_group, block_n), plan.groups)
    dummy = offset  # stands in for an absent mask / bias pointer (never read)
    args = (x, offset, dummy if mask is None else mask, w, dummy if bias is None else bias, out,
            *plan.geometry)
    flags = dict(HAS_MASK=mask is not None, HAS_BIAS=bias is not None, DOT=plan.dot,
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return _forward_kernel, grid, args, flags


def _backward_launches(plan, x, offset, mask, w, grad_out, grad_w, grad_x, grad_offset,
                       grad_mask):
    """[(kernel, grid, arguments, constexprs)] of the weight-gradient and the input-gradient
    kernels, in launch order."""
    rows, _, _, _, c_per_group, out_per_group = plan.geometry[:6]
    block_m, block_n, block_k = plan.blocks
    flags = dict(HAS_MASK=mask is not None, DOT=plan.dot,
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    mask_arg = offset if mask is None else mask
    weight_grid = (_POINTS.value * triton.cdiv(c_per_group, block_k),
                   triton.cdiv(out_per_group, block_n), plan.groups)
    input_grid = (triton.cdiv(rows, block_m), _POINTS.value, plan.groups)
    return [
        (_grad_weight_kernel, weight_grid,
         (x, offset, mask_arg, grad_out, grad_w, *plan.geometry), flags),
        (_grad_input_kernel, input_grid,
         (x, offset, mask_arg, w, grad_out, grad_x, grad_offset, grad_mask, *plan.geometry),
         flags),
    ]


def _launch(kernel, grid, args, flags):
    kernel[grid](*args, **flags)


def _backward_outputs(x, offset, mask, w):
    """Zeroed / empty gradients of (w, x, offset, mask) in the coordinate dtype, as the
    backward kernels write them (the input and offset gradients by atomic adds)."""
    ct = offset.dtype
    return (torch.empty(w.shape, device=x.device, dtype=ct),
            torch.zeros(x.shape, device=x.device, dtype=ct),
            torch.zeros_like(offset),
            torch.zeros_like(offset) if mask is None else torch.zeros_like(mask))


class _TritonDeformConv(torch.autograd.Function):
    """Inputs already in kernel layout: x (N, H, W, C) contiguous in the operand dtype; offset
    (N, 18, Ho, Wo) and mask (N, 9, Ho, Wo) or None, contiguous in the coordinate dtype;
    w (9 x Cg, Cout) in the operand dtype; bias (Cout,) or None. Returns (N x Ho x Wo, Cout)."""

    @staticmethod
    def forward(ctx, x, offset, mask, w, bias, stride, padding, groups):
        plan = _plan(x, offset, w, stride, padding, groups)
        out = torch.empty(plan.geometry[0], w.shape[1], device=x.device, dtype=x.dtype)
        _launch(*_forward_launch(plan, x, offset, mask, w, bias, out))
        ctx.save_for_backward(x, offset, mask, w)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, offset, mask, w = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype).contiguous()
        grads = _backward_outputs(x, offset, mask, w)
        for launch in _backward_launches(ctx.plan, x, offset, mask, w, grad_out, *grads):
            _launch(*launch)
        grad_w, grad_x, grad_offset, grad_mask = grads
        grad_bias = grad_out.sum(0, dtype=offset.dtype) if ctx.has_bias else None
        return (grad_x, grad_offset, None if mask is None else grad_mask, grad_w, grad_bias,
                None, None, None)


def _operand_dtype(x):
    """The dtype tl.dot multiplies in: x's, or autocast's for float32 x under autocast."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _kernel_inputs(x, offset, mask, weight, bias, dtype):
    """x, offset, mask, w, bias in kernel layout (see :class:`_TritonDeformConv`), operands in
    ``dtype``, and the number of convolution groups."""
    c_out, c_per_group = weight.shape[:2]
    coords = torch.float64 if dtype == torch.float64 else torch.float32
    return (
        x.to(dtype).permute(0, 2, 3, 1).contiguous(),
        offset.to(coords).contiguous(),
        None if mask is None else mask.to(coords).contiguous(),
        # contiguous: the kernels index it so, and with one input channel per group the
        # permuted weight reshapes to a strided view.
        weight.to(dtype).permute(2, 3, 1, 0).reshape(_POINTS.value * c_per_group, c_out)
        .contiguous(),
        None if bias is None else bias.to(coords),
        x.shape[1] // c_per_group,
    )


def triton_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation):
    """The arguments of ``torchvision.ops.deform_conv2d`` (``unsupported`` must return "").

    x (N, C_in, H, W); offset (N, 18, H_out, W_out), (dy, dx) in input pixels; mask
    (N, 9, H_out, W_out) or None; weight (C_out, C_in / groups, 3, 3); bias (C_out,) or None
    -> (N, C_out, H_out, W_out) in the operand dtype, channels-last memory.
    """
    n, c_out = x.shape[0], weight.shape[0]
    h_out, w_out = offset.shape[-2:]
    dtype = _operand_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x_, offset_, mask_, w, bias_, groups = _kernel_inputs(x, offset, mask, weight, bias, dtype)
        out = _TritonDeformConv.apply(x_, offset_, mask_, w, bias_, tuple(stride),
                                      tuple(padding), groups)
    return out.view(n, h_out, w_out, c_out).permute(0, 3, 1, 2)


def kernel_launches(x, offset, mask, weight, bias, stride, padding, dtype):
    """What a forward and backward of :func:`triton_deform_conv2d` with these arguments and
    operand ``dtype`` launch, as [(kernel, grid, arguments, constexprs)], launching nothing:
    a compile ahead of the run warms up these kernels with these arguments. The spatial sizes
    are unspecialised, so tensors of one pixel (on any device) name the same variants as the
    full-size ones."""
    x, offset, mask, w, bias, groups = _kernel_inputs(x, offset, mask, weight, bias, dtype)
    plan = _plan(x, offset, w, tuple(stride), tuple(padding), groups)
    out = torch.empty(plan.geometry[0], w.shape[1], device=x.device, dtype=x.dtype)
    return [_forward_launch(plan, x, offset, mask, w, bias, out)] + _backward_launches(
        plan, x, offset, mask, w, out, *_backward_outputs(x, offset, mask, w))
