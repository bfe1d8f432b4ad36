"""The SALT operator (spatial-disentangled, task-aligned sampling) of one FPN level.

From a level's classification and regression tower outputs it predicts a coarse box and nine
regression points inside / on it, rescales those points into nine classification points, and
samples each tower at its own points with a deformable conv, so that each task reads its own
evidence and the result stays aligned with the location's anchor point.

Units: the coarse side distances, the point sets and the deformable-conv offsets are all in
*stride units* of their level (one unit = one feature-map cell = ``stride`` input pixels),
measured from the location's anchor point. Points and offsets are (y, x) pairs, in the 3x3 raster
order of a deformable-conv kernel (0 top-left, 4 centre, 8 bottom-right).
"""

from typing import Any, NamedTuple, Optional, Sequence

import torch
from detectron2.layers import get_norm
from torch import nn
from torch.nn import functional as F

from ..layers import DeformConv
from .dense_utils import conv_norm_relu

__all__ = [
    "KERNEL_GRID",
    "SALTOperator",
    "SALTOutput",
    "SALTPredictions",
    "place_points",
]

# The regular 3x3 sampling grid of a deformable conv, (y, x) pairs in raster order: (1, 18, 1, 1).
KERNEL_GRID = torch.stack(
    torch.meshgrid(torch.arange(-1.0, 2.0), torch.arange(-1.0, 2.0), indexing="ij"), dim=-1
).reshape(1, 18, 1, 1)


def place_points(distances: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Place SALT's nine regression points inside/on a coarse box.

    Args:
        distances: (N, 4, H, W) coarse side distances (left, top, right, bottom) >= 0, stride units.
        factors: (N, 14, H, W) shape factors in (0, 1).

    Returns:
        (N, 18, H, W): nine (y, x) points relative to the anchor point, stride units. Points 3 / 5
        lie on the left / right side at heights given by factors 0 / 2, points 1 / 7 on the top /
        bottom side at widths given by factors 1 / 3; points 0, 2, 4, 6, 8 lie inside the box with
        y factors 4, 6, 8, 10, 12 and x factors 5, 7, 9, 11, 13.
    """
    left, top, right, bottom = distances.unbind(dim=1)
    width, height = left + right, top + bottom
    ys = torch.stack(
        [
            -top + height * factors[:, 4],
            -top,
            -top + height * factors[:, 6],
            -top + height * factors[:, 0],
            -top + height * factors[:, 8],
            -top + height * factors[:, 2],
            -top + height * factors[:, 10],
            bottom,
            -top + height * factors[:, 12],
        ],
        dim=1,
    )
    xs = torch.stack(
        [
            -left + width * factors[:, 5],
            -left + width * factors[:, 1],
            -left + width * factors[:, 7],
            -left,
            -left + width * factors[:, 9],
            right,
            -left + width * factors[:, 11],
            -left + width * factors[:, 3],
            -left + width * factors[:, 13],
        ],
        dim=1,
    )
    return torch.stack([ys, xs], dim=2).flatten(1, 2)


def _deform_conv_norm_relu(channels: int, norm: str, backend: Optional[str]) -> DeformConv:
    """Deformable conv3x3 (no bias) + norm + ReLU: SALT's point-sampling conv."""
    return DeformConv(
        channels,
        channels,
        3,
        padding=1,
        norm=get_norm(norm, channels),
        activation=F.relu,
        backend=backend,
    )


class SALTPredictions(NamedTuple):
    """What the SALT operator predicts, in stride units from the anchor point (module doc): for
    one level (:class:`SALTOperator`) each field is an (N, C, H, W) tensor; in the heads' outputs
    (``HeadOutputs``, ``PluginHeadOutputs``) a list of them over the levels."""

    coarse: Any  # (N, 4, H, W) float32 coarse side distances (left, top, right, bottom)
    reg_points: Any  # (N, 18, H, W) nine (y, x) regression points
    cls_points: Any  # (N, 18, H, W) nine (y, x) classification points

    @classmethod
    def over_levels(cls, levels: Sequence["SALTPredictions"]) -> "SALTPredictions":
        """The levels' predictions as one, each field the list of the levels' tensors."""
        return cls(**{field: [getattr(p, field) for p in levels] for field in cls._fields})


class SALTOutput(NamedTuple):
    """What :class:`SALTOperator` gives for one level; N images, C channels, H x W locations."""

    cls_feat: torch.Tensor  # (N, C, H, W) classification features sampled at cls_points
    reg_feat: torch.Tensor  # (N, C, H, W) regression features sampled at reg_points
    salt: SALTPredictions  # this level's coarse box and point sets


class SALTOperator(nn.Module):
    """The SALT operator, shared over ``num_levels`` levels of ``channels`` channels.

    ``forward(cls_feat, reg_feat, x, level)`` takes the two tower outputs and the tower input
    ``x`` (the FPN map, added to the classification features as a residual), all (N, C, H, W),
    and returns a :class:`SALTOutput`. Its owner initialises it
    (:func:`~.dense_utils.normal_init_`, in the owner's order of random draws). The coarse box
    is ReLU(conv) times a learnable scale per level; the 14 shape factors are sigmoids (see
    :func:`place_points`); the classification points are the (detached) regression points
    rescaled point by point by exp(conv).
    """

    def __init__(
        self, channels: int, num_levels: int, norm: str = "GN", deform_backend: Optional[str] = None
    ):
        super().__init__()
        # Coarse box and the shape factors that place the nine regression points.
        # (These two convs keep their bias before the norm, as in the authors' release.)
        self.coarse_conv = conv_norm_relu(channels, channels, norm, bias=True)
        self.coarse_pred = nn.Conv2d(channels, 4, kernel_size=3, padding=1)
        self.point_factor_pred = nn.Conv2d(channels, 14, kernel_size=3, padding=1)
        self.coarse_scales = nn.ParameterList(
            [nn.Parameter(torch.tensor(1.0)) for _ in range(num_levels)]
        )
        # Regression: sample the reg tower at the regression points.
        self.reg_dcn = _deform_conv_norm_relu(channels, norm, deform_backend)
        # Classification: rescale the (detached) regression points, sample the cls features.
        self.cls_point_conv = conv_norm_relu(channels, channels, norm, bias=True)
        self.cls_point_scale_pred = nn.Conv2d(channels, 18, kernel_size=3, padding=1)
        self.cls_dcn = _deform_conv_norm_relu(channels, norm, deform_backend)
        self.register_buffer("kernel_grid", KERNEL_GRID.clone(), persistent=False)

    def forward(self, cls_feat, reg_feat, x, level: int) -> SALTOutput:
        cls_feat = cls_feat + x
        hidden = self.coarse_conv(reg_feat)
        coarse = F.relu(self.coarse_pred(hidden)).float() * self.coarse_scales[level].float()
        factors = self.point_factor_pred(hidden).float().sigmoid()
        reg_points = place_points(coarse, factors)
        reg_feat = self.reg_dcn(reg_feat, reg_points - self.kernel_grid)
        point_scale = self.cls_point_scale_pred(self.cls_point_conv(cls_feat)).float().exp()
        cls_points = point_scale * reg_points.detach()
        cls_feat = self.cls_dcn(cls_feat, cls_points - self.kernel_grid)
        return SALTOutput(cls_feat, reg_feat, SALTPredictions(coarse, reg_points, cls_points))
