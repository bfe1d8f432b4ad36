#!/usr/bin/env python
"""The GPU check's steps, each a subprocess under its own timeout, essentials first; writes
``report.md`` and ``report.json`` to ``--out`` before the first step and after each (``tools/device/
check.sh`` installs the kit, then runs this).

    python tools/device/check.py --out "$OUT"                 # all steps
    python tools/device/check.py --out /tmp/c --tiny --steps train_step train_net

Steps, in this order: environment (nvidia-smi, versions, imports, whether torch sees CUDA, where
saltnet comes from, the deformable-conv backends; always first), compile_kernels (every Triton
kernel variant of the later steps, in parallel over the cores), cuda_tests (pytest -m cuda),
train_step (one training step of a plain, a "dcnx" and a plug-in config in bf16 on the CUDA
default backend), train_net (the quick config with AMP: training, evaluation, --resume),
deform_speed (tools/benchmark_deform.py), model_speed (tools/device/speed.py, once per
deformable-conv backend), then, while the time budget lasts, train_step_all (every config,
precision and backend). The check measures and reports; it decides nothing. Without CUDA,
``--tiny`` is on: the CUDA tests report "skipped: no CUDA", the kernels compile for sm_90 and
every other step runs at tiny sizes on the CPU, with ``CPU_SLACK`` times the timeouts.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
QUICK_YAML = "configs/quick_schedule/salt_R_18_synthetic.yaml"
IMPORTS = ["torch", "torchvision", "triton", "numpy", "cv2", "detectron2", "fvcore", "iopath",
           "omegaconf", "hydra", "yacs", "termcolor", "pycocotools", "tensorboard", "pytest",
           "saltnet", "saltnet.layers.triton_deform"]
# One interpreter start: versions, imports, whether torch sees CUDA (its start-up included),
# where saltnet is imported from and the deformable-conv backends that run here.
VERSIONS = """
import importlib, json, platform, torch
cuda = torch.cuda.is_available()
v = {"python": platform.python_version(), "torch": torch.__version__,
     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
     "cuda_available": cuda, "gpu": torch.cuda.get_device_name() if cuda else None}
for name in %r:
    try:
        m = importlib.import_module(name)
        v[name] = getattr(m, "__version__", "") or m.__file__
    except Exception as e:
        v[name] = "IMPORT FAILED: %%s: %%s" %% (type(e).__name__, e)
try:
    import saltnet, saltnet.layers
    v["saltnet_file"] = saltnet.__file__
    v["deform_backends"] = [b for b in saltnet.layers.available_backends() if b != "auto"]
except Exception as e:
    v["saltnet_file"] = "IMPORT FAILED: %%s: %%s" %% (type(e).__name__, e)
print(json.dumps(v))
""" % (IMPORTS,)
# train_step's essentials: one config of each kind (plain, "dcnx" backbone, plug-in).
ESSENTIAL_CONFIGS = ["salt_R_50_FPN_1x.yaml", "salt_X_101_32x4d_FPN_2x_ms_dcnx.yaml",
                     "plugin/fcos_R_50_FPN_1x_salt.py"]


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
    """What the steps share; ``environment`` fills in cuda, tiny and backends."""

    out: Path
    work: Path
    log: Path
    cuda: Optional[bool] = None  # None until environment has looked
    tiny: bool = True
    backends: List[str] = field(default_factory=list)  # deformable-conv backends, "auto" aside
    deadline: float = float("inf")  # time.perf_counter() at which the budget ends


def run(ctx: Context, result: Result, cmd: List[str], timeout: float, env=None) -> str:
    """Runs ``cmd`` from the repository root; its output goes to the check's log and the step's
    log tail. A non-zero exit or a timeout fails the step. Returns its standard output."""
    result.commands.append(" ".join("<script>" if "\n" in c else c for c in cmd))
    # one Triton cache for every step: compile_kernels fills it, the later steps load from it
    env = dict(os.environ, TRITON_CACHE_DIR=str(ctx.work / "triton_cache"), **(env or {}))
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
    """The ``<label>: {json}`` lines the tools print as they go (all a timeout leaves), by label;
    a label's trailing shape, as in ``P3 (8, 256, 100, 168, 1)``, is dropped."""
    results = {}
    for line in output.splitlines():
        label, sep, rest = line.partition(": {")
        if sep:
            try:
                results[re.sub(r" \(.*\)$", "", label)] = json.loads("{" + rest)
            except ValueError:
                continue
    return results


