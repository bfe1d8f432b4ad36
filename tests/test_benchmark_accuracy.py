"""tools/benchmark_accuracy.py: the summary table, and an end-to-end smoke run of two variants."""

import importlib.util
import json

import pytest
from conftest import REPO_ROOT, TINY_OPTS


def _tool():
    spec = importlib.util.spec_from_file_location(
        "benchmark_accuracy", REPO_ROOT / "tools/benchmark_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.slow
def test_smoke_run_trains_evaluates_and_writes_results(run_tool, tmp_path):
    opts = TINY_OPTS + ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1"]
    proc = run_tool(
        "tools/benchmark_accuracy.py",
        "--variants",
        "sdr_distill",
        "gflv2",
        "--seeds",
        "3",
        "--output-dir",
        tmp_path,
        *opts,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in results] == [("sdr_distill", 3), ("gflv2", 3)]
    assert all(0 <= r["AP"] <= 100 for r in results)
    assert "| sdr_distill | 1 |" in proc.stdout and "| gflv2 | 1 |" in proc.stdout
