"""The SALT-Net head: GFLV2-style towers and quality branch plus the SALT operator.

Units: the coarse side distances, the point sets and the deformable-conv offsets are all in
*stride units* of their level (one unit = one feature-map cell = ``stride`` input pixels),
measured from the location's anchor point. Points and offsets are (y, x) pairs, in the 3x3 raster
order of a deformable-conv kernel (0 top-left, 4 centre, 8 bottom-right).
"""

import math
from typing import Dict, List, NamedTuple, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from torch import nn
from torch.nn import functional as F

from ..layers import ModulatedDeformConv
from .dense_utils import conv_norm_relu, normal_init_
from .salt import SALTOperator, SALTPredictions

__all__ = ["OUTPUT_GROUPS", "HeadOutputs", "SALTHead"]


class HeadOutputs(NamedTuple):
    """What :class:`SALTHead` returns: per-level lists, level i of N images and Hi x Wi
    locations (:meth:`SALTHead.forward_level`: one level's tensors)."""

    # (N, K, Hi, Wi) joint class scores in [0, 1] = sigmoid(class logit) x quality (float32).
    scores: List[torch.Tensor]
    # (N, 4 x (reg_max + 1), Hi, Wi) refined box-distribution logits, sides left, top, right,
    # bottom, bins in stride units (float32).
    box_logits: List[torch.Tensor]
    # The SALT operator's coarse box and point sets; None for the plain head (salt_on=False).
    salt: Optional[SALTPredictions] = None

    def groups(self) -> Dict[str, List[torch.Tensor]]:
        """The groups the head filled, by name, in the order of :data:`OUTPUT_GROUPS`."""
        groups = {"scores": self.scores, "box_logits": self.box_logits}
        return groups if self.salt is None else {**groups, **self.salt._asdict()}

    @classmethod
    def from_groups(cls, groups: Dict[str, List[torch.Tensor]]) -> "HeadOutputs":
        """The inverse of :meth:`groups`."""
        salt = {name: groups[name] for name in SALTPredictions._fields if name in groups}
        salt = SALTPredictions(**salt) if salt else None
        return cls(scores=groups["scores"], box_logits=groups["box_logits"], salt=salt)


# The names of the head's output groups (:meth:`HeadOutputs.groups`), the SALT ones last.
OUTPUT_GROUPS = ("scores", "box_logits") + SALTPredictions._fields


class _ModulatedDeformTowerConv(nn.Module):
    """A modulated deformable conv3x3 (+ norm, ReLU) driven by its own offset/mask conv3x3.

    The "dcnx" models' last tower conv. Offsets start at zero, so it starts as a plain conv.
    """

    def __init__(self, channels: int, norm: str, backend: Optional[str]):
        super().__init__()
        self.offset_conv = nn.Conv2d(channels, 27, kernel_size=3, padding=1)
        self.conv = ModulatedDeformConv(
            channels,
            channels,
            3,
            padding=1,
            bias=not norm,
            norm=get_norm(norm, channels),
            activation=F.relu,
            backend=backend,
        )

    def forward(self, x):
        offset_y_x, mask = torch.split(self.offset_conv(x), [18, 9], dim=1)
        return self.conv(x, offset_y_x, mask.sigmoid())


def _tower(
    channels: int, num_convs: int, norm: str, last_dcn: bool, backend: Optional[str]
) -> nn.Sequential:
    """num_convs x (conv3x3 + norm + ReLU), the last one deformable (DCNv2) if ``last_dcn``."""
    layers = [conv_norm_relu(channels, channels, norm, bias=not norm) for _ in range(num_convs)]
    if last_dcn:
        layers[-1] = _ModulatedDeformTowerConv(channels, norm, backend)
    return nn.Sequential(*layers)


