#!/usr/bin/env python
"""The CPU demo job (``make demo``): train a small SALT-Net on the synthetic shapes and show it.

1. generates (once, cached) and registers the synthetic dataset ``saltnet_synth_{train,val}``;
2. trains ``configs/quick_schedule/salt_R_18_synthetic.yaml`` (ResNet-18-FPN from scratch,
   images at 96 px, 800 iterations of 8 images) with the trainer of ``train_net.py``;
3. evaluates COCO box AP on the validation split;
4. writes pictures of validation images, detections (with the SALT regression / classification
   points of the top detections, red / blue) next to the ground truth, into ``<output>/vis``.

A few minutes on a 2-core CPU (one torch thread, see ``--threads``). The AP repeats exactly on
one machine, but depends on the CPU model and the deformable-conv backend (measured runs:
docs/BENCHMARKS.md, "make demo"). Extra ``KEY VALUE`` arguments override the config.
"""

import saltnet  # noqa: F401  # isort: skip (first: it filters known third-party warnings)
import argparse
import logging
import os
import sys
import time

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from saltnet.config.load import load_config, register_datasets
from saltnet.data.image_io import read_image
from saltnet.engine import SALTNetTrainer
from saltnet.engine.preflight import check_command_line
from saltnet.engine.setup import setup
from saltnet.export import Predictor
from saltnet.utils.visualize import draw_predictions_and_gt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("detectron2")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file",
        default=os.path.join(REPO_ROOT, "configs/quick_schedule/salt_R_18_synthetic.yaml"),
        metavar="FILE",
    )
    parser.add_argument("--output-dir", default=os.path.join(REPO_ROOT, "output/demo_job"))
    parser.add_argument("--num-vis", type=int, default=12, help="validation images to draw")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("SALTNET_DEMO_THREADS", 1)),
        help="torch intra-op threads (default: $SALTNET_DEMO_THREADS or 1). One thread (plus "
        "the data-loader process) keeps the demo deterministic, and is not slowed down by another "
        "process on a small CPU (docs/BENCHMARKS.md).",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def draw_validation_images(cfg, weights: str, out_dir: str, num_images: int) -> None:
    """Save detections (+ points of the top 2) next to the ground truth for validation images,
    predicted by :class:`Predictor` with ``weights``."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    predictor = Predictor.from_config(cfg, output_point_sets=True)
    dataset_name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset_name)
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image_bgr = read_image(record["file_name"], format="BGR")
        instances = predictor(image_bgr)["instances"].to("cpu")
        rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        picture = draw_predictions_and_gt(rgb, instances, record, metadata, num_point_instances=2)
        name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".jpg"
        cv2.imwrite(os.path.join(out_dir, name), picture[:, :, ::-1])


def main(args) -> int:
    start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    cfg = load_config(args.config_file, ["OUTPUT_DIR", args.output_dir] + args.opts)
    setup(cfg, args)
    register_datasets(cfg)  # generates the synthetic dataset on the first run
    data_end = time.perf_counter()

    trainer = SALTNetTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # ends with an evaluation on cfg.DATASETS.TEST
    train_end = time.perf_counter()
    ap = {k: trainer.storage.history(f"bbox/{k}").latest() for k in ("AP", "AP50", "AP75")}

    vis_dir = os.path.join(cfg.OUTPUT_DIR, "vis")
    checkpoint = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    draw_validation_images(cfg, checkpoint, vis_dir, args.num_vis)
    end = time.perf_counter()
    summary = [
        "SALT-Net demo job summary",
        f"  model:      {os.path.relpath(args.config_file, REPO_ROOT)} "
        f"({cfg.SOLVER.MAX_ITER} iterations x {cfg.SOLVER.IMS_PER_BATCH} images, "
        f"{args.threads} torch thread(s))",
        f"  val AP:     {ap['AP']:.1f}  (AP50 {ap['AP50']:.1f}, AP75 {ap['AP75']:.1f}) "
        f"on {cfg.DATASETS.TEST[0]}",
        f"  wall time:  {(end - start) / 60:.1f} min = dataset {data_end - start:.0f} s + "
        f"training and evaluation {train_end - data_end:.0f} s + pictures {end - train_end:.0f} s",
        f"  checkpoint: {checkpoint}",
        f"  pictures:   {vis_dir} (left: detections, red / blue = SALT regression / "
        "classification points; right: ground truth)",
    ]
    print("\n".join(summary), flush=True)
    return 0


if __name__ == "__main__":
    parser = get_parser()
    args = parser.parse_args()
    # A misspelt override: a usage error before the dataset and the training.
    check_command_line(parser, args.config_file, args.opts)
    sys.exit(main(args))
