"""FPN backbones whose P6 comes from the FPN's P5 (not from C5) and P7 from P6 (no ReLU)."""

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN
from torch import nn

from .resnet import build_saltnet_resnet_backbone

__all__ = ["P6P7FromP5", "build_p3p7_fpn", "build_saltnet_resnet_fpn_backbone"]


class P6P7FromP5(nn.Module):
    """P6 = conv3x3/2(P5) and P7 = conv3x3/2(P6), each followed by ``norm`` if given.

    No ReLU between P6 and P7: the authors' release uses mmdetection's FPN with
    ``add_extra_convs="on_output"`` and ``relu_before_extra_convs=False`` (detectron2's
    ``LastLevelP6P7`` applies one).

    With ``norm=""`` it holds the same parameters as detectron2's ``LastLevelP6P7`` on P5
    (``p6`` / ``p7`` with bias); with a norm (e.g. "GN") the two convs carry it and no bias,
    as mmdetection's FPN with ``norm_cfg`` does. (N, C, H, W) -> [P6, P7]. Its own name, not
    detectron2's: the signature (``channels, norm``) differs from ``LastLevelP6P7(in_channels,
    out_channels, in_feature)``.
    """

    def __init__(self, channels: int, norm: str = ""):
        super().__init__()
        self.num_levels = 2
        self.in_feature = "p5"
        for name in ("p6", "p7"):
            conv = Conv2d(
                channels,
                channels,
                kernel_size=3,
                stride=2,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, channels),
            )
            weight_init.c2_xavier_fill(conv)
            self.add_module(name, conv)

    def forward(self, p5):
        p6 = self.p6(p5)
        p7 = self.p7(p6)
        return [p6, p7]


def build_p3p7_fpn(cfg, bottom_up: Backbone) -> FPN:
    """An FPN over ``bottom_up`` giving P3-P7 (strides 8-128), as GFL / SALT-Net use.

    ``MODEL.FPN.NORM`` ("" or "GN") normalises every FPN conv, P6 and P7 included.
    """
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=P6P7FromP5(out_channels, cfg.MODEL.FPN.NORM),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_saltnet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet / ResNeXt (:func:`build_saltnet_resnet_backbone`) + FPN giving P3-P7.

    ``MODEL.RESNETS`` sets the bottom-up network (depth, groups, deformable stages, frozen
    stages) exactly as in detectron2; its deformable convs need no compiled ops.
    """
    return build_p3p7_fpn(cfg, build_saltnet_resnet_backbone(cfg, input_shape))
