"""Deployment: SALT-Net's tensor part as one exportable module, and the decoding of its outputs.

The exported graph (TorchScript by tracing, or ONNX) is the tensor part of the detector: input
normalisation, backbone and head. It takes one batch ``(N, 3, H, W)`` float32 of raw pixels in
the model's ``INPUT.FORMAT`` (0-255), resized and padded by :func:`pad_images` (H, W multiples of
the backbone's size divisibility, padding filled with the pixel mean, so that it is 0 after
normalisation exactly as in :meth:`SALTNet.preprocess_image`), and returns the head's per-level
tensors as one flat tuple named ``<group>_<level>`` after the groups of
:class:`~saltnet.modeling.head.HeadOutputs` (``scores_0`` ... ``box_logits_0`` ...; the SALT groups
are left out when the head has none).

Post-processing (per-level top-k, score threshold, class-wise NMS, clipping, rescaling to the
input frame) stays outside the graph: :func:`decode_outputs` rebuilds the head's prediction
structure from the named outputs and runs the model's own :meth:`SALTNet.decode`,
so exported and PyTorch models share one decoding path. (Data-dependent shapes - how many
boxes pass the threshold and survive NMS - are what the exporters handle worst; the tensor part
has a fixed structure.)
"""

import json
import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances
from torch import Tensor, nn

from ..config.load import load_config, test_resize
from ..modeling.head import OUTPUT_GROUPS, HeadOutputs

__all__ = [
    "EXPORT_FORMATS",
    "MIN_DEFORM_CONV_OPSET",
    "ExportedPredictor",
    "SALTNetTensorPart",
    "check_export_request",
    "decode_outputs",
    "export_model",
    "load_export_config",
    "load_exported",
    "pad_images",
    "resize_for_test",
]

EXPORT_FORMATS = ("torchscript", "onnx")
# ONNX's DeformConv operator exists from opset 19 on; torch.onnx's dynamo exporter writes
# torchvision.ops.deform_conv2d as that operator (the legacy TorchScript-based exporter cannot).
MIN_DEFORM_CONV_OPSET = 19
TORCHSCRIPT_OUTPUTS_FILE = "saltnet_outputs.json"


def check_export_request(
    cfg,
    export_format: str,
    opset: int,
    allow_random_weights: bool,
    export_method: str = "tracing",
):
    """ValueError naming the problem if ``cfg`` cannot be exported as asked.

    Refused: an unknown format, an export method other than tracing, an ONNX opset without
    ``DeformConv`` (< 19), and a config without ``MODEL.WEIGHTS`` unless
    ``allow_random_weights`` (an exported model of random weights is rarely what one means to
    ship).
    """
    if export_method != "tracing":
        raise ValueError(
            f"Unsupported export method {export_method!r}: SALT-Net exports by tracing (its "
            "detectron2 detector is not scriptable)."
        )
    if export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"Unsupported export format {export_format!r}; choose one of {EXPORT_FORMATS}."
        )
    if export_format == "onnx" and opset < MIN_DEFORM_CONV_OPSET:
        raise ValueError(
            f"ONNX opset {opset} has no DeformConv operator, which SALT-Net's deformable "
            f"convolutions need; use --opset {MIN_DEFORM_CONV_OPSET} or newer."
        )
    if not cfg.MODEL.WEIGHTS and not allow_random_weights:
        raise ValueError(
            "The config sets no MODEL.WEIGHTS, so the exported model would have random weights. "
            "Pass MODEL.WEIGHTS /path/to/model.pth, or --allow-random-weights to export anyway."
        )


def load_export_config(config_file: str, opts: Sequence[str] = ()):
    """The checked, frozen config of a model to export or to run exported: ``config_file`` with
    ``opts``, on the CPU, deformable convs on the torchvision backend (a plain call of
    ``torchvision.ops.deform_conv2d``, which the ONNX exporter writes as ``DeformConv``)."""
    forced = ["MODEL.DEVICE", "cpu", "MODEL.SALTNET.DEFORM_BACKEND", "torchvision"]
    return load_config(config_file, [*opts, *forced])


