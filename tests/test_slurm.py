"""Training on a real two-node Slurm cluster (tests/slurm_cluster.py), started once for this
file: tools/slurm/train.sbatch across two nodes, preemption by a higher-priority partition,
an interactive step. The cluster needs root and Debian's slurm-wlm and munge; without them the
tests skip, except under CI=true, where they fail."""

import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch
from helpers import DIST_OPTS, QUICK_YAML, REPO_ROOT
from slurm_cluster import NODES, SlurmCluster, unavailable_reason

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on the CPU")

SBATCH = "tools/slurm/train.sbatch"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, synthetic_root):
    """The running cluster; jobs submitted through :meth:`submit` see the synthetic dataset and
    train with one torch thread."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but no Slurm cluster can start here: {reason}")
        pytest.skip(f"no Slurm cluster: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    cluster.env.update(
        OMP_NUM_THREADS="1", SALTNET_SYNTHETIC_ROOT=synthetic_root, PYTHON=sys.executable
    )
    yield cluster
    cluster.stop()


def _sbatch(slurm, out_dir, *args):
    """Submit train.sbatch (``args``: sbatch options, then ``--``, then train_net.py's); returns
    the job id and its output file."""
    split = args.index("--")
    log = out_dir / "slurm.out"
    options, train_args = args[:split], args[split + 1 :]
    proc = slurm.run(
        "sbatch", "--parsable", f"--output={log}", *options, SBATCH, *map(str, train_args),
        cwd=REPO_ROOT,
    )  # fmt: skip
    return proc.stdout.strip(), log


def _final_weights(out_dir):
    return torch.load(out_dir / "model_final.pth", weights_only=False)["model"]


def _differing(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


def _wait_for(path, pattern, timeout=180):
    deadline = time.monotonic() + timeout
    while not (path.exists() and re.search(pattern, path.read_text())):
        assert time.monotonic() < deadline, path.read_text()[-3000:] if path.exists() else path
        time.sleep(0.2)


@pytest.fixture(scope="module")
def spawned_run(two_process_train):
    out, proc = two_process_train
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return _final_weights(out)


def test_sbatch_on_two_nodes_trains_as_two_processes_on_one_machine(slurm, spawned_run, tmp_path):
    job, log = _sbatch(
        slurm, tmp_path, "--nodes=2", "--ntasks-per-node=1", "--",
        "--config-file", QUICK_YAML, *DIST_OPTS, "OUTPUT_DIR", tmp_path / "out",
    )  # fmt: skip
    fields = slurm.wait_job(job)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-4000:]
    assert fields["NodeList"] == "saltnet-n[1-2]"
    assert "World size: 2" in text and "World size: 1" not in text
    assert _differing(_final_weights(tmp_path / "out"), spawned_run) == []


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm, synthetic_root, tmp_path):
    # Data-loader workers (which Slurm's SIGTERM reaches too), 12 iterations; the same run
    # spawned on this machine at the same time gives the weights to compare with.
    opts = [*DIST_OPTS, "SOLVER.MAX_ITER", "12", "DATALOADER.NUM_WORKERS", "1"]
    opts += ["DATASETS.TEST", "()"]
    reference = subprocess.Popen(
        [sys.executable, "train_net.py", "--config-file", QUICK_YAML, "--num-gpus", "2"]
        + [*opts, "OUTPUT_DIR", str(tmp_path / "reference")],
        cwd=REPO_ROOT,
        env=dict(slurm.env, SLURM_CONF="/nonexistent"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    job, log = _sbatch(
        slurm, tmp_path, "--partition=low", "--nodes=2", "--ntasks-per-node=1", "--",
        "--config-file", QUICK_YAML, *opts, "OUTPUT_DIR", tmp_path / "out",
    )  # fmt: skip
    _wait_for(log, r"Starting training from iteration 0")
    slurm.run("sbatch", "--partition=high", f"--nodelist={NODES[0]}", "--output=/dev/null",
              "--wrap=true")  # fmt: skip
    # The controller looks for jobs to preempt on its own schedule; an update makes it look now.
    slurm.run("scontrol", "update", "PartitionName=high", "State=UP")
    # Within the partition's GraceTime the job requeues itself; it starts again once the
    # credentials of its first run have expired (AuthInfo cred_expire, 5 s here).
    fields = slurm.wait_job(job)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-4000:]
    assert "DataLoader worker" not in text, text[-4000:]
    iteration = int(re.search(r"received: stopping after iteration (\d+)", text).group(1))
    assert iteration < 11, text[-3000:]
    assert f"model_{iteration:07d}.pth" in os.listdir(tmp_path / "out")
    assert f"Starting training from iteration {iteration + 1}" in text
    ref_log = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, ref_log[-3000:]
    reference_weights = _final_weights(tmp_path / "reference")
    assert _differing(_final_weights(tmp_path / "out"), reference_weights) == []


def test_interactive_step_trains_alone_without_waiting_for_ranks(slurm, tmp_path):
    # srun --pty's shell in a step of two tasks per node: what is typed there is not one of them.
    opts = ["SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    command = shlex.join(
        [sys.executable, "train_net.py", "--num-gpus", "1", "--config-file", QUICK_YAML]
        + ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)"]
        + ["INPUT.MAX_SIZE_TRAIN", "96", "DATALOADER.NUM_WORKERS", "0", *opts]
    )
    srun = "srun --nodes=1 --ntasks-per-node=2 --pty bash --norc"
    proc = subprocess.run(
        ["script", "-qec", srun, "/dev/null"],
        input=f"cd {REPO_ROOT} && {command} > {tmp_path}/log 2>&1; echo rc=$?; exit\n",
        cwd=REPO_ROOT,
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else proc.stdout
    assert "rc=0" in proc.stdout, log[-3000:]
    assert "World size: 1" in log
    assert (tmp_path / "model_final.pth").is_file()
