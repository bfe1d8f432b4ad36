"""demo/demo.py, the SALT point sets of saltnet.utils.visualize, and tools/demo_job.py
(shortened)."""

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig
from detectron2.modeling import build_model
from helpers import QUICK_YAML, YAML_VAL_16, load_script, usage_error

from saltnet.config.defaults import load_yaml_config
from saltnet.export.predictor import Predictor


@pytest.fixture(scope="module")
def trained_model(quick_train, tiny_opts):
    """The tiny trained quick-schedule model, in eval mode (score threshold 0)."""
    out, proc = quick_train
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_yaml_config(QUICK_YAML, tiny_opts)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    return model


def test_point_sets_belong_to_the_detections(trained_model):
    model = trained_model
    image = torch.randint(0, 256, (3, 96, 96)).float()
    inputs = {"image": image, "height": 192, "width": 144}  # output frame: x 1.5, y 2
    with torch.no_grad():
        expected = model([inputs])[0]["instances"]
        model.output_point_sets = True
        try:
            instances = model([inputs])[0]["instances"]
        finally:
            model.output_point_sets = False
        features = model.backbone(model.preprocess_image([inputs]).tensor)
        salt = model.head([features[f] for f in model.head_in_features]).salt
        point_maps = salt.reg_points, salt.cls_points
    assert len(instances) > 0
    # The same detections as without point sets.
    assert torch.equal(instances.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(instances.scores, expected.scores)
    assert torch.equal(instances.pred_classes, expected.pred_classes)
    assert not expected.has("pred_reg_points")
    # Reference, one detection at a time: the head's (y, x) stride-unit maps at the detection's
    # level and location, plus the anchor point (column, row), times the stride, rescaled.
    output_scale = torch.tensor([1.5, 2.0])
    for name, maps in zip(("pred_reg_points", "pred_cls_points"), point_maps):
        assert instances.get(name).shape == (len(instances), 9, 2)
        for k, (level, location) in enumerate(
            zip(instances.pred_levels.tolist(), instances.pred_locations.tolist())
        ):
            row, col = divmod(location, maps[level].shape[-1])
            yx = maps[level][0, :, row, col].view(9, 2)
            xy = (yx.flip(1) + torch.tensor([col, row])) * model.strides[level] * output_scale
            torch.testing.assert_close(instances.get(name)[k], xy)

    strides = torch.tensor(model.strides)[instances.pred_levels].float()
    padded_width = model.preprocess_image([inputs]).tensor.shape[-1]  # a multiple of all strides
    widths = torch.tensor([padded_width // s for s in model.strides])[instances.pred_levels]
    rows, cols = instances.pred_locations // widths, instances.pred_locations % widths
    anchors = torch.stack([cols, rows], dim=1).float() * strides[:, None] * output_scale
    reg = instances.pred_reg_points
    # Points 3 / 5 lie on the coarse box's left / right side, 1 / 7 on its top / bottom: the
    # anchor point lies between them.
    assert (reg[:, 3, 0] <= anchors[:, 0] + 1e-4).all() and (
        reg[:, 5, 0] >= anchors[:, 0] - 1e-4
    ).all()
    assert (reg[:, 1, 1] <= anchors[:, 1] + 1e-4).all() and (
        reg[:, 7, 1] >= anchors[:, 1] - 1e-4
    ).all()
    assert torch.isfinite(instances.pred_cls_points).all()


def test_point_sets_need_the_salt_head(tiny_opts):
    cfg = load_yaml_config(QUICK_YAML, [*tiny_opts, "MODEL.SALTNET.SALT_ON", "False"])
    model = build_model(cfg).eval()
    model.output_point_sets = True
    with pytest.raises(ValueError, match="SALT_ON False"), torch.no_grad():
        model([{"image": torch.zeros(3, 64, 64)}])
    with pytest.raises(ValueError, match="SALT_ON False"):
        Predictor.from_config(cfg, output_point_sets=True)
    assert not Predictor.from_config(cfg).model.output_point_sets


@pytest.mark.parametrize("config", ["salt_R_18_synthetic.py", "fcos_salt_R_18_synthetic.py"])
def test_predictor_of_a_lazy_config(config):
    """A LazyConfig's predictor: point sets as the model's constructor argument, detections in
    the image's frame."""
    cfg = LazyConfig.load(f"configs/quick_schedule/{config}")
    predictor = Predictor.from_config(cfg, output_point_sets=True)
    assert not Predictor.from_config(cfg).model.output_point_sets
    predictor.model.test_score_thresh = 0.0  # untrained: keep every candidate
    image = np.random.RandomState(0).randint(0, 256, (80, 120, 3)).astype(np.uint8)
    instances = predictor(image)["instances"]
    assert len(instances) > 0 and instances.image_size == (80, 120)
    assert instances.pred_reg_points.shape == instances.pred_cls_points.shape
    assert instances.pred_reg_points.shape == (len(instances), 9, 2)


@pytest.mark.slow
def test_demo_writes_pictures_with_and_without_points(
    quick_train, run_tool, synthetic_root, tmp_path
):
    out, train = quick_train
    assert train.returncode == 0, train.stderr[-3000:]
    opts = ["--confidence-threshold", "0.0"]
    opts += ["--opts", "MODEL.WEIGHTS", out / "model_final.pth", "INPUT.MIN_SIZE_TEST", "96"]
    # Several inputs (the README's glob example) into a directory that does not exist yet,
    # then the first of them alone with its point sets.
    images, folder = f"{synthetic_root}/val/00000[01].png", tmp_path / "new" / "out"
    first, with_points = f"{synthetic_root}/val/000000.png", tmp_path / "points.png"
    for args in (
        ["--input", images, "--output", folder],  # the default --config-file
        ["--config-file", QUICK_YAML, "--input", first, "--output", with_points, "--show-points"],
    ):
        proc = run_tool("demo/demo.py", *args, *opts)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "detected" in proc.stdout + proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png"]
    pictures = [cv2.imread(str(path)) for path in (folder / "000000.png", with_points)]
    for picture in pictures:
        assert picture is not None and picture.shape == (128, 128, 3)
    assert np.abs(pictures[0].astype(int) - pictures[1]).sum() > 0


@pytest.mark.slow
def test_demo_on_a_video(quick_train, run_tool, synthetic_root, tmp_path):
    out, train = quick_train
    assert train.returncode == 0, train.stderr[-3000:]
    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (128, 128))
    for i in range(3):
        writer.write(cv2.imread(f"{synthetic_root}/val/{i:06d}.png"))
    writer.release()
    result = tmp_path / "out.mp4"
    proc = run_tool(
        "demo/demo.py",
        "--config-file",
        QUICK_YAML,
        "--video-input",
        video,
        "--output",
        result,
        "--show-points",
        "--confidence-threshold",
        "0.0",
        "--opts",
        "MODEL.WEIGHTS",
        out / "model_final.pth",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    capture = cv2.VideoCapture(str(result))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{tmp}/*.png"], "--input '{tmp}/*.png' matches no file."),
        (["--input", "{tmp}/a.png", "{tmp}/b.png"], "no such file: '{tmp}/a.png', '{tmp}/b.png'"),
        (["--video-input", "{tmp}/clip.mp4"], "--video-input '{tmp}/clip.mp4' does not exist."),
        ([], "give --input, --video-input or --webcam."),
        (["--webcam", "--output", "{tmp}/out"], "--output is not supported with --webcam."),
        (["--webcam", "--opts", "MODEL.WEIGHTS", "{tmp}/w.pth"], "Checkpoint '{tmp}/w.pth'"),
        (["--webcam", "--opts", "MODEL.NO_SUCH_KEY", "1"], "Unknown config key 'MODEL.NO_SUCH"),
        (["--webcam", "--opts", "DATASETS.TEST", "('nothing',)"], "'nothing' is not registered"),
    ],
)
def test_demo_rejects_bad_inputs_with_a_usage_error(tmp_path, capsys, args, message):
    # argparse's usage error (exit code 2, the problem named), before a model is built.
    demo = load_script("demo/demo.py")
    argv = ["--config-file", QUICK_YAML, *(a.format(tmp=tmp_path) for a in args)]
    assert message.format(tmp=tmp_path) in usage_error(capsys, demo.parse_args, argv)


@pytest.mark.parametrize(
    "model, inputs, trailing, message",
    [
        ("{tmp}/missing.onnx", [QUICK_YAML], [], "--model '{tmp}/missing.onnx' does not exist."),
        ("{tmp}/model.onnx", ["x*.png"], [], "--input 'x*.png' matches no file."),
        ("{tmp}/model.onnx", [QUICK_YAML], ["SOLVER.NO_SUCH_KEY", "1"], "'SOLVER.NO_SUCH_KEY'"),
    ],
)
def test_onnx_demo_rejects_bad_inputs_with_a_usage_error(
    tmp_path, capsys, model, inputs, trailing, message
):
    # Before a model is loaded: argparse's exit code 2, the problem named, nothing written.
    (tmp_path / "model.onnx").write_bytes(b"")
    argv = ["--config-file", QUICK_YAML, "--model", model.format(tmp=tmp_path), "--input", *inputs]
    argv += ["--output", str(tmp_path / "vis"), *trailing]  # KEY VALUE options come last
    stderr = usage_error(capsys, load_script("demo/onnx_demo.py").parse_args, argv)
    assert message.format(tmp=tmp_path) in stderr
    assert not (tmp_path / "vis").exists()


def test_onnx_demo_script_prints_no_traceback_for_a_bad_input(run_tool, tmp_path):
    args = ["--model", tmp_path / "model.onnx", "--output", tmp_path / "vis"]
    proc = run_tool("demo/onnx_demo.py", "--config-file", QUICK_YAML, *args, "--input", "x*.png")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not exist." in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_job_smoke(run_tool, tmp_path):
    proc = run_tool(
        "tools/demo_job.py",
        "--output-dir",
        tmp_path,
        "--num-vis",
        "2",
        "--threads",
        "1",
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
        "MODEL.SALTNET.SCORE_THRESH_TEST",
        "0.0",
        *YAML_VAL_16,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SALT-Net demo job summary" in proc.stdout
    assert "val AP:" in proc.stdout and "wall time:" in proc.stdout
    pictures = sorted((tmp_path / "vis").glob("*.jpg"))
    assert len(pictures) == 2
    picture = cv2.imread(str(pictures[0]))
    assert picture.shape[1] > 2 * picture.shape[0]  # detections next to the ground truth
    assert (tmp_path / "model_final.pth").is_file()
