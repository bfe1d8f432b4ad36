"""Training on a real Slurm cluster (tests/slurm_cluster.py), started once for this file:
tools/slurm/train.sbatch across two nodes, preemption by a higher-priority partition, the time
limit with --signal, submitit's Slurm executor, torchrun in an srun step, an interactive step.
The time-limit, torchrun and submitit jobs run from the start, beside the others (side_runs).
The cluster needs root and Debian's slurm-wlm and munge; without them the tests skip, except
under CI=true, where they fail."""

import os
import re
import shlex
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import DIST_OPTS, QUICK_YAML, REPO_ROOT, differing_keys, final_weights
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


def _wait_for(log, pattern, timeout=180, slurm=None, job=None):
    """Wait until ``log`` (a path, or a function returning the text) has a line matching
    ``pattern``; fail at ``timeout`` or once ``job`` (of ``slurm``) has ended without one."""
    read = log if callable(log) else lambda: log.read_text() if log.exists() else ""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, read()):
        ended = job is not None and slurm.job(job)["JobState"] in ("COMPLETED", "FAILED")
        assert time.monotonic() < deadline and not ended, read()[-3000:]
        time.sleep(0.2)


def _rank1_started(out, start=0, **kwargs):
    """Wait until rank 1 (which logs only to ``OUTPUT_DIR/log.txt.rank1``) has started training
    from iteration ``start``: rank 0 says so first, and a signal before rank 1 has its handlers
    would end it."""
    _wait_for(out / "log.txt.rank1", rf"Starting training from iteration {start}\b", **kwargs)


def _preempt(slurm, partition="high", node=NODES[0]):
    """Start a job of the high partition on its first node: it preempts what runs there."""
    slurm.run("sbatch", f"--partition={partition}", f"--nodelist={node}", "--output=/dev/null",
              "--wrap=true")  # fmt: skip
    # The controller looks for jobs to preempt on its own schedule; an update makes it look now.
    slurm.run("scontrol", "update", f"PartitionName={partition}", "State=UP")


@pytest.fixture(scope="module")
def spawned_run(two_process_train):
    out, proc = two_process_train
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return final_weights(out)


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
    assert differing_keys(final_weights(tmp_path / "out"), spawned_run) == []


# 12 iterations with a data-loader worker (which Slurm's signals reach too), no evaluation: the
# runs that are stopped and resumed.
RESUMED_OPTS = [*DIST_OPTS, "SOLVER.MAX_ITER", "12", "DATALOADER.NUM_WORKERS", "1"]
RESUMED_OPTS += ["DATASETS.TEST", "()"]


