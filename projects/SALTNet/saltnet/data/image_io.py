"""
Robust image reading for the data pipelines.

:func:`read_image` is a drop-in replacement for ``detectron2.data.detection_utils.read_image``
(same output for ordinary 8-bit images, EXIF orientation applied the same way) that in addition

* rescales high-bit-depth images instead of letting PIL clip them to 255 (a 16-bit PNG converted
  to RGB by PIL comes out almost white):

  - 16-bit integer modes (``"I;16"``, ``"I;16L"``, ``"I;16B"``, ...) are divided by 257, so
    0..65535 maps onto 0..255;
  - 32-bit modes (``"I"`` integer, ``"F"`` float) are scaled by ``255 / max`` when the image's
    maximum exceeds 255 and kept as they are otherwise; negative values are clipped to 0;

* drops the alpha channel of ``"RGBA"`` / ``"LA"`` / ``"PA"`` images and the transparency of
  palette images (PIL's ``convert("RGB")``: colour values are kept, not composited on a
  background);
* raises :class:`ImageReadError` (an ``OSError``) naming the file and the cause for a missing,
  truncated, corrupt or non-image file, instead of an anonymous PIL / iopath error. The image is
  fully decoded inside the ``try``, so truncation is detected here and not later.

Files are opened through detectron2's ``PathManager``, so remote / custom paths keep working.
"""

import errno
import glob
import os
from typing import List, Optional, Sequence

import numpy as np
from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["ImageReadError", "ImageNotFoundError", "input_image_paths", "read_image"]


class ImageReadError(OSError):
    """
    An image file could not be read or decoded. ``str(err)`` names the file and the cause;
    they are also in ``err.file_name`` and ``err.cause``, and the original exception is
    ``err.__cause__``.
    """

    def __init__(self, file_name: str, cause: str):
        super().__init__(f"cannot read image {file_name!r}: {cause}")
        # not OSError's ``filename``/``strerror``: setting those changes ``str(err)``
        self.file_name = file_name
        self.cause = cause

    def __reduce__(self):  # picklable (e.g. across worker processes) despite the 2-arg __init__
        return type(self), (self.file_name, self.cause)


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """The image file does not exist (also caught by ``except FileNotFoundError``)."""

    def __init__(self, file_name: str, cause: str = "file not found"):
        super().__init__(file_name, cause)
        self.errno = errno.ENOENT


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _to_8bit(image: Image.Image) -> Image.Image:
    """
    Turn a high-bit-depth greyscale image (``"I;16*"``, ``"I"``, ``"F"``) into an 8-bit ``"L"``
    image following the module's scaling policy; other images are returned unchanged.
    """
    if not (image.mode == "F" or image.mode.startswith("I")):
        return image
    array = np.asarray(image)
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # I;16, I;16L, I;16B, I;16N
        scaled = array.astype(np.float32) / 257.0
    else:  # "I" (int32), "F" (float32), signed 16-bit
        scaled = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = scaled.max(initial=0.0)
        if peak > 255:
            scaled = scaled * (255.0 / peak)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def read_image(file_name: str, format: Optional[str] = "BGR") -> np.ndarray:
    """
    Read an image file into a numpy array, applying its EXIF orientation.

    Args:
        file_name: path or URI understood by detectron2's ``PathManager``.
        format: ``"BGR"`` (default) or ``"RGB"`` for an (H, W, 3) uint8 array in that channel
            order; ``"L"`` for (H, W, 1) uint8; ``"YUV-BT.601"`` for (H, W, 3) float; any other PIL
            mode is passed to PIL's ``convert``. ``None`` returns the decoded pixels unconverted
            (as detectron2 does, high bit depths kept).

    Returns:
        np.ndarray: a C-contiguous HWC array, values 0..255 for the uint8 formats. Every input
        mode (``"1"``, ``"L"``, ``"LA"``, ``"P"``, ``"PA"``, ``"RGB"``, ``"RGBA"``, ``"CMYK"``,
        ``"YCbCr"``, 16/32-bit integer, float) gives a 3-channel result for ``"BGR"`` / ``"RGB"``;
        see the module docstring for how alpha and high bit depths are handled.

    Raises:
        ImageNotFoundError: the file does not exist (subclass of ``ImageReadError`` and
            ``FileNotFoundError``).
        ImageReadError: the file cannot be opened, is not an image, is truncated or corrupt, or
            its mode cannot be converted to ``format``. The message names the file.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # full decode here, so truncated / corrupt data fails inside the try
    except FileNotFoundError as e:
        raise ImageNotFoundError(file_name) from e
    except Image.UnidentifiedImageError as e:
        raise ImageReadError(file_name, "not a recognised image format") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageReadError(file_name, _describe(e)) from e

    try:
        image = _apply_exif_orientation(image)
        if not (format is None or format == "F" or format.startswith("I")):
            image = _to_8bit(image)
        array = convert_PIL_to_numpy(image, format)
    except (OSError, ValueError) as e:
        raise ImageReadError(
            file_name, f"cannot convert mode {image.mode!r} to {format!r} ({_describe(e)})"
        ) from e
    return np.ascontiguousarray(array)


def input_image_paths(inputs: Sequence[str]) -> List[str]:
    """The image files of a demo's ``--input``, as detectron2's demo reads it: a single argument
    is a glob pattern (``~`` expanded; its matches sorted), several are the files themselves.

    Raises:
        FileNotFoundError: the pattern matches no file, or given files do not exist; the message
            names them (the demos turn it into a usage error before they build a model).
    """
    if len(inputs) == 1:
        paths = sorted(glob.glob(os.path.expanduser(inputs[0])))
        if not paths:
            raise FileNotFoundError(f"--input {inputs[0]!r} matches no file.")
        return paths
    missing = [path for path in inputs if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"--input: no such file: {', '.join(map(repr, missing))}.")
    return list(inputs)
