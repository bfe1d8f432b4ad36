#!/usr/bin/env python
"""Accuracy of detectors trained on equal terms: box AP, mean and spread over seeds, and the
per-seed paired differences SALT on minus SALT off.

Every (variant, seed) pair is one ``train_net.py`` run (``SEED`` / ``train.seed`` sets the initial
weights and the training stream), each in its own process with one torch thread, up to
``--jobs`` at a time. All variants share the backbone (ResNet-18-FPN from scratch), input size
(96 px), data pipeline, optimiser and schedule of ``configs/quick_schedule/salt_R_18_synthetic.*``;
they differ only in the detector. Variants:

- ``saltnet``: SALT-Net as configured (``SDR_MODE`` gt); ``gflv2``: the same head, SALT off;
- ``sdr_both`` / ``sdr_gt`` / ``sdr_distill`` / ``sdr_none``: SALT-Net with that ``SDR_MODE``;
- ``fcos`` / ``fcos_salt``: detectron2's FCOS, SALT off / on (``saltnet/modeling/plugin.py``);
- ``retinanet`` / ``retinanet_salt``: detectron2's RetinaNet (GroupNorm towers), SALT off / on.

``--dataset raccoon`` trains on ``RACCOON_ROOT``'s train split and evaluates on its test split
(Pascal VOC layout, one class) instead of the synthetic shapes.

Resumable: each finished run leaves ``result.json`` in its directory
(``OUTPUT_DIR/DATASET/VARIANT_seedS``); a later call with the same settings reuses it and runs
only what is missing (an interrupted run starts again from scratch). ``results.json`` of the
dataset is rewritten after every run; at the end ``results.png`` next to it shows the per-seed AP
of each variant and the paired differences (with matplotlib, ``pip install .[plots]``). Example
(a comparison of docs/BENCHMARKS.md)::

    python tools/benchmark_accuracy.py --dataset raccoon --variants fcos fcos_salt \\
        retinanet retinanet_salt --seeds 0 1 2 3 --jobs 2 --output-dir output/accuracy
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO_ROOT, "configs", "quick_schedule")
SALTNET_YAML = os.path.join(QUICK, "salt_R_18_synthetic.yaml")
FCOS_PY = os.path.join(QUICK, "fcos_salt_R_18_synthetic.py")
RETINANET_PY = os.path.join(QUICK, "retinanet_salt_R_18_synthetic.py")
# variant -> (config file, overrides)
VARIANTS = {
    "saltnet": (SALTNET_YAML, []),
    "gflv2": (SALTNET_YAML, ["MODEL.SALTNET.SALT_ON", "False"]),
    "sdr_both": (SALTNET_YAML, ["MODEL.SALTNET.SDR_MODE", "both"]),
    "sdr_gt": (SALTNET_YAML, ["MODEL.SALTNET.SDR_MODE", "gt"]),
    "sdr_distill": (SALTNET_YAML, ["MODEL.SALTNET.SDR_MODE", "distill"]),
    "sdr_none": (SALTNET_YAML, ["MODEL.SALTNET.SDR_MODE", "none"]),
    "fcos": (FCOS_PY, ["model.head.salt_on=False"]),
    "fcos_salt": (FCOS_PY, ["model.head.salt_on=True"]),
    "retinanet": (RETINANET_PY, ["model.head.salt_on=False"]),
    "retinanet_salt": (RETINANET_PY, ["model.head.salt_on=True"]),
}
# (SALT on, SALT off) pairs whose per-seed differences are reported.
PAIRS = [("saltnet", "gflv2"), ("fcos_salt", "fcos"), ("retinanet_salt", "retinanet")]
METRICS = ("AP", "AP50", "AP75")
_COPYPASTE = re.compile(r"copypaste: AP,AP50,AP75,APs,APm,APl\n.*copypaste: ([-\d.,na]+)")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--dataset", choices=["synthetic", "raccoon"], default="synthetic")
    parser.add_argument(
        "--raccoon-root", default=os.path.join(REPO_ROOT, "..", "shared", "data", "raccoon")
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=800,
        help="training iterations (the quick configs' 800; LR steps at 77.5%% and 92.5%%, "
        "warm-up over the first 12.5%%)",
    )
    parser.add_argument("--batch", type=int, default=8, help="images per iteration")
    parser.add_argument("--workers", type=int, default=1, help="data-loading workers per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--output-dir", default=os.path.join(REPO_ROOT, "output/accuracy"))
    parser.add_argument(
        "--yaml-opts", nargs="*", default=[], help="KEY VALUE overrides for YAML variants"
    )
    parser.add_argument(
        "--lazy-opts", nargs="*", default=[], help="key=value overrides for LazyConfig variants"
    )
    return parser


def config_overrides(args, config_file: str):
    """The shared schedule, batch and dataset as overrides of ``config_file``'s kind."""
    iters = args.iters
    steps = sorted({min(iters - 1, max(1, round(iters * f))) for f in (0.775, 0.925)})
    warmup = max(1, round(iters / 8))
    root = os.path.abspath(args.raccoon_root)
    register = [f"raccoon_train=voc:{root}:train", f"raccoon_test=voc:{root}:test"]
    if config_file.endswith(".yaml"):
        opts = ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", tuple(steps)]
        opts += ["SOLVER.WARMUP_ITERS", warmup, "SOLVER.IMS_PER_BATCH", args.batch]
        opts += ["SOLVER.CHECKPOINT_PERIOD", iters + 1, "DATALOADER.NUM_WORKERS", args.workers]
        if args.dataset == "raccoon":
            opts += ["DATASETS.REGISTER", register, "DATASETS.TRAIN", ("raccoon_train",)]
            opts += ["DATASETS.TEST", ("raccoon_test",), "MODEL.SALTNET.NUM_CLASSES", 1]
        return [str(o) for o in opts] + list(args.yaml_opts)
    opts = {
        "train.max_iter": iters,
        "train.checkpointer.period": iters + 1,
        "lr_multiplier.scheduler.milestones": steps,
        "lr_multiplier.scheduler.values": [0.1**k for k in range(len(steps) + 1)],
        "lr_multiplier.scheduler.num_updates": iters,
        "lr_multiplier.warmup_length": warmup / iters,
        "dataloader.train.total_batch_size": args.batch,
        "dataloader.train.num_workers": args.workers,
        "dataloader.test.num_workers": args.workers,
    }
    if args.dataset == "raccoon":
        opts["dataloader.register"] = register
        opts["dataloader.train.dataset_names"] = "raccoon_train"
        opts["dataloader.test.dataset.names"] = "raccoon_test"
        opts["model.num_classes"] = 1
    return [f"{k}={v}" for k, v in opts.items()] + list(args.lazy_opts)


