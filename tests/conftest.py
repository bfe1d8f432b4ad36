"""Shared fixtures: the synthetic dataset (generated once) and a tiny trained SALT-Net; the
constants and plain helpers are in helpers.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from filelock import FileLock
from helpers import (
    DIST_OPTS,
    LAZY_TINY_OVERRIDES,
    QUICK_PY,
    QUICK_YAML,
    REPO_ROOT,
    TINY_OPTS,
    free_port,
)


def pytest_configure(config):
    """Under pytest-xdist (``make test``) the workers share the cores: one thread each, for
    torch in the worker and for the processes it starts."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The files that take longest (most of a minute or more of a worker, measured with
# ``--durations``), run first: pytest-xdist hands out whole files in collection order, and a long
# file handed out last would leave the other worker idle at the end.
LONGEST_FIRST = (
    "test_clusters.py",
    "test_slurm.py",
    "test_plugin_train.py",
    "test_export.py",
    "test_triton_deform.py",
    "test_demo.py",
    "test_release_parity.py",
    "test_benchmark_accuracy.py",
    "test_resume.py",
    "test_train_net.py",
    "test_backbone_conversion.py",
    "test_device_check.py",
    "test_benchmark.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


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
    # One generation when pytest-xdist's workers ask at once: the others wait, then find it.
    with FileLock(f"{root}.lock"):
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


def _run_once(tmp_path_factory, name: str, run) -> tuple:
    """``run(out_dir)`` once per session: pytest-xdist's workers share it through the folder
    above their temporary folders, under a file lock. Returns (out_dir, CompletedProcess)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out, record = shared / name, shared / f"{name}.json"
    with FileLock(f"{out}.lock"):
        if not record.exists():
            record.write_text(json.dumps(vars(run(out))))
    return out, subprocess.CompletedProcess(**json.loads(record.read_text()))


@pytest.fixture(scope="session")
def quick_train(run_tool, tmp_path_factory):
    """A 12-iteration training run of the quick-schedule config through train_net.py, once per
    session. Returns (output directory, CompletedProcess)."""

    def run(out):
        return run_tool("train_net.py", "--config-file", QUICK_YAML, *TINY_OPTS, "OUTPUT_DIR", out)

    return _run_once(tmp_path_factory, "quick_train", run)


@pytest.fixture(scope="session")
def lazy_quick_train(run_tool, tmp_path_factory):
    """The LazyConfig quick-schedule config through train_net.py (``LAZY_TINY_OVERRIDES``), once
    per session. Returns (output directory, CompletedProcess)."""

    def run(out):
        args = ["--config-file", QUICK_PY, *LAZY_TINY_OVERRIDES, f"train.output_dir={out}"]
        return run_tool("train_net.py", *args)

    return _run_once(tmp_path_factory, "lazy_quick_train", run)


@pytest.fixture(scope="session")
def two_process_train(run_tool, tmp_path_factory):
    """A training run of detectron2's launch with two CPU processes (``--num-gpus 2``, gloo,
    ``DIST_OPTS``), once per session. Returns (output directory, CompletedProcess)."""

    def run(out):
        dist_url = f"tcp://127.0.0.1:{free_port()}"
        args = ["--config-file", QUICK_YAML, "--num-gpus", "2", "--dist-url", dist_url]
        return run_tool("train_net.py", *args, *DIST_OPTS, "OUTPUT_DIR", out, timeout=600)

    return _run_once(tmp_path_factory, "two_process_train", run)
