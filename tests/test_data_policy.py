"""The training-data policy: box fix-ups and errors, unreadable and unusual images, odd sizes."""

import logging
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage
from helpers import ONE_IMAGE_OPTS, QUICK_PY, QUICK_YAML, REPO_ROOT, tiny_model
from PIL import Image

from saltnet.config.defaults import load_yaml_config
from saltnet.data.image_io import ImageReadError
from saltnet.data.loader import (
    SeededMapDataset,
    build_saltnet_train_loader,
    load_train_dataset_dicts,
)
from saltnet.data.mapper import SALTNetDatasetMapper
from saltnet.data.sanitize import check_image_files, check_num_classes, sanitize_dataset_dicts

XYWH, XYXY = BoxMode.XYWH_ABS, BoxMode.XYXY_ABS


def _ann(box, mode=XYXY, category=0, **extra):
    return dict(bbox=box, bbox_mode=mode, category_id=category, **extra)


def _record(annotations, file_name="img.jpg", width=100, height=50):
    return dict(
        file_name=file_name, width=width, height=height, image_id=1, annotations=annotations
    )


def test_box_policy_drops_and_keeps(caplog):
    record = _record(
        [
            _ann([10, 10, 20, 20]),  # kept
            _ann([-5, 40, 30, 60], id=7),  # partly outside: kept (the mapper clips it)
            _ann([90, 10, 20, 5], mode=XYWH),  # XYWH, partly outside: kept as XYXY
            _ann([30, 30, 20, 40], id=8),  # inverted x: dropped
            _ann([40, 10, 40, 30]),  # zero width: dropped
            _ann([120, 10, 130, 20]),  # outside the image: dropped
            _ann([99.5, 10, 130, 20]),  # 0.5 px inside the image: dropped
            _ann([30, 30, 20, 40], iscrowd=1),  # crowd: kept as is
        ]
    )
    original = [dict(a) for a in record["annotations"]]
    with caplog.at_level(logging.WARNING, logger="saltnet.data.sanitize"):
        (out,) = sanitize_dataset_dicts([record], num_classes=2, dataset_name="toy")
    boxes = [a["bbox"] for a in out["annotations"]]
    assert boxes == [[10, 10, 20, 20], [-5, 40, 30, 60], [90, 10, 110, 15], [30, 30, 20, 40]]
    assert all(a["bbox_mode"] == XYXY for a in out["annotations"])
    assert record["annotations"] == original  # the input is not modified
    text = caplog.text
    assert "dropped 1 boxes with inverted corners, e.g. annotation id 8 of image 'img.jpg'" in text
    assert "dropped 3 boxes narrower or lower than 1.0 px inside the image" in text


@pytest.mark.parametrize(
    "annotation, message",
    [
        (_ann([1, 2, 3, 4], category=5, id=3), r"annotation id 3 .*category_id=5.*0\.\.1"),
        (_ann([1, 2, 3, 4], category=-1), r"annotation #0 .*category_id=-1"),
        (_ann([1, 2, 3, 4], category="cat"), "category_id='cat'"),
        (_ann([1, 2, float("nan"), 4], id=4), "annotation id 4 .*malformed bbox"),
        (_ann([1, 2, 3]), "malformed bbox"),
        (_ann(None, id=5), "annotation id 5 .*malformed bbox None"),
        (_ann([1, "two", 3, 4]), "malformed bbox"),
    ],
)
def test_bad_annotations_stop_with_file_and_annotation(annotation, message):
    with pytest.raises(ValueError, match=message) as info:
        sanitize_dataset_dicts([_record([annotation], file_name="bad.jpg")], num_classes=2)
    assert "bad.jpg" in str(info.value)


def test_missing_image_files_are_listed(tmp_path):
    present = tmp_path / "a.jpg"
    present.write_bytes(b"")
    dicts = [{"file_name": str(present)}] + [{"file_name": f"gone{i}.jpg"} for i in range(7)]
    with pytest.raises(FileNotFoundError, match="7 of 8 image files") as info:
        check_image_files(dicts, "toy")
    assert "gone0.jpg" in str(info.value) and "... and 2 more" in str(info.value)


