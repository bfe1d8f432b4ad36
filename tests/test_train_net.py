"""train_net.py end to end on the CPU: training, --eval-only, --resume, LazyConfig, bad input."""

import math
import re
import shutil
import sys

import pytest
from detectron2.engine import default_argument_parser
from helpers import (
    LAZY_VAL_16,
    QUICK_PY,
    QUICK_YAML,
    REPO_ROOT,
    copypaste_ap,
    load_script,
    metrics_records,
    usage_error,
)

from saltnet.engine.preflight import check_before_launch


def _metrics(out_dir):
    """The training records of metrics.json (those with losses; evaluations are separate)."""
    return [r for r in metrics_records(out_dir) if "total_loss" in r]


def _train_net():
    return load_script("train_net.py")


@pytest.mark.slow
def test_training_writes_checkpoints_logs_and_events(quick_train):
    out, proc = quick_train
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model_0000005.pth").is_file()
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard event file"
    metrics = _metrics(out)
    assert max(m["iteration"] for m in metrics) == 11
    assert all(math.isfinite(m["total_loss"]) for m in metrics)
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 0" in log
    assert "eta:" in log  # CommonMetricPrinter
    assert "Evaluation results for bbox" in log  # final evaluation on saltnet_synth_val_16


@pytest.mark.slow
def test_eval_only_prints_ap_table_of_the_checkpoint(quick_train, run_tool, tiny_opts, tmp_path):
    out, train = quick_train
    assert train.returncode == 0, train.stderr[-3000:]
    weights = out / "model_final.pth"
    proc = run_tool(
        "train_net.py",
        "--config-file",
        QUICK_YAML,
        "--eval-only",
        *tiny_opts,
        "MODEL.WEIGHTS",
        weights,
        "OUTPUT_DIR",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Evaluation results for bbox" in proc.stdout
    assert re.search(r"\|\s+AP\s+\|\s+AP50\s+\|\s+AP75\s+\|", proc.stdout), "no markdown AP table"
    assert f"Loading from {weights}" in proc.stdout
    assert not (tmp_path / "model_final.pth").exists()  # evaluation only, no training
    ap = copypaste_ap(proc.stdout)
    assert math.isfinite(float(ap.split(",")[0]))
    # The same weights on the same data: the AP of the training run's final evaluation.
    assert ap == copypaste_ap((out / "log.txt").read_text())


@pytest.mark.slow
def test_resume_continues_from_the_saved_iteration(quick_train, run_tool, tiny_opts, tmp_path):
    out, train = quick_train
    assert train.returncode == 0, train.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    proc = run_tool(
        "train_net.py",
        "--config-file",
        QUICK_YAML,
        "--resume",
        *tiny_opts,
        "SOLVER.MAX_ITER",
        "16",
        "OUTPUT_DIR",
        resumed,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 12" in proc.stdout
    assert max(m["iteration"] for m in _metrics(resumed)) == 15
    assert (resumed / "model_final.pth").stat().st_mtime > (out / "model_final.pth").stat().st_mtime


@pytest.mark.slow
def test_lazy_config_trains_and_evaluates(lazy_quick_train, run_tool, tmp_path):
    out, proc = lazy_quick_train
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    assert max(m["iteration"] for m in _metrics(out)) == 7
    assert "eta:" in proc.stdout
    ap = copypaste_ap(proc.stdout)  # evaluated with COCOEvaluator

    weights = out / "model_final.pth"
    proc = run_tool(
        "train_net.py",
        "--config-file",
        QUICK_PY,
        "--eval-only",
        f"train.init_checkpoint={weights}",
        f"train.output_dir={tmp_path / 'eval'}",
        "dataloader.test.num_workers=0",
        LAZY_VAL_16,
        "model.test_score_thresh=0.0",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Loading from {weights}" in proc.stdout
    assert copypaste_ap(proc.stdout) == ap


@pytest.mark.parametrize(
    "config, opts, message",
    [
        ("{tmp}/nothing.yaml", [], "Config file '{tmp}/nothing.yaml' does not exist."),
        (QUICK_YAML, ["SOLVER.MAX_ITERS", "5"], "Unknown config key 'SOLVER.MAX_ITERS'"),
        (QUICK_PY, ["train.max_iters=5"], "Unknown config key 'train.max_iters'"),
        (QUICK_YAML, ["DATASETS.TRAIN", "('nothing',)"], "Dataset 'nothing' is not registered."),
        (
            QUICK_YAML,
            ["DATASETS.REGISTER", "('mine=coco:{tmp}/a.json:{tmp}',)"],
            "COCO annotation file '{tmp}/a.json' does not exist.",
        ),
        (
            QUICK_YAML,
            ["--eval-only", "MODEL.WEIGHTS", "{tmp}/model.pth"],
            "Checkpoint '{tmp}/model.pth' (MODEL.WEIGHTS) does not exist.",
        ),
        (
            QUICK_PY,
            ["--eval-only", "train.init_checkpoint={tmp}/model.pth"],
            "Checkpoint '{tmp}/model.pth' (train.init_checkpoint) does not exist.",
        ),
    ],
)
def test_command_line_mistakes_are_usage_errors(tmp_path, capsys, config, opts, message):
    # Before any worker starts: argparse's exit code 2 and the problem named.
    argv = ["train_net.py", "--config-file", config.format(tmp=tmp_path)]
    argv += [o.format(tmp=tmp_path) for o in opts]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        stderr = usage_error(capsys, _train_net().invoke_main)
    assert stderr.startswith("usage: train_net.py") and message.format(tmp=tmp_path) in stderr


def test_missing_weights_pass_the_check_when_resume_finds_a_checkpoint(tmp_path):
    # --resume loads the output folder's last checkpoint, not MODEL.WEIGHTS.
    opts = ["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", str(tmp_path / "x.pth")]
    with pytest.raises(FileNotFoundError, match="x.pth"):
        check_before_launch(str(REPO_ROOT / QUICK_YAML), opts, resume=True)
    (tmp_path / "model_0000009.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    check_before_launch(str(REPO_ROOT / QUICK_YAML), opts, resume=True)
    with pytest.raises(FileNotFoundError, match="x.pth"):
        check_before_launch(str(REPO_ROOT / QUICK_YAML), opts, resume=False)


def test_the_whole_script_prints_no_traceback_for_a_missing_config(run_tool, tmp_path):
    proc = run_tool("train_net.py", "--config-file", tmp_path / "no_such_config.yaml")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_config_key_names_the_key(tmp_path):
    # On the command line: the key and the closest valid one.
    args = default_argument_parser().parse_args(
        ["--config-file", str(REPO_ROOT / QUICK_YAML), "MODEL.SALTNET.NO_SUCH_KEY", "1"]
    )
    with pytest.raises(KeyError, match="Unknown config key 'MODEL.SALTNET.NO_SUCH_KEY'"):
        _train_net().main(args)
    # In a config file: the key and the file.
    config = tmp_path / "bad.yaml"
    config.write_text(
        f'_BASE_: "{REPO_ROOT / QUICK_YAML}"\nMODEL:\n  SALTNET:\n    NO_SUCH_KEY: 1\n'
    )
    args = default_argument_parser().parse_args(["--config-file", str(config)])
    with pytest.raises(KeyError, match="Unknown config key 'MODEL.SALTNET.NO_SUCH_KEY'") as info:
        _train_net().main(args)
    assert "bad.yaml" in str(info.value)


def test_main_rejects_missing_config_file(tmp_path):
    args = default_argument_parser().parse_args(["--config-file", str(tmp_path / "x.yaml")])
    with pytest.raises(FileNotFoundError, match="x.yaml"):
        _train_net().main(args)
