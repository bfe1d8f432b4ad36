#!/usr/bin/env python
"""SALT-Net demo on images, a video or a webcam, following detectron2's ``demo/demo.py``.

    python demo/demo.py --config-file configs/quick_schedule/salt_R_18_synthetic.yaml \\
        --input 'datasets/saltnet_synthetic/val/*.png' --output out/ --show-points \\
        --opts MODEL.WEIGHTS output/demo_job/model_final.pth

A LazyConfig (``.py``) works too, with ``key=value`` options, e.g. detectron2's FCOS with SALT::

    python demo/demo.py --config-file configs/quick_schedule/fcos_salt_R_18_synthetic.py \
        --input 'datasets/saltnet_synthetic/val/*.png' --output out/ --show-points \
        --opts train.init_checkpoint=output/fcos_salt_R_18_synthetic/model_final.pth

``--show-points`` also draws, for the top detections, the nine regression (red) and nine
classification (blue) sampling points of the SALT operator at the location each came from.
"""

import saltnet  # noqa: F401  # isort: skip (first: it filters known third-party warnings)
import argparse
import os
import time

import cv2
import torch
import tqdm
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

from saltnet.config.load import load_config, register_datasets, test_datasets
from saltnet.data.image_io import input_image_paths, read_image
from saltnet.engine.preflight import check_command_line
from saltnet.export.predictor import Predictor
from saltnet.utils.visualize import SALTVisualizationDemo

WINDOW_NAME = "SALT-Net detections"


def setup_cfg(args):
    """The config as ``train_net.py`` reads it, from file and ``--opts``: a checked YAML config
    (``KEY VALUE`` options) or a LazyConfig (``key=value``), its datasets registered. Runs on the
    CPU when CUDA is unavailable."""
    cpu = []
    if not torch.cuda.is_available():
        lazy = args.config_file.endswith(".py")
        cpu = ["train.device=cpu"] if lazy else ["MODEL.DEVICE", "cpu"]
    cfg = load_config(args.config_file, [*args.opts, *cpu])
    register_datasets(cfg)
    return cfg


def test_metadata(cfg):
    """The metadata (class names) of the config's first test dataset."""
    names = test_datasets(cfg)
    return MetadataCatalog.get(names[0] if names else "__unused")


def get_parser():
    parser = argparse.ArgumentParser(description="SALT-Net demo")
    parser.add_argument(
        "--config-file",
        default="configs/quick_schedule/salt_R_18_synthetic.yaml",
        metavar="FILE",
        help="path to config file",
    )
    parser.add_argument("--webcam", action="store_true", help="Take inputs from webcam.")
    parser.add_argument("--video-input", help="Path to video file.")
    parser.add_argument(
        "--input",
        nargs="+",
        help="A list of space separated input images; or a single glob pattern such as "
        "'directory/*.jpg'",
    )
    parser.add_argument(
        "--output",
        help="A file or directory to save output visualizations (created if missing; several "
        "inputs or a trailing '/' mean a directory). If not given, will show output in an "
        "OpenCV window.",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="Minimum score for instance predictions to be shown",
    )
    parser.add_argument(
        "--show-points",
        action="store_true",
        help="Draw the SALT regression (red) and classification (blue) points of the top "
        "detections.",
    )
    parser.add_argument(
        "--num-point-instances",
        type=int,
        default=3,
        help="With --show-points: how many top detections get their points drawn.",
    )
    parser.add_argument(
        "--opts",
        help="Modify config options using the command-line 'KEY VALUE' pairs",
        default=[],
        nargs=argparse.REMAINDER,
    )
    return parser


def output_path(args, input_path: str, extension: str = "") -> str:
    """Where to save the picture of ``input_path``: a file in ``--output`` if it is a directory
    (an existing one, a path ending in "/", or the target of several inputs; created if missing),
    else ``--output`` itself (its parent directory created if missing)."""
    several = len(args.input or []) > 1
    if several or args.output.endswith(("/", os.sep)) or os.path.isdir(args.output):
        os.makedirs(args.output, exist_ok=True)
        name = os.path.basename(input_path)
        name = os.path.splitext(name)[0] + extension if extension else name
        return os.path.join(args.output, name)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    return args.output


def run_on_images(demo, args, logger):
    for path in tqdm.tqdm(args.input, disable=not args.output):
        img = read_image(path, format="BGR")
        start_time = time.time()
        instances, vis = demo.run_on_image(img)
        logger.info(
            f"{path}: detected {len(instances)} instances in {time.time() - start_time:.2f}s"
        )
        if args.output:
            vis.save(output_path(args, path))
        else:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, vis.get_image()[:, :, ::-1])
            if cv2.waitKey(0) == 27:
                break  # esc to quit


def run_on_video(demo, args):
    video = cv2.VideoCapture(0 if args.webcam else args.video_input)
    writer = None
    if args.output:
        writer = cv2.VideoWriter(
            filename=output_path(args, args.video_input, ".mp4"),
            fourcc=cv2.VideoWriter_fourcc(*"mp4v"),
            fps=float(video.get(cv2.CAP_PROP_FPS)),
            frameSize=(
                int(video.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            ),
            isColor=True,
        )
    for vis_frame in tqdm.tqdm(demo.run_on_video(video)):
        if writer is not None:
            writer.write(vis_frame)
        else:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, vis_frame)
            if cv2.waitKey(1) == 27:
                break  # esc to quit
    video.release()
    if writer is not None:
        writer.release()
    else:
        cv2.destroyAllWindows()


def main(args):
    setup_logger(name="fvcore")
    logger = setup_logger()
    logger.info("Arguments: " + str(args))
    cfg = setup_cfg(args)
    metadata = test_metadata(cfg)
    predictor = Predictor.from_config(cfg, output_point_sets=args.show_points)
    demo = SALTVisualizationDemo(predictor, metadata, args.num_point_instances)
    # The confidence threshold is the model's score threshold (SALT-Net, RetinaNet and FCOS alike).
    demo.predictor.model.test_score_thresh = args.confidence_threshold
    if args.input:
        run_on_images(demo, args, logger)
    else:
        run_on_video(demo, args)


def parse_args(argv=None):
    """The command line, checked (usage errors, before a model is built): the inputs exist
    (``args.input`` becomes the list of image files), the config loads with ``--opts`` and its
    weights exist."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.input:
        try:
            args.input = input_image_paths(args.input)
        except FileNotFoundError as e:
            parser.error(str(e))
    elif args.webcam:
        if args.output:
            parser.error("--output is not supported with --webcam.")
    elif not args.video_input:
        parser.error("give --input, --video-input or --webcam.")
    elif not os.path.isfile(args.video_input):
        parser.error(f"--video-input {args.video_input!r} does not exist.")
    check_command_line(parser, args.config_file, args.opts, datasets=True)
    return args


if __name__ == "__main__":
    main(parse_args())
