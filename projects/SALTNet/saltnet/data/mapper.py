"""detectron2's :class:`DatasetMapper` for box detection, reading images with
:func:`saltnet.data.image_io.read_image` (greyscale, RGBA, palette, CMYK and 16-bit images become
8-bit colour images; unreadable files raise :class:`ImageReadError` naming the file), and resizing
as ``INPUT.RESIZE_BACKEND`` says (detectron2's PIL resize, or the release's OpenCV one)."""

import copy

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .image_io import read_image
from .transforms import with_resize_backend

__all__ = ["SALTNetDatasetMapper"]


class SALTNetDatasetMapper(DatasetMapper):
    """Same configuration and output as :class:`DatasetMapper` for boxes (``image``: uint8
    tensor (C, H, W); ``instances`` in training); masks, keypoints, semantic segmentation and
    precomputed proposals are not read."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        backend = cfg.INPUT.RESIZE_BACKEND
        ret["augmentations"] = [with_resize_backend(a, backend) for a in ret["augmentations"]]
        return ret

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
        elif "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