def _results_table(results: dict) -> str:
    """A markdown table of printed results ({row: {column: value}} or {row: {method: {column:
    value}}}): the partial table of a step that timed out before its tool printed its own."""
    rows = []
    for label, value in results.items():
        nested = isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())
        rows += [((label, k), v) for k, v in value.items()] if nested else [((label,), value)]
    if not rows:
        return ""
    keys = len(rows[0][0])
    columns = list(dict.fromkeys(c for _, row in rows for c in row))
    lines = ["| " + " | ".join(["name", "method"][:keys] + columns) + " |",
             "| " + " | ".join(["---"] * (keys + len(columns))) + " |"]
    for names, row in rows:
        cells = [_cell(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(list(names) + cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table_from_output(output: str) -> str:
    """The markdown table a tool printed last (its lines starting with "|"), or the table of
    the results it printed as it went."""
    lines = output.splitlines()
    end = max((i for i, line in enumerate(lines) if line.startswith("|")), default=-1)
    start = end
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    return "\n".join(lines[start:end + 1]) if end >= 0 else _results_table(
        _printed_results(output))


def environment(ctx, result, timeout):
    """Versions and imports, and what the other steps need to know: whether torch sees CUDA,
    where saltnet is imported from, the deformable-conv backends that run here."""
    deadline = time.perf_counter() + timeout
    smi = shutil.which("nvidia-smi")
    if smi:
        result.tables["nvidia-smi"] = run(ctx, result, [smi], min(15, timeout / 4))
    else:
        result.figures["nvidia-smi"] = "not found"
    # most of the step's time: torch's import and CUDA's start-up come first
    output = run(ctx, result, _python("-c", VERSIONS), (deadline - time.perf_counter()) * 0.7)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    versions = json.loads(lines[-1]) if lines else {}
    ctx.cuda = versions.pop("cuda_available", False) is True
    ctx.tiny = ctx.tiny or not ctx.cuda
    ctx.backends = versions.pop("deform_backends", [])
    result.figures.update(versions, platform=platform.platform(), tiny=ctx.tiny,
                          deform_backends=", ".join(ctx.backends))
    result.tables["collect_env"] = run(ctx, result, _python("-m", "saltnet.utils.collect_env"),
                                       deadline - time.perf_counter())
    failed = [k for k, v in versions.items() if str(v).startswith("IMPORT FAILED")]
    if result.status == "pass" and not versions:
        result.status = "fail: the version probe printed nothing"
    elif failed and result.status == "pass":
        result.status = f"fail: cannot import {', '.join(failed)}"


def compile_kernels(ctx, result, timeout):
    """Every Triton kernel variant of the later steps, into the steps' Triton cache; without
    CUDA, for sm_90 (what an H200 would compile, and the count)."""
    out = ctx.work / "compile_kernels.json"
    args = ["tools/device/compile_kernels.py", "--output", str(out)]
    if not ctx.cuda:
        args += ["--arch", "90"]
    output = run(ctx, result, _python(*args), timeout)
    figures = (json.loads(out.read_text()) if out.is_file()
               else _printed_results(output).get("variants", {}))
    result.figures.update({k: v for k, v in figures.items() if not isinstance(v, dict)})
    result.figures.update({f"variants of {k}": v for k, v in figures.get("per_kernel", {}).items()})


def cuda_tests(ctx, result, timeout):
    if not ctx.cuda:
        result.status = "skipped: no CUDA"
        return
    # The image's own pytest plugins stay out: the tests need none beyond pytest's own.
    output = run(ctx, result, _python("-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q",
                                      "-p", "no:cacheprovider", "-rfEs"), timeout,
                 env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    result.figures["summary"] = output.strip().splitlines()[-1] if output.strip() else ""


def _train_step(ctx, result, timeout, configs: Optional[List[str]], precisions: List[str],
                backends: List[str]):
    out = ctx.work / f"{result.name}.json"
    args = ["tools/device/train_step.py", "--output", str(out), "--precisions", *precisions,
            "--backends", *backends]
    args += ["--configs", *configs] if configs else []
    args += ["--tiny"] if ctx.tiny else []
    output = run(ctx, result, _python(*args), timeout)
    if out.is_file():
        result.figures["rows"] = json.loads(out.read_text())
    result.tables["one training step"] = _table_from_output(output)


def train_step(ctx, result, timeout):
    """One step of each config kind in bf16 (float32 on the CPU) on the default backend."""
    _train_step(ctx, result, timeout, ESSENTIAL_CONFIGS,
                ["bfloat16" if ctx.cuda else "float32"], ["auto"])


def train_step_all(ctx, result, timeout):
    """Every config in float32 and the AMP precisions (float32 on the CPU), on every
    deformable-conv backend, compared with the first."""
    precisions = ["float32", "float16", "bfloat16"] if ctx.cuda else ["float32"]
    _train_step(ctx, result, timeout, None, precisions, ctx.backends)


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
    methods = {m for rows in result.figures["results"].values() for m in rows}
    missing = [b for b in ctx.backends if not any(m.split()[0] == b for m in methods)]
    if missing:
        result.figures["backends not in the table"] = ", ".join(missing)
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
    """tools/device/speed.py on each deformable-conv backend: all models on the first, then
    only those with deformable convs (the others run the same on every backend)."""
    deadline = time.perf_counter() + timeout
    reference = {}
    for i, backend in enumerate(ctx.backends):
        out = ctx.work / f"model_speed_{backend}.json"
        args = ["tools/device/speed.py", "--deform-backend", backend, "--output", str(out)]
        args += ["--smoke"] if ctx.tiny else ["--warmup", "2", "--iters", "4"]
        args += ["--deformable-only"] if i else []
        # the time left, shared by the runs left by their number of models (all 5, then 3)
        models = [5 if j == 0 else 3 for j in range(i, len(ctx.backends))]
        output = run(ctx, result, _python(*args),
                     (deadline - time.perf_counter()) * models[0] / sum(models))
        figures = json.loads(out.read_text()) if out.is_file() else _printed_results(output)
        result.figures[backend] = figures
        result.tables[f"models, DEFORM_BACKEND {backend}"] = _table_from_output(output)
        reference = reference or figures
        result.figures.update(model_targets(backend, dict(reference, **figures)))


# name -> (function, timeout in seconds on one H200), in the order they run: the essentials,
# then what the time budget allows.
STEPS: Dict[str, tuple] = {
    "environment": (environment, 45),
    "compile_kernels": (compile_kernels, 45),
    "cuda_tests": (cuda_tests, 60),
    "train_step": (train_step, 45),
    "train_net": (train_net, 70),
    "deform_speed": (deform_speed, 60),
    "model_speed": (model_speed, 100),
    "train_step_all": (train_step_all, 150),
}
# The seconds of check.py on one H200 (check.sh's installation aside): later steps get what is
# left, and a step with less than MIN_STEP_S left is skipped.
BUDGET_S = 420
MIN_STEP_S = 10
# The CPU rehearsal's tiny sizes still take longer on a small CPU than the H200 budget.
CPU_SLACK = 3


def run_step(ctx: Context, name: str, fn: Callable, timeout: int) -> Result:
    """Runs one step within its timeout (times CPU_SLACK without CUDA, and for the first step,
    before CUDA is known, in a ``--tiny`` rehearsal) and what is left of the budget."""
    slack = 1 if ctx.cuda or (ctx.cuda is None and not ctx.tiny) else CPU_SLACK
    left = ctx.deadline - time.perf_counter()
    timeout = min(timeout * slack, left)
    result = Result(name=name, timeout_s=round(timeout))
    if left < MIN_STEP_S * slack:
        result.status = f"skipped: {max(left, 0):.0f} s of the time budget left"
        return result
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
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS),
                        help="steps to run (environment always runs first)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("CHECK_TINY") == "1",
                        help="tiny sizes (on without CUDA; or CHECK_TINY=1)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help="seconds for all steps on a GPU (times CPU_SLACK without CUDA)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["environment"] + [n for n in STEPS if n in args.steps and n != "environment"]
    with tempfile.TemporaryDirectory(prefix="saltnet_check_") as work:
        ctx = Context(out=out, work=Path(work), log=out / "check.log", tiny=args.tiny)
        ctx.log.write_text("")
        meta = {"cuda": None, "tiny": ctx.tiny, "python": sys.executable, "saltnet": None,
                "steps": ", ".join(names), "total_s": 0.0}
        start, results = time.perf_counter(), []
        write_report(out, meta, results)  # a report exists from the start
        for name in names:  # the report after each step: a kill keeps what was done
            results.append(run_step(ctx, name, *STEPS[name]))
            if name == "environment":
                ctx.deadline = start + args.budget * (1 if ctx.cuda else CPU_SLACK)
                meta.update(cuda=ctx.cuda, tiny=ctx.tiny,
                            saltnet=results[0].figures.get("saltnet_file"))
            meta["total_s"] = round(time.perf_counter() - start, 1)
            write_report(out, meta, results)
    print(f"[check] report: {out / 'report.md'}")
    return 0 if all(not r.status.startswith("fail") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
