"""The resize of the authors' release (mmcv's ``imrescale``), offered next to detectron2's.

detectron2 resizes uint8 images with PIL's bilinear filter, which low-pass filters when it
shrinks an image; the release resizes with OpenCV's bilinear interpolation (``cv2.INTER_LINEAR``,
no such filtering) and rounds the output size with mmcv's formula. Evaluating a converted release
checkpoint with ``INPUT.RESIZE_BACKEND opencv`` feeds it the pixels it was trained on.
"""

import cv2
import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "RESIZE_BACKENDS",
    "OpenCVResizeShortestEdge",
    "OpenCVResizeTransform",
    "with_resize_backend",
]

RESIZE_BACKENDS = ("pil", "opencv")


class OpenCVResizeTransform(T.ResizeTransform):
    """detectron2's ``ResizeTransform`` whose images are resized by ``cv2.resize`` (bilinear);
    boxes and coordinates scale exactly as detectron2's do."""

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        assert img.shape[:2] == (self.h, self.w), (img.shape, (self.h, self.w))
        out = cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        return out.reshape(out.shape[:2] + img.shape[2:])  # cv2 drops a single channel axis


class OpenCVResizeShortestEdge(T.ResizeShortestEdge):
    """``ResizeShortestEdge`` (same arguments, same random draws) with mmcv's output size
    ``int(side x min(max_size / long side, short_edge_length / short side) + 0.5)`` and
    :class:`OpenCVResizeTransform`."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.is_range:
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        if size == 0:
            return T.NoOpTransform()
        scale = min(self.max_size / max(h, w), size / min(h, w))
        return OpenCVResizeTransform(h, w, int(h * scale + 0.5), int(w * scale + 0.5))


def with_resize_backend(augmentation: T.Augmentation, backend: str) -> T.Augmentation:
    """``augmentation`` itself, or for ``backend="opencv"`` a ``ResizeShortestEdge`` turned into
    the equivalent :class:`OpenCVResizeShortestEdge` (``INPUT.RESIZE_BACKEND``)."""
    if backend not in RESIZE_BACKENDS:
        raise ValueError(f"INPUT.RESIZE_BACKEND is {backend!r}; choose one of {RESIZE_BACKENDS}.")
    if backend == "pil" or type(augmentation) is not T.ResizeShortestEdge:
        return augmentation
    return OpenCVResizeShortestEdge(
        augmentation.short_edge_length,
        augmentation.max_size,
        "range" if augmentation.is_range else "choice",
    )
