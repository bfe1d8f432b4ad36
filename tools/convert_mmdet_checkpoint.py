#!/usr/bin/env python
"""Convert a checkpoint of the authors' mmdetection SALT-Net release for this project.

    python tools/convert_mmdet_checkpoint.py salt_r50_fpn_1x.pth output/salt_R_50_FPN_1x.pth

The output loads with detectron2's checkpointer (MODEL.WEIGHTS / --eval-only). Any key that
cannot be placed stops the conversion with the list of such keys. The release's classifier has
K + 1 outputs (a background column last); the first K (``--num-classes``) are kept.

By default the converted file must load completely: a model whose head or neck cannot take one of
its tensors (e.g. another class count) stops with the names of those tensors. ``--finetune``
writes a file that loads like any detectron2 checkpoint instead (mismatched tensors are skipped
and logged), for fine-tuning on a dataset with other classes.
"""

import argparse
import logging
import os
import sys

import torch

from saltnet.checkpoint.convert_mmdet import (
    RELEASE_CHECKPOINT_AUTHOR,
    UnmappedKeysError,
    convert_mmdet_saltnet_state_dict,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="mmdetection checkpoint (.pth)")
    parser.add_argument("output", help="where to write the detectron2 checkpoint (.pth)")
    parser.add_argument(
        "--num-classes", type=int, default=80, help="MODEL.SALTNET.NUM_CLASSES (default: 80)"
    )
    parser.add_argument("--reg-max", type=int, default=16, help="MODEL.SALTNET.REG_MAX")
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="allow loading into a model with another head shape (tensors that do not fit are "
        "skipped and logged, as for any detectron2 checkpoint)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        checkpoint = torch.load(args.input, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        sys.exit(f"error: no such checkpoint: {args.input}")
    state_dict = checkpoint.get("state_dict", checkpoint)
    try:
        model = convert_mmdet_saltnet_state_dict(
            state_dict, num_classes=args.num_classes, reg_max=args.reg_max
        )
    except (UnmappedKeysError, ValueError) as e:
        sys.exit(f"error: {e}")
    output = {"model": model}
    if not args.finetune:
        output["__author__"] = RELEASE_CHECKPOINT_AUTHOR
    # Write next to the target, then rename: an interrupted run never leaves a partial file.
    tmp = args.output + ".tmp"
    torch.save(output, tmp)
    os.replace(tmp, args.output)
    print(f"converted {len(model)} tensors from {args.input} to {args.output}")


if __name__ == "__main__":
    main()
