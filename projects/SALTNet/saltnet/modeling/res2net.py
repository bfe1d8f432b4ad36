"""Res2Net v1d (Gao et al., "Res2Net: A New Multi-scale Backbone Architecture"), as mmdetection.

The "v1d" variant of the SALT-Net paper's R2-101 models: a deep stem (three 3x3 convs, 3 -> 32 ->
32 -> 64, then max-pool) and shortcuts that average-pool before their 1x1 projection. Its blocks
(:class:`Bottle2neckBlock`) split the bottleneck into ``scale`` groups of ``width`` channels; each
3x3 conv sees its split plus the previous conv's output, and the 3x3 convs may be deformable
(DCN v1 or modulated v2) per stage. The network is detectron2's
:class:`~detectron2.modeling.backbone.ResNet` (stages res2-res5, frozen stages, ``output_shape``),
so it plugs into detectron2's FPN like a ResNet.
"""

from typing import Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import ResNet
from torch import nn
from torch.nn import functional as F

from ..layers import DeformConv, ModulatedDeformConv
from ..layers.batch_norm import resolve_norm
from .backbone import build_p3p7_fpn

__all__ = [
    "DeepStem",
    "Bottle2neckBlock",
    "build_saltnet_res2net_backbone",
    "build_saltnet_res2net_fpn_backbone",
]

NUM_BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class DeepStem(CNNBlockBase):
    """The v1c/v1d stem: conv3x3/2 (C_in -> C/2), conv3x3 (C/2 -> C/2), conv3x3 (C/2 -> C),
    each with norm + ReLU, then max-pool 3x3/2. (N, C_in, H, W) -> (N, C, H / 4, W / 4).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm="BN"):
        super().__init__(in_channels, out_channels, 4)
        width = out_channels // 2
        channels = [in_channels, width, width, out_channels]
        for i in range(3):
            conv = Conv2d(
                channels[i],
                channels[i + 1],
                kernel_size=3,
                stride=2 if i == 0 else 1,
                padding=1,
                bias=False,
                norm=get_norm(norm, channels[i + 1]),
            )
            weight_init.c2_msra_fill(conv)
            self.add_module(f"conv{i + 1}", conv)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu_(conv(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottle2neckBlock(CNNBlockBase):
    """Res2Net bottleneck: conv1x1 -> ``scale`` splits of ``width`` channels -> conv1x1.

    Parameters: ``conv1`` (C_in -> width x scale), ``convs.{i}`` (i < scale - 1: the 3x3 convs of
    the splits, each with its norm; deformable if ``deform``, then driven by the plain conv
    ``convs_offset.{i}``), ``conv3`` (width x scale -> C_out) and, where the shape changes,
    ``shortcut`` (average pool to the stride, then conv1x1 + norm). The first block of a stage
    (stride > 1 or C_in != C_out) convolves every split on its own and average-pools the last
    split; later blocks add each conv's output to the next split and pass the last one through.
    (N, C_in, H, W) -> (N, C_out, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        width: int,
        scale: int = 4,
        stride: int = 1,
        norm="BN",
        stride1_split_pool: bool = False,
        deform: bool = False,
        deform_modulated: bool = False,
        deform_num_groups: int = 1,
        deform_backend: Optional[str] = None,
    ):
        super().__init__(in_channels, out_channels, stride)
        if scale < 2:
            raise ValueError(f"Res2Net needs scale >= 2 (scale 1 is a ResNet), got {scale}.")
        self.width = width
        self.first = stride > 1 or in_channels != out_channels
        self.pool_last_split = self.first and (stride > 1 or stride1_split_pool)
        self.deform_modulated = deform_modulated

        if self.first:
            self.shortcut = Conv2d(
                in_channels,
                out_channels,
                kernel_size=1,
                bias=False,
                norm=get_norm(norm, out_channels),
            )
        else:
            self.shortcut = None

        self.conv1 = Conv2d(
            in_channels,
            width * scale,
            kernel_size=1,
            bias=False,
            norm=get_norm(norm, width * scale),
        )
        conv_kwargs = dict(kernel_size=3, stride=stride, padding=1, bias=False)
        if deform:
            deform_conv_op = ModulatedDeformConv if deform_modulated else DeformConv
            offset_channels = (27 if deform_modulated else 18) * deform_num_groups
            self.convs = nn.ModuleList(
                deform_conv_op(
                    width,
                    width,
                    deformable_groups=deform_num_groups,
                    norm=get_norm(norm, width),
                    backend=deform_backend,
                    **conv_kwargs,
                )
                for _ in range(scale - 1)
            )
            self.convs_offset = nn.ModuleList(
                Conv2d(width, offset_channels, kernel_size=3, stride=stride, padding=1)
                for _ in range(scale - 1)
            )
            for offset_conv in self.convs_offset:
                nn.init.constant_(offset_conv.weight, 0)
                nn.init.constant_(offset_conv.bias, 0)
        else:
            self.convs = nn.ModuleList(
                Conv2d(width, width, norm=get_norm(norm, width), **conv_kwargs)
                for _ in range(scale - 1)
            )
            self.convs_offset = None
        self.conv3 = Conv2d(
            width * scale,
            out_channels,
            kernel_size=1,
            bias=False,
            norm=get_norm(norm, out_channels),
        )

        for layer in [self.conv1, *self.convs, self.conv3, self.shortcut]:
            if layer is not None:  # shortcut can be None
                weight_init.c2_msra_fill(layer)

    def _split_conv(self, i: int, x):
        """The 3x3 conv of split ``i`` (deformable: sampling points predicted from ``x``)."""
        if self.convs_offset is None:
            return self.convs[i](x)
        offset = self.convs_offset[i](x)
        if self.deform_modulated:
            points = offset.shape[1] // 3  # offsets first (2 per point), then mask logits
            offset, mask = torch.split(offset, [2 * points, points], dim=1)
            return self.convs[i](x, offset, mask.sigmoid())
        return self.convs[i](x, offset)

    def forward(self, x):
        splits = torch.split(F.relu_(self.conv1(x)), self.width, dim=1)
        outs = []
        sp = splits[0]
        for i in range(len(self.convs)):
            if i > 0:
                sp = splits[i] if self.first else sp + splits[i]
            sp = F.relu_(self._split_conv(i, sp))
            outs.append(sp)
        last = splits[-1]
        if self.pool_last_split:
            last = F.avg_pool2d(last, kernel_size=3, stride=self.stride, padding=1)
        out = self.conv3(torch.cat(outs + [last], dim=1))

        if self.shortcut is None:
            shortcut = x
        else:
            if self.stride > 1:
                x = F.avg_pool2d(x, self.stride, ceil_mode=True, count_include_pad=False)
            shortcut = self.shortcut(x)
        return F.relu_(out + shortcut)


