"""The speed benchmark's CPU smoke run: it runs end to end and prints its table (no timing
asserts: speed is measured on the GPU and reported in docs/BENCHMARKS.md); its chart."""

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, load_script
from PIL import Image


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
    with Image.open(out.with_suffix(".png")) as chart:  # the chart next to the JSON
        assert chart.format == "PNG"
    # SALT-Net and the plug-ins must run in every mode, AMP included (detectron2's own FCOS
    # fails to train under CPU bf16 autocast, the plug-in on it then too: fp32 only there).
    for name in ("SALT-Net R50-FPN", "RetinaNet+SALT R50-FPN", "FCOS+SALT R50-FPN"):
        model = results[name]
        for key in ("infer_b1_fp32_img_s", "infer_b2_amp_img_s", "train_b2_fp32_it_s"):
            assert isinstance(model[key], float) and model[key] > 0, (name, key, model[key])
    salt = results["SALT-Net R50-FPN"]
    assert isinstance(salt["train_b2_amp_it_s"], float), salt["train_b2_amp_it_s"]
    assert isinstance(results["RetinaNet+SALT R50-FPN"]["train_b2_amp_it_s"], float)


def test_chart_has_one_bar_per_measured_throughput(tmp_path):
    tool = load_script("tools/benchmark.py")
    stored = tmp_path / "bench.json"
    results = {
        "SALT-Net R50-FPN": {
            "infer_b1_fp32_img_s": 4.0,
            "infer_b1_amp_img_s": 6.0,
            "train_b2_fp32_it_s": 1.5,
            "train_b2_fp32_peak_mem_gb": 3.0,
        },
        "FCOS R50-FPN": {
            "infer_b1_fp32_img_s": 5.0,
            "infer_b1_amp_img_s": "failed: RuntimeError: boom",
            "train_b2_fp32_it_s": 2.0,
            "train_b2_fp32_peak_mem_gb": 2.5,
        },
    }
    stored.write_text(json.dumps(results))
    tool.main(["--plot", str(stored)])
    with Image.open(tmp_path / "bench.png") as image:
        assert image.format == "PNG" and image.size == (880, 320)
    infer, train = tool.plot_throughput(results, tmp_path / "again.png").axes
    assert [b.get_height() for b in infer.patches] == [4.0, 6.0, 5.0]  # no bar for the failure
    assert [b.get_height() for b in train.patches] == [1.5, 2.0]  # memory is not a throughput
    assert [t.get_text() for t in infer.get_xticklabels()] == ["infer_b1_fp32", "infer_b1_amp"]


@pytest.mark.slow
def test_no_amp_measures_fp32_only(tmp_path):
    out = tmp_path / "bench.json"
    tool = REPO_ROOT / "tools" / "benchmark.py"
    done = subprocess.run(
        [sys.executable, str(tool), "--smoke", "--no-amp", "--models", "SALT-Net R50-FPN",
         "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    salt = json.loads(out.read_text())["SALT-Net R50-FPN"]
    assert isinstance(salt["infer_b1_fp32_img_s"], float) and salt["infer_b1_fp32_img_s"] > 0
    assert isinstance(salt["train_b2_fp32_it_s"], float) and salt["train_b2_fp32_it_s"] > 0
    assert not [key for key in salt if "_amp_" in key], sorted(salt)
