"""tools/benchmark_accuracy.py: the summary table, and an end-to-end smoke run of two variants."""

import json
import shutil

import pytest
from helpers import LAZY_VAL_16, YAML_VAL_16, load_script
from PIL import Image


def _tool():
    return load_script("tools/benchmark_accuracy.py")


def test_summary_is_mean_and_sample_std_over_seeds():
    results = [
        {"variant": "sdr_gt", "seed": 0, "AP": 30.0, "AP50": 50.0, "AP75": 20.0},
        {"variant": "sdr_gt", "seed": 1, "AP": 34.0, "AP50": 54.0, "AP75": 22.0},
        {"variant": "gflv2", "seed": 0, "AP": 25.0, "AP50": 45.0, "AP75": 15.0},
        {"variant": "gflv2", "seed": 1, "error": "boom"},
    ]
    lines = _tool().summarize(results)
    assert lines[2] == "| sdr_gt | 2 | 32.0 ± 2.8 | 52.0 ± 2.8 | 21.0 ± 1.4 |"
    assert lines[3] == "| gflv2 | 1 | 25.0 | 45.0 | 15.0 |"


def test_paired_differences_are_per_seed_salt_on_minus_off():
    results = [
        {"variant": "fcos", "seed": 0, "AP": 30.0},
        {"variant": "fcos_salt", "seed": 0, "AP": 32.5},
        {"variant": "fcos", "seed": 1, "AP": 31.0},
        {"variant": "fcos_salt", "seed": 1, "AP": 30.0},
        {"variant": "fcos_salt", "seed": 2, "AP": 40.0},  # no partner: left out
        {"variant": "retinanet", "seed": 0, "error": "boom"},
        {"variant": "retinanet_salt", "seed": 0, "AP": 20.0},
    ]
    lines = _tool().paired_differences(results)
    assert lines[2:] == ["| fcos_salt - fcos | +2.5, -1.0 | +0.8 | 1 of 2 |"]


def test_overrides_share_one_schedule_across_config_kinds():
    tool = _tool()
    args = tool.get_parser().parse_args(["--iters", "400", "--dataset", "raccoon"])
    yaml_opts = tool.config_overrides(args, tool.SALTNET_YAML)
    pairs = dict(zip(yaml_opts[::2], yaml_opts[1::2]))
    assert pairs["SOLVER.MAX_ITER"] == "400" and pairs["SOLVER.STEPS"] == "(310, 370)"
    assert pairs["SOLVER.WARMUP_ITERS"] == "50" and pairs["MODEL.SALTNET.NUM_CLASSES"] == "1"
    lazy = dict(o.split("=", 1) for o in tool.config_overrides(args, tool.FCOS_PY))
    assert lazy["train.max_iter"] == "400"
    assert lazy["lr_multiplier.scheduler.milestones"] == "[310, 370]"
    assert lazy["lr_multiplier.warmup_length"] == "0.125" and lazy["model.num_classes"] == "1"
    assert lazy["dataloader.train.dataset_names"] == "raccoon_train"


@pytest.mark.slow
def test_smoke_run_trains_evaluates_writes_results_and_resumes(run_tool, tmp_path):
    args = ["--variants", "sdr_distill", "fcos_salt", "--seeds", "3", "--output-dir", tmp_path]
    args += ["--iters", "2", "--batch", "2", "--workers", "0"]
    args += ["--yaml-opts", "MODEL.SALTNET.SCORE_THRESH_TEST", "0.0", *YAML_VAL_16]
    args += ["--lazy-opts", LAZY_VAL_16, "model.test_score_thresh=0.0"]
    proc = run_tool("tools/benchmark_accuracy.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "synthetic" / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in results] == [("sdr_distill", 3), ("fcos_salt", 3)]
    assert all(0 <= r["AP"] <= 100 for r in results)
    assert "| sdr_distill | 1 |" in proc.stdout and "| fcos_salt | 1 |" in proc.stdout
    with Image.open(tmp_path / "synthetic" / "results.png") as chart:
        assert chart.format == "PNG"

    # A second call reuses the finished runs, also from another output folder (moved there);
    # other settings run them again.
    (tmp_path / "synthetic" / "fcos_salt_seed3" / "log.txt").unlink()
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "synthetic", moved / "synthetic")
    args[args.index("--output-dir") + 1] = moved
    proc = run_tool("tools/benchmark_accuracy.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(finished earlier)") == 2
    assert not (moved / "synthetic" / "fcos_salt_seed3" / "log.txt").exists()
    proc = run_tool("tools/benchmark_accuracy.py", *args[:-1], "--variants", "fcos_salt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "settings changed" in proc.stdout


def test_plot_shows_each_seed_and_each_paired_difference(tmp_path):
    results = [
        {"variant": "fcos", "seed": 0, "AP": 30.0},
        {"variant": "fcos", "seed": 1, "AP": 20.0},
        {"variant": "fcos_salt", "seed": 0, "AP": 32.5},
        {"variant": "fcos_salt", "seed": 1, "AP": 21.0},
        {"variant": "retinanet", "seed": 0, "error": "boom"},
        {"variant": "retinanet_salt", "seed": 0, "AP": 20.0},  # its partner failed: no pair
    ]
    path = tmp_path / "results.png"
    fig = _tool().plot_results(results, path)
    runs, diffs = fig.axes
    assert [b.get_height() for b in runs.patches] == [25.0, 26.75, 20.0]
    seeds = [c.get_offsets()[:, 1].tolist() for c in runs.collections]
    assert seeds == [[30.0, 20.0], [32.5, 21.0], [20.0]]
    assert [t.get_text() for t in runs.get_xticklabels()] == ["fcos", "fcos_salt", "retinanet_salt"]
    per_seed, mean = diffs.collections
    assert per_seed.get_offsets()[:, 1].tolist() == [2.5, 1.0]
    assert mean.get_segments()[0][:, 1].tolist() == [1.75, 1.75]
    assert [t.get_text() for t in diffs.get_xticklabels()] == ["fcos_salt\n- fcos"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 320)
