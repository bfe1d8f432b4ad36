"""Backbone weight conversion: torchvision / open-mmlab / mmdetection / timm weights land in our
backbones (strict loads, identical feature maps), and detectron2's checkpointer reads what the
tool writes (and still reads detectron2's own model-zoo pickles). Whole release checkpoints
(Res2Net, "dcnx"): test_release_parity.py."""

import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from helpers import REPO_ROOT
from torchvision.models.resnet import Bottleneck, ResNet

from saltnet import add_saltnet_config
from saltnet.checkpoint.convert_backbone import (
    PREFIX,
    UnmappedKeysError,
    check_state_dict_matches,
    convert_backbone_state_dict,
    save_checkpoint,
)
from saltnet.config.defaults import load_yaml_config
from saltnet.modeling.res2net import build_saltnet_res2net_backbone
from saltnet.modeling.resnet import build_saltnet_resnet_backbone

STAGES = ["res2", "res3", "res4", "res5"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def randomize_bn_(model, seed=0):
    """Random BN statistics and affine parameters, so that BN conversion errors show."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return model.eval()


def source_features(model, x):
    """res2-res5 of a torchvision or timm ResNet-style model."""
    stem_act = model.relu if hasattr(model, "relu") else model.act1
    x = model.maxpool(stem_act(model.bn1(model.conv1(x))))
    outs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outs.append(x)
    return outs


def backbone_cfg():
    cfg = get_cfg()
    add_saltnet_config(cfg)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision: stride in the 3x3 conv
    cfg.MODEL.RESNETS.OUT_FEATURES = STAGES
    cfg.MODEL.RES2NET.OUT_FEATURES = STAGES
    return cfg


def assert_same_features(ours, source, x, **tol):
    out = ours(x)
    for name, ref in zip(STAGES, source_features(source, x)):
        torch.testing.assert_close(out[name], ref, **tol)


def assert_same_tensors(a, b):
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def resnext101_32x4d():
    if hasattr(torchvision.models, "resnext101_32x4d"):
        return torchvision.models.resnext101_32x4d()
    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)


def test_torchvision_resnet50_and_mmdet_names():
    source = randomize_bn_(torchvision.models.resnet50())
    converted = convert_backbone_state_dict(source.state_dict(), "torchvision", prefix="")
    assert torch.equal(converted["stem.conv1.norm.running_var"], source.bn1.running_var)
    assert "res2.0.shortcut.weight" in converted and "res5.2.conv3.norm.bias" in converted
    ours = build_saltnet_resnet_backbone(backbone_cfg(), ShapeSpec(channels=3)).eval()
    ours.load_state_dict(converted, strict=True)
    assert_same_features(ours, source, torch.randn(1, 3, 64, 64), rtol=0, atol=0)

    # mmdetection's ResNet backbone: torchvision's names under "backbone.".
    mmdet = {"backbone." + k: v for k, v in source.state_dict().items() if not k.startswith("fc")}
    assert_same_tensors(convert_backbone_state_dict(mmdet, "mmdet-resnet", prefix=""), converted)


def test_resnext101_32x4d_with_deformable_stages():
    source = randomize_bn_(resnext101_32x4d())
    cfg = backbone_cfg()
    cfg.MODEL.RESNETS.DEPTH = 101
    cfg.MODEL.RESNETS.NUM_GROUPS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True, True]
    ours = build_saltnet_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    converted = convert_backbone_state_dict(source.state_dict(), "torchvision", prefix="")
    # ImageNet weights have no offsets: those stay zero, so the DCNs start as plain convs.
    missing = ours.load_state_dict(converted, strict=False).missing_keys
    assert missing and all(
        re.fullmatch(r"res[345]\.\d+\.conv2_offset\.(weight|bias)", k) for k in missing
    )
    assert len(missing) == 2 * (4 + 23 + 3)
    assert check_state_dict_matches(converted, ours.state_dict()) == missing  # tolerated
    assert_same_features(ours, source, torch.randn(1, 3, 64, 64), rtol=1e-4, atol=1e-4)

    # An mmdetection DCN ResNeXt: mmcv's DeformConv2dPack keeps its offsets in conv2.conv_offset.
    mmdet = {"backbone." + k: v for k, v in source.state_dict().items()}
    for key in missing:
        stage, block, kind = re.fullmatch(r"res(\d)\.(\d+)\.conv2_offset\.(\w+)", key).groups()
        mmdet[f"backbone.layer{int(stage) - 1}.{block}.conv2.conv_offset.{kind}"] = torch.randn(
            ours.state_dict()[key].shape
        )
    converted = convert_backbone_state_dict(mmdet, "mmdet-resnet", prefix="")
    ours.load_state_dict(converted, strict=True)
    torch.testing.assert_close(
        ours.res4[7].conv2_offset.bias, mmdet["backbone.layer3.7.conv2.conv_offset.bias"]
    )


def res2net_cfg(depth, **res2net):
    cfg = backbone_cfg()
    cfg.MODEL.RES2NET.DEPTH = depth
    for key, value in res2net.items():
        setattr(cfg.MODEL.RES2NET, key, value)
    return cfg


@pytest.mark.parametrize("depth", [50, 101])
def test_timm_res2net_v1d(depth):
    source = randomize_bn_(timm.create_model(f"res2net{depth}d", pretrained=False))
    converted = convert_backbone_state_dict(source.state_dict(), "timm-res2net", prefix="")
    x = torch.randn(1, 3, 64, 64)
    # timm (like the original Res2Net) also pools the last split of res2's first block.
    ours = build_saltnet_res2net_backbone(
        res2net_cfg(depth, STRIDE1_SPLIT_POOL=True), ShapeSpec(channels=3)
    ).eval()
    ours.load_state_dict(converted, strict=True)
    assert_same_features(ours, source, x, rtol=1e-5, atol=1e-5)
    # mmdetection's Res2Net (the default) does not: timm without that pool computes the same.
    ours = build_saltnet_res2net_backbone(res2net_cfg(depth), ShapeSpec(channels=3)).eval()
    ours.load_state_dict(converted, strict=True)
    source.layer1[0].pool = None
    assert_same_features(ours, source, x, rtol=1e-5, atol=1e-5)


def timm_to_mmdet_res2net(state_dict):
    """timm Res2Net names -> mmdetection Res2Net names (deep stem ``stem.{0,1,3,4,6,7}``)."""
    stem = {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv1.3": "stem.3", "conv1.4": "stem.4"}
    stem.update({"conv1.6": "stem.6", "bn1": "stem.7"})
    out = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        out["backbone." + stem.get(module, module) + "." + leaf] = value
    return out


def mmdet_res2net_offsets(depth_blocks, stages, width=26, seed=0):
    """mmcv DeformConv2dPack offsets (``convs.{i}.conv_offset``) for the blocks of ``stages``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for stage in stages:
        w = width * 2 ** (stage - 1)
        for block in range(depth_blocks[stage - 1]):
            for i in range(3):
                prefix = f"backbone.layer{stage}.{block}.convs.{i}.conv_offset"
                out[prefix + ".weight"] = 0.01 * torch.randn(18, w, 3, 3, generator=gen)
                out[prefix + ".bias"] = 0.1 * torch.randn(18, generator=gen)
    return out


def test_mmdet_res2net_names_with_dcn():
    source = randomize_bn_(timm.create_model("res2net50d", pretrained=False))
    from_timm = convert_backbone_state_dict(source.state_dict(), "timm-res2net", prefix="")
    offsets = mmdet_res2net_offsets([3, 4, 6, 3], stages=[3, 4])
    mmdet = {**timm_to_mmdet_res2net(source.state_dict()), **offsets}
    assert "backbone.stem.7.running_var" in mmdet and "backbone.layer1.0.downsample.2.bias" in mmdet
    converted = convert_backbone_state_dict(mmdet, "mmdet-res2net", prefix="")
    assert_same_tensors({k: v for k, v in converted.items() if "offset" not in k}, from_timm)
    torch.testing.assert_close(
        converted["res5.2.convs_offset.1.weight"],
        offsets["backbone.layer4.2.convs.1.conv_offset.weight"],
    )
    cfg = res2net_cfg(50, DEFORM_ON_PER_STAGE=[False, False, True, True])
    ours = build_saltnet_res2net_backbone(cfg, ShapeSpec(channels=3))
    ours.load_state_dict(converted, strict=True)


def test_unmapped_keys_fail_loudly():
    state = torchvision.models.resnet18().state_dict()
    extra = {"layer1.0.se.fc1.weight": torch.zeros(1), "head.fc.weight": torch.zeros(1)}
    with pytest.raises(UnmappedKeysError, match="layer1.0.se.fc1.weight, head.fc.weight") as e:
        convert_backbone_state_dict({**state, **extra}, "torchvision")
    assert e.value.keys == list(extra)
    # A whole detector is not a backbone checkpoint; ResNet names are not Res2Net names.
    with pytest.raises(UnmappedKeysError, match="neck.lateral_convs.0.conv.weight"):
        convert_backbone_state_dict({"neck.lateral_convs.0.conv.weight": 0}, "mmdet-resnet")
    with pytest.raises(UnmappedKeysError, match="conv1.weight"):
        convert_backbone_state_dict(state, "timm-res2net")
    with pytest.raises(ValueError, match="Unknown source"):
        convert_backbone_state_dict(state, "caffe2")
    with pytest.raises(ValueError, match="Two checkpoint keys"):
        convert_backbone_state_dict({"conv1.weight": 0, "backbone.conv1.weight": 0}, "torchvision")
    with pytest.raises(ValueError, match=r"missing \(1\): b; unexpected \(1\): c; shape"):
        check_state_dict_matches(
            {"a": torch.zeros(2), "c": torch.zeros(1)}, {"a": torch.zeros(3), "b": torch.zeros(1)}
        )


def saltnet_r50():
    opts = ["MODEL.SALTNET.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu"]
    return build_model(load_yaml_config(str(REPO_ROOT / "configs" / "salt_R_50_FPN_1x.yaml"), opts))


def test_detectron2_model_zoo_pickles_still_load(tmp_path):
    model = saltnet_r50()
    gen = np.random.default_rng(0)
    bottom_up = model.backbone.bottom_up.state_dict()

    # Caffe2 / Detectron names (ImageNetPretrained/MSRA/R-50.pkl): detectron2 renames and matches.
    c2_names = {
        "conv1_w": "stem.conv1.weight",
        "res_conv1_bn_s": "stem.conv1.norm.weight",
        "res2_0_branch1_w": "res2.0.shortcut.weight",
        "res2_0_branch2a_w": "res2.0.conv1.weight",
        "res2_0_branch2a_bn_b": "res2.0.conv1.norm.bias",
        "res5_2_branch2c_w": "res5.2.conv3.weight",
    }
    blobs = {
        c2: gen.standard_normal(bottom_up[d2].shape).astype("float32")
        for c2, d2 in c2_names.items()
    }
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump(blobs, f)
    DetectionCheckpointer(model).load(str(tmp_path / "R-50.pkl"))
    for c2, d2 in c2_names.items():
        np.testing.assert_array_equal(model.backbone.bottom_up.state_dict()[d2].numpy(), blobs[c2])

    # detectron2's converted torchvision pickles (ImageNetPretrained/torchvision/R-50.pkl):
    # bare detectron2 names, matched by suffix.
    bare = {k: gen.standard_normal(v.shape).astype("float32") for k, v in bottom_up.items()}
    with open(tmp_path / "tv.pkl", "wb") as f:
        pickle.dump({"model": bare, "__author__": "torchvision", "matching_heuristics": True}, f)
    DetectionCheckpointer(model).load(str(tmp_path / "tv.pkl"))
    for k, v in model.backbone.bottom_up.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), bare[k])


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_saved_checkpoint_loads_by_exact_name(tmp_path, suffix):
    model = saltnet_r50()
    source = randomize_bn_(torchvision.models.resnet50(), seed=3)
    converted = convert_backbone_state_dict(source.state_dict(), "torchvision")
    assert all(k.startswith(PREFIX) for k in converted)
    # every key of the bottom-up network, right shapes
    check_state_dict_matches(
        converted, {k: v for k, v in model.state_dict().items() if PREFIX in k}
    )
    path = str(tmp_path / f"R-50{suffix}")
    save_checkpoint(converted, path, author="test")
    DetectionCheckpointer(model).load(path)
    for k, v in model.state_dict().items():
        if k.startswith(PREFIX):
            torch.testing.assert_close(v, converted[k], rtol=0, atol=0)


