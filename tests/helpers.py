"""Constants and plain helpers the test files share (fixtures live in conftest.py)."""

import importlib.util
import json
import math
import re
import socket
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from saltnet.config import get_saltnet_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK_YAML = "configs/quick_schedule/salt_R_18_synthetic.yaml"
QUICK_PY = "configs/quick_schedule/salt_R_18_synthetic.py"
# Evaluation on the synthetic dataset's 16-image validation subset, for YAML and LazyConfigs.
YAML_VAL_16 = ["DATASETS.TEST", "('saltnet_synth_val_16',)"]
LAZY_VAL_16 = "dataloader.test.dataset.names=saltnet_synth_val_16"
# Shrinks the quick-schedule config to a few seconds of CPU: batch 2, 96 px images, no workers,
# evaluation on the 16-image validation subset; a zero score threshold so that even an untrained
# model yields detections (and an AP table).
# fmt: off
TINY_OPTS = [
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "12",
    "SOLVER.STEPS", "(8,)",
    "SOLVER.WARMUP_ITERS", "4",
    "SOLVER.CHECKPOINT_PERIOD", "6",
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "96",
    "DATALOADER.NUM_WORKERS", "0",
    *YAML_VAL_16,
    "MODEL.SALTNET.SCORE_THRESH_TEST", "0.0",
]
# fmt: on
# Shrinks a LazyConfig quick-schedule config (conftest's ``lazy_quick_train``; later overrides
# win): 8 iterations of 2 images, a checkpoint after iteration 3, no data workers; detections at
# any score (an AP table even from an untrained model) on the 16-image validation subset.
LAZY_TINY_OVERRIDES = [
    "train.max_iter=8",
    "train.log_period=2",
    "train.checkpointer.period=4",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    LAZY_VAL_16,
    "model.test_score_thresh=0.0",
]
# The tests' small models: ResNet-18 and a TINY_CHANNELS-channel FPN on res3-res5 (SALT-Net's
# P3-P7, or detectron2's RetinaNet's), on the CPU, with TINY_NUM_CLASSES classes.
TINY_CHANNELS = 32
TINY_NUM_CLASSES = 3
# fmt: off
TINY_BACKBONE_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']",
    "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']",
    "MODEL.FPN.OUT_CHANNELS", str(TINY_CHANNELS),
]
# fmt: on
# For a tiny model trained on one small image at a time: the head's GroupNorm (32 groups) needs
# more than one value per group on the 1 x 1 top level, so 64 channels.
ONE_IMAGE_OPTS = ["MODEL.FPN.OUT_CHANNELS", "64"]
# Two workers, 4 iterations, a fixed seed, evaluation at the end (the two-process runs).
DIST_OPTS = TINY_OPTS + ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100", "SEED", "3"]


def tiny_cfg(*opts):
    """A small SALT-Net YAML config (the tiny backbone, detectron2's FrozenBN, TINY_NUM_CLASSES
    classes); ``opts`` (key, value, ...) override it."""
    cfg = get_saltnet_cfg()
    # fmt: off
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "SALTNet",
        "MODEL.BACKBONE.NAME", "build_saltnet_resnet_fpn_backbone",
        *TINY_BACKBONE_OPTS,
        "MODEL.SALTNET.NUM_CLASSES", str(TINY_NUM_CLASSES),
        *opts,
    ])
    # fmt: on
    return cfg


def tiny_model(*opts, seed: int = 0):
    """The model of ``tiny_cfg(*opts)``, built from torch seed ``seed`` (the same weights every
    call), in training mode."""
    cfg = tiny_cfg(*opts)
    torch.manual_seed(seed)
    return build_model(cfg).train()


def metrics_records(out_dir) -> list:
    """The records of detectron2's metrics.json in ``out_dir`` (training and evaluation)."""
    with open(Path(out_dir) / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def copypaste_ap(text: str) -> str:
    """The values of detectron2's ``copypaste: AP,AP50,...`` line (e.g. "1.0,2.5,0.3,0,1.0,nan")."""
    match = re.search(r"copypaste: AP,AP50,AP75,APs,APm,APl\n.*copypaste: ([-\d.,na]+)", text)
    assert match, "no AP table in the output"
    return match.group(1)


def assert_trained_and_evaluated(out_dir, loss_names) -> None:
    """metrics.json in ``out_dir`` holds finite ``total_loss`` and ``loss_names`` at every logged
    iteration, and a final evaluation whose bbox AP and AP50 are numbers in [0, 100]."""
    records = metrics_records(out_dir)
    training = [r for r in records if "total_loss" in r]
    assert training, "no training records in metrics.json"
    for record in training:
        for name in ("total_loss", *loss_names):
            assert math.isfinite(record[name]), (name, record)
    evaluations = [r for r in records if "bbox/AP" in r]
    assert evaluations, "no evaluation in metrics.json"
    for key in ("bbox/AP", "bbox/AP50"):
        assert 0 <= evaluations[-1][key] <= 100, (key, evaluations[-1])


def final_weights(out_dir) -> dict:
    """The model state dict of ``out_dir/model_final.pth`` (a training run's last checkpoint)."""
    return torch.load(Path(out_dir) / "model_final.pth", weights_only=False)["model"]


def differing_keys(a: dict, b: dict) -> list:
    """The keys of state dict ``a`` whose tensors are not bit for bit those of ``b``."""
    return [k for k in a if not torch.equal(a[k], b[k])]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_image_batch():
    """Model inputs: two 64 x 64 training images, one with two boxes, one without any."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for boxes in ([[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]], []):
        instances = Instances((64, 64))
        instances.gt_boxes = Boxes(torch.tensor(boxes).reshape(-1, 4))
        instances.gt_classes = torch.arange(len(boxes))
        image = torch.randint(0, 255, (3, 64, 64), generator=generator, dtype=torch.uint8)
        inputs.append({"image": image, "instances": instances})
    return inputs


def load_script(relative_path: str):
    """The module of one of the repository's scripts (``train_net.py``, ``tools/*.py``,
    ``demo/*.py``), imported from its file without running its ``__main__`` block."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def usage_error(capsys, function, *args) -> str:
    """The standard error of ``function(*args)``, which must end in argparse's usage error (the
    usage first, exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        function(*args)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("usage: "), stderr
    return stderr
