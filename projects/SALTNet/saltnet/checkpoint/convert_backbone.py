"""Convert ImageNet backbone checkpoints to the parameter names of this project's backbones.

Sources (``SOURCES``):

* ``"torchvision"`` / ``"mmdet-resnet"``: torchvision's ResNet / ResNeXt state dicts and the
  open-mmlab / mmdetection ResNet / ResNeXt checkpoints, which use the same names (``conv1``,
  ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, mmcv DCN offsets
  ``layer3.0.conv2.conv_offset``) -> :func:`~saltnet.modeling.resnet.build_saltnet_resnet_backbone`
  (detectron2's names: ``stem.conv1``, ``res2.0.conv1``, ``res2.0.conv1.norm``,
  ``res2.0.shortcut``, ``res4.0.conv2_offset``).
* ``"mmdet-res2net"``: open-mmlab / mmdetection Res2Net (``stem.{0,1,3,4,6,7}``,
  ``layer1.0.convs.0``, ``layer1.0.bns.0``, ``layer1.0.downsample.{1,2}``) and
* ``"timm-res2net"``: timm's ``res2net50d`` / ``res2net101d`` (deep stem ``conv1.{0,1,3,4,6}``
  + ``bn1``) -> :func:`~saltnet.modeling.res2net.build_saltnet_res2net_backbone` (``stem.conv1-3``,
  ``res2.0.convs.0``, ``res2.0.convs.0.norm``, ``res4.0.convs_offset.0``, ``res2.0.shortcut``).

A leading ``module.`` or ``backbone.`` is ignored; the ImageNet classifier (``fc.*``) and BN's
``num_batches_tracked`` are dropped; any other key that no rule places raises
:class:`UnmappedKeysError`. :func:`save_checkpoint` writes a file for detectron2's
``DetectionCheckpointer`` (``MODEL.WEIGHTS``): keys carry the full-model prefix
``backbone.bottom_up.`` (the FPN's bottom-up network), so it loads by exact name, without
detectron2's name-matching heuristics.
"""

import os
import pickle
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "SOURCES",
    "PREFIX",
    "UnmappedKeysError",
    "rename_backbone_key",
    "convert_backbone_state_dict",
    "check_state_dict_matches",
    "save_checkpoint",
]

# Where a SALTNet model (FPN backbone) keeps its bottom-up network.
PREFIX = "backbone.bottom_up."


class UnmappedKeysError(KeyError):
    """Raised with the list of keys a converter could not place."""

    def __init__(self, keys: List[str]):
        self.keys = keys
        preview = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
        super().__init__(f"{len(keys)} key(s) could not be converted: {preview}")


_BN = r"(weight|bias|running_mean|running_var)"
_BLOCK = r"(res[2-5]\.\d+)"  # after ``layerN.`` -> ``res{N+1}.``

# (pattern, replacement) pairs tried in order on the whole key; the first match wins.
RESNET_RULES: List[Tuple[str, str]] = [
    (r"conv1\.weight", r"stem.conv1.weight"),
    (rf"bn1\.{_BN}", r"stem.conv1.norm.\1"),
    (rf"{_BLOCK}\.conv([1-3])\.weight", r"\1.conv\2.weight"),
    (rf"{_BLOCK}\.conv2\.conv_offset\.(weight|bias)", r"\1.conv2_offset.\2"),
    (rf"{_BLOCK}\.bn([1-3])\.{_BN}", r"\1.conv\2.norm.\3"),
    (rf"{_BLOCK}\.downsample\.0\.weight", r"\1.shortcut.weight"),
    (rf"{_BLOCK}\.downsample\.1\.{_BN}", r"\1.shortcut.norm.\2"),
]

# Res2Net blocks, the same in mmdetection and timm (downsample.0 is the parameter-free pool).
_RES2NET_BLOCK_RULES: List[Tuple[str, str]] = [
    (rf"{_BLOCK}\.conv([13])\.weight", r"\1.conv\2.weight"),
    (rf"{_BLOCK}\.bn([13])\.{_BN}", r"\1.conv\2.norm.\3"),
    (rf"{_BLOCK}\.convs\.(\d+)\.weight", r"\1.convs.\2.weight"),
    (rf"{_BLOCK}\.convs\.(\d+)\.conv_offset\.(weight|bias)", r"\1.convs_offset.\2.\3"),
    (rf"{_BLOCK}\.bns\.(\d+)\.{_BN}", r"\1.convs.\2.norm.\3"),
    (rf"{_BLOCK}\.downsample\.1\.weight", r"\1.shortcut.weight"),
    (rf"{_BLOCK}\.downsample\.2\.{_BN}", r"\1.shortcut.norm.\2"),
]

