"""Convert checkpoints of the authors' mmdetection release of SALT-Net to this project.

:func:`convert_mmdet_saltnet_state_dict` renames every key of the original detector (ResNet /
ResNeXt backbone, FPN neck, SALT head) to the names of :class:`saltnet.SALTNet` with the
``build_saltnet_resnet_fpn_backbone`` backbone, and raises on any key it cannot place.
"""

import re
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch

__all__ = ["convert_mmdet_saltnet_state_dict", "UnmappedKeysError"]


class UnmappedKeysError(KeyError):
    """Raised with the list of keys a converter could not place."""

    def __init__(self, keys: List[str]):
        self.keys = keys
        preview = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
        super().__init__(f"{len(keys)} key(s) could not be converted: {preview}")


# (pattern, replacement) pairs tried in order; the first match wins.
_HEAD_RULES: List[Tuple[str, str]] = [
    (r"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.weight", r"head.\1_tower.\2.weight"),
    (r"bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.(weight|bias)", r"head.\1_tower.\2.norm.\3"),
    (r"bbox_head\.reg_init_out\.conv\.(weight|bias)", r"head.coarse_conv.\1"),
    (r"bbox_head\.reg_init_out\.bn\.(weight|bias)", r"head.coarse_conv.norm.\1"),
    (r"bbox_head\.reg_init_out\.regression\.(weight|bias)", r"head.coarse_pred.\1"),
    (r"bbox_head\.reg_init_out\.scale_fs\.(weight|bias)", r"head.point_factor_pred.\1"),
    (r"bbox_head\.salt_reg_conv\.conv\.weight", r"head.reg_dcn.weight"),
    (r"bbox_head\.salt_reg_conv\.bn\.(weight|bias)", r"head.reg_dcn.norm.\1"),
    (r"bbox_head\.salt_reg\.(weight|bias)", r"head.bbox_pred.\1"),
    (r"bbox_head\.salt_cls_refinement\.conv\.(weight|bias)", r"head.cls_point_conv.\1"),
    (r"bbox_head\.salt_cls_refinement\.bn\.(weight|bias)", r"head.cls_point_conv.norm.\1"),
    (r"bbox_head\.salt_cls_refinement\.proposal\.(weight|bias)", r"head.cls_point_scale_pred.\1"),
    (r"bbox_head\.salt_cls_conv\.conv\.weight", r"head.cls_dcn.weight"),
    (r"bbox_head\.salt_cls_conv\.bn\.(weight|bias)", r"head.cls_dcn.norm.\1"),
    (r"bbox_head\.salt_cls\.(weight|bias)", r"head.cls_score.\1"),
    (r"bbox_head\.scales_init\.(\d+)\.scale", r"head.coarse_scales.\1"),
    (r"bbox_head\.scales\.(\d+)\.scale", r"head.bbox_scales.\1"),
    (r"bbox_head\.reg_conf\.(0|2)\.(weight|bias)", r"head.quality.\1.\2"),
]

_BN = r"(weight|bias|running_mean|running_var)"
_BACKBONE_RULES: List[Tuple[str, str]] = [
    (r"backbone\.conv1\.weight", r"backbone.bottom_up.stem.conv1.weight"),
    (rf"backbone\.bn1\.{_BN}", r"backbone.bottom_up.stem.conv1.norm.\1"),
    (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight", "BLOCK.conv\\3.weight"),
    (r"backbone\.layer(\d)\.(\d+)\.conv2\.conv_offset\.(weight|bias)", "BLOCK.conv2_offset.\\3"),
    (rf"backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_BN}", "BLOCK.conv\\3.norm.\\4"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight", "BLOCK.shortcut.weight"),
    (rf"backbone\.layer(\d)\.(\d+)\.downsample\.1\.{_BN}", "BLOCK.shortcut.norm.\\3"),
]

_NECK_RULES: List[Tuple[str, str]] = [
    (r"neck\.lateral_convs\.(\d)\.conv\.(weight|bias)", "LATERAL.\\2"),
    (r"neck\.lateral_convs\.(\d)\.gn\.(weight|bias)", "LATERAL.norm.\\2"),
    (r"neck\.fpn_convs\.([0-2])\.conv\.(weight|bias)", "OUTPUT.\\2"),
    (r"neck\.fpn_convs\.([0-2])\.gn\.(weight|bias)", "OUTPUT.norm.\\2"),
    (r"neck\.fpn_convs\.3\.conv\.(weight|bias)", r"backbone.top_block.p6.\1"),
    (r"neck\.fpn_convs\.4\.conv\.(weight|bias)", r"backbone.top_block.p7.\1"),
]

# Keys that carry no learned state in our model: checked, then dropped.
_DROPPED = (r"bbox_head\.integral\.project", r".*\.num_batches_tracked")


def _rename(key: str) -> str:
    for pattern, repl in _HEAD_RULES + _NECK_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            new = match.expand(repl)
            if new.startswith(("LATERAL", "OUTPUT")):
                level = 3 + int(match.group(1))  # mmdet's FPN starts at C3 (start_level=1)
                prefix = "fpn_lateral" if new.startswith("LATERAL") else "fpn_output"
                new = f"backbone.{prefix}{level}.{new.split('.', 1)[1]}"
            return new
    for pattern, repl in _BACKBONE_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            new = match.expand(repl)
            if new.startswith("BLOCK"):
                stage, block = int(match.group(1)), match.group(2)
                new = f"backbone.bottom_up.res{stage + 1}.{block}" + new[len("BLOCK") :]
            return new
    return ""


def convert_mmdet_saltnet_state_dict(
    state_dict: Dict[str, torch.Tensor], reg_max: int = 16
) -> "OrderedDict[str, torch.Tensor]":
    """Rename an mmdetection SALT-Net state dict to :class:`saltnet.SALTNet`'s names.

    Args:
        state_dict: the original's ``checkpoint["state_dict"]`` (keys ``backbone.*``,
            ``neck.*``, ``bbox_head.*``).
        reg_max: the model's ``reg_max``; the original's ``integral.project`` buffer must equal
            ``0, 1, ..., reg_max`` (our head computes it instead of storing it).

    Returns:
        A state dict for ``SALTNet.load_state_dict``.

    Raises:
        UnmappedKeysError: naming every key that no rule places.
        ValueError: if two keys map to the same name or ``integral.project`` is unexpected.
    """
    converted: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unmapped = []
    for key, value in state_dict.items():
        if key.startswith("module."):  # saved from a DataParallel wrapper
            key = key[len("module.") :]
        if any(re.fullmatch(p, key) for p in _DROPPED):
            if key == "bbox_head.integral.project" and not torch.equal(
                value.float(), torch.arange(reg_max + 1, dtype=torch.float32)
            ):
                raise ValueError(
                    f"bbox_head.integral.project is {value.tolist()}, expected 0..{reg_max}: "
                    "the checkpoint was trained with another reg_max (MODEL.SALTNET.REG_MAX)."
                )
            continue
        new = _rename(key)
        if not new:
            unmapped.append(key)
            continue
        if new in converted:
            raise ValueError(f"Two checkpoint keys map to {new!r} (the second is {key!r}).")
        converted[new] = value
    if unmapped:
        raise UnmappedKeysError(unmapped)
    return converted
