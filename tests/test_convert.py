"""The mmdetection checkpoint converter: every original key placed, head outputs reproduced."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

from saltnet import SALTHead, add_saltnet_config
from saltnet.convert import UnmappedKeysError, convert_mmdet_saltnet_state_dict

REPO = Path(__file__).resolve().parents[1]
C, K, LEVELS, REG_MAX = 32, 3, 5, 16


def original_head_shapes():
    """Every key of the original's ``bbox_head`` (3-conv towers) with its shape."""
    conv = (C, C, 3, 3)
    shapes = {}
    for tower in ("cls", "reg"):
        for i in range(3):
            shapes[f"bbox_head.{tower}_convs.{i}.conv.weight"] = conv
            shapes[f"bbox_head.{tower}_convs.{i}.gn.weight"] = (C,)
            shapes[f"bbox_head.{tower}_convs.{i}.gn.bias"] = (C,)
    for name, out in [("conv", C), ("regression", 4), ("scale_fs", 14)]:
        shapes[f"bbox_head.reg_init_out.{name}.weight"] = (out, C, 3, 3)
        shapes[f"bbox_head.reg_init_out.{name}.bias"] = (out,)
    for name, out in [("conv", C), ("proposal", 18)]:
        shapes[f"bbox_head.salt_cls_refinement.{name}.weight"] = (out, C, 3, 3)
        shapes[f"bbox_head.salt_cls_refinement.{name}.bias"] = (out,)
    for module in ("reg_init_out", "salt_cls_refinement", "salt_reg_conv", "salt_cls_conv"):
        shapes[f"bbox_head.{module}.bn.weight"] = (C,)
        shapes[f"bbox_head.{module}.bn.bias"] = (C,)
    shapes["bbox_head.salt_reg_conv.conv.weight"] = conv
    shapes["bbox_head.salt_cls_conv.conv.weight"] = conv
    shapes["bbox_head.salt_reg.weight"] = (4 * (REG_MAX + 1), C, 3, 3)
    shapes["bbox_head.salt_reg.bias"] = (4 * (REG_MAX + 1),)
    # The release's classifier: K classes + mmdetection's background column.
    shapes["bbox_head.salt_cls.weight"] = (K + 1, C, 3, 3)
    shapes["bbox_head.salt_cls.bias"] = (K + 1,)
    for i in range(LEVELS):
        shapes[f"bbox_head.scales_init.{i}.scale"] = ()
        shapes[f"bbox_head.scales.{i}.scale"] = ()
    shapes["bbox_head.reg_conf.0.weight"] = (64, 20, 1, 1)
    shapes["bbox_head.reg_conf.0.bias"] = (64,)
    shapes["bbox_head.reg_conf.2.weight"] = (1, 64, 1, 1)
    shapes["bbox_head.reg_conf.2.bias"] = (1,)
    return shapes


