#!/usr/bin/env python
"""Accuracy of SALT-Net variants trained on equal terms: box AP, mean and spread over seeds.

Every (variant, seed) pair is one ``train_net.py`` run of the same config (``SEED`` sets the
initial weights and the training stream), each in its own process with one torch thread, up to
``--jobs`` at a time. The AP of the run's final COCOEvaluator pass is read from its log.
Variants (``MODEL.SALTNET`` overrides):

- ``sdr_both`` / ``sdr_gt`` / ``sdr_distill`` / ``sdr_none``: SALT on, coarse-box supervision
  ``SDR_MODE`` both / gt / distill / none (see ``saltnet/config.py``);
- ``gflv2``: SALT off (the same head without the SALT operator).

Example (the CPU ablation in the README)::

    python tools/benchmark_accuracy.py --seeds 0 1 --jobs 2 --output-dir output/accuracy
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "sdr_both": ["MODEL.SALTNET.SDR_MODE", "both"],
    "sdr_gt": ["MODEL.SALTNET.SDR_MODE", "gt"],
    "sdr_distill": ["MODEL.SALTNET.SDR_MODE", "distill"],
    "sdr_none": ["MODEL.SALTNET.SDR_MODE", "none"],
    "gflv2": ["MODEL.SALTNET.SALT_ON", "False"],
}
METRICS = ("AP", "AP50", "AP75")
_COPYPASTE = re.compile(r"copypaste: AP,AP50,AP75,APs,APm,APl\n.*copypaste: ([-\d.,na]+)")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file",
        default=os.path.join(REPO_ROOT, "configs/quick_schedule/salt_R_18_synthetic.yaml"),
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--output-dir", default=os.path.join(REPO_ROOT, "output/accuracy"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for all runs")
    return parser


def run_one(args, variant: str, seed: int) -> dict:
    """Train and evaluate one (variant, seed); its AP numbers (or the error)."""
    out = os.path.join(args.output_dir, f"{variant}_seed{seed}")
    command = [sys.executable, os.path.join(REPO_ROOT, "train_net.py")]
    command += ["--config-file", args.config_file, *args.opts, *VARIANTS[variant]]
    command += ["SEED", str(seed), "OUTPUT_DIR", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    match = _COPYPASTE.search(proc.stdout + proc.stderr)
    if proc.returncode or not match:
        return {"variant": variant, "seed": seed, "error": (proc.stderr or proc.stdout)[-2000:]}
    values = [float(v) for v in match.group(1).split(",")]
    print(f"{variant} seed {seed}: AP {values[0]:.1f}", flush=True)
    return {"variant": variant, "seed": seed, **dict(zip(METRICS, values))}


def summarize(results):
    """Lines of a markdown table: per variant, mean +- sample std over seeds of each metric."""
    lines = ["| variant | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * 3]
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant and "error" not in r]
        cells = []
        for metric in METRICS:
            values = [r[metric] for r in runs]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread}" if values else "failed")
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def main(args) -> int:
    os.makedirs(args.output_dir, exist_ok=True)
    pairs = [(v, s) for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda pair: run_one(args, *pair), pairs))
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    for r in results:
        if "error" in r:
            print(f"{r['variant']} seed {r['seed']} failed:\n{r['error']}", file=sys.stderr)
    print("\n".join(summarize(results)))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(get_parser().parse_args()))