def resize_for_test(cfg, image_bgr: np.ndarray) -> Tensor:
    """A BGR (OpenCV) image as the model's (3, H, W) float32 input: the test-time resize of
    ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` (by ``INPUT.RESIZE_BACKEND``) and
    ``INPUT.FORMAT``, as ``DefaultPredictor``."""
    aug, input_format = test_resize(cfg)
    image = image_bgr[:, :, ::-1] if input_format == "RGB" else image_bgr
    resized = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))


class SALTNetTensorPart(nn.Module):
    """Normalisation + backbone + head of a :class:`SALTNet`, returning a flat tuple of tensors.

    ``forward(images)``: (N, 3, H, W) float32 raw pixels from :func:`pad_images` -> the head's
    per-level tensors, group after group (see :attr:`output_names`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.output_names = head_output_names(model)

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        model = self.model
        features = model.backbone((images - model.pixel_mean) / model.pixel_std)
        predictions = model.head([features[f] for f in model.head_in_features])
        return tuple(x for group in predictions.groups().values() for x in group)


def head_output_names(model: nn.Module) -> List[str]:
    """``<group>_<level>`` for every tensor the head returns: the :class:`HeadOutputs` groups it
    fills (``SALTHead.output_groups``), level after level."""
    levels = range(len(model.head_in_features))
    return [f"{group}_{level}" for group in model.head.output_groups for level in levels]


def pad_images(model: nn.Module, images: Sequence[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """Batch (3, Hi, Wi) raw-pixel images for the exported graph.

    Returns the (N, 3, H, W) float32 batch, H and W the largest sizes rounded up to the
    backbone's size divisibility, padded with the pixel mean; and each image's (Hi, Wi).
    """
    divisor = max(model.backbone.size_divisibility, 1)
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    height = -(-max(h for h, _ in sizes) // divisor) * divisor
    width = -(-max(w for _, w in sizes) // divisor) * divisor
    batch = model.pixel_mean.cpu().float().expand(len(images), 3, height, width).clone()
    for x, (h, w), slot in zip(images, sizes, batch):
        slot[:, :h, :w] = x
    return batch, sizes


def decode_outputs(
    model: nn.Module,
    outputs: Sequence[Tensor],
    output_names: Sequence[str],
    image_sizes: Sequence[Tuple[int, int]],
    output_sizes: Optional[Sequence[Tuple[int, int]]] = None,
) -> List[Instances]:
    """Detections from the exported graph's outputs, by the model's own :meth:`SALTNet.decode`.

    ``outputs`` in the order of ``output_names`` (``<group>_<level>``); ``image_sizes``: each
    image's (height, width) in the batch (before padding); ``output_sizes``: the frame to rescale
    the boxes to (the original image's), default ``image_sizes``. Only the model's decoding
    settings are used (test top-k, score threshold, NMS threshold, detections per image), not
    its weights.
    """
    by_name = {name: torch.as_tensor(x) for name, x in zip(output_names, outputs)}
    groups = {name.rsplit("_", 1)[0] for name in by_name}
    unknown = sorted(groups - set(OUTPUT_GROUPS))
    if unknown:
        raise ValueError(f"{unknown} are no output groups of an exported SALT-Net.")
    levels = range(len(model.head_in_features))
    predictions = HeadOutputs.from_groups(
        {group: [by_name[f"{group}_{level}"] for level in levels] for group in groups}
    )
    results = model.decode(predictions, list(image_sizes))
    output_sizes = image_sizes if output_sizes is None else output_sizes
    return [detector_postprocess(r, h, w) for r, (h, w) in zip(results, output_sizes)]


def export_model(
    model: nn.Module,
    sample: Tensor,
    path: str,
    export_format: str,
    opset: int = MIN_DEFORM_CONV_OPSET,
) -> List[str]:
    """Export ``model``'s tensor part, traced on ``sample`` (from :func:`pad_images`), to ``path``.

    TorchScript: ``torch.jit.trace``, the output names stored in the file. ONNX: the dynamo
    exporter at ``opset``, input ``images`` with dynamic batch, height and width (multiples of
    the backbone's size divisibility). Returns the output names.
    """
    part = SALTNetTensorPart(model.eval()).eval()
    with torch.no_grad():
        if export_format == "torchscript":
            with warnings.catch_warnings():
                # The layers' input checks (ranks, channel counts) become constants, rightly.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(part, (sample,), check_trace=False)
            torch.jit.save(
                traced, path, _extra_files={TORCHSCRIPT_OUTPUTS_FILE: json.dumps(part.output_names)}
            )
        elif export_format == "onnx":
            divisor = max(model.backbone.size_divisibility, 1)
            sample = _generic_sample(model, sample)
            dims = {
                0: torch.export.Dim("batch", min=1),
                2: divisor * torch.export.Dim("height_blocks", min=1),
                3: divisor * torch.export.Dim("width_blocks", min=1),
            }
            torch.onnx.export(
                part,
                (sample,),
                path,
                input_names=["images"],
                output_names=part.output_names,
                dynamic_shapes={"images": dims},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        else:
            raise ValueError(f"Unsupported export format {export_format!r}.")
    return part.output_names


def _generic_sample(model: nn.Module, sample: Tensor) -> Tensor:
    """``sample`` grown to two images and to two locations per side on the coarsest level.

    torch.export specialises dimensions of size 1 (it would fix the batch to 1, or the coarsest
    level to 1 x 1), so the ONNX export traces a sample where no dynamic dimension is 1.
    """
    min_size = 2 * max(model.strides)
    height, width = max(sample.shape[2], min_size), max(sample.shape[3], min_size)
    grown = model.pixel_mean.cpu().float().expand(max(len(sample), 2), 3, height, width).clone()
    grown[: len(sample), :, : sample.shape[2], : sample.shape[3]] = sample
    return grown


def load_exported(
    path: str, num_threads: Optional[int] = None
) -> Tuple[Callable[[Tensor], List[Tensor]], List[str]]:
    """An exported SALT-Net as ``(run, output_names)``; ``run(batch)`` -> the output tensors.

    ``.onnx`` files run with onnxruntime on the CPU (``num_threads`` intra-op threads, default
    onnxruntime's), others load as TorchScript (threads: torch's setting).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Exported model {path!r} does not exist.")
    if path.endswith(".onnx"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def run_onnx(batch: Tensor) -> List[Tensor]:
            outputs = session.run(names, {"images": batch.numpy()})
            return [torch.from_numpy(x) for x in outputs]

        return run_onnx, names
    extra = {TORCHSCRIPT_OUTPUTS_FILE: ""}
    module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    if not extra[TORCHSCRIPT_OUTPUTS_FILE]:
        raise ValueError(f"{path!r} is no SALT-Net exported by tools/deploy/export_model.py.")

    def run_torchscript(batch: Tensor) -> List[Tensor]:
        with torch.no_grad():
            return list(module(batch))

    return run_torchscript, json.loads(extra[TORCHSCRIPT_OUTPUTS_FILE])


class ExportedPredictor:
    """detectron2's ``DefaultPredictor`` on an exported SALT-Net: BGR image -> ``Instances``.

    ``cfg`` is the exported model's config (see :func:`load_export_config`): it gives the test
    resize, the input format and the decoding settings. The PyTorch model is built for its
    ``forward_inference`` only; no weights are read.
    """

    def __init__(self, cfg, path: str, num_threads: Optional[int] = None):
        self.cfg = cfg
        self.model = build_model(cfg).eval()
        self.run, self.output_names = load_exported(path, num_threads)

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        height, width = image_bgr.shape[:2]
        batch, sizes = pad_images(self.model, [resize_for_test(self.cfg, image_bgr)])
        outputs = self.run(batch)
        return decode_outputs(self.model, outputs, self.output_names, sizes, [(height, width)])[0]
