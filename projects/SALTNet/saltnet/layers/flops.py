"""FLOPs of the deformable convolutions for detectron2's FLOP counter.

detectron2's :class:`~detectron2.utils.analysis.FlopCountAnalysis` (fvcore's, what detectron2's
``tools/analyze_model.py --tasks flop`` runs) counts by traced operator and has no handle for
deformable convolution. :class:`FlopCountAnalysis` here is detectron2's with handles for every
backend's operator; ``DEFORM_CONV_FLOP_HANDLES`` are the handles themselves, for any fvcore
counter (``counter.set_op_handle(**DEFORM_CONV_FLOP_HANDLES)``).

Convention (fvcore's: one multiply-add is one flop). A deformable conv with weight
(C_out, C_in / groups, kH, kW) and output (N, C_out, H_out, W_out) counts

* the dense convolution, N x H_out x W_out x C_out x (C_in / groups) x kH x kW, as detectron2
  counts a plain convolution of that shape, plus
* the bilinear sampling, N x H_out x W_out x kH x kW x C_in x 4: four corner multiply-adds per
  sampled value (the modulation mask is folded into the corner weights).

The sampling positions and bilinear weights (per kernel point and deformable group, not per
channel) are elementwise work, which detectron2 does not count for any layer. Each backend gives
the same count: ``torchvision`` traces as ``torchvision::deform_conv2d``, ``triton`` and
``detectron2`` as their autograd functions, ``gather`` as its sampling and matrix product (an
autograd function, after the sampling positions' elementwise work).
"""

from detectron2.utils import analysis
from fvcore.nn.jit_handles import get_shape

__all__ = ["DEFORM_CONV_FLOP_HANDLES", "FlopCountAnalysis", "deform_conv_flops"]

CORNERS = 4  # bilinear sampling: multiply-adds per sampled value


def deform_conv_flops(x_shape, weight_shape, out_shape) -> int:
    """Multiply-adds of one deformable conv: x (N, C_in, H, W), weight (C_out, C_in / groups,
    kH, kW), output (N, C_out, H_out, W_out) -> the dense conv's plus the sampling's."""
    n, c_out, h_out, w_out = out_shape
    _, c_per_group, kh, kw = weight_shape
    pixels_x_points = n * h_out * w_out * kh * kw
    return pixels_x_points * (c_out * c_per_group + CORNERS * x_shape[1])


def _torchvision_handle(inputs, outputs):
    """``torchvision::deform_conv2d(input, weight, offset, mask, bias, ...)``."""
    return deform_conv_flops(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]))


def _autograd_function_handle(inputs, outputs):
    """An autograd function traced as ``prim::PythonOp``, with x first and the weight the last
    4-D tensor among its inputs (triton's, detectron2's)."""
    shapes = [get_shape(v) for v in inputs]
    weight_shape = [s for s in shapes if s is not None and len(s) == 4][-1]
    return deform_conv_flops(shapes[0], weight_shape, get_shape(outputs[0]))


def _gather_handle(inputs, outputs):
    """The gather backend's ``_SampledProduct(rows, weights, matrices, [bias,] indices)`` ->
    (pixels, C_out): four corner multiply-adds per sampled value (the rows' width times the
    corner indices), and the matrix products (pixels x C_out x the matrices' depth)."""
    rows, matrices, indices = (get_shape(inputs[i]) for i in (0, 2, -1))
    pixels, c_out = get_shape(outputs[0])
    return rows[1] * indices[0] * indices[1] + pixels * c_out * matrices[2]


DEFORM_CONV_FLOP_HANDLES = {
    "torchvision::deform_conv2d": _torchvision_handle,
    "prim::PythonOp._TritonDeformConv": _autograd_function_handle,
    "prim::PythonOp._DeformConv": _autograd_function_handle,
    "prim::PythonOp._ModulatedDeformConv": _autograd_function_handle,
    "prim::PythonOp._SampledProduct": _gather_handle,
}


class FlopCountAnalysis(analysis.FlopCountAnalysis):
    """detectron2's FLOP counter (``FlopCountAnalysis(model, inputs)``, inputs as the model
    takes them), counting the deformable convolutions of every backend as the module docstring
    says."""

    def __init__(self, model, inputs):
        super().__init__(model, inputs)
        self.set_op_handle(**DEFORM_CONV_FLOP_HANDLES)
