"""The speed benchmark's CPU smoke run: it runs end to end and prints its table (no timing
asserts: speed is measured on the GPU and reported in the README)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "benchmark.py"), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| metric | SALT-Net R50-FPN | FCOS R50-FPN | RetinaNet R50-FPN |" in done.stdout
    results = json.loads(out.read_text())
    salt = results["SALT-Net R50-FPN"]
    # SALT-Net itself must run in every mode, AMP included.
    for key in ("infer_b1_fp32_img_s", "infer_b2_amp_img_s", "train_b2_fp32_it_s"):
        assert isinstance(salt[key], float) and salt[key] > 0, (key, salt[key])
    assert isinstance(salt["train_b2_amp_it_s"], float), salt["train_b2_amp_it_s"]
