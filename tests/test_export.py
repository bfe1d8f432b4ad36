"""Deployment: TorchScript and ONNX exports give the PyTorch model's detections (saltnet.export,
tools/deploy/export_model.py, demo/onnx_demo.py)."""

import cv2
import numpy as np
import onnx
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import QUICK_YAML

from saltnet.export.exporter import (
    ExportedPredictor,
    check_export_request,
    decode_outputs,
    export_model,
    load_export_config,
    load_exported,
    pad_images,
    resize_for_test,
)

VARIANTS = {
    "salt": [],
    "salt_off": ["MODEL.SALTNET.SALT_ON", "False"],
    "dcnx": ["MODEL.SALTNET.TOWER_LAST_DCN", "True", "MODEL.FPN.NORM", "GN"],
}
# The exported graphs hold the head once per level, and the ONNX export's time grows with the
# graph: two levels of different strides test the per-level outputs and their decoding, the
# quick config's five are exported by test_export_tool_and_demo.
TWO_LEVELS = ["MODEL.SALTNET.IN_FEATURES", "['p3', 'p4']"]
# Deformable convs per head level (2 x 3 tower convs, SALT's reg / cls convs): the exported
# graph holds one DeformConv per layer and level.
DEFORM_CONVS_PER_LEVEL = {"salt": 2, "salt_off": 0, "dcnx": 4}


def random_head(model, seed: int = 0):
    """Spread the head's weights (normal, std 0.1) so that scores and boxes vary a lot across
    locations: at its initialisation every score is about the prior and every offset is zero,
    which would leave the comparison of detections and the deformable sampling untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def images(*sizes, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) * 255 for h, w in sizes]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tiny_opts, tmp_path_factory):
    """(variant, model, {format: path}): a quick-config model on two levels with a random head,
    exported to TorchScript and ONNX on one 96 x 128 image."""
    variant = request.param
    cfg = load_export_config(QUICK_YAML, [*tiny_opts, *TWO_LEVELS, *VARIANTS[variant]])
    torch.manual_seed(0)
    model = random_head(build_model(cfg).eval())
    sample, _ = pad_images(model, images((96, 128)))
    out = tmp_path_factory.mktemp(f"export_{variant}")
    paths = {"torchscript": str(out / "model.ts"), "onnx": str(out / "model.onnx")}
    for export_format, path in paths.items():
        export_model(model, sample, path, export_format)
    return variant, model, paths


def assert_same_detections(got, expected):
    assert len(expected) > 0
    assert len(got) == len(expected)
    assert torch.equal(got.pred_classes, expected.pred_classes)
    torch.testing.assert_close(
        got.pred_boxes.tensor, expected.pred_boxes.tensor, atol=1e-3, rtol=0
    )
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
def test_exported_model_gives_pytorch_detections_at_other_sizes(exported, export_format):
    """Exported at 96 x 128, run at that size and at another (160 x 64); ONNX (exported with a
    dynamic batch) also on a batch of two images of different sizes: the detections equal the
    PyTorch model's."""
    _, model, paths = exported
    run, names = load_exported(paths[export_format])
    batches = [images((96, 128)), images((160, 64), seed=1)]
    if export_format == "onnx":
        batches.append(images((64, 90), (90, 64), seed=2))
    for batch_images in batches:
        with torch.no_grad():
            expected = model([{"image": x} for x in batch_images])
        batch, sizes = pad_images(model, batch_images)
        got = decode_outputs(model, run(batch), names, sizes)
        assert len(got) == len(batch_images)
        for got_i, expected_i in zip(got, expected):
            assert_same_detections(got_i, expected_i["instances"])


@pytest.mark.slow
def test_onnx_graph_has_deform_conv_per_deformable_layer(exported):
    variant, model, paths = exported
    ops = [node.op_type for node in onnx.load(paths["onnx"]).graph.node]
    num_levels = len(model.head_in_features)
    assert ops.count("DeformConv") == DEFORM_CONVS_PER_LEVEL[variant] * num_levels


@pytest.mark.slow
def test_export_tool_and_demo(run_tool, tiny_opts, tmp_path):
    """The command-line tool exports a checkpoint (TorchScript: the ONNX export costs the tests
    more, and the fixtures above cover it), and demo/onnx_demo.py draws its detections."""
    cfg = load_export_config(QUICK_YAML, tiny_opts)
    torch.manual_seed(0)
    model = random_head(build_model(cfg).eval())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    image = np.random.default_rng(0).integers(0, 256, (120, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "sample.png"), image)
    proc = run_tool(
        "tools/deploy/export_model.py",
        "--config-file", QUICK_YAML,
        "--format", "torchscript",
        "--sample-image", tmp_path / "sample.png",
        "--output", tmp_path / "out",
        *tiny_opts, "MODEL.WEIGHTS", tmp_path / "model.pth",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "out" / "model.ts"
    assert f"Wrote {path}" in proc.stdout
    assert "output scores_0: (1, 4, 12, 8)" in proc.stdout  # 96 x 64 after the test resize

    # The exported checkpoint detects what the PyTorch model does, in the input image's frame.
    predictor = ExportedPredictor(cfg, str(path))
    resized = resize_for_test(cfg, image)
    assert resized.shape == (3, 96, 64)
    with torch.no_grad():
        expected = model([{"image": resized, "height": 120, "width": 80}])[0]["instances"]
    assert_same_detections(predictor(image), expected)

    proc = run_tool(
        "demo/onnx_demo.py",
        "--config-file", QUICK_YAML,
        "--model", path,
        "--input", tmp_path / "sample.png",
        "--output", tmp_path / "vis",
        "--confidence-threshold", "0.0",
        *tiny_opts,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    picture = cv2.imread(str(tmp_path / "vis" / "sample.png"))
    assert picture.shape == image.shape
    assert not np.array_equal(picture, image)  # boxes drawn


@pytest.mark.slow
def test_export_tool_refuses_a_config_without_weights(run_tool, tmp_path):
    proc = run_tool(
        "tools/deploy/export_model.py",
        "--config-file", QUICK_YAML,
        "--format", "torchscript",
        "--output", tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "sets no MODEL.WEIGHTS" in proc.stderr and "--allow-random-weights" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_bad_export_requests_name_the_problem(tiny_opts):
    cfg = load_export_config(QUICK_YAML, tiny_opts)
    with pytest.raises(ValueError, match="sets no MODEL.WEIGHTS"):
        check_export_request(cfg, "onnx", 19, allow_random_weights=False)
    check_export_request(cfg, "onnx", 19, allow_random_weights=True)
    with pytest.raises(ValueError, match="Unsupported export format 'tensorrt'"):
        check_export_request(cfg, "tensorrt", 19, allow_random_weights=True)
    with pytest.raises(ValueError, match="opset 17 has no DeformConv"):
        check_export_request(cfg, "onnx", 17, allow_random_weights=True)
    check_export_request(cfg, "torchscript", 17, allow_random_weights=True)  # no opset there
    with pytest.raises(ValueError, match="Unsupported export method 'scripting'"):
        check_export_request(cfg, "torchscript", 19, True, export_method="scripting")


def test_export_config_forces_the_torchvision_deform_backend(tiny_opts):
    cfg = load_export_config(QUICK_YAML, [*tiny_opts, "MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.SALTNET.DEFORM_BACKEND == "torchvision"
    assert cfg.MODEL.DEVICE == "cpu"
