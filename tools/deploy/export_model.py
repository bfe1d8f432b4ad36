#!/usr/bin/env python
"""Export SALT-Net to TorchScript (tracing) or ONNX, following detectron2's tools/deploy tool.

    python tools/deploy/export_model.py \\
        --config-file configs/quick_schedule/salt_R_18_synthetic.yaml \\
        --format onnx --output out/ MODEL.WEIGHTS output/demo_job/model_final.pth

The exported graph is the tensor part of the detector (normalisation, backbone, head; see
``saltnet.export``); post-processing runs in Python with ``saltnet.export.ExportedPredictor``.
The tool writes ``model.ts`` or ``model.onnx`` into ``--output``, prints its inputs and outputs,
and checks the exported model against PyTorch on the sample image.
"""

import saltnet  # noqa: F401  # isort: skip (first: it filters known third-party warnings)
import argparse
import os
import sys

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from saltnet.checkpoint.checkpointer import AtomicCheckpointer
from saltnet.data.image_io import read_image
from saltnet.export.exporter import (
    MIN_DEFORM_CONV_OPSET,
    ExportedPredictor,
    check_export_request,
    export_model,
    load_export_config,
    pad_images,
    resize_for_test,
)

FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def get_parser():
    parser = argparse.ArgumentParser(description="Export a SALT-Net model for deployment.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--format", default="onnx", help="torchscript or onnx")
    parser.add_argument(
        "--export-method",
        default="tracing",
        help="tracing (the only method: the detector is not scriptable)",
    )
    parser.add_argument(
        "--sample-image",
        help="image to trace the model on (default: a generated one of the test size)",
    )
    parser.add_argument("--output", required=True, help="directory for the exported model")
    parser.add_argument(
        "--opset",
        type=int,
        default=MIN_DEFORM_CONV_OPSET,
        help=f"ONNX opset (at least {MIN_DEFORM_CONV_OPSET}: DeformConv)",
    )
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="export even though the config sets no MODEL.WEIGHTS (random weights)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="trailing KEY VALUE options")
    return parser


def sample_image(args, cfg) -> np.ndarray:
    """The --sample-image (BGR), or a generated one of the test size."""
    if args.sample_image:
        return read_image(args.sample_image, format="BGR")
    size = cfg.INPUT.MIN_SIZE_TEST
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def main(args) -> str:
    logger = setup_logger(name="saltnet")
    cfg = load_export_config(args.config_file, args.opts)
    check_export_request(
        cfg, args.format, args.opset, args.allow_random_weights, args.export_method
    )
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("Exporting a model of random weights (--allow-random-weights).")

    image = sample_image(args, cfg)
    tensor = resize_for_test(cfg, image)
    batch, _ = pad_images(model, [tensor])
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FILE_NAMES[args.format])
    export_model(model, batch, path, args.format, args.opset)

    exported = ExportedPredictor(cfg, path)
    outputs = exported.run(batch)
    print(f"Wrote {path}")
    print(f"  input  images: {tuple(batch.shape)} float32, {cfg.INPUT.FORMAT} pixels 0-255")
    for name, x in zip(exported.output_names, outputs):
        print(f"  output {name}: {tuple(x.shape)}")
    height, width = image.shape[:2]
    with torch.no_grad():
        expected = model([{"image": tensor, "height": height, "width": width}])[0]["instances"]
    got = exported(image)
    print(f"Sample image: {len(expected)} detections in PyTorch, {len(got)} exported.")
    if len(got) == len(expected) and len(got):
        box_diff = (got.pred_boxes.tensor - expected.pred_boxes.tensor).abs().max().item()
        score_diff = (got.scores - expected.scores).abs().max().item()
        print(f"  max |box difference| {box_diff:.2e} px, max |score difference| {score_diff:.2e}")
    return path


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export_model.py: error: {e}")
