"""Shared fixtures: the synthetic dataset (generated once) and a tiny trained SALT-Net."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.structures import Boxes, Instances

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK_YAML = "configs/quick_schedule/salt_R_18_synthetic.yaml"
# Shrinks the quick-schedule config to a few seconds of CPU: batch 2, 96 px images, no workers;
# a zero score threshold so that even an untrained model yields detections (and an AP table).
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
    "MODEL.SALTNET.SCORE_THRESH_TEST", "0.0",
]
# fmt: on


@pytest.fixture(scope="session")
def tiny_opts():
    """``KEY VALUE`` options that shrink the quick-schedule config (see ``TINY_OPTS``)."""
    return list(TINY_OPTS)


@pytest.fixture(scope="session")
def synthetic_root() -> str:
    """The synthetic dataset, generated on first use and cached (``$SALTNET_SYNTHETIC_ROOT`` or
    ``datasets/saltnet_synthetic`` of the repository)."""
    from saltnet.data.synthetic import prepare_synthetic_dataset

    root = os.environ.get("SALTNET_SYNTHETIC_ROOT") or REPO_ROOT / "datasets" / "saltnet_synthetic"
    return prepare_synthetic_dataset(str(root))


@pytest.fixture(scope="session")
def run_tool(synthetic_root):
    """Run a repository script (path relative to the repository root) in a fresh Python process.

    The process uses one torch thread (the tests share small CPUs) and the session's synthetic
    dataset. Returns the :class:`subprocess.CompletedProcess` (text output).
    """

    def run(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", SALTNET_SYNTHETIC_ROOT=synthetic_root)
        return subprocess.run(
            [sys.executable, script, *map(str, args)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def quick_train(run_tool, tmp_path_factory):
    """A 12-iteration training run of the quick-schedule config through train_net.py.

    Returns (output directory, CompletedProcess).
    """
    out = tmp_path_factory.mktemp("quick_train")
    proc = run_tool("train_net.py", "--config-file", QUICK_YAML, *TINY_OPTS, "OUTPUT_DIR", out)
    return out, proc


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
