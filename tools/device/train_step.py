#!/usr/bin/env python
"""One training step of every paper config and both plug-ins, in each precision and on each
deformable-conv backend, from the same weights and batch (steps train_step and train_step_all of
``tools/device/check.py``).

    python tools/device/train_step.py --output steps.json    # CUDA: float32, float16, bfloat16
    python tools/device/train_step.py --tiny --configs salt_R_50_FPN_1x.yaml
    python tools/device/train_step.py --precisions bfloat16 --backends auto

Per (config, precision, backend): the losses are finite, every trainable parameter receives a
gradient (what DDP's unused-parameter check catches) and, for float16, the GradScaler's unscaled
gradients are finite or the step is skipped as detectron2's AMPTrainer does. The second backend's
total loss of each further backend is compared with the first's: within ``TOLERANCE`` of it,
relative. By default CUDA compares every deformable-conv backend that runs here with
``torchvision`` in float32 and the AMP precisions of ``SOLVER.AMP.PRECISION`` (float16 with the
GradScaler, bfloat16); the CPU compares ``gather`` with ``torchvision`` in float32 (``--tiny``
images, automatically without CUDA). The table is printed again after each config, so that a
run stopped early still shows what it did.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from detectron2.utils.events import EventStorage

from saltnet.config.checks import AMP_PRECISIONS
from saltnet.config.load import build_model, load_config
from saltnet.layers import BACKENDS, available_backends

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from benchmark import make_batch  # noqa: E402  (tools/ is not a package)

CONFIGS = [
    "salt_R_50_FPN_1x.yaml",
    "salt_X_101_32x4d_FPN_2x_ms_dcn.yaml",
    "salt_X_101_32x4d_FPN_2x_ms_dcnx.yaml",
    "salt_R2_101_FPN_2x_ms_dcn.yaml",
    "salt_R2_101_FPN_2x_ms_dcnx.yaml",
    "gflv2_R_50_FPN_1x.yaml",
    "plugin/fcos_R_50_FPN_1x_salt.py",
    "plugin/retinanet_R_50_FPN_1x_salt.py",
]
# Relative difference of the total loss between two backends from the same weights and batch:
# float32 kernels agree to ~1e-6 per convolution; bfloat16 / float16 round every operand to 8 / 11
# bits. The precisions: float32 and the AMP precisions (autocast dtypes) of SOLVER.AMP.PRECISION.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}


def build(config: str, backend: str, device: str):
    if config.endswith(".py"):
        opts = [f"model.head.deform_backend={backend}", f"train.device={device}"]
    else:
        opts = ["MODEL.DEVICE", device, "MODEL.SALTNET.DEFORM_BACKEND", backend]
    return build_model(load_config(str(REPO / "configs" / config), opts))


def train_step(model, inputs, precision: str, device: str) -> dict:
    """Losses of one SGD step (autocast for an ``AMP_PRECISIONS`` name, GradScaler for float16),
    the parameters left without a gradient, whether the (unscaled) gradients are finite."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=precision == "float16")
    amp = precision in AMP_PRECISIONS
    with EventStorage(), torch.autocast(device, AMP_PRECISIONS.get(precision), enabled=amp):
        losses = model(inputs)
    total = sum(losses.values())
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = all(torch.isfinite(g).all() for g in grads)
    scaler.step(optimizer)
    scaler.update()
    return {
        "losses": {k: v.item() for k, v in losses.items()},
        "total": total.item(),
        "no_grad": [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None],
        "grads_finite": bool(finite),
    }


def check_config(config, device, precisions, backends, size, batch):
    """Rows {config, precision, backend, total, ok, problems} of one config."""
    torch.manual_seed(0)
    models = {b: build(config, b, device) for b in backends}
    # a copy: the steps update the parameters in place
    state = {k: v.clone() for k, v in models[backends[0]].state_dict().items()}
    inputs = [dict(d, image=d["image"].to(device)) for d in make_batch(batch, size, size, 4)]
    rows = []
    for precision in precisions:
        first = None
        for backend in backends:
            models[backend].load_state_dict(state)
            start = time.perf_counter()
            try:
                result = train_step(models[backend], inputs, precision, device)
            except Exception as e:  # report, go on with the other configs
                rows.append(dict(config=config, precision=precision, backend=backend, ok=False,
                                 problems=[f"{type(e).__name__}: {str(e)[:300]}"]))
                continue
            problems = []
            if not all(math.isfinite(v) for v in result["losses"].values()):
                problems.append(f"non-finite losses {result['losses']}")
            if result["no_grad"]:
                problems.append(f"no gradient: {result['no_grad'][:5]}")
            if not result["grads_finite"] and precision != "float16":
                problems.append("non-finite gradients")
            diff = None
            if first is None:
                first = result["total"]
            else:
                diff = abs(result["total"] - first) / max(abs(first), 1e-12)
                if not diff <= TOLERANCE[precision]:
                    problems.append(f"total loss differs from {backends[0]}'s by {diff:.2e} "
                                    f"(tolerance {TOLERANCE[precision]:.0e})")
            rows.append(dict(config=config, precision=precision, backend=backend,
                             total=result["total"], rel_diff=diff,
                             grads_finite=result["grads_finite"],
                             seconds=time.perf_counter() - start, ok=not problems,
                             problems=problems))
    return rows


def format_table(rows):
    lines = [
        "| config | precision | backend | total loss | rel. diff | grads finite | s | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        total = f"{r['total']:.5f}" if "total" in r else "-"
        diff = f"{r['rel_diff']:.1e}" if r.get("rel_diff") is not None else "-"
        result = "ok" if r["ok"] else "; ".join(r["problems"])
        lines.append(f"| {r['config']} | {r['precision']} | {r['backend']} | {total} | {diff} "
                     f"| {r.get('grads_finite', '-')} | {r.get('seconds', 0):.1f} | {result} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="64 px images, batch 1 (CPU default)")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="paths under configs/")
    parser.add_argument("--precisions", nargs="+", choices=list(TOLERANCE),
                        help="default: float32 and the AMP precisions on CUDA, float32 on the CPU")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        help="deformable-conv backends, the first the reference; default: every "
                             "one that runs on CUDA, torchvision first; gather on the CPU")
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tiny = args.tiny or not cuda
    precisions = args.precisions or (["float32", *AMP_PRECISIONS] if cuda else ["float32"])
    cuda_backends = [b for b in available_backends() if b not in ("auto", "torchvision")]
    backends = args.backends or ["torchvision"] + (cuda_backends if cuda else ["gather"])
    size, batch = (64, 1) if tiny else (512, 2)
    rows = []
    for config in args.configs:
        rows += check_config(config, device, precisions, backends, size, batch)
        print(format_table(rows), flush=True)  # after each config: a timeout keeps what was done
        if args.output:
            Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
