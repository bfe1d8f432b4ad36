"""The SALT point sets of each detection, for any dense detector whose head has the SALT operator.

A head with SALT returns, per level, (N, 18, Hi, Wi) regression and classification points: nine
(y, x) pairs in *stride units* from the location's anchor point. A detection records where it
was decoded (``pred_levels``: index of its level, ``pred_locations``: row x Wi + column); from
those, :func:`gather_point_sets` gives its two point sets as (D, 9, 2) xy *pixels*, and
:class:`PointSetOutputs` attaches them to the outputs and rescales them with the boxes.
"""

from typing import Dict, List, Sequence

import torch
from torch import Tensor

__all__ = ["POINT_SET_FIELDS", "PointSetOutputs", "gather_point_sets"]

# Per-detection fields of the SALT point sets (with ``output_point_sets``).
POINT_SET_FIELDS = ("pred_reg_points", "pred_cls_points")


def gather_point_sets(
    levels: Tensor,
    locations: Tensor,
    point_sets: Sequence[Tensor],
    centers: Sequence[Tensor],
    strides: Sequence[int],
) -> Tensor:
    """The point set of each detection, in pixels.

    Args:
        levels, locations: (D,) int64, each detection's level and location (index in 0..Ri-1).
        point_sets: per level (Ri, 18) nine (y, x) points, stride units from the anchor point.
        centers: per level (Ri, 2) xy anchor points of the locations, pixels.
        strides: per level, pixels.

    Returns:
        (D, 9, 2) float32 xy points, pixels, in the order of a 3x3 kernel (0 top-left).
    """
    sizes = torch.tensor([len(c) for c in centers], device=locations.device)
    index = (sizes.cumsum(0) - sizes)[levels] + locations
    yx = torch.cat(list(point_sets))[index].float().unflatten(1, (9, 2))
    stride = torch.cat([c.new_full((len(c),), float(s)) for c, s in zip(centers, strides)])
    return yx.flip(2) * stride[index, None, None] + torch.cat(list(centers))[index, None].float()


class PointSetOutputs:
    """Mixin for a :class:`DenseDetector` whose detections can carry the SALT point sets.

    With ``output_point_sets`` (a constructor argument, default False), inference attaches
    ``pred_reg_points`` and ``pred_cls_points`` (D, 9, 2) xy pixels to each detection
    (:meth:`attach_point_sets`, called by the subclass's ``forward_inference``) and
    :meth:`forward` rescales them to each input's ``height`` / ``width``, as
    ``detector_postprocess`` does with the boxes.
    """

    def __init__(self, *args, output_point_sets: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_point_sets = output_point_sets

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        outputs = super().forward(batched_inputs)
        if self.training or not self.output_point_sets:
            return outputs
        for output, inputs in zip(outputs, batched_inputs):
            instances, (height, width) = output["instances"], inputs["image"].shape[-2:]
            out_height, out_width = instances.image_size
            scale = instances.scores.new_tensor([out_width / width, out_height / height])
            for name in POINT_SET_FIELDS:
                instances.set(name, instances.get(name) * scale)
        return outputs

    def attach_point_sets(self, results, salt, centers, strides) -> None:
        """Set the point-set fields of each image's detections (in place).

        ``results``: per image :class:`Instances` with ``pred_levels`` / ``pred_locations``;
        ``salt``: the head's :class:`~.salt.SALTPredictions` (per-level lists, (N, 18, Hi, Wi)
        point maps), None for a head without SALT; ``centers`` / ``strides``: per level
        (Hi x Wi, 2) pixels / pixels.
        """
        if salt is None:
            raise ValueError(
                "output_point_sets needs the SALT operator's point sets; this head runs without "
                "SALT (SALT_ON False)."
            )
        for i, instances in enumerate(results):
            for name, per_level in zip(POINT_SET_FIELDS, (salt.reg_points, salt.cls_points)):
                flat = [p[i].flatten(1).t() for p in per_level]  # (Hi x Wi, 18) per level
                instances.set(
                    name,
                    gather_point_sets(
                        instances.pred_levels, instances.pred_locations, flat, centers, strides
                    ),
                )
