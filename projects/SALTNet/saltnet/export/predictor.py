"""Predictors: a trained detector of a YAML config or a LazyConfig, BGR image -> its outputs.

:class:`Predictor` is detectron2's ``DefaultPredictor`` for both kinds of config: the same
call, with the model, the test resize and the input format given by :meth:`Predictor.from_config`.
With ``output_point_sets`` (a constructor argument of the model, see
:class:`~saltnet.modeling.point_sets.PointSetOutputs`), every detection also carries SALT's two
point sets, in the input image's pixels.
"""

from typing import Dict

import numpy as np
import torch
from detectron2.data import transforms as T
from torch import nn

from ..checkpoint.checkpointer import AtomicCheckpointer
from ..config.load import build_model, test_resize, weights

__all__ = ["Predictor"]


class Predictor:
    """``DefaultPredictor.__call__``: a BGR (H, W, 3) uint8 image -> the model's output dict
    for it (``instances`` in the image's frame), without gradients.

    Args:
        model: a detectron2 detector in eval mode, on its device.
        aug: the test-time resize.
        input_format: "BGR" or "RGB", the model's channel order.
    """

    def __init__(self, model: nn.Module, aug: T.Augmentation, input_format: str):
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}.")
        self.model = model
        self.aug = aug
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg, output_point_sets: bool = False) -> "Predictor":
        """The detector of ``cfg`` with its weights: a YAML config (``MODEL.WEIGHTS``, the test
        resize of ``INPUT.*_SIZE_TEST`` by ``INPUT.RESIZE_BACKEND``, ``INPUT.FORMAT``) or a
        LazyConfig (``train.init_checkpoint``, the test mapper's first augmentation and its
        ``image_format``), on the config's device. ``output_point_sets``: detections carry the
        SALT point sets (ValueError if the head has none, ``SALT_ON`` False)."""
        model = build_model(cfg, output_point_sets=output_point_sets)
        if output_point_sets and not getattr(model.head, "salt_on", False):
            raise ValueError(
                "The model's head runs without SALT (SALT_ON False): it has no points."
            )
        AtomicCheckpointer(model.eval()).load(weights(cfg))
        return cls(model, *test_resize(cfg))

    def __call__(self, original_image: np.ndarray) -> Dict:
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]
