"""detectron2's FLOP counter on SALT-Net and both plug-ins, with saltnet's deformable-conv
handles (saltnet.layers.flops): it traces every backend and counts each deformable conv as a
dense conv plus four multiply-adds per sampled value, against a hand count; and the analysis modes
of tools/benchmark.py (--flops, --profile)."""

import argparse
import functools

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from helpers import QUICK_YAML, REPO_ROOT, load_script

from saltnet.config import load_yaml_config
from saltnet.layers import DeformConv, ModulatedDeformConv, available_backends
from saltnet.layers.flops import FlopCountAnalysis, deform_conv_flops

# One 64 x 96 image (both sides divisible by 32: no padding); the quick configs' heads run on
# P3-P7, of strides 8 to 128: 8 x 12, 4 x 6, 2 x 3, 1 x 2 and 1 x 1 pixels.
IMAGE = (64, 96)
LEVEL_PIXELS = 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1
# "auto" is "gather" on the CPU; detectron2's kernel runs on CUDA only.
BACKENDS = [b for b in available_backends() if b not in ("auto", "detectron2")]


def _build(model_name, backend):
    """The quick (ResNet-18-FPN) config of SALT-Net or a plug-in, random weights."""
    if model_name == "saltnet":
        overrides = ["MODEL.SALTNET.DEFORM_BACKEND", backend]
        return build_model(load_yaml_config(str(REPO_ROOT / QUICK_YAML), overrides))
    path = REPO_ROOT / "configs" / "quick_schedule" / f"{model_name}_salt_R_18_synthetic.py"
    cfg = LazyConfig.load(str(path))
    cfg.model.head.deform_backend = backend
    return instantiate(cfg.model)


@functools.lru_cache(maxsize=None)
def _count(model_name, backend):
    """(model, its FlopCountAnalysis on one 64 x 96 image)."""
    torch.manual_seed(0)
    model = _build(model_name, backend).eval()
    analysis = FlopCountAnalysis(model, [{"image": torch.rand(3, *IMAGE) * 255}])
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return model, analysis


def _hand_count(layer):
    """The layer's multiply-adds over P3-P7 (3 x 3 kernel, stride 1, padding 1), restated:
    per output pixel and kernel point, C_out x C_in / groups for the dense conv and 4 x C_in
    for the bilinear sampling."""
    c_in, c_out, groups = layer.in_channels, layer.out_channels, layer.groups
    assert layer.kernel_size == (3, 3) and layer.stride == (1, 1) and layer.padding == (1, 1)
    return LEVEL_PIXELS * 9 * (c_out * c_in // groups + 4 * c_in)


@pytest.mark.parametrize("model_name", ["saltnet", "fcos", "retinanet"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_deformable_convs_counted_on_every_backend(model_name, backend):
    """Each deformable conv module counts the hand count (its norm apart), and the whole model
    counts the same on every backend."""
    model, analysis = _count(model_name, backend)
    by_module = analysis.by_module()
    deformable = (DeformConv, ModulatedDeformConv)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, deformable)}
    assert len(layers) == 2  # the SALT operator's two deformable convs
    for name, layer in layers.items():
        norm = by_module.get(f"model.{name}.norm", 0)
        assert by_module[f"model.{name}"] - norm == _hand_count(layer), name
    assert analysis.total() == _count(model_name, "torchvision")[1].total()
    assert analysis.total() > sum(_hand_count(layer) for layer in layers.values())


def test_deform_conv_flops_formula():
    # (1, 256, 100, 152) head conv: 15200 pixels x 9 points x (256 x 256 + 4 x 256).
    assert deform_conv_flops((1, 256, 100, 152), (256, 256, 3, 3), (1, 256, 100, 152)) == (
        15200 * 9 * (65536 + 1024)
    )
    # ResNeXt 32x4d res4 conv: 512 channels in 32 groups of 16.
    assert deform_conv_flops((2, 512, 50, 76), (512, 16, 3, 3), (2, 512, 50, 76)) == (
        2 * 3800 * 9 * (512 * 16 + 4 * 512)
    )


def _benchmark_tool():
    return load_script("tools/benchmark.py")


def test_benchmark_tool_counts_the_deformable_share():
    """``tools/benchmark.py --flops``: SALT-Net R50-FPN's two 256-channel deformable convs."""
    tool = _benchmark_tool()
    torch.manual_seed(0)
    counts = tool.count_flops(tool.MODELS["SALT-Net R50-FPN"](80), *IMAGE)
    assert counts["deform_gflops"] * 1e9 == pytest.approx(2 * LEVEL_PIXELS * 9 * (256 + 4) * 256)
    assert counts["gflops"] > counts["deform_gflops"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modulated", [False, True])
def test_single_layer_with_bias_groups_and_stride(backend, modulated):
    """A strided, grouped layer with two deformable groups, and a bias: dense conv plus
    sampling, nothing else (the bias add and the norm-free layer count nothing more)."""
    layer_cls = ModulatedDeformConv if modulated else DeformConv
    layer = layer_cls(8, 12, 3, stride=2, padding=1, groups=2, deformable_groups=2, bias=True,
                      backend=backend)
    x, offset, mask = torch.randn(2, 8, 9, 11), torch.randn(2, 36, 5, 6), torch.rand(2, 18, 5, 6)
    inputs = (x, offset, mask) if modulated else (x, offset)
    analysis = FlopCountAnalysis(layer, inputs)
    assert analysis.total() == 2 * 5 * 6 * 9 * (12 * 4 + 4 * 8)


def test_benchmark_tool_profiles_inference():
    """``tools/benchmark.py --profile``: the profile of SALT-Net's inference names its
    convolutions and, on the CPU default, the gather backend's sampled product."""
    tool = _benchmark_tool()
    args = argparse.Namespace(height=IMAGE[0], width=IMAGE[1], boxes=1, warmup=0, iters=1)
    table = tool.profile_inference(tool.MODELS["SALT-Net R50-FPN"](80), args, rows=100)
    assert "aten::mkldnn_convolution" in table or "aten::convolution" in table
    assert "_SampledProduct" in table