@pytest.fixture(scope="module")
def uninterrupted_weights(slurm, tmp_path_factory):
    """The final weights of ``RESUMED_OPTS`` spawned on this machine (``--num-gpus 2``), without
    Slurm: the weights every stopped and resumed run must end with. Started at the first test
    that asks for it, so that it runs beside that test's job; ``get()`` waits for it."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.Popen(
        [sys.executable, "train_net.py", "--config-file", QUICK_YAML, "--num-gpus", "2"]
        + [*RESUMED_OPTS, "OUTPUT_DIR", str(out)],
        cwd=REPO_ROOT,
        env=dict(slurm.env, SLURM_CONF="/nonexistent"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    weights = {}

    def get():
        if not weights:
            log = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, log[-3000:]
            weights.update(final_weights(out))
        return weights

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(
    slurm, uninterrupted_weights, tmp_path
):
    job, log = _sbatch(
        slurm, tmp_path, "--partition=low", "--nodes=2", "--ntasks-per-node=1", "--",
        "--config-file", QUICK_YAML, *RESUMED_OPTS, "OUTPUT_DIR", tmp_path / "out",
    )  # fmt: skip
    _wait_for(log, r"Starting training from iteration 0")
    _rank1_started(tmp_path / "out")
    _preempt(slurm)
    # At the start of the partition's GraceTime the job's tasks get its --signal signal
    # (train.sbatch's SIGUSR1; SIGTERM where preempt_send_user_signal is not set); within the
    # GraceTime the job requeues itself; it starts again once the credentials of its first run
    # have expired (AuthInfo cred_expire, 5 s here).
    fields = slurm.wait_job(job)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-4000:]
    assert "DataLoader worker" not in text, text[-4000:]
    iteration = int(re.search(r"received: stopping after iteration (\d+)", text).group(1))
    assert iteration < 11, text[-3000:]
    assert f"model_{iteration:07d}.pth" in os.listdir(tmp_path / "out")
    assert f"Starting training from iteration {iteration + 1}" in text
    assert differing_keys(final_weights(tmp_path / "out"), uninterrupted_weights()) == []


def _run_seconds(slurm, job):
    """How long the job has run (``scontrol``'s RunTime, [D-]HH:MM:SS)."""
    days, _, clock = slurm.job(job)["RunTime"].rpartition("-")
    hours, minutes, seconds = map(int, clock.split(":"))
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _time_limit_run(slurm, out_dir):
    """``--time=15`` with ``--signal=USR1@360``: the warning signal that slurmctld itself sends to
    the steps when the job comes within 360 s of its time limit (its time-limit check runs
    every 30 s, ``PERIODIC_TIMEOUT``). The limit is in minutes, so instead of waiting minutes
    the test lowers it with ``scontrol update JobId=.. TimeLimit=..`` to 5-6 minutes past the
    job's run time: the next check sends the warning, as it would 6 minutes before a real limit
    (the limit itself stays 5 minutes away, so ``OverTimeLimit`` and ``KillWait`` never come
    into play: the run is gone long before). Once the job has requeued itself the test gives
    the limit back (15 minutes), so that the rerun is not warned at once. To spend no CPU while
    waiting for the controller's check, the step's processes are stopped (``scancel
    --signal=STOP``, steps only); the warning comes with the SIGCONT Slurm sends before it.
    Returns the job id, its fields at the end and its output."""
    job, log = _sbatch(
        slurm, out_dir, "--partition=side", "--nodes=1", "--ntasks-per-node=2", "--time=15",
        "--signal=USR1@360", "--",
        "--config-file", QUICK_YAML, *RESUMED_OPTS, "OUTPUT_DIR", out_dir / "out",
    )  # fmt: skip
    _wait_for(log, r"Starting training from iteration 0", timeout=300)
    _rank1_started(out_dir / "out")
    slurm.run("scancel", "--signal=STOP", job)
    limit = -(-_run_seconds(slurm, job) // 60) + 5  # minutes: the limit 300-359 s away
    slurm.run("scontrol", "update", f"JobId={job}", f"TimeLimit={limit}")
    deadline = time.monotonic() + 120
    while slurm.job(job)["Restarts"] == "0":
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=15")
    return job, slurm.wait_job(job), log.read_text()


def _torchrun_step_run(slurm, out_dir):
    """torchrun (``--nproc_per_node 2``) as the one task of an srun step, with the signals it
    must pass on exported as docs/CLUSTERS.md says and train.sbatch does (``PET_SIGNALS_TO_HANDLE``,
    torchrun's ``--signals-to-handle``, which overrides ``TORCHELASTIC_SIGNALS_TO_HANDLE``):
    ``scancel --signal=USR1 JOB.0`` signals every process of the step, torchrun's agent and its
    workers. The workers write one checkpoint of the current iteration and exit with 75; the
    agent passes the signal on, waits for them and exits with 1 (torchrun reports a signal as a
    failure), which srun returns. Returns srun's exit code and output."""
    out = out_dir / "out"
    name = f"saltnet-torchrun-{out_dir.name}"
    signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
    proc = subprocess.Popen(
        ["srun", "--partition=side", "--nodes=1", "--ntasks=1", "--cpus-per-task=2"]
        + [f"--job-name={name}"]
        + [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["train_net.py", "--config-file", QUICK_YAML, *RESUMED_OPTS, "OUTPUT_DIR", str(out)],
        cwd=REPO_ROOT,
        env=dict(slurm.env, PET_SIGNALS_TO_HANDLE=signals, TORCHELASTIC_SIGNALS_TO_HANDLE=signals),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # until rank 0 trains
        lines.append(line)
        if "Starting training from iteration 0" in line:
            break
    else:
        pytest.fail("".join(lines)[-3000:])
    _rank1_started(out)
    job = slurm.run("squeue", "-h", f"--name={name}", "-o", "%A").stdout.strip()
    slurm.run("scancel", "--signal=USR1", f"{job}.0")
    text = "".join(lines) + proc.communicate(timeout=180)[0]
    return proc.returncode, text


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


def _submitit_run(slurm, out_dir):
    """tools/submit_slurm.py with submitit's Slurm executor, two nodes (partition low2, n5 and
    n6), one task each. First
    Slurm requeues the job by itself (``scontrol requeue``, as after a node failure: SIGTERM to
    the steps, then the job runs again from its original submission, without ``--resume``):
    the rerun resumes (``SLURM_RESTART_COUNT``). Then a job of the high partition preempts it
    (``preempt_send_user_signal``: submitit's SIGUSR2 at the start of the GraceTime):
    checkpoint, submitit's handler requeues it with ``--resume``, rank 0 exits with 255
    (submitit's ``sys.exit(-1)``), rank 1 with 75. Returns the job id, its fields at the end
    and the tasks' output."""
    jobs, out = out_dir / "jobs", out_dir / "out"
    proc = slurm.run(
        sys.executable, "tools/submit_slurm.py", "--cluster", "slurm", "--nodes", "2",
        "--gpus-per-node", "0", "--cpus-per-task", "1", "--partition", "low2", "--time", "10",
        "--job-dir", str(jobs), "--config-file", QUICK_YAML, *RESUMED_OPTS, "OUTPUT_DIR", str(out),
        cwd=REPO_ROOT,
    )  # fmt: skip
    job = re.search(r"Submitted job (\d+)", proc.stdout).group(1)

    def text():  # rank 0's output and errors (submitit's log files), and rank 1's
        return "".join(p.read_text() for p in sorted(jobs.glob(f"{job}_*_log.*")))

    _wait_for(text, r"Starting training from iteration 0", 300, slurm=slurm, job=job)
    _rank1_started(out, slurm=slurm, job=job)
    slurm.run("scontrol", "requeue", job)
    _wait_for(text, r"SIGTERM received: stopping after iteration", slurm=slurm, job=job)
    first = int(re.search(r"SIGTERM received: stopping after iteration (\d+)", text()).group(1))
    _wait_for(text, rf"Starting training from iteration {first + 1}", slurm=slurm, job=job)
    _rank1_started(out, first + 1, slurm=slurm, job=job)
    _preempt(slurm, "high2", NODES[4])
    return job, slurm.wait_job(job), text()


class _Background(threading.Thread):
    """``function(*args)`` in a thread; :meth:`result` waits for it and returns its value or
    raises its exception (an assertion of the run fails the test that asks for it)."""

    def __init__(self, function, *args):
        super().__init__(daemon=True)
        self._call = lambda: function(*args)
        self._value = self._error = None

    def run(self):
        try:
            self._value = self._call()
        except BaseException as e:  # noqa: B902 (pytest.fail's exception included)
            self._error = e

    def result(self, timeout=600):
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self._error is not None:
            raise self._error
        return self._value


@pytest.fixture(scope="module", autouse=True)
def side_runs(request, slurm, tmp_path_factory):
    """The time-limit job and the torchrun step (partition ``side``, nodes n3 and n4) and the
    submitit job (``low2``, n5 and n6) run from the start of this file, beside the other tests'
    jobs on n1 and n2: much of their time is spent waiting for Slurm (the controller's
    time-limit check, a requeue). Only the runs of selected tests start."""
    selected = {item.name for item in request.session.items}
    runs = {}
    for name, function, test in [
        ("time_limit", _time_limit_run, "test_time_limit_warning_"),
        ("torchrun", _torchrun_step_run, "test_torchrun_in_an_srun_step_"),
        ("submitit", _submitit_run, "test_submitit_job_resumes_"),
    ]:
        if not any(item.startswith(test) for item in selected):
            continue
        out_dir = tmp_path_factory.mktemp(name)
        runs[name] = (_Background(function, slurm, out_dir), out_dir / "out")
        runs[name][0].start()
    yield runs
    for run, _ in runs.values():
        run.join(timeout=300)


def test_time_limit_warning_checkpoints_requeues_resumes_and_finishes(
    side_runs, uninterrupted_weights
):
    # See _time_limit_run: checkpoint of the current iteration, Restarts=1, resumed, finished
    # with the uninterrupted run's weights.
    run, out = side_runs["time_limit"]
    job, fields, text = run.result()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-4000:]
    match = re.search(r"SIGUSR1 received: stopping after iteration (\d+)", text)
    assert match, text[-3000:]
    iteration = int(match.group(1))
    assert f"model_{iteration:07d}.pth" in os.listdir(out)
    assert f"Requeued Slurm job {job}" in text
    assert f"Starting training from iteration {iteration + 1}" in text
    assert differing_keys(final_weights(out), uninterrupted_weights()) == []


def test_torchrun_in_an_srun_step_stops_on_the_steps_signal_with_a_checkpoint(side_runs):
    # See _torchrun_step_run.
    run, out = side_runs["torchrun"]
    returncode, text = run.result()
    assert returncode == 1, text[-3000:]
    stopped = re.findall(r"SIGUSR1 received: stopping after iteration (\d+)", text)
    assert len(set(stopped)) == 1, text[-3000:]  # every rank, the same iteration
    iteration = int(stopped[0])
    assert (out / "last_checkpoint").read_text() == f"model_{iteration:07d}.pth"
    checkpoint = torch.load(out / f"model_{iteration:07d}.pth", weights_only=False)
    assert checkpoint["iteration"] == iteration
    assert not (out / "model_final.pth").exists()
    assert text.count("Saving checkpoint to") == 1, text[-3000:]
    # srun's own allocation is no batch job: nothing to requeue, and no failed attempt.
    assert "scontrol requeue" not in text, text[-3000:]


def test_submitit_job_resumes_after_a_slurm_requeue_and_after_preemption(
    side_runs, uninterrupted_weights
):
    # See _submitit_run: resumed after each, the uninterrupted run's weights.
    run, out = side_runs["submitit"]
    job, fields, logs = run.result()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "2", logs[-4000:]
    assert "SLURM_RESTART_COUNT > 0: resuming from the last checkpoint" in logs
    first = re.search(r"SIGTERM received: stopping after iteration (\d+)", logs)
    second = re.search(r"SIGUSR2 received: stopping after iteration (\d+)", logs)
    assert first and second, logs[-3000:]
    for stopped in (first, second):
        assert f"Starting training from iteration {int(stopped.group(1)) + 1}" in logs
    # Rank 0 requeued the job and left by submitit's sys.exit(-1) (exit code 255). srun's own
    # "task 0: Exited with exit code 255" is no evidence either way: the requeue ends the batch
    # step, often before srun reports its task.
    assert f"Requeued job {job} " in logs, logs[-3000:]
    assert "Exiting gracefully after preemption/timeout." in logs, logs[-3000:]
    assert differing_keys(final_weights(out), uninterrupted_weights()) == []
