#!/usr/bin/env python
"""Detections of an exported SALT-Net (ONNX with onnxruntime, or TorchScript) drawn on images.

    python demo/onnx_demo.py --config-file configs/quick_schedule/salt_R_18_synthetic.yaml \\
        --model out/model.onnx --input 'datasets/saltnet_synthetic/val/*.png' --output vis/

``--config-file`` and trailing ``KEY VALUE`` options are those the model was exported with (they
give the test resize and the post-processing settings; see ``tools/deploy/export_model.py``).
The pictures are drawn by detectron2's ``Visualizer`` as in ``demo/demo.py`` (without SALT's
point sets).
"""

import saltnet  # noqa: F401  # isort: skip (first: it filters known third-party warnings)
import argparse
import os

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from saltnet.config import ConfigError
from saltnet.data import register_datasets_from_cfg
from saltnet.data.image_io import input_image_paths, read_image
from saltnet.export.exporter import ExportedPredictor, load_export_config


def get_parser():
    parser = argparse.ArgumentParser(description="SALT-Net demo on an exported model")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--model", required=True, help="exported model (.onnx or TorchScript)")
    parser.add_argument("--input", required=True, nargs="+", help="images, or one glob pattern")
    parser.add_argument("--output", required=True, help="directory for the pictures")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="Minimum score for instance predictions to be shown",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="trailing KEY VALUE options")
    return parser


def main(args):
    logger = setup_logger(name="saltnet")
    thresh = ["MODEL.SALTNET.SCORE_THRESH_TEST", str(args.confidence_threshold)]
    cfg = load_export_config(args.config_file, [*args.opts, *thresh])
    register_datasets_from_cfg(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
    predictor = ExportedPredictor(cfg, args.model)
    os.makedirs(args.output, exist_ok=True)
    for path in args.input:
        image = read_image(path, format="BGR")
        instances = predictor(image)
        vis = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        vis.save(os.path.join(args.output, os.path.basename(path)))
        logger.info(f"{path}: {len(instances)} detections")


def parse_args(argv=None):
    """The command line, checked (usage errors, before a model is loaded): the model file and
    the inputs exist (``args.input`` becomes the list of image files), the config loads with its
    options."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if not os.path.isfile(args.model):
        parser.error(f"--model {args.model!r} does not exist.")
    try:
        args.input = input_image_paths(args.input)
        load_export_config(args.config_file, args.opts)
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    return args


if __name__ == "__main__":
    main(parse_args())
