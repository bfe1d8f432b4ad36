"""tools/benchmark_deform.py --smoke: every method runs (Triton on its CPU interpreter) and
agrees with torchvision; the table has a row per method with its ratios."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

FP32_METHODS = ["torchvision", "gather", "triton fp32"]
DENSE_METHODS = ["dense fp32", "dense bf16", "dense bf16 CL"]


def test_smoke_run_times_every_method_and_checks_agreement(tmp_path):
    pytest.importorskip("triton")
    output = tmp_path / "deform.json"
    proc = subprocess.run(
        [sys.executable, "tools/benchmark_deform.py", "--smoke", "--output", str(output)],
        cwd=REPO_ROOT,
        env=dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = json.loads(output.read_text()).values()
    assert list(results) == FP32_METHODS + ["triton bf16"] + DENSE_METHODS
    for name, row in results.items():
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["first_call_ms"] > 0, name
        assert f"| smoke | {name} |" in proc.stdout
    for name in FP32_METHODS:
        assert results[name]["max_rel_diff"] < 1e-5, name
    # bf16 features and weights: a few bf16 roundings (2^-9 each) of the output's scale.
    assert 0 < results["triton bf16"]["max_rel_diff"] < 3e-2
