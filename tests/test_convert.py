"""The mmdetection checkpoint converter: every key placed or named, the classifier's background
column dropped, the command-line tool. (That the converted detector computes what the release
computes is in ``test_release_parity.py``.)"""

import subprocess
import sys

import pytest
import torch
from detectron2.layers import ShapeSpec
from helpers import REPO_ROOT
from release_reference import release_neck_and_head

from saltnet import SALTHead
from saltnet.checkpoint.convert_mmdet import (
    ClassifierShapeError,
    UnmappedKeysError,
    convert_mmdet_saltnet_state_dict,
)

C, K, LEVELS, REG_MAX = 32, 3, 5, 16


def release_head(num_classes=K):
    """The release's ``bbox_head.*`` tensors at width C, classifier with K + 1 rows."""
    state = release_neck_and_head(num_classes, channels=C, in_channels=(C, C, C))
    return {k: v for k, v in state.items() if k.startswith("bbox_head.")}


def test_head_keys_convert_exactly():
    original = release_head()
    converted = convert_mmdet_saltnet_state_dict(original, num_classes=K)
    head = SALTHead(
        input_shape=[ShapeSpec(channels=C, stride=2 ** (3 + i)) for i in range(LEVELS)],
        num_classes=K,
    )
    # strict: every converted key used, every parameter of the head filled.
    head.load_state_dict({k[len("head.") :]: v for k, v in converted.items()}, strict=True)
    assert len(converted) == len(original) - 1  # only the constant integral.project is dropped
    # The classifier keeps the first K rows; the release's last row is its background column.
    for name in ("weight", "bias"):
        kept = original[f"bbox_head.salt_cls.{name}"][:K]
        assert torch.equal(converted[f"head.cls_score.{name}"], kept)


def test_classifier_with_k_rows_is_kept_and_other_shapes_refused():
    original = release_head()
    for key in ("bbox_head.salt_cls.weight", "bbox_head.salt_cls.bias"):
        original[key] = original[key][:K]
    converted = convert_mmdet_saltnet_state_dict(original, num_classes=K)
    assert converted["head.cls_score.weight"].shape[0] == K
    with pytest.raises(ClassifierShapeError, match="salt_cls.weight has 3 output rows.*5 classes"):
        convert_mmdet_saltnet_state_dict(original, num_classes=5)


def test_unmapped_and_conflicting_keys_fail_loudly():
    original = release_head()
    with pytest.raises(UnmappedKeysError, match="bbox_head.salt_mystery.weight"):
        convert_mmdet_saltnet_state_dict(
            {**original, "bbox_head.salt_mystery.weight": 0}, num_classes=K
        )
    with pytest.raises(ValueError, match="another reg_max"):
        convert_mmdet_saltnet_state_dict(original, num_classes=K, reg_max=8)
    with pytest.raises(ValueError, match="Two checkpoint keys"):
        zeros = torch.zeros(K)
        convert_mmdet_saltnet_state_dict(
            {"bbox_head.salt_cls.bias": zeros, "module.bbox_head.salt_cls.bias": zeros},
            num_classes=K,
        )


def test_command_line_tool(tmp_path):
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    torch.save({"state_dict": release_head(), "meta": {}}, src)
    tool = str(REPO_ROOT / "tools" / "convert_mmdet_checkpoint.py")
    done = subprocess.run(
        [sys.executable, tool, str(src), str(dst), "--num-classes", str(K)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout
    assert "bbox_head.salt_cls.weight: kept the first 3 of 4 rows" in done.stderr
    written = torch.load(dst, weights_only=False)
    assert written["model"]["head.cls_score.weight"].shape == (K, C, 3, 3)
    assert written["__author__"] == "mmdetection SALT-Net release"

    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"bbox_head.unknown": torch.zeros(1)}}, bad)
    failed = subprocess.run(
        [sys.executable, tool, str(bad), str(dst)], capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "bbox_head.unknown" in failed.stderr
