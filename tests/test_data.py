"""Dataset registration (COCO json, VOC folders, DATASETS.REGISTER) and the synthetic dataset."""

import filecmp
import json
import os
import subprocess
import sys
import uuid

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from helpers import QUICK_YAML, REPO_ROOT

from saltnet.data import (
    SYNTHETIC_CLASSES,
    register_coco_json,
    register_dataset_spec,
    register_synthetic,
    register_voc_folder,
    synthetic,
)
from saltnet.data.loader import load_train_dataset_dicts


def _name(prefix: str) -> str:
    """A dataset name not used before in this process (the catalogs are global)."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _write_image(path, size=(64, 80)):
    img = np.full((*size, 3), 90, np.uint8)
    cv2.rectangle(img, (10, 12), (40, 50), (20, 200, 60), -1)
    cv2.imwrite(str(path), img)


@pytest.fixture
def coco_dir(tmp_path):
    """A COCO dataset of 3 images, categories with non-contiguous ids 1 ("cat") and 3 ("dog")."""
    (tmp_path / "images").mkdir()
    images, annotations = [], []
    for i in range(3):
        _write_image(tmp_path / "images" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 80})
        annotations.append(
            {
                "id": i + 1,
                "image_id": i,
                "category_id": 1 if i else 3,
                "bbox": [10, 12, 30, 38],
                "area": 1140,
                "iscrowd": 0,
            }
        )
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path


VOC_XML = """<annotation>
  <filename>{file_id}.jpg</filename>
  <size><width>80</width><height>64</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><difficult>0</difficult>
  <bndbox><xmin>11</xmin><ymin>13</ymin><xmax>41</xmax><ymax>51</ymax></bndbox></object>"""


def _write_voc_xml(voc, file_id, names):
    objects = "".join(VOC_OBJECT.format(name=n) for n in names)
    (voc / "Annotations" / f"{file_id}.xml").write_text(
        VOC_XML.format(file_id=file_id, objects=objects)
    )


@pytest.fixture
def voc_dir(tmp_path):
    """A VOC folder: train = 000001 (dog), 000002 (cat, dog); val = 000003 (cat)."""
    voc = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for file_id, names in (("000001", ["dog"]), ("000002", ["cat", "dog"]), ("000003", ["cat"])):
        _write_voc_xml(voc, file_id, names)
        _write_image(voc / "JPEGImages" / f"{file_id}.jpg")
    (voc / "ImageSets/Main/train.txt").write_text("000001\n000002\n")
    (voc / "ImageSets/Main/val.txt").write_text("000003\n")
    return voc


def test_coco_json_registration_loads_and_maps_categories(coco_dir):
    name = _name("coco")
    register_coco_json(name, str(coco_dir / "ann.json"), str(coco_dir / "images"))
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 3
    assert [d["annotations"][0]["category_id"] for d in dicts] == [1, 0, 0]  # ids 3, 1, 1
    assert dicts[0]["annotations"][0]["bbox"] == [10, 12, 30, 38]
    assert dicts[0]["file_name"] == str(coco_dir / "images" / "0.jpg")
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == ["cat", "dog"]
    # Registering the same again is a no-op; the same name for other files is an error.
    register_coco_json(name, str(coco_dir / "ann.json"), str(coco_dir / "images"))
    with pytest.raises(ValueError, match="already registered"):
        register_coco_json(name, str(coco_dir / "ann.json"), str(coco_dir))


def test_coco_json_missing_files_are_named(coco_dir):
    missing = coco_dir / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        register_coco_json(_name("coco"), str(missing), str(coco_dir / "images"))
    with pytest.raises(FileNotFoundError, match="no_images"):
        register_coco_json(_name("coco"), str(coco_dir / "ann.json"), str(coco_dir / "no_images"))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d["annotations"][1].update(category_id=7), "category_id=7"),
        (lambda d: d["annotations"][1].pop("category_id"), "category_id"),
        (lambda d: d.update(images=[], annotations=[]), "lists no images"),
    ],
)
def test_coco_json_malformed_annotations_are_clear_errors(coco_dir, corrupt, message):
    data = json.loads((coco_dir / "ann.json").read_text())
    corrupt(data)
    (coco_dir / "bad.json").write_text(json.dumps(data))
    name = _name("coco_bad")
    register_coco_json(name, str(coco_dir / "bad.json"), str(coco_dir / "images"))
    with pytest.raises(ValueError, match=message) as info:
        DatasetCatalog.get(name)
    assert "bad.json" in str(info.value)


@pytest.mark.parametrize("corrupt", [lambda a: a.pop("bbox"), lambda a: a.update(bbox=[1, 2, 3])])
def test_coco_json_malformed_boxes_stop_before_training(coco_dir, corrupt):
    data = json.loads((coco_dir / "ann.json").read_text())
    corrupt(data["annotations"][1])
    (coco_dir / "bad.json").write_text(json.dumps(data))
    name = _name("coco_bad")
    register_coco_json(name, str(coco_dir / "bad.json"), str(coco_dir / "images"))
    with pytest.raises(ValueError, match="malformed bbox"):
        load_train_dataset_dicts(name)


def test_coco_json_invalid_json(coco_dir):
    (coco_dir / "bad.json").write_text("{not json")
    name = _name("coco_bad")
    register_coco_json(name, str(coco_dir / "bad.json"), str(coco_dir / "images"))
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        DatasetCatalog.get(name)


def test_voc_folder_registration_infers_classes_over_all_splits(voc_dir):
    train, val = _name("voc_train"), _name("voc_val")
    register_voc_folder(train, str(voc_dir), "train")
    register_voc_folder(val, str(voc_dir), "val")
    # val has only cats, but both splits share the classes found in all annotations.
    assert MetadataCatalog.get(train).thing_classes == ["cat", "dog"]
    assert MetadataCatalog.get(val).thing_classes == ["cat", "dog"]
    assert MetadataCatalog.get(val).evaluator_type == "coco"
    dicts = DatasetCatalog.get(train)
    assert [d["image_id"] for d in dicts] == [0, 1]
    assert dicts[0]["file_name"] == str(voc_dir / "JPEGImages" / "000001.jpg")
    assert (dicts[0]["height"], dicts[0]["width"]) == (64, 80)
    assert [a["category_id"] for a in dicts[1]["annotations"]] == [0, 1]
    obj = dicts[0]["annotations"][0]
    assert obj["bbox_mode"] == BoxMode.XYXY_ABS
    assert obj["bbox"] == [10.0, 12.0, 41.0, 51.0]  # 1-based xmin / ymin shifted as detectron2


def test_voc_folder_unknown_class_name(voc_dir):
    name = _name("voc")
    register_voc_folder(name, str(voc_dir), "train", class_names=["cat"])
    assert MetadataCatalog.get(name).thing_classes == ["cat"]
    with pytest.raises(ValueError, match="000001.xml.*unknown class 'dog'"):
        DatasetCatalog.get(name)


def test_voc_folder_missing_parts_are_named(voc_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_voc"):
        register_voc_folder(_name("voc"), str(tmp_path / "no_voc"), "train")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        register_voc_folder(_name("voc"), str(voc_dir), "test")
    os.remove(voc_dir / "JPEGImages" / "000002.jpg")
    name = _name("voc")
    register_voc_folder(name, str(voc_dir), "train", class_names=["cat", "dog"])
    with pytest.raises(FileNotFoundError, match="000002.jpg"):
        load_train_dataset_dicts(name)


def test_voc_folder_malformed_annotations(voc_dir):
    (voc_dir / "Annotations" / "000002.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="000002.xml.*not valid XML"):
        register_voc_folder(_name("voc"), str(voc_dir), "train")  # while inferring classes

    (voc_dir / "Annotations" / "000002.xml").write_text(
        VOC_XML.format(file_id="000002", objects="<object><name>cat</name></object>")
    )
    name = _name("voc")
    register_voc_folder(name, str(voc_dir), "train")
    with pytest.raises(ValueError, match="000002.xml.*no valid <bndbox>"):
        DatasetCatalog.get(name)


def test_voc_folder_empty_split(voc_dir):
    (voc_dir / "ImageSets/Main/empty.txt").write_text("\n")
    name = _name("voc")
    register_voc_folder(name, str(voc_dir), "empty")
    with pytest.raises(ValueError, match="lists no images"):
        DatasetCatalog.get(name)


def test_dataset_specs(coco_dir, voc_dir):
    name = register_dataset_spec(f"{_name('s')}=coco:{coco_dir / 'ann.json'}:{coco_dir / 'images'}")
    assert len(DatasetCatalog.get(name)) == 3
    name = register_dataset_spec(f"{_name('s')}=voc:{voc_dir}:val:dog,cat")
    assert MetadataCatalog.get(name).thing_classes == ["dog", "cat"]
    for bad in ("no_equals_sign", "x=coco:only_one_field", "x=parquet:a:b", "=coco:a:b"):
        with pytest.raises(ValueError, match="spec"):
            register_dataset_spec(bad)


@pytest.mark.slow
def test_register_from_the_command_line_and_train(coco_dir, voc_dir, run_tool, tiny_opts, tmp_path):
    specs = [
        f"cli_coco=coco:{coco_dir / 'ann.json'}:{coco_dir / 'images'}",
        f"cli_voc=voc:{voc_dir}:val",
    ]
    proc = run_tool(
        "train_net.py",
        "--config-file",
        QUICK_YAML,
        *tiny_opts,
        "DATASETS.REGISTER",
        repr(specs),
        "DATASETS.TRAIN",
        "('cli_coco',)",
        "DATASETS.TEST",
        "('cli_voc',)",
        "MODEL.SALTNET.NUM_CLASSES",
        "2",
        "SOLVER.MAX_ITER",
        "2",
        "OUTPUT_DIR",
        tmp_path / "out",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Evaluation results for bbox" in proc.stdout
    assert "cli_voc" in proc.stdout
    assert (tmp_path / "out" / "model_final.pth").is_file()


@pytest.mark.slow
def test_command_line_registration_of_a_missing_file_fails_clearly(run_tool, tmp_path):
    missing = tmp_path / "missing.json"
    proc = run_tool(
        "train_net.py",
        "--config-file",
        QUICK_YAML,
        "DATASETS.REGISTER",
        repr([f"x=coco:{missing}:{tmp_path}"]),
        "DATASETS.TRAIN",
        "('x',)",
        "OUTPUT_DIR",
        tmp_path / "out",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # a usage error, before any worker
    assert f"error: COCO annotation file '{missing}' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# A fresh process that imports neither train_net.py nor saltnet's registration helpers, as
# detectron2's tools/lazyconfig_train_net.py (or analyze_model.py, benchmark.py) would.
_LAZY_TOOL = """
import sys
from detectron2.config import LazyConfig, instantiate
cfg = LazyConfig.load("configs/quick_schedule/salt_R_18_synthetic.py")
cfg.dataloader.train.num_workers = 0
batch = next(iter(instantiate(cfg.dataloader.train)))
assert len(batch) == cfg.dataloader.train.total_batch_size, len(batch)
assert len(batch[0]["instances"]) > 0 and batch[0]["image"].shape[0] == 3
test = instantiate(cfg.dataloader.test)
assert len(test) == 80, len(test)  # saltnet_synth_val
assert "train_net" not in sys.modules
print("ok")
"""


def test_lazy_config_loaders_register_their_datasets_in_a_fresh_process(synthetic_root):
    env = dict(os.environ, OMP_NUM_THREADS="1", SALTNET_SYNTHETIC_ROOT=synthetic_root)
    proc = subprocess.run(
        [sys.executable, "-c", _LAZY_TOOL],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_synthetic_dataset_content(synthetic_root):
    names = register_synthetic(synthetic_root)
    assert names == ["saltnet_synth_train", "saltnet_synth_val", "saltnet_synth_val_16"]
    for name, split in zip(names, ("train", "val")):
        num_images = synthetic.SYNTHETIC_SPLITS[split][0]
        assert MetadataCatalog.get(name).thing_classes == list(SYNTHETIC_CLASSES)
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == num_images
        boxes = np.array([a["bbox"] for d in dicts for a in d["annotations"]], dtype=float)
        classes = {a["category_id"] for d in dicts for a in d["annotations"]}
        assert classes == set(range(len(SYNTHETIC_CLASSES)))
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 128).all()
        assert boxes[:, 2:].min() >= 4 and boxes[:, 2:].max() >= 60  # varied sizes
        aspect = boxes[:, 2] / boxes[:, 3]
        assert aspect.min() < 0.3 and aspect.max() > 3  # bars in both orientations
        assert all(1 <= len(d["annotations"]) <= 5 for d in dicts)
    image = cv2.imread(DatasetCatalog.get(names[1])[0]["file_name"])
    assert image.shape == (128, 128, 3)
    # The smoke-run subset: the first 16 validation images with all their boxes, evaluated
    # against its own json.
    val, val_16 = DatasetCatalog.get(names[1]), DatasetCatalog.get(names[2])
    assert val_16 == val[:16]
    assert MetadataCatalog.get(names[2]).json_file.endswith("val_16.json")
    assert MetadataCatalog.get(names[2]).thing_classes == list(SYNTHETIC_CLASSES)


def test_synthetic_generation_is_deterministic_atomic_and_repairs(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "SYNTHETIC_SPLITS", {"train": (6, 11), "val": (3, 12)})
    a = synthetic.prepare_synthetic_dataset(str(tmp_path / "a"))
    b = synthetic.prepare_synthetic_dataset(str(tmp_path / "b"))
    files = ["manifest.json", "annotations/train.json", "annotations/val.json"]
    files += ["annotations/val_16.json"]
    files += [f"train/{i:06d}.png" for i in range(6)] + [f"val/{i:06d}.png" for i in range(3)]
    assert filecmp.cmpfiles(a, b, files, shallow=False)[0] == files
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temporary folders left behind

    # Cached: a second call generates nothing. Incomplete: it is regenerated.
    mtime = os.path.getmtime(os.path.join(a, "manifest.json"))
    assert synthetic.prepare_synthetic_dataset(a) == a
    assert os.path.getmtime(os.path.join(a, "manifest.json")) == mtime
    os.remove(os.path.join(a, "val", "000001.png"))
    synthetic.prepare_synthetic_dataset(a)
    assert filecmp.cmpfiles(a, b, files, shallow=False)[0] == files
