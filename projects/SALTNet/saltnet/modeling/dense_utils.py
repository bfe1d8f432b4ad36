"""Helpers shared by SALT-Net's and the plug-ins' dense heads and detectors: the anchor points of
detectron2's anchors, a mean over workers, the heads' conv3x3 + norm + ReLU and their
initialisation."""

from typing import Iterable, List, Tuple

from detectron2.layers import Conv2d, cat, get_norm
from detectron2.structures import Boxes
from detectron2.utils import comm
from torch import Tensor
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from ..layers import DeformConv, ModulatedDeformConv

__all__ = ["anchor_points", "conv_norm_relu", "normal_init_", "reduce_mean"]


def anchor_points(anchors: List[Boxes], strides: List[int]) -> Tuple[Tensor, Tensor]:
    """The anchors' centres (R, 2) xy in pixels and the stride (R,) of each (float32, pixels),
    all levels concatenated; ``strides`` per level."""
    points = cat([a.get_centers() for a in anchors], dim=0)
    per_anchor = [points.new_full((len(a),), float(s)) for a, s in zip(anchors, strides)]
    return points, cat(per_anchor)


def reduce_mean(tensor: Tensor) -> Tensor:
    """Average a tensor over all workers (no-op in a single process); no host sync.

    SALT-Net's loss normalisers (positive counts, quality-weight sums) are this batch's, averaged
    over workers, as in the authors' release. Not ``DenseDetector._ema_update`` (detectron2's
    FCOS / RetinaNet), which smooths the positive count over iterations (momentum 0.9): that is
    another normalisation than the release's, and would give another loss scale per batch.
    """
    if comm.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor = tensor / comm.get_world_size()
    return tensor


def conv_norm_relu(in_channels: int, channels: int, norm: str, bias: bool) -> Conv2d:
    """conv3x3 + norm + ReLU."""
    return Conv2d(
        in_channels,
        channels,
        kernel_size=3,
        padding=1,
        bias=bias,
        norm=get_norm(norm, channels),
        activation=F.relu,
    )


def normal_init_(modules: Iterable[nn.Module], std: float = 0.01) -> None:
    """The dense heads' initialisation: every conv and deformable conv among ``modules`` gets
    weights ~ N(0, std) and zero biases (in the order given, which fixes the random draws)."""
    for module in modules:
        if isinstance(module, (nn.Conv2d, DeformConv, ModulatedDeformConv)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