def original_head_state_dict(seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_head_shapes().items():
        if key.endswith(".scale"):
            state[key] = 0.5 + torch.rand((), generator=gen)
        elif key.endswith("gn.weight") or key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    # Coarse boxes of a few cells, so that the points spread over the feature map.
    state["bbox_head.reg_init_out.regression.bias"] = torch.tensor([1.5, 2.0, 1.0, 2.5])
    state["bbox_head.integral.project"] = torch.linspace(0, REG_MAX, REG_MAX + 1)
    return state


def original_forward_single(sd, x, level):
    """The release's ``SALTHead.forward_single``, written out with functional ops."""

    def p(name):
        return sd["bbox_head." + name]

    def gn(t, name):
        return F.group_norm(t, 32, p(name + ".weight"), p(name + ".bias"))

    def conv(t, name, bias=True):
        return F.conv2d(t, p(name + ".weight"), p(name + ".bias") if bias else None, padding=1)

    cls_feat, reg_feat = x, x
    for i in range(3):
        cls_feat = F.relu(
            gn(conv(cls_feat, f"cls_convs.{i}.conv", bias=False), f"cls_convs.{i}.gn")
        )
        reg_feat = F.relu(
            gn(conv(reg_feat, f"reg_convs.{i}.conv", bias=False), f"reg_convs.{i}.gn")
        )
    cls_feat = cls_feat + x

    feats = F.relu(gn(conv(reg_feat, "reg_init_out.conv"), "reg_init_out.bn"))
    bbox_distance = F.relu(conv(feats, "reg_init_out.regression")) * p(f"scales_init.{level}.scale")
    scale = torch.sigmoid(conv(feats, "reg_init_out.scale_fs"))

    # points_sampler of the release: (y, x) pairs in a 3x3 raster.
    n, _, h, w = bbox_distance.shape
    width = bbox_distance[:, [0]] + bbox_distance[:, [2]]
    height = bbox_distance[:, [1]] + bbox_distance[:, [3]]
    xmin, ymin = -bbox_distance[:, [0]], -bbox_distance[:, [1]]
    xmax, ymax = bbox_distance[:, [2]], bbox_distance[:, [3]]
    pts = bbox_distance.new_zeros(n, 18, h, w)
    pr = pts.view(n, 9, 2, h, w)
    pr[:, [3], 1] = xmin
    pr[:, [5], 1] = xmax
    pr[:, [3, 5], 0] = height * scale[:, [0, 2]] + ymin
    pr[:, [1, 7], 1] = width * scale[:, [1, 3]] + xmin
    pr[:, [1], 0] = ymin
    pr[:, [7], 0] = ymax
    pr[:, [0, 2, 4, 6, 8], 1] = xmin + width * scale[:, [5, 7, 9, 11, 13]]
    pr[:, [0, 2, 4, 6, 8], 0] = ymin + height * scale[:, [4, 6, 8, 10, 12]]
    base = np.arange(-1, 2).astype(np.float64)
    base = np.stack([np.repeat(base, 3), np.tile(base, 3)], axis=1).reshape(-1)
    base = torch.tensor(base, dtype=x.dtype).view(1, -1, 1, 1)

    reg_dcn = deform_conv2d(reg_feat, pts - base, p("salt_reg_conv.conv.weight"), padding=1)
    reg_dcn = F.relu(gn(reg_dcn, "salt_reg_conv.bn"))
    bbox_pred = conv(reg_dcn, "salt_reg") * p(f"scales.{level}.scale")

    prob = F.softmax(bbox_pred.reshape(n, 4, REG_MAX + 1, h, w), dim=2)
    topk = prob.topk(4, dim=2).values
    stat = torch.cat([topk, topk.mean(dim=2, keepdim=True)], dim=2).reshape(n, -1, h, w)
    quality = torch.sigmoid(
        F.conv2d(
            F.relu(F.conv2d(stat, p("reg_conf.0.weight"), p("reg_conf.0.bias"))),
            p("reg_conf.2.weight"),
            p("reg_conf.2.bias"),
        )
    )

    refine = F.relu(gn(conv(cls_feat, "salt_cls_refinement.conv"), "salt_cls_refinement.bn"))
    class_offset = conv(refine, "salt_cls_refinement.proposal").exp() * pts - base
    cls_dcn = deform_conv2d(cls_feat, class_offset, p("salt_cls_conv.conv.weight"), padding=1)
    cls_dcn = F.relu(gn(cls_dcn, "salt_cls_conv.bn"))
    cls_score = torch.sigmoid(conv(cls_dcn, "salt_cls")) * quality
    return cls_score, bbox_pred, bbox_distance


def prefixed(state):
    return {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}


def test_head_keys_convert_exactly_and_reproduce_original_outputs():
    original = original_head_state_dict()
    converted = convert_mmdet_saltnet_state_dict(original, num_classes=K)
    head = SALTHead(
        input_shape=[ShapeSpec(channels=C, stride=2 ** (3 + i)) for i in range(LEVELS)],
        num_classes=K,
    )
    # strict: every converted key used, every parameter of the head filled.
    head.load_state_dict(prefixed(converted), strict=True)
    assert len(converted) == len(original) - 1  # only the constant integral.project is dropped

    gen = torch.Generator().manual_seed(1)
    features = [
        torch.randn(2, C, 12 >> min(i, 2), 10 >> min(i, 2), generator=gen) for i in range(5)
    ]
    with torch.no_grad():
        scores, box_logits, coarse, *_ = head(features)
        for level, x in enumerate(features):
            ref_scores, ref_logits, ref_coarse = original_forward_single(original, x, level)
            torch.testing.assert_close(coarse[level], ref_coarse)
            torch.testing.assert_close(box_logits[level], ref_logits, rtol=1e-4, atol=1e-5)
            # The release's last score column is its background column, dropped at inference.
            torch.testing.assert_close(scores[level], ref_scores[:, :K], rtol=1e-4, atol=1e-6)


def test_unmapped_and_conflicting_keys_fail_loudly():
    original = original_head_state_dict()
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


def mmdet_resnet50_fpn_shapes():
    """Keys and shapes of mmdetection's ResNet-50 (pytorch style) + FPN (P3-P7, on_output)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    shapes = {"backbone.conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"backbone.bn1.{b}": (64,) for b in bn})
    in_ch = 64
    for stage, blocks in enumerate([3, 4, 6, 3], start=1):
        planes = 64 * 2 ** (stage - 1)
        for b in range(blocks):
            prefix = f"backbone.layer{stage}.{b}"
            block_in = in_ch if b == 0 else planes * 4
            convs = [(planes, block_in, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            for i, shape in enumerate(convs, start=1):
                shapes[f"{prefix}.conv{i}.weight"] = shape
                shapes.update({f"{prefix}.bn{i}.{k}": (shape[0],) for k in bn})
            if b == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, block_in, 1, 1)
                shapes.update({f"{prefix}.downsample.1.{k}": (planes * 4,) for k in bn})
        in_ch = planes * 4
    for i, c_in in enumerate([512, 1024, 2048]):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (256, c_in, 1, 1)
        shapes[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        shapes[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        shapes[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    return shapes


def test_full_r50_checkpoint_loads_strictly_into_saltnet():
    cfg = get_cfg()
    add_saltnet_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "SALTNet"
    cfg.MODEL.BACKBONE.NAME = "build_saltnet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SALTNET.NUM_CLASSES = K
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)

    original = {k: torch.zeros(s) for k, s in mmdet_resnet50_fpn_shapes().items()}
    # The head keys at the model's width (256 channels).
    for key, shape in original_head_shapes().items():
        original[key] = torch.zeros(tuple(256 if d == C else d for d in shape))
    original["bbox_head.integral.project"] = torch.arange(REG_MAX + 1.0)

    converted = convert_mmdet_saltnet_state_dict(original, num_classes=K)
    incompatible = model.load_state_dict(converted, strict=False)
    assert not incompatible.unexpected_keys
    assert not incompatible.missing_keys


def test_command_line_tool(tmp_path):
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    torch.save({"state_dict": original_head_state_dict(), "meta": {}}, src)
    tool = str(REPO / "tools" / "convert_mmdet_checkpoint.py")
    done = subprocess.run(
        [sys.executable, tool, str(src), str(dst), "--num-classes", str(K)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout
    assert torch.load(dst, weights_only=False)["model"]["head.cls_score.weight"].shape == (
        K,
        C,
        3,
        3,
    )

    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"bbox_head.unknown": torch.zeros(1)}}, bad)
    failed = subprocess.run(
        [sys.executable, tool, str(bad), str(dst)], capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "bbox_head.unknown" in failed.stderr
