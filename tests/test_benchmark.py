"""The speed benchmark's CPU smoke run: it runs end to end and prints its table (no timing
asserts: speed is measured on the GPU and reported in the README)."""

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    tool = REPO_ROOT / "tools" / "benchmark.py"
    done = subprocess.run(
        [sys.executable, str(tool), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = (
        "| metric | SALT-Net R50-FPN | FCOS R50-FPN | RetinaNet R50-FPN | FCOS+SALT R50-FPN | "
        "RetinaNet+SALT R50-FPN | SALT/FCOS | SALT/RetinaNet | FCOS+SALT/FCOS | "
        "RetinaNet+SALT/RetinaNet |"
    )
    assert header in done.stdout
    results = json.loads(out.read_text())
    # SALT-Net and the plug-ins must run in every mode, AMP included (detectron2's own FCOS
    # fails to train under CPU bf16 autocast, the plug-in on it then too: fp32 only there).
    for name in ("SALT-Net R50-FPN", "RetinaNet+SALT R50-FPN", "FCOS+SALT R50-FPN"):
        model = results[name]
        for key in ("infer_b1_fp32_img_s", "infer_b2_amp_img_s", "train_b2_fp32_it_s"):
            assert isinstance(model[key], float) and model[key] > 0, (name, key, model[key])
    salt = results["SALT-Net R50-FPN"]
    assert isinstance(salt["train_b2_amp_it_s"], float), salt["train_b2_amp_it_s"]
    assert isinstance(results["RetinaNet+SALT R50-FPN"]["train_b2_amp_it_s"], float)
