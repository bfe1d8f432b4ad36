"""ResNet / ResNeXt with deformable stages that run without detectron2's compiled ops.

:func:`build_saltnet_resnet_backbone` reads the same ``MODEL.RESNETS`` keys and builds the same
:class:`detectron2.modeling.backbone.ResNet` as detectron2's ``build_resnet_backbone``, with the
same parameter names, so detectron2 checkpoints (model-zoo pickles included) load unchanged. Only
the deformable block differs: :class:`DeformBottleneckBlock` holds exactly the parameters of
detectron2's, computed with :mod:`saltnet.layers` (torchvision's kernel by default).
"""

from typing import Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn
from torch.nn import functional as F

from ..layers import DeformConv, ModulatedDeformConv
from ..layers.batch_norm import resolve_norm

__all__ = ["DeformBottleneckBlock", "build_saltnet_resnet_backbone"]

NUM_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


class DeformBottleneckBlock(CNNBlockBase):
    """Bottleneck block whose 3x3 conv is deformable (DCN v1, or modulated v2).

    Same constructor (plus ``deform_backend``, see :mod:`saltnet.layers`) and parameters as
    detectron2's ``DeformBottleneckBlock``: ``conv1``, ``conv2_offset`` (a plain conv predicting
    18 offsets, or 18 offsets + 9 mask logits, per deformable group), ``conv2`` (the deformable
    conv, weight only, with ``conv2.norm``), ``conv3`` and ``shortcut``.
    (N, C_in, H, W) -> (N, C_out, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        bottleneck_channels,
        stride=1,
        num_groups=1,
        norm="BN",
        stride_in_1x1=False,
        dilation=1,
        deform_modulated=False,
        deform_num_groups=1,
        deform_backend: Optional[str] = None,
    ):
        super().__init__(in_channels, out_channels, stride)
        self.deform_modulated = deform_modulated

        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels,
                out_channels,
                kernel_size=1,
                stride=stride,
                bias=False,
                norm=get_norm(norm, out_channels),
            )
        else:
            self.shortcut = None

        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)

        self.conv1 = Conv2d(
            in_channels,
            bottleneck_channels,
            kernel_size=1,
            stride=stride_1x1,
            bias=False,
            norm=get_norm(norm, bottleneck_channels),
        )

        deform_conv_op = ModulatedDeformConv if deform_modulated else DeformConv
        offset_channels = 27 if deform_modulated else 18  # (dy, dx) [+ mask] per kernel point
        self.conv2_offset = Conv2d(
            bottleneck_channels,
            offset_channels * deform_num_groups,
            kernel_size=3,
            stride=stride_3x3,
            padding=1 * dilation,
            dilation=dilation,
        )
        self.conv2 = deform_conv_op(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            stride=stride_3x3,
            padding=1 * dilation,
            bias=False,
            groups=num_groups,
            dilation=dilation,
            deformable_groups=deform_num_groups,
            norm=get_norm(norm, bottleneck_channels),
            backend=deform_backend,
        )

        self.conv3 = Conv2d(
            bottleneck_channels,
            out_channels,
            kernel_size=1,
            bias=False,
            norm=get_norm(norm, out_channels),
        )

        for layer in [self.conv1, self.conv2, self.conv3, self.shortcut]:
            if layer is not None:  # shortcut can be None
                weight_init.c2_msra_fill(layer)

        nn.init.constant_(self.conv2_offset.weight, 0)
        nn.init.constant_(self.conv2_offset.bias, 0)

    def forward(self, x):
        out = F.relu_(self.conv1(x))

        if self.deform_modulated:
            offset_mask = self.conv2_offset(out)
            points = offset_mask.shape[1] // 3  # offsets first (2 per point), then mask logits
            offset, mask = torch.split(offset_mask, [2 * points, points], dim=1)
            out = self.conv2(out, offset, mask.sigmoid())
        else:
            out = self.conv2(out, self.conv2_offset(out))
        out = F.relu_(out)

        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + shortcut)


@BACKBONE_REGISTRY.register()
def build_saltnet_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ``build_resnet_backbone`` with :class:`DeformBottleneckBlock` from here.

    Restated, not called: detectron2's builder takes no block class (it names its own
    ``DeformBottleneckBlock``, which cannot be built without detectron2's compiled ops), and
    ``ResNet.make_default_stages`` fixes the widths (no ResNeXt) and takes one block for all stages.

    Reads ``MODEL.RESNETS.*`` (DEPTH, NUM_GROUPS, WIDTH_PER_GROUP, STEM_OUT_CHANNELS,
    RES2_OUT_CHANNELS, STRIDE_IN_1X1, RES5_DILATION, DEFORM_ON_PER_STAGE, DEFORM_MODULATED,
    DEFORM_NUM_GROUPS, NORM, OUT_FEATURES) and ``MODEL.BACKBONE.FREEZE_AT`` exactly as detectron2
    does; the deformable convs use ``MODEL.SALTNET.DEFORM_BACKEND``. ``NORM`` also takes
    ``"FrozenStatsBN"`` (:class:`~saltnet.layers.batch_norm.FrozenStatsBatchNorm2d`).
    """
    node = cfg.MODEL.RESNETS
    depth = node.DEPTH
    norm = resolve_norm(node.NORM)
    num_groups = node.NUM_GROUPS
    bottleneck_channels = num_groups * node.WIDTH_PER_GROUP
    in_channels = node.STEM_OUT_CHANNELS
    out_channels = node.RES2_OUT_CHANNELS
    res5_dilation = node.RES5_DILATION
    deform_on_per_stage = node.DEFORM_ON_PER_STAGE
    if res5_dilation not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {res5_dilation}.")
    if depth not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH must be one of {sorted(NUM_BLOCKS_PER_STAGE)}.")
    if depth in (18, 34) and (
        out_channels != 64 or any(deform_on_per_stage) or res5_dilation != 1 or num_groups != 1
    ):
        raise ValueError(
            "ResNet-18/34 need RES2_OUT_CHANNELS = 64, RES5_DILATION = 1, NUM_GROUPS = 1 and no "
            "deformable stage (MODEL.RESNETS)."
        )

    stem = BasicStem(in_channels=input_shape.channels, out_channels=in_channels, norm=norm)
    stages = []
    for idx, num_blocks in enumerate(NUM_BLOCKS_PER_STAGE[depth]):
        stage_idx = idx + 2
        # res5_dilation is used this way as a convention in R-FCN & Deformable Conv paper
        dilation = res5_dilation if stage_idx == 5 else 1
        first_stride = 1 if idx == 0 or (stage_idx == 5 and dilation == 2) else 2
        stage_kwargs = {
            "num_blocks": num_blocks,
            "stride_per_block": [first_stride] + [1] * (num_blocks - 1),
            "in_channels": in_channels,
            "out_channels": out_channels,
            "norm": norm,
        }
        if depth in (18, 34):
            stage_kwargs["block_class"] = BasicBlock
        else:
            stage_kwargs["bottleneck_channels"] = bottleneck_channels
            stage_kwargs["stride_in_1x1"] = node.STRIDE_IN_1X1
            stage_kwargs["dilation"] = dilation
            stage_kwargs["num_groups"] = num_groups
            if deform_on_per_stage[idx]:
                stage_kwargs["block_class"] = DeformBottleneckBlock
                stage_kwargs["deform_modulated"] = node.DEFORM_MODULATED
                stage_kwargs["deform_num_groups"] = node.DEFORM_NUM_GROUPS
                stage_kwargs["deform_backend"] = cfg.MODEL.SALTNET.DEFORM_BACKEND
            else:
                stage_kwargs["block_class"] = BottleneckBlock
        stages.append(ResNet.make_stage(**stage_kwargs))
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return ResNet(
        stem, stages, out_features=node.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )
