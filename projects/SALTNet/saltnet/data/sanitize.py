"""The data policy of SALT-Net training: the checks detectron2 lacks, in one place.

Applied to the dataset dicts of ``DATASETS.TRAIN`` before training (docs/ROBUSTNESS.md); the
image-file check also to test datasets:

- an image file that does not exist: stop, listing the missing files;
- a box missing or not 4 finite numbers, or a ``category_id`` outside the dataset's classes
  (``thing_classes``): stop, naming the file and the annotation;
- a box with inverted corners (x1 < x0 or y1 < y0, XYXY pixels): dropped (detectron2 would
  silently swap them);
- a box with less than ``min_size`` pixels of width or height inside the image (zero-area or
  outside the image): dropped;
- training datasets with different class lists, or more classes than the model
  (:func:`check_num_classes`): stop.

Dropped boxes are counted and logged once per dataset with an example each. Crowd boxes
(``iscrowd=1``, ignored in training) are checked but never changed. Boxes partly outside the
image are left to detectron2's mapper, which clips them after resizing.
"""

import logging
import math
import numbers
import os
from collections import Counter
from typing import Dict, List, Sequence, Union

from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

__all__ = ["check_image_files", "check_num_classes", "sanitize_dataset_dicts"]

logger = logging.getLogger(__name__)


def _describe(record: dict, k: int, obj: dict) -> str:
    ann = f"annotation id {obj['id']}" if "id" in obj else f"annotation #{k}"
    return f"{ann} of image {record['file_name']!r}"


def check_image_files(dataset_dicts: Sequence[dict], dataset_name: str = "") -> None:
    """Raise FileNotFoundError listing (up to 5 of) the image files that do not exist."""
    missing = [d["file_name"] for d in dataset_dicts if not os.path.isfile(d["file_name"])]
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"Dataset {dataset_name!r}: {len(missing)} of {len(dataset_dicts)} image files do "
            f"not exist:\n  {shown}{more}"
        )


def _sanitize_box(record: dict, k: int, obj: dict, num_classes: int, min_size: float):
    """(box XYXY pixels or None if dropped, what happened) of one annotation; raises on bad data."""
    category = obj.get("category_id")
    if not isinstance(category, numbers.Integral) or not 0 <= category < num_classes:
        raise ValueError(
            f"{_describe(record, k, obj)} has category_id={category!r}; the dataset has "
            f"{num_classes} classes (valid ids: 0..{num_classes - 1})."
        )
    box = obj.get("bbox")
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box)
    ):
        raise ValueError(f"{_describe(record, k, obj)} has a malformed bbox {box!r}.")
    x0, y0, x1, y1 = BoxMode.convert(list(map(float, box)), obj["bbox_mode"], BoxMode.XYXY_ABS)
    if obj.get("iscrowd", 0):
        return [x0, y0, x1, y1], "kept"
    if x1 < x0 or y1 < y0:
        return None, "inverted"
    w, h = record.get("width", math.inf), record.get("height", math.inf)
    if min(x1, w) - max(x0, 0.0) < min_size or min(y1, h) - max(y0, 0.0) < min_size:
        return None, "degenerate"
    return [x0, y0, x1, y1], "kept"


def sanitize_dataset_dicts(
    dataset_dicts: Sequence[dict], num_classes: int, dataset_name: str = "", min_size: float = 1.0
) -> List[dict]:
    """Apply the policy of the module doc to the dicts of a dataset of ``num_classes`` classes;
    returns new dicts (the input is not modified).

    Boxes come back in ``BoxMode.XYXY_ABS`` (pixels). Raises ValueError naming the image and the
    annotation for malformed boxes and unknown category ids.
    """
    counts: Counter = Counter()
    examples: Dict[str, str] = {}
    result = []
    for record in dataset_dicts:
        if "annotations" not in record:
            result.append(record)
            continue
        annotations = []
        for k, obj in enumerate(record["annotations"]):
            box, what = _sanitize_box(record, k, obj, num_classes, min_size)
            counts[what] += 1
            examples.setdefault(what, _describe(record, k, obj))
            if box is not None:
                annotations.append(dict(obj, bbox=box, bbox_mode=BoxMode.XYXY_ABS))
        result.append(dict(record, annotations=annotations))
    reasons = {
        "inverted": "dropped {} boxes with inverted corners",
        "degenerate": "dropped {} boxes narrower or lower than {} px inside the image",
    }
    for what, message in reasons.items():
        if counts[what]:
            logger.warning(
                f"Dataset {dataset_name!r}: "
                + message.format(counts[what], min_size)
                + f", e.g. {examples[what]}."
            )
    return result


def _class_list(names: Sequence[str], limit: int = 10) -> str:
    return f"[{', '.join(map(repr, names[:limit]))}{', ...' if len(names) > limit else ''}]"


def check_num_classes(
    num_classes: int,
    dataset_names: Union[str, Sequence[str]],
    key: str = "MODEL.SALTNET.NUM_CLASSES, model.num_classes",
) -> None:
    """Compare the model's class count (``key``: e.g. ``MODEL.SALTNET.NUM_CLASSES``, a
    LazyConfig's ``model.num_classes``) with the ``thing_classes`` of the datasets named (call
    it after ``DatasetCatalog.get``, which sets a COCO json dataset's). Datasets without them
    are skipped.

    Raises ValueError if the datasets' class lists differ or have more classes than the model;
    fewer only warn.
    """
    names = [dataset_names] if isinstance(dataset_names, str) else dataset_names
    found = [(n, MetadataCatalog.get(n).get("thing_classes")) for n in names]
    found = [(n, list(c)) for n, c in found if c is not None]
    for name, classes in found[1:]:
        if classes != found[0][1]:
            raise ValueError(
                f"The training datasets have different classes: {found[0][0]!r} has "
                f"{len(found[0][1])} {_class_list(found[0][1])} but {name!r} has {len(classes)} "
                f"{_class_list(classes)}. Datasets trained together must share one class list."
            )
    name, classes = found[0] if found else ("", [])
    if len(classes) > num_classes:
        raise ValueError(
            f"Dataset {name!r} has {len(classes)} classes {_class_list(classes)} but the model "
            f"has {num_classes} ({key}); set it to "
            f"{len(classes)}."
        )
    if 0 < len(classes) < num_classes:
        logger.warning(
            f"Dataset {name!r} has {len(classes)} classes but the model has {num_classes} "
            f"({key}): {num_classes - len(classes)} "
            f"classifier outputs are never trained as positives. Set it to {len(classes)} "
            "unless intended."
        )
