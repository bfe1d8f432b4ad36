"""Register COCO-json, Pascal-VOC-style and synthetic datasets, also from config keys.

``DATASETS.REGISTER`` (added by :func:`add_dataset_config`) lists datasets as spec strings that
:func:`register_dataset_spec` understands (fields separated by ``:``, so paths must not contain
one)::

    NAME=coco:JSON_FILE:IMAGE_ROOT
    NAME=voc:VOC_DIR:SPLIT[:CLASS1,CLASS2,...]

The synthetic datasets ``saltnet_synth_train`` / ``saltnet_synth_val`` / ``saltnet_synth_val_16``
(:mod:`saltnet.data.synthetic`) need no spec: naming them in
``DATASETS.TRAIN`` / ``DATASETS.TEST`` generates (once) and registers them, under
``DATASETS.SYNTHETIC_ROOT`` if set. All datasets get ``evaluator_type="coco"``, so
:class:`detectron2.evaluation.COCOEvaluator` evaluates them (it converts non-COCO datasets to a
COCO json itself).
"""

import functools
import json
import os
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Optional, Sequence

from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image

from .synthetic import register_synthetic, synthetic_dataset_names

__all__ = [
    "add_dataset_config",
    "infer_voc_class_names",
    "load_checked_coco_json",
    "load_voc_folder",
    "register_coco_json",
    "register_dataset_spec",
    "register_datasets",
    "register_datasets_from_cfg",
    "register_voc_folder",
]

# name -> spec of the datasets registered here, so that registering the same again is a no-op.
_REGISTERED: Dict[str, tuple] = {}


def add_dataset_config(cfg):
    """Add ``DATASETS.REGISTER`` and ``DATASETS.SYNTHETIC_ROOT`` to a config (in place)."""
    cfg.DATASETS.REGISTER = []
    cfg.DATASETS.SYNTHETIC_ROOT = ""
    return cfg


def _claim(name: str, spec: tuple) -> bool:
    """True if ``name`` still has to be registered; error if it is taken by something else."""
    if _REGISTERED.get(name) == spec:
        return False
    if name in DatasetCatalog.list():
        raise ValueError(f"Dataset name {name!r} is already registered; choose another name.")
    _REGISTERED[name] = spec
    return True


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist.")


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist or is not a directory.")


def load_checked_coco_json(json_file: str, image_root: str, dataset_name: str) -> List[Dict]:
    """:func:`detectron2.data.datasets.load_coco_json`, with clear errors for broken files.

    Raises ValueError naming the file for invalid JSON, annotations without a category id,
    category ids missing from ``categories``, and a dataset without images. Boxes and image
    files are checked with the rest of the data policy (:mod:`saltnet.data.sanitize`).
    """
    _require_file(json_file, "COCO annotation file")
    try:
        dicts = load_coco_json(json_file, image_root, dataset_name)
    except json.JSONDecodeError as e:
        raise ValueError(f"COCO annotation file {json_file!r} is not valid JSON: {e}") from e
    except KeyError as e:
        raise ValueError(f"Malformed annotation in {json_file!r}: {e}") from e
    if not dicts:
        raise ValueError(f"Dataset {dataset_name!r}: {json_file!r} lists no images.")
    return dicts


def register_coco_json(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format detection dataset, as detectron2's ``register_coco_instances``.

    The files must exist now (FileNotFoundError otherwise); the json is read and checked when the
    dataset is first used (see :func:`load_checked_coco_json`).
    """
    _require_file(json_file, "COCO annotation file")
    _require_dir(image_root, "Image directory")
    if not _claim(name, ("coco", json_file, image_root)):
        return
    DatasetCatalog.register(name, lambda: load_checked_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _parse_voc_xml(xml_file: str) -> ET.ElementTree:
    _require_file(xml_file, "VOC annotation")
    try:
        return ET.parse(xml_file)
    except ET.ParseError as e:
        raise ValueError(f"VOC annotation {xml_file!r} is not valid XML: {e}") from e


def _object_name(obj: ET.Element, xml_file: str) -> str:
    name = obj.findtext("name")
    if not name or not name.strip():
        raise ValueError(f"VOC annotation {xml_file!r}: an <object> has no <name>.")
    return name.strip()


def infer_voc_class_names(dirname: str) -> List[str]:
    """Sorted object names over all ``Annotations/*.xml`` of a VOC folder (all splits agree).
    Read once per folder and process: a folder is registered again by every loader built from
    the config, and each registration needs its class names."""
    return list(_voc_class_names(dirname))


@functools.lru_cache(maxsize=None)
def _voc_class_names(dirname: str) -> tuple:
    ann_dir = os.path.join(dirname, "Annotations")
    _require_dir(ann_dir, "VOC annotation directory")
    names = set()
    for fname in sorted(os.listdir(ann_dir)):
        if fname.endswith(".xml"):
            xml_file = os.path.join(ann_dir, fname)
            tree = _parse_voc_xml(xml_file)
            names.update(_object_name(obj, xml_file) for obj in tree.findall("object"))
    if not names:
        raise ValueError(f"No annotated objects found in {ann_dir!r}; cannot infer class names.")
    return tuple(sorted(names))


def _voc_split_ids(dirname: str, split: str) -> List[str]:
    split_file = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    _require_file(split_file, "VOC split file")
    with open(split_file) as f:
        return [line.split()[0] for line in f if line.strip()]


def load_voc_folder(dirname: str, split: str, class_names: Sequence[str]) -> List[Dict]:
    """Load one split of a VOC-style folder as detectron2 dataset dicts.

    Reads ``ImageSets/Main/{split}.txt`` and ``Annotations/{id}.xml``; images are
    ``JPEGImages/<filename>`` (the XML's ``<filename>``, else ``{id}.jpg``). Boxes are XYXY
    pixels; VOC's 1-based ``xmin``/``ymin`` are shifted by -1 as in detectron2's Pascal VOC
    loader, and "difficult" objects are kept. ``image_id`` is the index in the split.
    """
    class_to_id = {c: i for i, c in enumerate(class_names)}
    dicts = []
    for image_id, file_id in enumerate(_voc_split_ids(dirname, split)):
        xml_file = os.path.join(dirname, "Annotations", f"{file_id}.xml")
        tree = _parse_voc_xml(xml_file)
        file_name = os.path.join(
            dirname, "JPEGImages", tree.findtext("filename") or f"{file_id}.jpg"
        )
        try:
            height, width = int(tree.findtext("size/height")), int(tree.findtext("size/width"))
        except (TypeError, ValueError):  # no usable <size>: read it from the image header
            with Image.open(file_name) as img:
                width, height = img.size
        annotations = []
        for obj in tree.findall("object"):
            name = _object_name(obj, xml_file)
            if name not in class_to_id:
                raise ValueError(
                    f"VOC annotation {xml_file!r}: unknown class {name!r}; known: {class_names}."
                )
            try:
                box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"VOC annotation {xml_file!r}: object {name!r} has no valid <bndbox> "
                    "with xmin, ymin, xmax, ymax."
                ) from e
            box[0] -= 1.0
            box[1] -= 1.0
            annotations.append(
                {"category_id": class_to_id[name], "bbox": box, "bbox_mode": BoxMode.XYXY_ABS}
            )
        dicts.append(
            {
                "file_name": file_name,
                "image_id": image_id,
                "height": height,
                "width": width,
                "annotations": annotations,
            }
        )
    if not dicts:
        raise ValueError(f"VOC split {split!r} of {dirname!r} lists no images.")
    return dicts


def register_voc_folder(
    name: str, dirname: str, split: str, class_names: Optional[Sequence[str]] = None
) -> None:
    """Register one split of a VOC-style folder (Annotations/, ImageSets/Main/, JPEGImages/).

    ``class_names`` defaults to the object names of all its XML files, sorted. The folder layout
    is checked now (FileNotFoundError); the split's annotations when the dataset is first used.
    """
    _require_dir(dirname, "VOC folder")
    for sub in ("Annotations", "JPEGImages"):
        _require_dir(os.path.join(dirname, sub), f"VOC {sub} directory")
    _require_file(os.path.join(dirname, "ImageSets", "Main", f"{split}.txt"), "VOC split file")
    class_names = list(class_names) if class_names else infer_voc_class_names(dirname)
    if not _claim(name, ("voc", dirname, split, tuple(class_names))):
        return
    DatasetCatalog.register(name, lambda: load_voc_folder(dirname, split, class_names))
    MetadataCatalog.get(name).set(
        thing_classes=class_names, dirname=dirname, split=split, evaluator_type="coco"
    )


def register_dataset_spec(spec: str) -> str:
    """Register the dataset of one ``DATASETS.REGISTER`` entry (see module doc); return its name."""
    name, sep, rest = spec.partition("=")
    kind, _, args = rest.partition(":")
    fields = args.split(":") if args else []
    name, kind = name.strip(), kind.strip()
    if not sep or not name:
        raise ValueError(f"Dataset spec {spec!r} must look like NAME=KIND:ARGS.")
    if kind == "coco" and len(fields) == 2:
        register_coco_json(name, *fields)
    elif kind == "voc" and len(fields) in (2, 3):
        classes = fields[2].split(",") if len(fields) == 3 else None
        register_voc_folder(name, fields[0], fields[1], classes)
    else:
        raise ValueError(
            f"Cannot parse dataset spec {spec!r}. Use NAME=coco:JSON_FILE:IMAGE_ROOT or "
            "NAME=voc:VOC_DIR:SPLIT[:CLASS1,CLASS2,...]."
        )
    return name


def register_datasets(
    specs: Iterable[str] = (), names: Iterable[str] = (), synthetic_root: Optional[str] = None
) -> None:
    """Register ``specs`` (see module doc), then the synthetic splits if ``names`` mention one."""
    for spec in specs:
        register_dataset_spec(spec)
    if set(synthetic_dataset_names()) & set(names):
        register_synthetic(synthetic_root or None)


def _check_registered(names: Iterable[str], key: str) -> None:
    """ValueError naming the config key that registers datasets if one of ``names`` is not
    registered (detectron2 would answer with the list of its builtin names)."""
    missing = [name for name in names if name not in DatasetCatalog.list()]
    if missing:
        raise ValueError(
            f"Dataset {missing[0]!r} is not registered. Register it in the config's {key}, "
            "e.g. NAME=coco:JSON_FILE:IMAGE_ROOT or NAME=voc:VOC_DIR:SPLIT[:CLASS1,CLASS2,...] "
            "(detectron2's builtin datasets and the synthetic dataset need none)."
        )


def register_datasets_from_cfg(cfg: CN) -> None:
    """Register what ``DATASETS.REGISTER`` lists and the synthetic splits TRAIN / TEST name;
    ValueError for a name that is still not registered."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    register_datasets(cfg.DATASETS.REGISTER, names, cfg.DATASETS.SYNTHETIC_ROOT)
    _check_registered(names, "DATASETS.REGISTER")


def lazy_dataset_names(cfg, loader: str) -> List[str]:
    """The dataset names of a LazyConfig's ``dataloader.<loader>`` ("train" / "test"), whether
    it names them itself (``dataset_names``) or through its dataset (``dataset.names``)."""
    node = cfg.dataloader.get(loader, {})
    names = node.get("dataset_names") or node.get("dataset", {}).get("names", ())
    return [names] if isinstance(names, str) else list(names)


def register_datasets_from_lazy_cfg(cfg) -> None:
    """The LazyConfig route of :func:`register_datasets_from_cfg`: register
    ``dataloader.register`` and the synthetic splits the train / test loaders name."""
    names = lazy_dataset_names(cfg, "train") + lazy_dataset_names(cfg, "test")
    register_datasets(
        cfg.dataloader.get("register", ()), names, cfg.dataloader.get("synthetic_root", None)
    )
    _check_registered(names, "dataloader.register")