class SALTHead(nn.Module):
    """Dense head of SALT-Net; with ``salt_on=False`` a plain GFLV2-style head.

    ``forward(features)`` takes the list of FPN maps (N, C, Hi, Wi) and returns
    :class:`HeadOutputs`.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_convs: int = 3,
        norm: str = "GN",
        tower_last_dcn: bool = False,
        reg_max: int = 16,
        dgqp_topk: int = 4,
        dgqp_add_mean: bool = True,
        dgqp_channels: int = 64,
        prior_prob: float = 0.01,
        salt_on: bool = True,
        deform_backend: Optional[str] = "auto",
    ):
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"SALTHead needs the same channels on every level, got {channels}.")
        channels = channels.pop()
        self.num_classes = num_classes
        self.num_levels = len(input_shape)
        self.reg_max = reg_max
        self.dgqp_topk = dgqp_topk
        self.dgqp_add_mean = dgqp_add_mean
        self.salt_on = salt_on

        self.cls_tower = _tower(channels, num_convs, norm, tower_last_dcn, deform_backend)
        self.reg_tower = _tower(channels, num_convs, norm, tower_last_dcn, deform_backend)
        num_bins = 4 * (reg_max + 1)
        if salt_on:
            self.salt = SALTOperator(channels, self.num_levels, norm, deform_backend)
        self.cls_score = nn.Conv2d(channels, num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, num_bins, kernel_size=3, padding=1)
        self.bbox_scales = nn.ParameterList(
            [nn.Parameter(torch.tensor(1.0)) for _ in range(self.num_levels)]
        )
        dgqp_in = 4 * (dgqp_topk + int(dgqp_add_mean))
        self.quality = nn.Sequential(
            nn.Conv2d(dgqp_in, dgqp_channels, 1), nn.ReLU(), nn.Conv2d(dgqp_channels, 1, 1)
        )
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float):
        """Convs normal(std 0.01), biases 0, DCNv2 offsets 0, class bias from the prior."""
        normal_init_(self.modules())
        for module in self.modules():
            if isinstance(module, _ModulatedDeformTowerConv):
                nn.init.zeros_(module.offset_conv.weight)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        node = cfg.MODEL.SALTNET
        return {
            "input_shape": input_shape,
            "num_classes": node.NUM_CLASSES,
            "num_convs": node.NUM_CONVS,
            "norm": node.NORM,
            "tower_last_dcn": node.TOWER_LAST_DCN,
            "reg_max": node.REG_MAX,
            "dgqp_topk": node.DGQP_TOPK,
            "dgqp_add_mean": node.DGQP_ADD_MEAN,
            "dgqp_channels": node.DGQP_CHANNELS,
            "prior_prob": node.PRIOR_PROB,
            "salt_on": node.SALT_ON,
            "deform_backend": node.DEFORM_BACKEND,
        }

    @property
    def output_groups(self) -> List[str]:
        """The names of the groups :meth:`forward` fills (:data:`OUTPUT_GROUPS`)."""
        return list(OUTPUT_GROUPS if self.salt_on else OUTPUT_GROUPS[:2])

    def forward(self, features: List[torch.Tensor]) -> HeadOutputs:
        if len(features) != self.num_levels:
            raise ValueError(f"SALTHead built for {self.num_levels} levels, got {len(features)}.")
        levels = [self.forward_level(x, level) for level, x in enumerate(features)]
        salt = SALTPredictions.over_levels([o.salt for o in levels]) if self.salt_on else None
        return HeadOutputs(
            scores=[o.scores for o in levels], box_logits=[o.box_logits for o in levels], salt=salt
        )

    def forward_level(self, x: torch.Tensor, level: int) -> HeadOutputs:
        """One level: a :class:`HeadOutputs` of this level's tensors (not lists)."""
        cls_feat = self.cls_tower(x)
        reg_feat = self.reg_tower(x)
        salt = None
        if self.salt_on:
            sampled = self.salt(cls_feat, reg_feat, x, level)
            cls_feat, reg_feat, salt = sampled.cls_feat, sampled.reg_feat, sampled.salt
        box_logits = self.bbox_pred(reg_feat).float() * self.bbox_scales[level].float()
        quality = self.quality(self._distribution_statistics(box_logits).to(x.dtype)).sigmoid()
        scores = self.cls_score(cls_feat).float().sigmoid() * quality.float()
        return HeadOutputs(scores=scores, box_logits=box_logits, salt=salt)

    def _distribution_statistics(self, box_logits: torch.Tensor) -> torch.Tensor:
        """(N, 4 x (reg_max + 1), H, W) logits -> (N, 4 x (topk [+ 1]), H, W) DGQP input."""
        n, _, h, w = box_logits.shape
        prob = F.softmax(box_logits.float().view(n, 4, self.reg_max + 1, h, w), dim=2)
        top = prob.topk(self.dgqp_topk, dim=2).values
        if self.dgqp_add_mean:
            top = torch.cat([top, top.mean(dim=2, keepdim=True)], dim=2)
        return top.reshape(n, -1, h, w)
