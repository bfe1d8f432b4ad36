#!/usr/bin/env python
"""Convert ImageNet backbone weights (torchvision, open-mmlab / mmdetection, timm) for this project.

    python tools/convert_backbone_weights.py torchvision resnext101_32x4d-a5af3160.pth \\
        weights/X-101-32x4d_open-mmlab.pkl \\
        --config-file configs/salt_X_101_32x4d_FPN_2x_ms_dcn.yaml
    python tools/convert_backbone_weights.py mmdet-res2net \\
        res2net101_v1d_26w_4s_mmdetv2-f0a600f9.pth weights/R2-101-v1d-26w4s_open-mmlab.pkl \\
        --config-file configs/salt_R2_101_FPN_2x_ms_dcn.yaml

FORMAT is one of: torchvision / mmdet-resnet (torchvision's or open-mmlab's ResNet / ResNeXt;
mmdetection ResNet backbones), mmdet-res2net (open-mmlab Res2Net), timm-res2net (timm
res2net50d / res2net101d). The output ({"model": ..., "__author__": ...}; a pickle of numpy
arrays for .pkl, torch.save otherwise) is read by detectron2's checkpointer through MODEL.WEIGHTS:
its keys start with "backbone.bottom_up." (use --prefix "" for the bare backbone). With
--config-file the weights must fit that config's backbone (every key, every shape; only the offset
convs of deformable stages, absent from ImageNet weights, may be missing: they start at zero).
Any key that cannot be placed stops the conversion with the list of such keys.
"""

import argparse
import sys

import torch

from saltnet.checkpoint.convert_backbone import (
    PREFIX,
    SOURCES,
    UnmappedKeysError,
    check_state_dict_matches,
    convert_backbone_state_dict,
    save_checkpoint,
)


def load_state_dict(path):
    """The tensors of a .pth / .pth.tar / .safetensors file (``state_dict`` entry if present)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return checkpoint.get("state_dict", checkpoint)


def backbone_state_dict(config_file, opts, prefix):
    """``prefix`` + names -> tensors of the bottom-up network that ``config_file`` builds."""
    from detectron2.modeling import build_backbone

    from saltnet.config.defaults import load_yaml_config

    bottom_up = build_backbone(load_yaml_config(config_file, opts)).bottom_up
    return {prefix + k: v for k, v in bottom_up.state_dict().items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=sorted(SOURCES), help="layout of the input's names")
    parser.add_argument("input", help="source checkpoint (.pth, .pth.tar, .safetensors)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl or .pth)")
    parser.add_argument(
        "--prefix", default=PREFIX, help=f"put before every key (default {PREFIX!r})"
    )
    parser.add_argument("--config-file", help="check the result against this config's backbone")
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="config overrides for --config-file, e.g. MODEL.RESNETS.DEPTH 101",
    )
    args = parser.parse_args(argv)

    try:
        state_dict = load_state_dict(args.input)
    except FileNotFoundError:
        sys.exit(f"error: no such checkpoint: {args.input}")
    try:
        model = convert_backbone_state_dict(state_dict, args.format, prefix=args.prefix)
        offsets = []
        if args.config_file:
            expected = backbone_state_dict(args.config_file, args.opts, args.prefix)
            offsets = check_state_dict_matches(model, expected)
    except (UnmappedKeysError, ValueError) as e:
        sys.exit(f"error: {e}")
    save_checkpoint(model, args.output, author=f"{args.format}: {args.input}")
    print(f"converted {len(model)} tensors from {args.input} to {args.output}")
    if offsets:
        print(
            f"note: the {len(offsets)} offset-conv tensors of the deformable stages are not in "
            "the input; they start at zero (the deformable convs start as plain convs)."
        )
    if args.format == "timm-res2net":
        print(
            "note: timm's Res2Net also average-pools the last split of res2's first block; set "
            "MODEL.RES2NET.STRIDE1_SPLIT_POOL True to compute exactly what timm computes."
        )


if __name__ == "__main__":
    main()