# mmdetection's deep stem: Sequential(conv, bn, relu, conv, bn, relu, conv, bn, relu).
MMDET_RES2NET_RULES: List[Tuple[str, str]] = [
    (r"stem\.0\.weight", r"stem.conv1.weight"),
    (rf"stem\.1\.{_BN}", r"stem.conv1.norm.\1"),
    (r"stem\.3\.weight", r"stem.conv2.weight"),
    (rf"stem\.4\.{_BN}", r"stem.conv2.norm.\1"),
    (r"stem\.6\.weight", r"stem.conv3.weight"),
    (rf"stem\.7\.{_BN}", r"stem.conv3.norm.\1"),
] + _RES2NET_BLOCK_RULES

# timm's deep stem: conv1 = Sequential(conv, bn, act, conv, bn, act, conv), then bn1.
TIMM_RES2NET_RULES: List[Tuple[str, str]] = [
    (r"conv1\.0\.weight", r"stem.conv1.weight"),
    (rf"conv1\.1\.{_BN}", r"stem.conv1.norm.\1"),
    (r"conv1\.3\.weight", r"stem.conv2.weight"),
    (rf"conv1\.4\.{_BN}", r"stem.conv2.norm.\1"),
    (r"conv1\.6\.weight", r"stem.conv3.weight"),
    (rf"bn1\.{_BN}", r"stem.conv3.norm.\1"),
] + _RES2NET_BLOCK_RULES

SOURCES: Dict[str, List[Tuple[str, str]]] = {
    "torchvision": RESNET_RULES,
    "mmdet-resnet": RESNET_RULES,
    "mmdet-res2net": MMDET_RES2NET_RULES,
    "timm-res2net": TIMM_RES2NET_RULES,
}

# The offset (and mask) convs of our deformable blocks (ResNet, Res2Net).
_OFFSET_CONV = r"\.(conv2_offset|convs_offset\.\d+)\.(weight|bias)$"

# Keys with no counterpart in a detection backbone: checked, then dropped.
_DROPPED = (r"fc\.(weight|bias)", r".*num_batches_tracked")


def rename_backbone_key(key: str, rules: List[Tuple[str, str]]) -> Optional[str]:
    """Our name (no prefix) for an unprefixed backbone ``key`` under ``rules``; None if none."""
    key = re.sub(r"^layer([1-4])\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
    for pattern, repl in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(repl)
    return None


def convert_backbone_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str, prefix: str = PREFIX
) -> "OrderedDict[str, torch.Tensor]":
    """Rename a backbone state dict from ``source`` (a key of ``SOURCES``) to our names.

    Args:
        state_dict: the source backbone's tensors (a ``backbone.`` / ``module.`` prefix is
            ignored).
        source: "torchvision", "mmdet-resnet", "mmdet-res2net" or "timm-res2net".
        prefix: put before every name: ``PREFIX`` for a SALTNet model, "" for the bare backbone.

    Raises:
        UnmappedKeysError: naming every key that no rule places.
        ValueError: for an unknown source or two keys mapping to the same name.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; choose one of {sorted(SOURCES)}.")
    converted: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unmapped = []
    for original, value in state_dict.items():
        key = re.sub(r"^(module\.)?(backbone\.)?", "", original)
        if any(re.fullmatch(p, key) for p in _DROPPED):
            continue
        new = rename_backbone_key(key, SOURCES[source])
        if new is None:
            unmapped.append(original)
            continue
        new = prefix + new
        if new in converted:
            raise ValueError(f"Two checkpoint keys map to {new!r} (the second is {original!r}).")
        converted[new] = value
    if unmapped:
        raise UnmappedKeysError(unmapped)
    return converted


def check_state_dict_matches(
    converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> List[str]:
    """Raise ValueError unless ``converted`` has ``expected``'s keys and shapes.

    Tolerated as missing: BN ``num_batches_tracked`` buffers (PyTorch fills them) and the
    offset convs of deformable stages, which ImageNet weights lack: these start at zero, so the
    deformable convs start as plain convs. Returns the missing offset-conv keys.
    """
    missing = [k for k in expected if k not in converted]
    offsets = [k for k in missing if re.search(_OFFSET_CONV, k)]
    missing = [k for k in missing if k not in offsets and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in converted if k not in expected]
    shapes = [
        f"{k}: {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
        for k in converted
        if k in expected and tuple(converted[k].shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{title} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
        for title, keys in [
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (converted vs model)", shapes),
        ]
        if keys
    ]
    if problems:
        raise ValueError("Converted weights do not fit the model: " + "; ".join(problems))
    return offsets


def save_checkpoint(model: Mapping[str, torch.Tensor], path: str, author: str) -> None:
    """Write ``{"model": model, "__author__": author}`` for ``DetectionCheckpointer``.

    ``.pkl``: a pickle of numpy arrays (detectron2's model-zoo format); otherwise ``torch.save``.
    Written to ``path + ".tmp"`` and renamed, so an interrupted run leaves no partial file.
    """
    tmp = path + ".tmp"
    if path.endswith(".pkl"):
        arrays = {k: v.detach().cpu().numpy() for k, v in model.items()}
        with open(tmp, "wb") as f:
            pickle.dump({"model": arrays, "__author__": author}, f)
    else:
        torch.save({"model": dict(model), "__author__": author}, tmp)
    os.replace(tmp, path)
