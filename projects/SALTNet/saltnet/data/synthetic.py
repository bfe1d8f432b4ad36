"""A small synthetic detection dataset in COCO format, for smoke runs and the CPU demo job.

Four shape classes (circle, square, triangle, bar) of varied size, aspect ratio, rotation and
colour, partly overlapping, on textured backgrounds (noise, stripes, gradients). The images are
generated from a seeded numpy RNG, so every run yields the same bytes, and cached on disk:

    <root>/train/000000.png ...      <root>/annotations/train.json
    <root>/val/000000.png ...        <root>/annotations/val.json
                                     <root>/annotations/val_16.json (its first 16 images)
    <root>/manifest.json             (written last; marks a complete dataset)

Registered as ``saltnet_synth_train``, ``saltnet_synth_val`` and ``saltnet_synth_val_16``, a subset
for smoke runs whose evaluation should take a second (as detectron2's ``coco_2017_val_100``).

``<root>`` is, in order: the ``root`` argument, ``$SALTNET_SYNTHETIC_ROOT``, or
``$DETECTRON2_DATASETS/saltnet_synthetic`` (``DETECTRON2_DATASETS`` defaulting to ``datasets``,
as in detectron2's builtin datasets). A missing or incomplete dataset is regenerated in a
temporary folder and moved into place atomically, so concurrent processes never see half of one.
"""

import json
import logging
import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_SPLITS",
    "SYNTHETIC_SUBSETS",
    "default_synthetic_root",
    "prepare_synthetic_dataset",
    "register_synthetic",
    "synthetic_dataset_name",
    "synthetic_dataset_names",
]

logger = logging.getLogger(__name__)

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "bar")
# split -> (number of images, RNG seed)
SYNTHETIC_SPLITS = {"train": (480, 2022), "val": (80, 2108)}
# subset -> (its split, the number of that split's first images it holds)
SYNTHETIC_SUBSETS = {"val_16": ("val", 16)}
IMAGE_SIZE = 128  # pixels, square images
_VERSION = 2  # bump when the generator changes, so stale caches are regenerated


def synthetic_dataset_name(split: str) -> str:
    """``"train"`` -> ``"saltnet_synth_train"`` (a split or a subset)."""
    return f"saltnet_synth_{split}"


def synthetic_dataset_names() -> List[str]:
    """The names of every split and subset, in registration order."""
    return [synthetic_dataset_name(s) for s in (*SYNTHETIC_SPLITS, *SYNTHETIC_SUBSETS)]


def default_synthetic_root() -> str:
    """Where the dataset is cached when no root is given (see the module docstring)."""
    root = os.environ.get("SALTNET_SYNTHETIC_ROOT")
    if root:
        return root
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "saltnet_synthetic")


def _manifest() -> Dict:
    return {
        "version": _VERSION,
        "image_size": IMAGE_SIZE,
        "classes": list(SYNTHETIC_CLASSES),
        "splits": {k: list(v) for k, v in SYNTHETIC_SPLITS.items()},
        "subsets": {k: list(v) for k, v in SYNTHETIC_SUBSETS.items()},
    }


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 RGB texture in [0, 255]: noise, stripes or a gradient."""
    kind = rng.integers(3)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 0:
        img = np.broadcast_to(c0, (size, size, 3)) + rng.normal(0, 20, (size, size, 3))
    elif kind == 1:
        period = rng.uniform(0.06, 0.25)
        weight = (np.sin(2 * math.pi * along / period) > 0).astype(np.float32)[..., None]
        img = c0 * weight + c1 * (1 - weight)
    else:
        weight = np.clip(along / max(math.cos(angle) + math.sin(angle), 1e-3), 0, 1)[..., None]
        img = c0 * weight + c1 * (1 - weight)
    return img.astype(np.float32)


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """A (size, size) bool mask of one object of class ``cls``, placed inside the image."""
    if cls == 3:  # bar: elongated, horizontal or vertical
        length = rng.uniform(40, 96)
        w, h = length, length / rng.uniform(3.0, 5.0)
        if rng.random() < 0.5:
            w, h = h, w
    else:  # circle / square / triangle: aspect ratio within [0.75, 1.33]
        side = rng.uniform(24, 72)
        aspect = math.exp(rng.uniform(-0.29, 0.29))
        w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
    cx = rng.uniform(w / 2 + 1, size - w / 2 - 1)
    cy = rng.uniform(h / 2 + 1, size - h / 2 - 1)
    mask = np.zeros((size, size), np.uint8)
    if cls == 0:
        cv2.ellipse(mask, (round(cx), round(cy)), (round(w / 2), round(h / 2)), 0, 0, 360, 1, -1)
        return mask.astype(bool)
    if cls == 2:  # isosceles triangle, apex up or down
        apex = -1 if rng.random() < 0.5 else 1
        corners = np.array([[0, apex * h / 2], [-w / 2, -apex * h / 2], [w / 2, -apex * h / 2]])
    else:
        corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    theta = math.radians(rng.uniform(-10, 10))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = corners @ rot.T + [cx, cy]
    points = np.clip(points, 0, size - 1)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def _render_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[Dict]]:
    """One RGB uint8 image and its objects as {"category_id" (1-based), "bbox" XYWH pixels}."""
    img = _background(rng, size)
    objects, covered = [], []
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
        for _attempt in range(10):
            mask = _shape_mask(rng, cls, size)
            # Later objects occlude earlier ones; keep at least 75% of each earlier one visible.
            if all((m & mask).sum() < 0.25 * m.sum() for m in covered):
                break
        else:
            continue
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - img[mask].mean(axis=0)).sum() < 180:
            colour = rng.uniform(0, 255, 3)
        img[mask] = colour
        covered = [m & ~mask for m in covered] + [mask]
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        box = [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]
        objects.append({"category_id": cls + 1, "bbox": box})
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _write_split(folder: str, split: str, num_images: int, seed: int) -> Dict:
    """Render the split's images into ``folder/split``; write and return its COCO json."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, split))
    images, annotations = [], []
    for image_id in range(num_images):
        img, objects = _render_image(rng, IMAGE_SIZE)
        file_name = f"{image_id:06d}.png"
        cv2.imwrite(os.path.join(folder, split, file_name), img[:, :, ::-1])
        images.append(
            {"id": image_id, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        for obj in objects:
            w, h = obj["bbox"][2:]
            ann_id = len(annotations) + 1
            annotations.append(
                {"id": ann_id, "image_id": image_id, "area": w * h, "iscrowd": 0, **obj}
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(SYNTHETIC_CLASSES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    _write_json(folder, split, coco)
    return coco


def _write_subset(folder: str, subset: str, coco: Dict, num_images: int) -> None:
    """Write the COCO json of the first ``num_images`` images of a split's ``coco``."""
    images = coco["images"][:num_images]
    ids = {image["id"] for image in images}
    annotations = [a for a in coco["annotations"] if a["image_id"] in ids]
    _write_json(folder, subset, {**coco, "images": images, "annotations": annotations})


def _write_json(folder: str, name: str, coco: Dict) -> None:
    with open(os.path.join(folder, "annotations", f"{name}.json"), "w") as f:
        json.dump(coco, f)


def _is_complete(root: str) -> bool:
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            if json.load(f) != _manifest():
                return False
    except (OSError, ValueError):
        return False
    return all(
        os.path.isfile(os.path.join(root, "annotations", f"{split}.json"))
        and len(os.listdir(os.path.join(root, split))) == num
        for split, (num, _) in SYNTHETIC_SPLITS.items()
    ) and all(
        os.path.isfile(os.path.join(root, "annotations", f"{subset}.json"))
        for subset in SYNTHETIC_SUBSETS
    )


def prepare_synthetic_dataset(root: Optional[str] = None) -> str:
    """Generate the dataset under ``root`` unless a complete copy is there; return ``root``."""
    root = os.path.abspath(root or default_synthetic_root())
    if _is_complete(root):
        return root
    logger.info(f"Generating the synthetic dataset in {root} ...")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".saltnet_synthetic-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        splits = {
            split: _write_split(tmp, split, num_images, seed)
            for split, (num_images, seed) in SYNTHETIC_SPLITS.items()
        }
        for subset, (split, num_images) in SYNTHETIC_SUBSETS.items():
            _write_subset(tmp, subset, splits[split], num_images)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(_manifest(), f)
        if os.path.exists(root) and not _is_complete(root):
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not _is_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def register_synthetic(root: Optional[str] = None) -> List[str]:
    """Prepare the dataset and register its splits and subsets (:func:`synthetic_dataset_names`);
    return their names.

    Already registered names are left alone (the first registration wins).
    """
    root = prepare_synthetic_dataset(root)
    folders = {split: split for split in SYNTHETIC_SPLITS}  # split or subset -> image folder
    folders.update({subset: split for subset, (split, _) in SYNTHETIC_SUBSETS.items()})
    names = []
    for part, folder in folders.items():
        name = synthetic_dataset_name(part)
        names.append(name)
        if name in DatasetCatalog.list():
            continue
        json_file = os.path.join(root, "annotations", f"{part}.json")
        image_root = os.path.join(root, folder)
        DatasetCatalog.register(
            name, lambda j=json_file, i=image_root, n=name: load_coco_json(j, i, n)
        )
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(SYNTHETIC_CLASSES),
        )
    return names