def run_tool(*args):
    tool = str(REPO_ROOT / "tools" / "convert_backbone_weights.py")
    return subprocess.run([sys.executable, tool, *args], capture_output=True, text=True)


@pytest.mark.slow
def test_command_line_tool(tmp_path):
    from safetensors.torch import save_file

    src, dst = tmp_path / "res2net50d.safetensors", tmp_path / "R2-50.pkl"
    source = randomize_bn_(timm.create_model("res2net50d", pretrained=False))
    save_file(source.state_dict(), str(src))
    config = str(REPO_ROOT / "configs" / "salt_R2_101_FPN_2x_ms_dcnx.yaml")
    r2_50 = ["--opts", "MODEL.RES2NET.DEPTH", "50"]
    done = run_tool("timm-res2net", str(src), str(dst), "--config-file", config, *r2_50)
    assert done.returncode == 0, done.stderr
    assert "converted 435 tensors" in done.stdout
    assert "the 78 offset-conv tensors" in done.stdout  # DCN in res3-res5: zero offsets
    with open(dst, "rb") as f:
        written = pickle.load(f)
    assert written["__author__"].startswith("timm-res2net")
    np.testing.assert_array_equal(
        written["model"][PREFIX + "res3.0.shortcut.norm.running_mean"],
        source.layer2[0].downsample[2].running_mean.numpy(),
    )

    # Weights that do not fit the config's backbone (Res2Net-50 weights, Res2Net-101 config).
    failed = run_tool("timm-res2net", str(src), str(dst), "--config-file", config)
    assert failed.returncode != 0
    assert "missing" in failed.stderr and "res4.6.conv1.weight" in failed.stderr

    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"layer1.0.mystery.weight": torch.zeros(1)}}, bad)
    failed = run_tool("mmdet-res2net", str(bad), str(tmp_path / "x.pkl"))
    assert failed.returncode != 0 and "layer1.0.mystery.weight" in failed.stderr
    assert not (tmp_path / "x.pkl").exists()
