"""Backbones: detectron2-compatible ResNet with pure-PyTorch deformable stages, Res2Net v1d,
the P3-P7 FPN, and every paper config built and run on CPU."""

import functools

import pytest
import timm
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import resnet as d2_resnet
from helpers import REPO_ROOT
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from saltnet import add_saltnet_config
from saltnet.config.defaults import load_yaml_config
from saltnet.layers import DeformConv, ModulatedDeformConv, available_backends
from saltnet.modeling.head import _ModulatedDeformTowerConv
from saltnet.modeling.res2net import Bottle2neckBlock, DeepStem, build_saltnet_res2net_backbone
from saltnet.modeling.resnet import DeformBottleneckBlock, build_saltnet_resnet_backbone

STAGES = ["res2", "res3", "res4", "res5"]


@pytest.fixture(autouse=True)
def no_grad_by_default():
    with torch.no_grad():
        yield


def backbone_cfg(**resnets):
    cfg = get_cfg()
    add_saltnet_config(cfg)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = STAGES
    cfg.MODEL.RES2NET.OUT_FEATURES = STAGES
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    for key, value in resnets.items():
        setattr(cfg.MODEL.RESNETS, key, value)
    return cfg


def randomize_(module, seed=0):
    """Random weights everywhere, BN statistics and offset convs included."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
        elif "norm.weight" in name:
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
        else:
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
    return module


@pytest.mark.parametrize(
    "depth,groups,width", [(18, 1, 64), (50, 1, 64), (50, 32, 4)], ids=["R18", "R50", "X50"]
)
def test_resnet_builder_is_detectron2s(depth, groups, width):
    cfg = backbone_cfg(DEPTH=depth, NUM_GROUPS=groups, WIDTH_PER_GROUP=width)
    if depth == 18:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    theirs = d2_resnet.build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    ours = build_saltnet_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    assert type(ours) is type(theirs)
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert ours.output_shape() == theirs.output_shape()
    ours.load_state_dict(randomize_(theirs).state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    for name, out in ours(x).items():
        torch.testing.assert_close(out, theirs(x)[name])


@pytest.mark.parametrize("modulated", [False, True], ids=["dcn", "mdcn"])
def test_deform_block_has_detectron2s_parameters_and_output(monkeypatch, modulated):
    # detectron2's own block, made constructible by lending it our deformable convs.
    monkeypatch.setattr(d2_resnet, "DeformConv", DeformConv)
    monkeypatch.setattr(d2_resnet, "ModulatedDeformConv", ModulatedDeformConv)
    kwargs = dict(
        in_channels=32,
        out_channels=64,
        bottleneck_channels=16,
        stride=2,
        num_groups=2,
        norm="FrozenBN",
        deform_modulated=modulated,
        deform_num_groups=2,
    )
    theirs = randomize_(d2_resnet.DeformBottleneckBlock(**kwargs))
    ours = DeformBottleneckBlock(**kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert ours.conv2.bias is None
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 32, 9, 11)
    torch.testing.assert_close(ours(x), theirs(x))


def test_deform_block_with_zero_offsets_is_the_plain_block():
    kwargs = dict(in_channels=32, out_channels=64, bottleneck_channels=16, stride=2, norm="BN")
    plain = randomize_(d2_resnet.BottleneckBlock(num_groups=4, **kwargs)).eval()
    dcn = DeformBottleneckBlock(num_groups=4, **kwargs).eval()
    missing = dcn.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["conv2_offset.bias", "conv2_offset.weight"]  # zero-initialised
    x = torch.randn(1, 32, 10, 10)
    torch.testing.assert_close(dcn(x), plain(x), rtol=1e-4, atol=1e-5)


def test_deformable_and_frozen_stages():
    cfg = backbone_cfg(DEPTH=50, DEFORM_ON_PER_STAGE=[False, True, True, True])
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    with torch.enable_grad():
        net = build_saltnet_resnet_backbone(cfg, ShapeSpec(channels=3))
        assert all(
            type(b) is DeformBottleneckBlock for s in STAGES[1:] for b in net.get_submodule(s)
        )
        assert not any(isinstance(b, DeformBottleneckBlock) for b in net.res2)
        for name, param in net.named_parameters():
            assert param.requires_grad == name.startswith(("res3", "res4", "res5")), name
        assert all(
            isinstance(m, FrozenBatchNorm2d) for m in net.modules() if "norm" in type(m).__name__
        )
        net.res3[0].conv2_offset.weight.data.normal_(std=0.1)  # move the sampling points
        out = net(torch.randn(1, 3, 64, 64))
        sum(o.mean() for o in out.values()).backward()
    assert net.res3[0].conv2_offset.weight.grad.abs().sum() > 0
    assert net.res5[2].conv2.weight.grad.abs().sum() > 0


def test_res2net_structure_and_frozen_stages():
    cfg = backbone_cfg()
    cfg.MODEL.RES2NET.DEPTH = 50
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    net = build_saltnet_res2net_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(net.stem, DeepStem)
    assert [net.stem.get_submodule(f"conv{i}").weight.shape[:2] for i in (1, 2, 3)] == [
        (32, 3),
        (32, 32),
        (64, 32),
    ]
    assert [len(net.get_submodule(s)) for s in STAGES] == [3, 4, 6, 3]
    for i, stage in enumerate(STAGES):
        width, channels, stride = 26 * 2**i, 256 * 2**i, 4 * 2**i
        blocks = net.get_submodule(stage)
        assert all(isinstance(b, Bottle2neckBlock) and b.width == width for b in blocks)
        assert len(blocks[0].convs) == 3 and blocks[0].conv1.out_channels == 4 * width
        assert blocks[0].shortcut is not None and all(b.shortcut is None for b in blocks[1:])
        assert net.output_shape()[stage] == ShapeSpec(channels=channels, stride=stride)
    for name, param in net.named_parameters():
        assert param.requires_grad == name.startswith(("res3", "res4", "res5")), name
    out = net(torch.randn(1, 3, 64, 96))
    assert [tuple(out[s].shape) for s in STAGES] == [
        (1, 256, 16, 24),
        (1, 512, 8, 12),
        (1, 1024, 4, 6),
        (1, 2048, 2, 3),
    ]


@pytest.mark.parametrize("modulated", [False, True], ids=["dcn", "mdcn"])
def test_res2net_deformable_block_with_zero_offsets_is_the_plain_block(modulated):
    kwargs = dict(in_channels=64, out_channels=128, width=8, scale=4, stride=2, norm="BN")
    plain = randomize_(Bottle2neckBlock(**kwargs)).eval()
    dcn = Bottle2neckBlock(deform=True, deform_modulated=modulated, **kwargs).eval()
    assert all(isinstance(c, ModulatedDeformConv if modulated else DeformConv) for c in dcn.convs)
    missing = dcn.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert all(k.startswith("convs_offset.") for k in missing) and len(missing) == 6
    if modulated:  # mask sigmoid(30) ~ 1
        for offset_conv in dcn.convs_offset:
            offset_conv.bias[18:] = 30.0
    x = torch.randn(2, 64, 12, 10)
    torch.testing.assert_close(dcn(x), plain(x), rtol=1e-4, atol=1e-5)


# The models of the paper table, as each config must build them.
R50 = dict(kind="resnet", depth=50, groups=1, deform=[0, 0, 0, 0], fpn_norm="", tower_dcn=False)
X101 = dict(kind="resnet", depth=101, groups=32)
R2_101 = dict(kind="res2net", depth=101, groups=1)
DCN = dict(deform=[0, 0, 1, 1], fpn_norm="", tower_dcn=False)
DCNX = dict(deform=[0, 1, 1, 1], fpn_norm="GN", tower_dcn=True)
PAPER_CONFIGS = {
    "salt_R_50_FPN_1x": R50,
    "salt_R_50_FPN_2x_ms": R50,
    "gflv2_R_50_FPN_1x": R50,
    "salt_X_101_32x4d_FPN_2x_ms_dcn": {**X101, **DCN},
    "salt_X_101_32x4d_FPN_2x_ms_dcnx": {**X101, **DCNX},
    "salt_R2_101_FPN_2x_ms_dcn": {**R2_101, **DCN},
    "salt_R2_101_FPN_2x_ms_dcnx": {**R2_101, **DCNX},
}


@functools.lru_cache(maxsize=None)
def source_parameter_count(kind, depth, groups):
    """Parameters (without the classifier) of the torchvision / timm ImageNet model."""
    if kind == "res2net":
        model = timm.create_model(f"res2net{depth}d", pretrained=False)
    else:
        layers = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
        width = 64 if groups == 1 else 4  # ResNet or ResNeXt 32x4d
        model = ResNet(Bottleneck, layers, groups=groups, width_per_group=width)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc."))


def learnable_count(module, offsets):
    """Learnable tensors of a backbone (FrozenBN affine included), with or without DCN offsets."""
    return sum(
        v.numel()
        for k, v in module.state_dict().items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        and (("offset" in k) == offsets)
    )


@pytest.mark.parametrize("backend", ["torchvision", "detectron2"])
@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_builds_and_runs(name, backend):
    expected = PAPER_CONFIGS[name]
    device = "cpu"
    if backend == "detectron2":
        if backend not in available_backends() or not torch.cuda.is_available():
            pytest.skip("detectron2's compiled deformable conv (CUDA) is not available")
        if not any(expected["deform"]) and not expected["tower_dcn"]:
            pytest.skip("no deformable conv in this model")
        device = "cuda"
    cfg = load_yaml_config(
        str(REPO_ROOT / "configs" / f"{name}.yaml"),
        ["MODEL.DEVICE", device, "MODEL.SALTNET.DEFORM_BACKEND", backend],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    bottom_up = model.backbone.bottom_up

    # The backbone of the paper table.
    block = Bottle2neckBlock if expected["kind"] == "res2net" else d2_resnet.BottleneckBlock
    dcn_block = Bottle2neckBlock if expected["kind"] == "res2net" else DeformBottleneckBlock
    assert len(bottom_up.res4) == {50: 6, 101: 23}[expected["depth"]]
    for stage, deform in zip(STAGES, expected["deform"]):
        for b in bottom_up.get_submodule(stage):
            assert type(b) is (dcn_block if deform else block), (stage, type(b))
            if expected["kind"] == "res2net":
                assert (b.convs_offset is not None) == bool(deform)
                assert not deform or all(type(c) is DeformConv for c in b.convs)  # DCN v1
            else:
                assert b.conv2.groups == expected["groups"]
                assert not deform or type(b.conv2) is DeformConv
    if expected["kind"] == "res2net":
        assert isinstance(bottom_up.stem, DeepStem) and bottom_up.res3[0].width == 52
    fpn_norm = nn.GroupNorm if expected["fpn_norm"] == "GN" else type(None)
    assert isinstance(model.backbone.fpn_lateral3.norm, fpn_norm)
    assert isinstance(model.backbone.top_block.p6.norm, fpn_norm)
    for tower in (model.head.cls_tower, model.head.reg_tower):
        assert isinstance(tower[-1], _ModulatedDeformTowerConv) == expected["tower_dcn"]
    assert all(not p.requires_grad for p in bottom_up.res2.parameters())  # FREEZE_AT 2

    ours = learnable_count(bottom_up, offsets=False)
    source = source_parameter_count(expected["kind"], expected["depth"], expected["groups"])
    offsets = learnable_count(bottom_up, offsets=True)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{name}: backbone {ours / 1e6:.2f}M (source ImageNet model without fc: "
        f"{source / 1e6:.2f}M) + DCN offsets {offsets / 1e6:.2f}M; whole detector "
        f"{total / 1e6:.2f}M parameters"
    )
    assert ours == source

    image = torch.rand(3, 72, 88, device=device) * 255
    with torch.no_grad():
        (result,) = model([{"image": image}])
    assert result["instances"].image_size == (72, 88)
