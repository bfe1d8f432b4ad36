"""Convert checkpoints of the authors' mmdetection release of SALT-Net to this project.

:func:`convert_mmdet_saltnet_state_dict` renames every key of the original detector to the names
of :class:`saltnet.SALTNet` and raises on any key it cannot place: the backbone (ResNet / ResNeXt,
with mmcv DCN offsets, for ``build_saltnet_resnet_fpn_backbone``; or Res2Net, recognised by its
deep stem, for ``build_saltnet_res2net_fpn_backbone``), the FPN neck (with or without GN) and the
SALT head (with or without the "dcnx" modulated deformable last tower convs).

The release's classifier ``bbox_head.salt_cls`` has ``num_classes + 1`` outputs: its configs use
``QualityFocalLoss(use_sigmoid=False)``, for which mmdetection's ``AnchorHead`` adds a background
column, trained towards 0 and dropped at inference. The converter keeps the first
``num_classes`` rows (weight and bias) and refuses any other classifier shape.
"""

import logging
import re
from collections import OrderedDict
from typing import Dict, List, Set, Tuple

import torch

from .convert_backbone import (
    MMDET_RES2NET_RULES,
    PREFIX,
    RESNET_RULES,
    UnmappedKeysError,
    rename_backbone_key,
)

__all__ = [
    "ClassifierShapeError",
    "RELEASE_CHECKPOINT_AUTHOR",
    "UnmappedKeysError",
    "convert_mmdet_saltnet_state_dict",
]


# (pattern, replacement) pairs tried in order; the first match wins.
_HEAD_RULES: List[Tuple[str, str]] = [
    (r"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.weight", r"head.\1_tower.\2.weight"),
    (r"bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.(weight|bias)", r"head.\1_tower.\2.norm.\3"),
    (r"bbox_head\.reg_init_out\.conv\.(weight|bias)", r"head.salt.coarse_conv.\1"),
    (r"bbox_head\.reg_init_out\.bn\.(weight|bias)", r"head.salt.coarse_conv.norm.\1"),
    (r"bbox_head\.reg_init_out\.regression\.(weight|bias)", r"head.salt.coarse_pred.\1"),
    (r"bbox_head\.reg_init_out\.scale_fs\.(weight|bias)", r"head.salt.point_factor_pred.\1"),
    (r"bbox_head\.salt_reg_conv\.conv\.weight", r"head.salt.reg_dcn.weight"),
    (r"bbox_head\.salt_reg_conv\.bn\.(weight|bias)", r"head.salt.reg_dcn.norm.\1"),
    (r"bbox_head\.salt_reg\.(weight|bias)", r"head.bbox_pred.\1"),
    (r"bbox_head\.salt_cls_refinement\.conv\.(weight|bias)", r"head.salt.cls_point_conv.\1"),
    (r"bbox_head\.salt_cls_refinement\.bn\.(weight|bias)", r"head.salt.cls_point_conv.norm.\1"),
    (
        r"bbox_head\.salt_cls_refinement\.proposal\.(weight|bias)",
        r"head.salt.cls_point_scale_pred.\1",
    ),
    (r"bbox_head\.salt_cls_conv\.conv\.weight", r"head.salt.cls_dcn.weight"),
    (r"bbox_head\.salt_cls_conv\.bn\.(weight|bias)", r"head.salt.cls_dcn.norm.\1"),
    (r"bbox_head\.salt_cls\.(weight|bias)", r"head.cls_score.\1"),
    (r"bbox_head\.scales_init\.(\d+)\.scale", r"head.salt.coarse_scales.\1"),
    (r"bbox_head\.scales\.(\d+)\.scale", r"head.bbox_scales.\1"),
    (r"bbox_head\.reg_conf\.(0|2)\.(weight|bias)", r"head.quality.\1.\2"),
]

# The "dcnx" last tower convs: mmcv ConvModule around a ModulatedDeformConv2dPack (its offset
# and mask conv is ``conv.conv_offset``; with a norm the conv has no bias).
_DCN_TOWER = r"bbox_head\.(?:cls|reg)_convs\.\d+"
_DCN_TOWER_RULES: List[Tuple[str, str]] = [
    (
        r"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.conv_offset\.(weight|bias)",
        r"head.\1_tower.\2.offset_conv.\3",
    ),
    (r"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)", r"head.\1_tower.\2.conv.\3"),
    (r"bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.(weight|bias)", r"head.\1_tower.\2.conv.norm.\3"),
]

_NECK_RULES: List[Tuple[str, str]] = [
    (r"neck\.lateral_convs\.(\d)\.conv\.(weight|bias)", "LATERAL.\\2"),
    (r"neck\.lateral_convs\.(\d)\.gn\.(weight|bias)", "LATERAL.norm.\\2"),
    (r"neck\.fpn_convs\.([0-2])\.conv\.(weight|bias)", "OUTPUT.\\2"),
    (r"neck\.fpn_convs\.([0-2])\.gn\.(weight|bias)", "OUTPUT.norm.\\2"),
    (r"neck\.fpn_convs\.3\.conv\.(weight|bias)", r"backbone.top_block.p6.\1"),
    (r"neck\.fpn_convs\.3\.gn\.(weight|bias)", r"backbone.top_block.p6.norm.\1"),
    (r"neck\.fpn_convs\.4\.conv\.(weight|bias)", r"backbone.top_block.p7.\1"),
    (r"neck\.fpn_convs\.4\.gn\.(weight|bias)", r"backbone.top_block.p7.norm.\1"),
]

