#!/usr/bin/env python
"""Convert a checkpoint of the authors' mmdetection SALT-Net release for this project.

    python tools/convert_mmdet_checkpoint.py salt_r50_fpn_1x.pth output/salt_R_50_FPN_1x.pth

The output loads with detectron2's checkpointer (MODEL.WEIGHTS / --eval-only). Any key that
cannot be placed stops the conversion with the list of such keys.
"""

import argparse
import os
import sys

import torch

from saltnet.convert import UnmappedKeysError, convert_mmdet_saltnet_state_dict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="mmdetection checkpoint (.pth)")
    parser.add_argument("output", help="where to write the detectron2 checkpoint (.pth)")
    parser.add_argument("--reg-max", type=int, default=16, help="MODEL.SALTNET.REG_MAX")
    args = parser.parse_args(argv)

    try:
        checkpoint = torch.load(args.input, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        sys.exit(f"error: no such checkpoint: {args.input}")
    state_dict = checkpoint.get("state_dict", checkpoint)
    try:
        model = convert_mmdet_saltnet_state_dict(state_dict, reg_max=args.reg_max)
    except (UnmappedKeysError, ValueError) as e:
        sys.exit(f"error: {e}")
    # Write next to the target, then rename: an interrupted run never leaves a partial file.
    tmp = args.output + ".tmp"
    torch.save({"model": model, "__author__": "mmdetection SALT-Net release"}, tmp)
    os.replace(tmp, args.output)
    print(f"converted {len(model)} tensors from {args.input} to {args.output}")


if __name__ == "__main__":
    main()
