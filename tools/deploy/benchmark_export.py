#!/usr/bin/env python
"""CPU latency of one SALT-Net config: PyTorch eager vs TorchScript vs onnxruntime, batch 1.

    python tools/deploy/benchmark_export.py --config-file configs/salt_R_50_FPN_1x.yaml \\
        --size 800 1333 --threads 2

Exports the config's model (``MODEL.WEIGHTS`` if set, else random weights: latency does not
depend on them) to both formats in a temporary directory, then times each on one random image
of ``--size`` (the test resize set to keep it), from the BGR image to the detections: resize,
the network, post-processing. Prints the median of ``--iters`` runs after one warm-up run, and
each runtime's ratio to eager.
"""

import saltnet  # noqa: F401  # isort: skip (first: it filters known third-party warnings)
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from detectron2.modeling import build_model

from saltnet.checkpoint.checkpointer import AtomicCheckpointer
from saltnet.export.exporter import (
    ExportedPredictor,
    export_model,
    load_export_config,
    pad_images,
    resize_for_test,
)


def get_parser():
    parser = argparse.ArgumentParser(description="CPU latency of exported SALT-Net models.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per runtime")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="trailing KEY VALUE options")
    return parser


def median_seconds(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args):
    torch.set_num_threads(args.threads)
    height, width = args.size
    resize = ["INPUT.MIN_SIZE_TEST", min(height, width), "INPUT.MAX_SIZE_TEST", max(height, width)]
    cfg = load_export_config(args.config_file, [*args.opts, *map(str, resize)])
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

    def eager(image):
        inputs = {"image": resize_for_test(cfg, image), "height": height, "width": width}
        with torch.no_grad():
            return model([inputs])

    runtimes = {"PyTorch eager": eager}
    with tempfile.TemporaryDirectory() as tmp:
        batch, _ = pad_images(model, [resize_for_test(cfg, image)])
        for name, export_format in (("TorchScript", "torchscript"), ("onnxruntime", "onnx")):
            path = os.path.join(tmp, f"model.{export_format}")
            export_model(model, batch, path, export_format)
            runtimes[name] = ExportedPredictor(cfg, path, num_threads=args.threads)
        seconds = {
            name: median_seconds(lambda: run(image), args.iters) for name, run in runtimes.items()
        }
    print(
        f"{args.config_file} at {height} x {width}, batch 1, {args.threads} threads, "
        f"median of {args.iters} runs (torch {torch.__version__}):"
    )
    for name, s in seconds.items():
        print(f"  {name:14s} {1000 * s:8.1f} ms  ({s / seconds['PyTorch eager']:.2f} x eager)")


if __name__ == "__main__":
    main(get_parser().parse_args())