@BACKBONE_REGISTRY.register()
def build_saltnet_res2net_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """Res2Net v1d from ``MODEL.RES2NET`` (see :func:`saltnet.config.defaults.add_res2net_config`).

    Outputs ``MODEL.RES2NET.OUT_FEATURES`` among res2-res5 (strides 4-32, 256-2048 channels);
    ``MODEL.BACKBONE.FREEZE_AT`` freezes the stem (1) and the first stages (2 = stem + res2);
    deformable convs use ``MODEL.SALTNET.DEFORM_BACKEND``.
    """
    node = cfg.MODEL.RES2NET
    if node.DEPTH not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RES2NET.DEPTH must be one of {sorted(NUM_BLOCKS_PER_STAGE)}.")
    norm = resolve_norm(node.NORM)  # detectron2's names, or "FrozenStatsBN"
    stem = DeepStem(input_shape.channels, 64, norm=norm)
    in_channels = stem.out_channels
    stages = []
    for idx, num_blocks in enumerate(NUM_BLOCKS_PER_STAGE[node.DEPTH]):
        planes = 64 * 2**idx
        stages.append(
            ResNet.make_stage(
                Bottle2neckBlock,
                num_blocks,
                in_channels=in_channels,
                out_channels=planes * 4,
                stride_per_block=[1 if idx == 0 else 2] + [1] * (num_blocks - 1),
                width=planes * node.BASE_WIDTH // 64,
                scale=node.SCALE,
                norm=norm,
                stride1_split_pool=node.STRIDE1_SPLIT_POOL,
                deform=node.DEFORM_ON_PER_STAGE[idx],
                deform_modulated=node.DEFORM_MODULATED,
                deform_num_groups=node.DEFORM_NUM_GROUPS,
                deform_backend=cfg.MODEL.SALTNET.DEFORM_BACKEND,
            )
        )
        in_channels = planes * 4
    return ResNet(
        stem, stages, out_features=node.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )


@BACKBONE_REGISTRY.register()
def build_saltnet_res2net_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Res2Net v1d (:func:`build_saltnet_res2net_backbone`) + FPN giving P3-P7, P6 from P5."""
    return build_p3p7_fpn(cfg, build_saltnet_res2net_backbone(cfg, input_shape))
