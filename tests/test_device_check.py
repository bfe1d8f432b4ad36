"""tools/device/check.py (the GPU check without its kit installation) on this environment:
tiny steps, their statuses, the report files; a failing and a hanging command fail their step."""

import importlib.util
import json
import sys

import pytest
import torch
from helpers import REPO_ROOT


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check", REPO_ROOT / "tools/device/check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_check_reports_every_step(check, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    steps = ["environment", "cuda_tests", "deform_speed"]
    code = check.main(["--out", str(tmp_path), "--tiny", "--steps", *steps])
    report = json.loads((tmp_path / "report.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["steps"]}
    assert list(statuses) == steps
    assert statuses["cuda_tests"] == ("pass" if torch.cuda.is_available() else "skipped: no CUDA")
    assert statuses["environment"] == "pass" and statuses["deform_speed"] == "pass", statuses
    assert code == 0 and report["tiny"] is True
    assert report["cuda"] is torch.cuda.is_available()
    assert report["saltnet"] == str(REPO_ROOT / "projects/SALTNet/saltnet/__init__.py")
    environment, _, deform = report["steps"]
    assert environment["figures"]["torch"] == torch.__version__
    assert environment["figures"]["saltnet"]  # imported, not "IMPORT FAILED"
    assert "detectron2" in environment["tables"]["collect_env"]
    assert "| smoke | torchvision |" in deform["tables"]["deformable conv"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| cuda_tests | " + statuses["cuda_tests"] + " |" in markdown
    assert "### deformable conv" in markdown
    assert "===== deform_speed:" in (tmp_path / "check.log").read_text()


@pytest.mark.parametrize(
    "code, timeout, status",
    [
        ("raise SystemExit(3)", 30, "fail: -c: exit status 3"),
        # check.CPU_SLACK (3) x 1 s
        ("import time; time.sleep(30)", 1, "fail: -c: timed out after 3 s"),
    ],
    ids=["exit-status", "timeout"],
)
def test_failing_command_fails_its_step_with_its_log(check, tmp_path, code, timeout, status):
    ctx = check.Context(out=tmp_path, work=tmp_path, cuda=False, tiny=True,
                        log=tmp_path / "check.log")

    def step(ctx, result, timeout):
        script = f"print('hello', flush=True); {code}"
        check.run(ctx, result, [sys.executable, "-c", script], timeout)

    result = check.run_step(ctx, "broken", step, timeout)
    assert result.status == status
    assert "hello" in (tmp_path / "check.log").read_text()
    assert "hello" in check.format_report({}, [result])  # the log tail of a failed step


def test_targets_are_the_issue_ratios(check):
    deform = {"P3": {"torchvision": {"fwd_bwd_ms": 90.0}, "triton bf16": {"fwd_bwd_ms": 20.0},
                     "dense bf16 CL": {"fwd_bwd_ms": 8.0}}}
    assert check.deform_targets(deform) == {
        "P3 triton bf16 / dense bf16 CL (target <= 4)": 2.5,
        "P3 torchvision fp32 / triton bf16 (target >= 3)": 4.5,
    }
    assert check.deform_targets({"smoke": deform["P3"]}) == {}
    models = {"SALT-Net R50-FPN": {"train_b8_amp_it_s": 3.0, "infer_b8_amp_img_s": "failed: x"},
              "FCOS R50-FPN": {"train_b8_amp_it_s": 4.0, "infer_b8_amp_img_s": 30.0}}
    assert check.model_targets("triton", models) == {
        "triton: SALT-Net / FCOS train_b8_amp_it_s (target >= 0.8)": 0.75
    }