# Keys that carry no learned state in our model: checked, then dropped.
_DROPPED = (r"bbox_head\.integral\.project", r".*\.num_batches_tracked")

logger = logging.getLogger(__name__)

_CLASSIFIER = re.compile(r"bbox_head\.salt_cls\.(weight|bias)")

# ``checkpoint["__author__"]`` of a converted file. :class:`saltnet.checkpoint.AtomicCheckpointer`
# refuses to load such a file into a model whose head or neck does not take every tensor.
RELEASE_CHECKPOINT_AUTHOR = "mmdetection SALT-Net release"


class ClassifierShapeError(ValueError):
    """The release's classifier has neither ``num_classes`` nor ``num_classes + 1`` outputs."""


def _drop_background_column(key: str, value: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The first ``num_classes`` rows of the release's (K + 1)-row ``salt_cls`` weight / bias."""
    rows = value.shape[0] if value.dim() else 0
    if rows == num_classes + 1:
        logger.info(
            "%s: kept the first %d of %d rows (the last is the release's background column, "
            "unused at inference).",
            key,
            num_classes,
            rows,
        )
        return value[:num_classes]
    if rows == num_classes:
        return value
    raise ClassifierShapeError(
        f"{key} has {rows} output rows; a model with {num_classes} classes needs "
        f"{num_classes} + 1 (the release's layout, background column last) or {num_classes}. "
        "Set the class count with --num-classes (MODEL.SALTNET.NUM_CLASSES)."
    )


def _rename(key: str, backbone_rules: List[Tuple[str, str]], dcn_towers: Set[str]) -> str:
    """Our name for ``key``, or "" if no rule places it. ``dcn_towers``: the deformable tower
    convs ("bbox_head.cls_convs.2", ...)."""
    tower = re.match(_DCN_TOWER, key)
    rules = _DCN_TOWER_RULES if tower and tower.group(0) in dcn_towers else _HEAD_RULES
    for pattern, repl in rules + _NECK_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            new = match.expand(repl)
            if new.startswith(("LATERAL", "OUTPUT")):
                level = 3 + int(match.group(1))  # mmdet's FPN starts at C3 (start_level=1)
                prefix = "fpn_lateral" if new.startswith("LATERAL") else "fpn_output"
                new = f"backbone.{prefix}{level}.{new.split('.', 1)[1]}"
            return new
    if key.startswith("backbone."):
        new = rename_backbone_key(key[len("backbone.") :], backbone_rules)
        if new is not None:
            return PREFIX + new
    return ""


def convert_mmdet_saltnet_state_dict(
    state_dict: Dict[str, torch.Tensor], num_classes: int = 80, reg_max: int = 16
) -> "OrderedDict[str, torch.Tensor]":
    """Rename an mmdetection SALT-Net state dict to :class:`saltnet.SALTNet`'s names.

    Args:
        state_dict: the original's ``checkpoint["state_dict"]`` (keys ``backbone.*``,
            ``neck.*``, ``bbox_head.*``).
        num_classes: the model's class count K; ``salt_cls`` must have K + 1 rows (the
            release's layout; the last, background row is dropped) or K.
        reg_max: the model's ``reg_max``; the original's ``integral.project`` buffer must equal
            ``0, 1, ..., reg_max`` (our head computes it instead of storing it).

    Returns:
        A state dict for ``SALTNet.load_state_dict``.

    Raises:
        UnmappedKeysError: naming every key that no rule places.
        ClassifierShapeError: if ``salt_cls`` fits neither K + 1 nor K classes.
        ValueError: if two keys map to the same name or ``integral.project`` is unexpected.
    """
    keys = [re.sub(r"^module\.", "", k) for k in state_dict]  # saved from a DataParallel wrapper
    res2net = any(k.startswith("backbone.stem.") for k in keys)  # Res2Net's deep stem
    backbone_rules = MMDET_RES2NET_RULES if res2net else RESNET_RULES
    offset_key = re.compile(rf"({_DCN_TOWER})\.conv\.conv_offset\.weight")
    dcn_towers = {m.group(1) for m in map(offset_key.fullmatch, keys) if m}
    converted: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unmapped = []
    for key, value in zip(keys, state_dict.values()):
        if any(re.fullmatch(p, key) for p in _DROPPED):
            if key == "bbox_head.integral.project" and not torch.equal(
                value.float(), torch.arange(reg_max + 1, dtype=torch.float32)
            ):
                raise ValueError(
                    f"bbox_head.integral.project is {value.tolist()}, expected 0..{reg_max}: "
                    "the checkpoint was trained with another reg_max (MODEL.SALTNET.REG_MAX)."
                )
            continue
        new = _rename(key, backbone_rules, dcn_towers)
        if not new:
            unmapped.append(key)
            continue
        if _CLASSIFIER.fullmatch(key):
            value = _drop_background_column(key, value, num_classes)
        if new in converted:
            raise ValueError(f"Two checkpoint keys map to {new!r} (the second is {key!r}).")
        converted[new] = value
    if unmapped:
        raise UnmappedKeysError(unmapped)
    return converted