def _register(dicts, classes=("a", "b")):
    name = f"policy_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(classes))
    return name


def _write_image(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return str(path)


def test_empty_or_boxless_datasets_stop_early(tmp_path):
    with pytest.raises(ValueError, match="has no images"):
        load_train_dataset_dicts(_register([]))
    image = _write_image(tmp_path / "x.png", np.zeros((20, 30, 3), np.uint8))
    degenerate = _record([_ann([5, 5, 5, 9])], file_name=image, width=30, height=20)
    name = _register([degenerate])
    with pytest.raises(ValueError, match="no image with a usable box"):
        load_train_dataset_dicts(name)
    kept = load_train_dataset_dicts(name, filter_empty=False)
    assert kept[0]["annotations"] == []
    with pytest.raises(KeyError, match="not registered"):
        load_train_dataset_dicts("no_such_dataset")


def test_category_ids_are_checked_against_the_datasets_classes(tmp_path):
    image = _write_image(tmp_path / "x.png", np.zeros((20, 30, 3), np.uint8))
    record = _record([_ann([5, 5, 15, 15], category=2, id=9)], file_name=image, width=30, height=20)
    with pytest.raises(ValueError, match=r"annotation id 9 .*category_id=2.*2 classes"):
        load_train_dataset_dicts(_register([record], classes=("a", "b")))
    assert load_train_dataset_dicts(_register([record], classes=("a", "b", "c")))
    name = f"policy_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [record])  # no thing_classes
    with pytest.raises(ValueError, match=f"{name}.* no thing_classes"):
        load_train_dataset_dicts(name)


def test_dataset_with_more_classes_than_model():
    name = _register([], classes=("a", "b", "c"))
    with pytest.raises(ValueError) as info:
        check_num_classes(2, name)
    message = str(info.value)
    assert f"Dataset {name!r} has 3 classes ['a', 'b', 'c'] but the model has 2" in message
    assert "(MODEL.SALTNET.NUM_CLASSES, model.num_classes); set it to 3" in message
    # Another detector's key (RetinaNet with SALT, trained from YAML) is the one named.
    with pytest.raises(ValueError, match=r"has 2 \(MODEL.RETINANET.NUM_CLASSES\); set it to 3"):
        check_num_classes(2, name, "MODEL.RETINANET.NUM_CLASSES")


def test_dataset_with_fewer_classes_warns(caplog):
    name = _register([], classes=("a", "b", "c"))
    with caplog.at_level(logging.WARNING, logger="saltnet.data.sanitize"):
        check_num_classes(5, [name])
    assert f"Dataset {name!r} has 3 classes but the model has 5" in caplog.text
    caplog.clear()
    without_classes = f"policy_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(without_classes, lambda: [])
    with caplog.at_level(logging.WARNING, logger="saltnet.data.sanitize"):
        check_num_classes(3, [name, without_classes])  # no thing_classes: skipped
    assert caplog.text == ""


@pytest.mark.parametrize(
    "config, key",
    [
        ("configs/quick_schedule/salt_R_18_synthetic.yaml", "MODEL.SALTNET.NUM_CLASSES"),
        (
            "configs/quick_schedule/retinanet_salt_R_18_synthetic.yaml",
            "MODEL.RETINANET.NUM_CLASSES",
        ),
    ],
)
def test_yaml_training_loader_checks_the_models_class_count(synthetic_root, config, key):
    opts = ["DATASETS.SYNTHETIC_ROOT", synthetic_root, "DATALOADER.NUM_WORKERS", "0", key, "2"]
    cfg = load_yaml_config(str(REPO_ROOT / config), opts)
    with pytest.raises(ValueError, match=rf"has 4 classes .* model has 2 \({key}\); set it to 4"):
        build_saltnet_train_loader(cfg)


def test_lazy_training_loader_checks_the_models_class_count(synthetic_root):
    cfg = LazyConfig.load(str(REPO_ROOT / QUICK_PY))
    cfg.dataloader.synthetic_root, cfg.dataloader.train.num_workers = synthetic_root, 0
    cfg.model.num_classes = 3
    with pytest.raises(ValueError, match=r"has 4 classes .* model has 3 \(model.num_classes\)"):
        instantiate(cfg.dataloader.train)


def test_datasets_with_different_classes():
    first, second = _register([], classes=("a", "b")), _register([], classes=("a", "c"))
    with pytest.raises(ValueError) as info:
        check_num_classes(80, [first, second])
    assert f"{first!r} has 2 ['a', 'b'] but {second!r} has 2 ['a', 'c']" in str(info.value)


@pytest.fixture(scope="module")
def mapper():
    opts = ["INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "64"]
    return SALTNetDatasetMapper(load_yaml_config(QUICK_YAML, opts), is_train=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (np.full((40, 60), 128, np.uint8), "L"),
        lambda: (np.full((40, 60, 4), 200, np.uint8), "RGBA"),
        lambda: (np.full((40, 60), 40000, np.uint16), None),  # 16-bit greyscale PNG
    ],
    ids=["greyscale", "rgba", "16bit"],
)
def test_unusual_images_become_8bit_colour(mapper, tmp_path, make):
    array, mode = make()
    path = _write_image(tmp_path / "img.png", array, mode)
    out = mapper(_record([_ann([10, 10, 30, 30])], file_name=path, width=60, height=40))
    image = out["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 48)
    expected = 40000 / 257 if array.dtype == np.uint16 else array.reshape(40, 60, -1)[0, 0, 0]
    assert image.float().mean().item() == pytest.approx(expected, abs=1)
    assert len(out["instances"]) == 1


def test_unreadable_training_images_are_skipped_with_a_warning(mapper, tmp_path, caplog):
    good = _write_image(tmp_path / "good.png", np.full((40, 60, 3), 9, np.uint8))
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    dicts = [
        _record([_ann([1, 1, 9, 9])], file_name=str(truncated), width=64, height=64),
        _record([_ann([1, 1, 9, 9])], file_name=good, width=60, height=40),
    ]
    dataset = SeededMapDataset(dicts, mapper, max_skips=1)
    with caplog.at_level(logging.WARNING, logger="saltnet.data.loader"):
        out = dataset[(0, 123)]
    assert out["file_name"] == good
    assert "truncated.jpg" in caplog.text
    with pytest.raises(RuntimeError, match="2 images in a row could not be read"):
        SeededMapDataset(dicts[:1], mapper, max_skips=1)[(0, 1)]


def _broken_and_good(tmp_path):
    """Records: truncated JPEG, good, not-an-image PNG, good (64 x 64)."""
    good = _write_image(tmp_path / "good.png", np.full((64, 64, 3), 9, np.uint8))
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    files = [str(truncated), good, str(garbage), good]
    return [_record([_ann([1, 1, 9, 9])], file_name=f, width=64, height=64) for f in files]


def test_unreadable_training_images_are_reported_once_per_file(mapper, tmp_path, caplog):
    dicts = _broken_and_good(tmp_path)
    dataset = SeededMapDataset(dicts, mapper, max_skips=1)
    with caplog.at_level(logging.WARNING, logger="saltnet.data.loader"):
        for epoch in range(6):  # the sampler returns to every image 6 times
            for index in range(4):
                assert dataset[(index, epoch)]["file_name"].endswith("good.png")
    # The loader's own records: whether detectron2's INFO records reach caplog depends on which
    # tests set up its loggers before.
    messages = [r.getMessage() for r in caplog.records if r.name == "saltnet.data.loader"]
    bad = [dicts[0]["file_name"], dicts[2]["file_name"]]
    for file_name in bad:
        assert sum(m.startswith("Skipping") and file_name in m for m in messages) == 1, messages
    # 2 skips per epoch: one summary, after the 10th.
    summary = f"2 unreadable training image(s) skipped 10 time(s) so far: {', '.join(bad)}"
    assert [m for m in messages if not m.startswith("Skipping")] == [summary]
    assert dataset.unreadable_files() == bad
    assert "skipped 12 time(s)" in dataset.unreadable_summary()


def test_unreadable_images_are_recorded_across_loader_workers(mapper, tmp_path):
    dicts = _broken_and_good(tmp_path)
    dataset = SeededMapDataset(dicts, mapper, max_skips=1)
    keys = [(index, 0) for index in range(4)] * 3
    loader = torch.utils.data.DataLoader(
        dataset, sampler=keys, batch_size=None, num_workers=2, collate_fn=lambda x: x
    )
    assert len(list(loader)) == 12
    # Recorded by the workers, read by this process.
    assert dataset.unreadable_files() == [dicts[0]["file_name"], dicts[2]["file_name"]]
    assert "skipped 6 time(s)" in dataset.unreadable_summary()


def test_unreadable_image_at_evaluation_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_text("not an image")
    mapper = SALTNetDatasetMapper(load_yaml_config(QUICK_YAML), is_train=False)
    with pytest.raises(ImageReadError, match="broken.png"):
        mapper(_record([], file_name=str(path)))


def test_augmentation_depends_only_on_the_sample_seed(mapper, tmp_path):
    array = np.zeros((40, 60, 3), np.uint8)
    array[:, :10] = 255  # left edge bright: a flip moves it
    path = _write_image(tmp_path / "edge.png", array)
    dataset = SeededMapDataset([_record([_ann([0, 0, 10, 40])], path, 60, 40)], mapper)
    flips = {seed: dataset[(0, seed)]["image"][0, 0, 0].item() for seed in range(12)}
    np.random.seed(0)  # the global RNG does not matter, and is left as it was
    state = np.random.get_state()[1].copy()
    assert {s: dataset[(0, s)]["image"][0, 0, 0].item() for s in range(12)} == flips
    assert np.array_equal(np.random.get_state()[1], state)
    assert len(set(flips.values())) == 2  # both flipped and unflipped samples occur


@pytest.fixture(scope="module")
def tiny_saltnet():
    # FrozenBN (the tiny model's), as in the paper's configs: trainable BN cannot normalise the
    # 1 x 1 res5 map of a lone 16 x 16 image (the training mapper resizes such images to
    # INPUT.MIN_SIZE_TRAIN anyway).
    return tiny_model(*ONE_IMAGE_OPTS)


def _instances(boxes, size):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.int64)
    return inst


def _random_boxes(n, h, w, generator):
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w - 8.0, h - 8.0])
    wh = 2 + torch.rand(n, 2, generator=generator) * torch.tensor([w / 4, h / 4])
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], dim=1).tolist()


@pytest.mark.parametrize(
    "h, w, num_boxes",
    [(16, 16, 1), (50, 2000, 5), (2000, 50, 5), (128, 128, 1000), (64, 64, 0)],
    ids=["16x16", "50x2000", "2000x50", "1000-boxes", "no-boxes"],
)
def test_training_step_on_odd_images_has_finite_losses_and_gradients(tiny_saltnet, h, w, num_boxes):
    generator = torch.Generator().manual_seed(h * w + num_boxes)
    image = torch.randint(0, 255, (3, h, w), generator=generator, dtype=torch.uint8)
    boxes = _random_boxes(num_boxes, h, w, generator) if num_boxes > 1 else [[2, 2, 14, 14]]
    boxes = boxes[:num_boxes]
    tiny_saltnet.zero_grad()
    with EventStorage():
        losses = tiny_saltnet([{"image": image, "instances": _instances(boxes, (h, w))}])
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    grads = [p.grad for p in tiny_saltnet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_other_training_samplers_are_refused_not_ignored():
    cfg = load_yaml_config(QUICK_YAML, ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"])
    with pytest.raises(ValueError, match="SAMPLER_TRAIN is 'RepeatFactorTrainingSampler'"):
        build_saltnet_train_loader(cfg)
