"""The SALT plug-in configs through the command-line tools: detectron2's FCOS with SALT from a
LazyConfig and its RetinaNet with SALT from YAML each train, resume exactly, evaluate with
--eval-only and draw their point sets with demo/demo.py --show-points."""

import cv2
import numpy as np
import pytest
from helpers import (
    LAZY_TINY_OVERRIDES,
    YAML_VAL_16,
    assert_trained_and_evaluated,
    copypaste_ap,
    differing_keys,
    final_weights,
)

FCOS_PY = "configs/quick_schedule/fcos_salt_R_18_synthetic.py"
RETINANET_YAML = "configs/quick_schedule/retinanet_salt_R_18_synthetic.yaml"


@pytest.fixture(autouse=True)
def no_torchscript(monkeypatch):
    """detectron2's RetinaNet / FCOS compute their focal loss with a TorchScript function, whose
    first calls run unfused and later ones fused, with other float rounding: a resumed run (whose
    first call is the straight run's fifth) then differs in the last bits. Without TorchScript
    the resumed run must equal the straight one exactly."""
    monkeypatch.setenv("PYTORCH_JIT", "0")


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _assert_ap_numbers(log):
    """--eval-only prints an AP table whose AP and AP50 are numbers in [0, 100]."""
    ap, ap50 = (float(v) for v in copypaste_ap(log).split(",")[:2])
    assert 0 <= ap <= 100 and 0 <= ap50 <= 100, (ap, ap50)


def _check_resume_and_demo(run_tool, synthetic_root, tmp_path, config, train_args, weights_opt):
    """After a straight run into tmp_path/train (4 iterations): resuming from the checkpoint of
    iteration 1 gives the same final weights; the demo draws pictures, with points different from
    without."""
    out = tmp_path / "train"
    straight = final_weights(out)
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    log = _ok(run_tool("train_net.py", "--config-file", config, "--resume", *train_args))
    assert "Starting training from iteration 2" in log
    assert differing_keys(straight, final_weights(out)) == []

    image = f"{synthetic_root}/val/000000.png"
    pictures = {}
    for flag in ([], ["--show-points"]):
        target = tmp_path / f"vis{len(flag)}.png"
        args = ["--config-file", config, "--input", image, "--output", target, *flag]
        args += ["--confidence-threshold", "0.0", "--opts", *weights_opt(out / "model_final.pth")]
        _ok(run_tool("demo/demo.py", *args))
        pictures[len(flag)] = cv2.imread(str(target))
        assert pictures[len(flag)].shape == (128, 128, 3)
    assert np.abs(pictures[0].astype(int) - pictures[1]).sum() > 0


@pytest.mark.slow
def test_fcos_with_salt_from_a_lazy_config(run_tool, synthetic_root, tmp_path):
    train_args = [*LAZY_TINY_OVERRIDES, "train.max_iter=4", "train.checkpointer.period=2"]
    train_args.append(f"train.output_dir={tmp_path / 'train'}")
    _ok(run_tool("train_net.py", "--config-file", FCOS_PY, *train_args))
    assert_trained_and_evaluated(tmp_path / "train", ["loss_salt_coarse", "loss_fcos_ctr"])

    weights = [f"train.init_checkpoint={tmp_path / 'train' / 'model_final.pth'}"]
    eval_args = ["--config-file", FCOS_PY, "--eval-only", *train_args, *weights]
    _assert_ap_numbers(_ok(run_tool("train_net.py", *eval_args)))

    _check_resume_and_demo(
        run_tool,
        synthetic_root,
        tmp_path,
        FCOS_PY,
        train_args,
        lambda path: [f"train.init_checkpoint={path}"],
    )


@pytest.mark.slow
def test_retinanet_with_salt_from_yaml(run_tool, synthetic_root, tmp_path):
    # fmt: off
    train_args = [
        "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        *YAML_VAL_16,
        "OUTPUT_DIR", tmp_path / "train",
    ]
    # fmt: on
    _ok(run_tool("train_net.py", "--config-file", RETINANET_YAML, *train_args))
    assert_trained_and_evaluated(tmp_path / "train", ["loss_salt_coarse", "loss_box_reg"])
    assert "SALTRetinaNet" in (tmp_path / "train" / "config.yaml").read_text()

    weights = ["MODEL.WEIGHTS", tmp_path / "train" / "model_final.pth"]
    eval_args = ["--config-file", RETINANET_YAML, "--eval-only", *train_args, *weights]
    _assert_ap_numbers(_ok(run_tool("train_net.py", *eval_args)))

    _check_resume_and_demo(
        run_tool,
        synthetic_root,
        tmp_path,
        RETINANET_YAML,
        train_args,
        lambda path: ["MODEL.WEIGHTS", path],
    )