def _settings(command):
    """What makes two runs the same: the command line, without where the repository and the
    output directory are (a comparison continued from another clone or folder still counts)."""
    settings = []
    for previous, c in zip([None, *command], command):
        if c == "OUTPUT_DIR" or previous == "OUTPUT_DIR" or c.startswith("train.output_dir="):
            continue
        settings.append("train_net.py" if c.endswith("train_net.py") else c)
    return settings


def run_one(args, variant: str, seed: int) -> dict:
    """Train and evaluate one (variant, seed), or reuse its finished result; its AP numbers (or
    the error)."""
    out = os.path.join(args.output_dir, args.dataset, f"{variant}_seed{seed}")
    config_file, variant_opts = VARIANTS[variant]
    opts = config_overrides(args, config_file) + variant_opts
    if config_file.endswith(".yaml"):
        opts += ["SEED", str(seed), "OUTPUT_DIR", out]
    else:
        opts += [f"train.seed={seed}", f"train.output_dir={out}"]
    command = [sys.executable, os.path.join(REPO_ROOT, "train_net.py")]
    command += ["--config-file", os.path.relpath(config_file, REPO_ROOT), *opts]
    result_file = os.path.join(out, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            done = json.load(f)
        if _settings(done.get("command", [])) == _settings(command[1:]):
            print(f"{variant} seed {seed}: AP {done['AP']:.1f} (finished earlier)", flush=True)
            return done
        print(f"{variant} seed {seed}: settings changed since the last run; running again")
    shutil.rmtree(out, ignore_errors=True)  # an unfinished or outdated run starts afresh
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    match = _COPYPASTE.search(proc.stdout + proc.stderr)
    if proc.returncode or not match:
        return {"variant": variant, "seed": seed, "error": (proc.stderr or proc.stdout)[-2000:]}
    values = [float(v) for v in match.group(1).split(",")]
    result = {"variant": variant, "seed": seed, **dict(zip(METRICS, values))}
    result["command"] = command[1:]
    with open(result_file + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(result_file + ".tmp", result_file)
    print(f"{variant} seed {seed}: AP {values[0]:.1f}", flush=True)
    return result


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


def paired_differences(results):
    """Lines of a markdown table: per (SALT on, SALT off) pair present, AP on minus AP off for
    each seed both finished, their mean, and on how many seeds SALT was ahead."""
    ap = {(r["variant"], r["seed"]): r["AP"] for r in results if "error" not in r}
    lines = []
    for on, off in PAIRS:
        seeds = sorted(s for v, s in ap if v == on and (off, s) in ap)
        if not seeds:
            continue
        diffs = [ap[on, s] - ap[off, s] for s in seeds]
        per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
        ahead = sum(d > 0 for d in diffs)
        lines.append(
            f"| {on} - {off} | {per_seed} | {statistics.mean(diffs):+.1f} | "
            f"{ahead} of {len(diffs)} |"
        )
    header = ["| pair | AP difference per seed | mean | SALT ahead |", "|---|---|---|---|"]
    return header + lines if lines else []


def plot_results(results, path, title=""):
    """Save a PNG at ``path``: left, each finished run's AP (one point per seed, a bar at the
    variant's mean); right, the paired differences SALT on minus off (points per seed, a line at
    their mean). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = {(r["variant"], r["seed"]): r["AP"] for r in results if "error" not in r}
    variants = list(dict.fromkeys(v for v, _ in ap))
    pairs = [(on, off) for on, off in PAIRS if any(v == on and (off, s) in ap for v, s in ap)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    for x, variant in enumerate(variants):
        values = [a for (v, _), a in ap.items() if v == variant]
        axes[0].bar(x, statistics.mean(values), color="0.85")
        axes[0].scatter([x] * len(values), values, color="C0", zorder=3)
    axes[0].set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    axes[0].set_ylabel("box AP (points: seeds, bars: mean)")
    for x, (on, off) in enumerate(pairs):
        diffs = [a - ap[off, s] for (v, s), a in ap.items() if v == on and (off, s) in ap]
        axes[1].scatter([x] * len(diffs), diffs, color="C1", zorder=3)
        axes[1].hlines(statistics.mean(diffs), x - 0.2, x + 0.2, color="C1")
    axes[1].axhline(0.0, color="0.3", linewidth=1)
    axes[1].set_xticks(range(len(pairs)), [f"{on}\n- {off}" for on, off in pairs])
    axes[1].set_ylabel("AP, SALT on - off (same seed)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return fig


def main(args) -> int:
    os.makedirs(os.path.join(args.output_dir, args.dataset), exist_ok=True)
    pairs = [(v, s) for v in args.variants for s in args.seeds]
    results, lock = [], threading.Lock()
    results_file = os.path.join(args.output_dir, args.dataset, "results.json")

    def run_and_record(pair):
        result = run_one(args, *pair)
        with lock:
            results.append(result)
            results.sort(key=lambda r: pairs.index((r["variant"], r["seed"])))
            with open(results_file, "w") as f:
                json.dump(results, f, indent=1)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run_and_record, pairs))
    for r in results:
        if "error" in r:
            print(f"{r['variant']} seed {r['seed']} failed:\n{r['error']}", file=sys.stderr)
    print("\n".join(summarize(results) + [""] + paired_differences(results)))
    try:
        plot_results(results, results_file[: -len(".json")] + ".png", title=args.dataset)
    except ImportError:
        print("matplotlib is not installed (pip install .[plots]): no results.png")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(get_parser().parse_args()))
