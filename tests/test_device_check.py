"""tools/device/check.py (the GPU check without its kit installation) on this environment:
tiny steps, their statuses, the report files; a failing and a hanging command fail their step;
the order of the steps, the time budget, the report of a step that timed out, the targets from
the lines a timeout leaves; check.sh without OUT."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, load_script


@pytest.fixture(scope="module")
def check():
    return load_script("tools/device/check.py")


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
    assert "gather, torchvision" in environment["figures"]["deform_backends"]
    assert "detectron2" in environment["tables"]["collect_env"]
    assert "| smoke | torchvision |" in deform["tables"]["deformable conv"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| cuda_tests | " + statuses["cuda_tests"] + " |" in markdown
    assert "### deformable conv" in markdown
    assert "===== deform_speed:" in (tmp_path / "check.log").read_text()


@pytest.mark.parametrize(
    "cuda, tiny, slack",
    [(None, False, 1), (None, True, 3), (True, True, 1), (False, False, 3)],
    ids=["unknown", "unknown-tiny", "cuda", "cpu"],
)
def test_step_timeout_is_stretched_on_the_cpu_and_in_a_tiny_rehearsal(
    check, tmp_path, cuda, tiny, slack
):
    # The first step runs before CUDA is known: a --tiny rehearsal on a busy CPU gets the slack.
    ctx = check.Context(out=tmp_path, work=tmp_path, cuda=cuda, tiny=tiny, log=tmp_path / "l")
    result = check.run_step(ctx, "step", lambda ctx, result, timeout: None, 20)
    assert result.timeout_s == 20 * slack and result.status == "pass"


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


def test_targets_from_the_lines_a_timeout_leaves(check):
    """benchmark_deform.py prints "<label> <shape>: {json}" per shape as it goes."""
    rows = {"torchvision": {"fwd_bwd_ms": 90.0}, "triton bf16": {"fwd_bwd_ms": 20.0},
            "dense bf16 CL": {"fwd_bwd_ms": 8.0}}
    output = f"device: X\nP3 (8, 256, 100, 168, 1): {json.dumps(rows)}\nP4 (8, 256,"
    results = check._printed_results(output)
    assert list(results) == ["P3"]
    assert check.deform_targets(results)["P3 torchvision fp32 / triton bf16 (target >= 3)"] == 4.5
    table = check._table_from_output(output)
    assert table.splitlines()[0] == "| name | method | fwd_bwd_ms |"
    assert "| P3 | triton bf16 | 20 |" in table


def test_essentials_run_first(check):
    assert list(check.STEPS) == ["environment", "compile_kernels", "cuda_tests", "train_step",
                                 "train_net", "deform_speed", "model_speed", "train_step_all"]
    plain, dcnx, plugin = check.ESSENTIAL_CONFIGS
    assert plain.startswith("salt_R_50") and "dcnx" in dcnx and plugin.startswith("plugin/")


def _fake_steps(check, monkeypatch, seconds):
    """STEPS with a fast environment (CPU) and steps that print a table as they go, each
    running ``seconds[name]`` (a timeout of 1 s: 3 s on the CPU)."""

    def environment(ctx, result, timeout):
        ctx.cuda, ctx.tiny = False, True

    def step(ctx, result, timeout):
        script = ("import json, sys, time\n"
                  f"print('{result.name} row: ' + json.dumps({{'ms': 1.5}}), flush=True)\n"
                  f"time.sleep({seconds[result.name]})")
        output = check.run(ctx, result, [sys.executable, "-c", script], timeout)
        result.tables["speed"] = check._table_from_output(output)

    monkeypatch.setattr(check, "STEPS", {"environment": (environment, 5), "first": (step, 1),
                                         "second": (step, 1), "third": (step, 1)})


def test_report_keeps_every_table_when_a_step_times_out(check, tmp_path, monkeypatch):
    _fake_steps(check, monkeypatch, {"first": 0, "second": 30, "third": 0})
    code = check.main(["--out", str(tmp_path), "--steps", "third", "second", "first"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["environment", "first", "second", "third"]
    statuses = [s["status"] for s in report["steps"]]
    assert statuses == ["pass", "pass", "fail: -c: timed out after 3 s", "pass"] and code == 1
    markdown = (tmp_path / "report.md").read_text()
    for name in ("first", "second", "third"):  # the timed-out step's partial table too
        assert f"| {name} row | 1.5 |" in markdown


def test_time_budget_skips_the_last_steps(check, tmp_path, monkeypatch):
    _fake_steps(check, monkeypatch, {"first": 0, "second": 2, "third": 0})
    monkeypatch.setattr(check, "MIN_STEP_S", 0.8)  # 2.4 s on the CPU
    check.main(["--out", str(tmp_path), "--budget", "1.2"])  # 3.6 s on the CPU
    report = json.loads((tmp_path / "report.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["steps"]}
    assert statuses["first"] == "pass"
    assert statuses["third"].startswith("skipped: ") and "time budget left" in statuses["third"]


def test_check_sh_requires_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(REPO_ROOT / "tools/device/check.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "OUT is not set" in proc.stdout
