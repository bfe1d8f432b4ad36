"""FPN backbones whose P6 comes from the FPN's P5 (not from C5) and P7 from ReLU(P6)."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["build_saltnet_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_saltnet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet / ResNeXt + FPN giving P3-P7 (strides 8-128), as GFL / SALT-Net use.

    ``MODEL.FPN.NORM`` ("" or "GN") normalises the FPN convs; ``MODEL.RESNETS`` sets the bottom-up
    network (depth, groups, deformable stages, frozen stages) exactly as in detectron2.
    """
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=build_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
