#!/usr/bin/env python
"""The GPU check's steps, each a subprocess under its own timeout; writes ``report.md`` and
``report.json`` to ``--out`` (``tools/device/check.sh`` installs the kit, then runs this).

    python tools/device/check.py --out "$OUT"                 # all steps
    python tools/device/check.py --out /tmp/c --tiny --steps environment train_step

Steps: environment (nvidia-smi, versions, imports, saltnet.utils.collect_env), cuda_tests (pytest -m
cuda), train_step (tools/device/train_step.py), train_net (the quick config with AMP: training,
evaluation, --resume), deform_speed (tools/benchmark_deform.py), model_speed
(tools/device/speed.py, once per deformable-conv backend). Without CUDA, ``--tiny`` is on: the
CUDA tests report "skipped: no CUDA" and every other step runs at tiny sizes on the CPU. The
timeouts add up to 8 minutes with the kit's installation.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[2]
QUICK_YAML = "configs/quick_schedule/salt_R_18_synthetic.yaml"
IMPORTS = ["torch", "torchvision", "triton", "numpy", "cv2", "detectron2", "fvcore", "iopath",
           "omegaconf", "hydra", "yacs", "termcolor", "pycocotools", "tensorboard", "pytest",
           "saltnet", "saltnet.layers.triton_deform"]
VERSIONS = """
import importlib, json, platform, torch
v = {"python": platform.python_version(), "torch": torch.__version__,
     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in %r:
    try:
        m = importlib.import_module(name)
        v[name] = getattr(m, "__version__", "") or m.__file__
    except Exception as e:
        v[name] = "IMPORT FAILED: %%s: %%s" %% (type(e).__name__, e)
print(json.dumps(v))
""" % (IMPORTS,)


@dataclass
class Result:
    """What a step reports: status is "pass", "fail" or "skipped: <why>"."""

    name: str
    status: str = "pass"
    seconds: float = 0.0
    timeout_s: int = 0
    commands: List[str] = field(default_factory=list)
    tables: Dict[str, str] = field(default_factory=dict)
    figures: Dict[str, object] = field(default_factory=dict)
    log_tail: str = ""


@dataclass
class Context:
    out: Path
    work: Path
    cuda: bool
    tiny: bool
    log: Path


def run(ctx: Context, result: Result, cmd: List[str], timeout: float, env=None) -> str:
    """Runs ``cmd`` from the repository root; its output goes to the check's log and the step's
    log tail. A non-zero exit or a timeout fails the step. Returns its standard output."""
    result.commands.append(" ".join("<script>" if "\n" in c else c for c in cmd))
    env = dict(os.environ, **(env or {}))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(timeout, 1))
        stdout, stderr = proc.stdout, proc.stderr
        failed, why = proc.returncode != 0, f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout, stderr = (x.decode() if isinstance(x, bytes) else (x or "")
                          for x in (e.stdout, e.stderr))
        failed, why = True, f"timed out after {timeout:.0f} s"
    output = stdout + stderr
    with open(ctx.log, "a") as f:
        f.write(f"\n===== {result.name}: {' '.join(cmd)}\n{output}")
    result.log_tail = (result.log_tail + output)[-4000:]
    if failed and result.status == "pass":
        result.status = f"fail: {cmd[1] if len(cmd) > 1 else cmd[0]}: {why}"
    return stdout


def _python(*args):
    return [sys.executable, *args]


def _printed_results(output: str) -> dict:
    """The ``<label>: {json}`` lines the speed tools print as they go (all a timeout leaves)."""
    results = {}
    for line in output.splitlines():
        label, sep, rest = line.partition(": {")
        if sep:
            try:
                results[label] = json.loads("{" + rest)
            except ValueError:
                continue
    return results


def _table_from_output(output: str) -> str:
    """The markdown table a tool printed last (its lines starting with "|")."""
    lines = output.splitlines()
    end = max((i for i, line in enumerate(lines) if line.startswith("|")), default=-1)
    start = end
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    return "\n".join(lines[start:end + 1]) if end >= 0 else ""


def environment(ctx, result, timeout):
    smi = shutil.which("nvidia-smi")
    if smi:
        result.tables["nvidia-smi"] = run(ctx, result, [smi], 15)
    else:
        result.figures["nvidia-smi"] = "not found"
    versions = json.loads(run(ctx, result, _python("-c", VERSIONS), timeout / 2).splitlines()[-1])
    result.figures.update(versions, platform=platform.platform(), tiny=ctx.tiny)
    failed = [k for k, v in versions.items() if str(v).startswith("IMPORT FAILED")]
    result.tables["collect_env"] = run(ctx, result, _python("-m", "saltnet.utils.collect_env"),
                                       timeout / 2)
    if failed and result.status == "pass":
        result.status = f"fail: cannot import {', '.join(failed)}"


def cuda_tests(ctx, result, timeout):
    if not ctx.cuda:
        result.status = "skipped: no CUDA"
        return
    output = run(ctx, result, _python("-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q",
                                      "-p", "no:cacheprovider", "-rfEs"), timeout)
    result.figures["summary"] = output.strip().splitlines()[-1] if output.strip() else ""


def train_step(ctx, result, timeout):
    out = ctx.work / "train_step.json"
    args = ["tools/device/train_step.py", "--output", str(out)]
    if ctx.tiny:
        args.append("--tiny")
    output = run(ctx, result, _python(*args), timeout)
    if out.is_file():
        result.figures["rows"] = json.loads(out.read_text())
    result.tables["one training step"] = _table_from_output(output)


def train_net(ctx, result, timeout):
    """About 50 iterations of the quick config with AMP, its evaluation, then --resume for 10
    more (tiny: 4 + 2 iterations at 96 px)."""
    data = ctx.work / "synthetic"
    env = {"SALTNET_SYNTHETIC_ROOT": str(data)}
    run(ctx, result, _python("-c", "from saltnet.data.synthetic import prepare_synthetic_dataset;"
                             f"prepare_synthetic_dataset({str(data)!r})"), timeout * 0.25)
    iters, resume_iters = (4, 6) if ctx.tiny else (50, 60)
    out_dir = ctx.work / "train_net"
    opts = ["MODEL.DEVICE", "cuda" if ctx.cuda else "cpu", "SOLVER.AMP.ENABLED", str(ctx.cuda),
            "SOLVER.AMP.PRECISION", "bfloat16",
            "SOLVER.CHECKPOINT_PERIOD", str(iters), "SOLVER.WARMUP_ITERS", "2",
            "SOLVER.STEPS", f"({iters - 1},)", "DATALOADER.NUM_WORKERS", "0" if ctx.tiny else "4",
            "SOLVER.IMS_PER_BATCH", "2" if ctx.tiny else "8", "OUTPUT_DIR", str(out_dir)]
    start = time.perf_counter()
    first = run(ctx, result, _python("train_net.py", "--config-file", QUICK_YAML, *opts,
                                     "SOLVER.MAX_ITER", str(iters)), timeout * 0.45, env)
    result.figures["train_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    resumed = run(ctx, result, _python("train_net.py", "--config-file", QUICK_YAML, "--resume",
                                       *opts, "SOLVER.MAX_ITER", str(resume_iters)),
                  timeout * 0.3, env)
    result.figures["resume_s"] = round(time.perf_counter() - start, 1)
    ap = [line for line in first.splitlines() if "copypaste:" in line]
    result.tables["evaluation"] = "\n".join(ap)
    if result.status == "pass" and not ap:
        result.status = "fail: no evaluation table in train_net.py's output"
    if result.status == "pass" and f"Starting training from iteration {iters}" not in resumed:
        result.status = f"fail: --resume did not start from iteration {iters}"


def deform_speed(ctx, result, timeout):
    out = ctx.work / "deform_speed.json"
    args = ["tools/benchmark_deform.py", "--output", str(out)]
    args += ["--smoke"] if ctx.tiny else ["--warmup", "2", "--iters", "5"]
    output = run(ctx, result, _python(*args), timeout)
    result.figures["results"] = (json.loads(out.read_text()) if out.is_file()
                                 else _printed_results(output))
    result.tables["deformable conv"] = _table_from_output(output)
    result.figures.update(deform_targets(result.figures["results"]))


def deform_targets(results: dict) -> dict:
    """The issue's targets at P3 (fwd+bwd): Triton bf16 at most 4x a bf16 channels-last dense
    conv, at least 3x faster than torchvision's fp32 kernel. Empty without those rows."""
    p3 = {k: v.get("fwd_bwd_ms") for k, v in results.get("P3", {}).items()}
    if not all(p3.get(k) for k in ("triton bf16", "dense bf16 CL", "torchvision")):
        return {}
    return {
        "P3 triton bf16 / dense bf16 CL (target <= 4)": round(
            p3["triton bf16"] / p3["dense bf16 CL"], 2),
        "P3 torchvision fp32 / triton bf16 (target >= 3)": round(
            p3["torchvision"] / p3["triton bf16"], 2),
    }


def model_targets(backend: str, results: dict) -> dict:
    """SALT-Net / FCOS throughput at batch 8 under AMP: targets 0.8 (training), 0.9 (inference)."""
    salt, fcos = results.get("SALT-Net R50-FPN", {}), results.get("FCOS R50-FPN", {})
    figures = {}
    for key, target in (("train_b8_amp_it_s", 0.8), ("infer_b8_amp_img_s", 0.9)):
        if all(isinstance(m.get(key), float) for m in (salt, fcos)):
            name = f"{backend}: SALT-Net / FCOS {key} (target >= {target})"
            figures[name] = round(salt[key] / fcos[key], 2)
    return figures


def model_speed(ctx, result, timeout):
    for backend in ("torchvision", "triton"):
        out = ctx.work / f"model_speed_{backend}.json"
        args = ["tools/device/speed.py", "--deform-backend", backend, "--output", str(out)]
        args += ["--smoke"] if ctx.tiny else ["--warmup", "2", "--iters", "4"]
        output = run(ctx, result, _python(*args), timeout / 2)
        result.figures[backend] = (json.loads(out.read_text()) if out.is_file()
                                   else _printed_results(output))
        result.tables[f"models, DEFORM_BACKEND {backend}"] = _table_from_output(output)
        result.figures.update(model_targets(backend, result.figures[backend]))


# name -> (function, timeout in seconds on one H200)
STEPS: Dict[str, tuple] = {
    "environment": (environment, 30),
    "cuda_tests": (cuda_tests, 80),
    "train_step": (train_step, 90),
    "train_net": (train_net, 70),
    "deform_speed": (deform_speed, 60),
    "model_speed": (model_speed, 100),
}
# The CPU rehearsal's tiny sizes still take longer on a small CPU than the H200 budget.
CPU_SLACK = 3


def run_step(ctx: Context, name: str, fn: Callable, timeout: int) -> Result:
    timeout = timeout if ctx.cuda else timeout * CPU_SLACK
    result = Result(name=name, timeout_s=timeout)
    start = time.perf_counter()
    try:
        fn(ctx, result, timeout)
    except Exception as e:  # a broken step must not stop the others or the report
        result.status = f"fail: {type(e).__name__}: {e}"
    result.seconds = round(time.perf_counter() - start, 1)
    print(f"[check] {name}: {result.status} ({result.seconds} s)", flush=True)
    return result


def format_report(meta: dict, results: List[Result]) -> str:
    lines = ["# GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| step | status | s | timeout s |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.seconds} | {r.timeout_s} |" for r in results]
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", ""]
        lines += [f"    {c}" for c in r.commands]
        scalars = {k: v for k, v in r.figures.items() if not isinstance(v, (dict, list))}
        lines += [f"- {k}: {v}" for k, v in scalars.items()]
        for title, table in r.tables.items():
            fence = "" if table.startswith("|") else "```"
            lines += ["", f"### {title}", "", fence, table, fence]
        if not r.status.startswith(("pass", "skipped")):
            lines += ["", "### log tail", "", "```", r.log_tail[-2500:], "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, meta: dict, results: List[Result]):
    (out / "report.json").write_text(json.dumps(
        dict(meta, steps=[asdict(r) for r in results]), indent=2, default=str))
    (out / "report.md").write_text(format_report(meta, results))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for report.md, report.json, log")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("CHECK_TINY") == "1",
                        help="tiny sizes (on without CUDA; or CHECK_TINY=1)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda, saltnet_location = _probe()
    with tempfile.TemporaryDirectory(prefix="saltnet_check_") as work:
        ctx = Context(out=out, work=Path(work), cuda=cuda, tiny=args.tiny or not cuda,
                      log=out / "check.log")
        ctx.log.write_text("")
        meta = {"cuda": cuda, "tiny": ctx.tiny, "python": sys.executable,
                "saltnet": saltnet_location, "total_s": 0.0}
        start, results = time.perf_counter(), []
        for name in args.steps:  # the report after each step: a kill keeps what was done
            results.append(run_step(ctx, name, *STEPS[name]))
            meta["total_s"] = round(time.perf_counter() - start, 1)
            write_report(out, meta, results)
    print(f"[check] report: {out / 'report.md'}")
    return 0 if all(not r.status.startswith("fail") for r in results) else 1


def _probe():
    """(whether torch sees CUDA, where saltnet is imported from or why it is not), in one
    interpreter start."""
    proc = subprocess.run(
        _python("-c", "import torch; print(torch.cuda.is_available())\n"
                      "import saltnet; print(saltnet.__file__)"),
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    lines = proc.stdout.splitlines()
    cuda = bool(lines) and lines[0].strip() == "True"
    location = lines[1].strip() if len(lines) > 1 else proc.stderr.strip()[-300:]
    return cuda, location


if __name__ == "__main__":
    sys.exit(main())
