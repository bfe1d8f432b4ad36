"""Training as clusters start it: torchrun (env://), SLURM's srun, submitit; preemption signals
stop a run with a checkpoint of the current iteration that --resume continues exactly."""

import datetime
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from stat import S_ISDIR
from types import SimpleNamespace

import pytest
import torch
from detectron2.engine import HookBase, SimpleTrainer, default_argument_parser, hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, EventStorage
from helpers import (
    DIST_OPTS,
    LAZY_TINY_OVERRIDES,
    QUICK_PY,
    QUICK_YAML,
    REPO_ROOT,
    TINY_OPTS,
    differing_keys,
    final_weights,
    free_port,
    usage_error,
)

from saltnet.checkpoint.checkpointer import AtomicCheckpointer
from saltnet.engine.launch import (
    cuda_device,
    distributed_env,
    init_distributed,
    launch_from_args,
    parse_slurm_nodelist,
    slurm_hostnames,
)
from saltnet.engine.preemption import PREEMPTED_EXIT_CODE, PreemptionHook
from saltnet.engine.trainer import MetricPrinter

TORCHRUN_ENV = {
    "RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}
SLURM_ENV = {
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def _children(pid):
    """The process ids of the children of ``pid`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


# --- Reading the environment ----------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[001-003,007],gpu5", ["node001", "node002", "node003", "node007", "gpu5"]),
        ("gpu5", ["gpu5"]),
        ("a[8-10]-ib,b1", ["a8-ib", "a9-ib", "a10-ib", "b1"]),
        ("n[09-11]", ["n09", "n10", "n11"]),
    ],
)
def test_slurm_nodelist_is_expanded(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[1-", "node[a-b]", "n[3-1]", "x,,y", "n[1]]"])
def test_unparseable_slurm_nodelist_is_an_error_naming_the_variable(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        parse_slurm_nodelist(nodelist)
    env = dict(SLURM_ENV, SLURM_JOB_NODELIST=nodelist)
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        distributed_env(env)


def test_torchrun_environment_is_read():
    env = distributed_env(TORCHRUN_ENV)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 4, 1, 2)
    assert env.num_machines == 2 and env.init_method == "tcp://10.0.0.1:29500"
    # Under torchrun's agent the workers join its store, which only env:// does.
    agent = distributed_env(dict(TORCHRUN_ENV, TORCHELASTIC_USE_AGENT_STORE="True"))
    assert agent.init_method == "env://"


def test_slurm_environment_is_read_with_the_first_host_as_master():
    env = distributed_env(SLURM_ENV)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.init_method == f"tcp://gpu07:{distributed_env(SLURM_ENV).master_port}"
    assert distributed_env(dict(SLURM_ENV, MASTER_PORT="1234")).master_port == 1234
    # The batch script itself (no job step) and a one-task step spawn with --num-gpus.
    batch_script = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_ID"}
    assert distributed_env(batch_script) is None
    assert distributed_env(dict(SLURM_ENV, SLURM_NTASKS="1")) is None
    assert distributed_env({}) is None


@pytest.mark.parametrize(
    "environ, names",
    [
        ({"WORLD_SIZE": "2"}, "RANK"),  # WORLD_SIZE without RANK
        ({**TORCHRUN_ENV, "RANK": "4"}, "RANK=4 must be smaller than WORLD_SIZE=4"),
        ({**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": "3"}, "WORLD_SIZE=4 is not a multiple"),
        ({**TORCHRUN_ENV, "MASTER_PORT": "port"}, "MASTER_PORT='port'"),
        ({**SLURM_ENV, "SLURM_TASKS_PER_NODE": "2,1"}, "SLURM_TASKS_PER_NODE"),
        ({k: v for k, v in SLURM_ENV.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID"),
    ],
)
def test_bad_environment_is_an_error_naming_the_variable(environ, names):
    with pytest.raises(ValueError, match=re.escape(names)):
        distributed_env(environ)


def test_num_gpus_contradicting_the_environment_is_an_error():
    args = default_argument_parser().parse_args(["--num-gpus", "8"])
    with pytest.raises(ValueError, match="--num-gpus 8 contradicts"):
        launch_from_args(print, args, environ=TORCHRUN_ENV)
    args = default_argument_parser().parse_args(["--num-machines", "3"])
    with pytest.raises(ValueError, match="--num-machines 3 contradicts"):
        launch_from_args(print, args, environ=TORCHRUN_ENV)


# What srun sets in a task (read from a real Slurm 22.05): here a step of 2 tasks on the second
# node of a job of 4 tasks on 2 nodes.
STEP_ENV = {
    **SLURM_ENV,
    "SLURM_PROCID": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2",
    "SLURM_STEP_NODELIST": "gpu08",
    "SLURM_NTASKS_PER_NODE": "2",
}


def test_slurm_step_layout_and_master_come_from_the_step_not_the_job():
    env = distributed_env(STEP_ENV)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert env.master_addr == "gpu08"


def test_shell_of_an_interactive_allocation_is_not_a_rank():
    # salloc's interactive step in an allocation of 8 tasks per node: one task, SLURM_NTASKS=8.
    shell = dict(SLURM_ENV, SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="8", SLURM_PROCID="0")
    shell.update(SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1")
    assert distributed_env(shell) is None


def test_slurm_ports_differ_per_step_and_job_and_avoid_the_ephemeral_range():
    def port(job, step):
        return distributed_env(dict(SLURM_ENV, SLURM_JOB_ID=str(job), SLURM_STEP_ID=str(step)))

    ports = [port(4242, step).master_port for step in range(8)]
    assert len(set(ports)) == 8
    assert port(4242, 0).master_port != port(24242, 0).master_port  # job ids 20000 apart
    jobs = [port(job, 0).master_port for job in range(4000, 5500)]
    assert len(set(jobs)) == len(jobs) and all(20000 <= p < 32768 for p in jobs)


@pytest.mark.parametrize("rank, local_rank, distribution", [("0", "0", "cyclic"), ("1", "0", None)])
def test_cyclic_task_placement_is_refused(rank, local_rank, distribution):
    # srun -N 2 -n 4 -m cyclic: ranks 0, 2 on the first node, 1, 3 on the second.
    env = dict(SLURM_ENV, SLURM_PROCID=rank, SLURM_LOCALID=local_rank)
    if distribution:
        env["SLURM_DISTRIBUTION"] = distribution
    with pytest.raises(ValueError, match="--distribution=block"):
        distributed_env(env)


@pytest.mark.parametrize(
    "local_rank, workers, devices, device",
    [(1, 2, 2, 1), (1, 2, 1, 0), (3, 4, 1, 0), (0, 1, 8, 0)],
)
def test_cuda_device_is_the_local_rank_or_the_only_visible(local_rank, workers, devices, device):
    assert cuda_device(local_rank, workers, devices) == device


def test_more_workers_than_gpus_is_an_error():
    with pytest.raises(ValueError, match="at most one worker per GPU"):
        cuda_device(2, 3, 2)


def test_slurm_client_without_configuration_falls_back_to_the_own_parser(monkeypatch):
    # Debian's slurm-wlm on a workstation: scontrol is there but finds no slurm.conf.
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    assert slurm_hostnames("gpu[07-08]") == ["gpu07", "gpu08"]


@pytest.mark.parametrize("variable", ["SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"])
def test_requeued_or_restarted_run_resumes(variable):
    resumed = []
    args = default_argument_parser().parse_args([])
    launch_from_args(lambda a: resumed.append(a.resume), args, environ={variable: "1"})
    assert resumed == [True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on the CPU")
def test_master_port_in_use_is_an_error_naming_the_variable():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        environ = dict(TORCHRUN_ENV, RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env = distributed_env(dict(environ, MASTER_PORT=str(port)))
        with pytest.raises(RuntimeError, match=f"Port {port} \\(MASTER_PORT\\).*in use"):
            init_distributed(env, timeout=datetime.timedelta(seconds=20))


# --- Preemption across ranks ----------------------------------------------------------------


class _SignalAt(HookBase):
    """On rank 1, send ``signum`` to this process (or its parent) during iteration ``at``."""

    def __init__(self, at, signum, to_parent):
        self.at, self.signum, self.to_parent = at, signum, to_parent

    def before_step(self):
        if comm.get_rank() == 1 and self.trainer.iter == self.at:
            os.kill(os.getppid() if self.to_parent else os.getpid(), self.signum)


class _RecordIteration(HookBase):
    """Write each finished iteration to ``stopped_<rank>`` (register before PreemptionHook)."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def after_step(self):
        with open(f"{self.out_dir}/stopped_{comm.get_rank()}", "w") as f:
            f.write(str(self.trainer.iter))


class _Linear(torch.nn.Linear):
    def forward(self, x):  # SimpleTrainer's models return their losses
        return {"loss": super().forward(x).square().mean()}


def _linear_training(args):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = iter(lambda: torch.ones(4, 2), None)
    trainer = SimpleTrainer(model, data, optimizer)
    checkpointer = AtomicCheckpointer(model, args.out_dir, trainer=trainer)
    signal_at = _SignalAt(2, signal.SIGUSR1, args.to_parent)
    trainer.register_hooks(
        [_RecordIteration(args.out_dir), signal_at, PreemptionHook(checkpointer)]
    )
    trainer.train(0, 100)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on the CPU")
@pytest.mark.parametrize("to_parent", [False, True], ids=["rank1-only", "via-parent"])
def test_ranks_agree_to_stop_after_the_iteration_of_the_signal(tmp_path, to_parent):
    # Rank 1 alone gets SIGUSR1 during iteration 2, or the launching process gets it and passes
    # it on to both workers: both stop after the same iteration, the one of the signal or later.
    # The port of detectron2's default --dist-url is taken (as by another run on the machine):
    # a single-machine run finds a free one.
    args = default_argument_parser().parse_args(["--num-gpus", "2"])
    args.out_dir, args.to_parent = str(tmp_path), to_parent
    with socket.socket() as other_run, pytest.raises(SystemExit) as exited:
        other_run.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other_run.bind(("127.0.0.1", int(args.dist_url.rsplit(":", 1)[1])))
        other_run.listen()
        launch_from_args(_linear_training, args, environ={})
    assert exited.value.code == PREEMPTED_EXIT_CODE
    stopped = {(tmp_path / f"stopped_{r}").read_text() for r in (0, 1)}
    assert len(stopped) == 1
    iteration = int(stopped.pop())
    assert iteration == 2 if not to_parent else iteration >= 2
    assert (tmp_path / "last_checkpoint").read_text() == f"model_{iteration:07d}.pth"
    checkpoint = torch.load(tmp_path / f"model_{iteration:07d}.pth", weights_only=False)
    assert checkpoint["iteration"] == iteration


class _SignalSelf(HookBase):
    """Send ``signums`` to this process, and to its DataLoader workers if ``workers``, during
    iteration ``at``."""

    def __init__(self, at, signums, workers=False):
        self.at, self.signums, self.workers = at, signums, workers

    def before_step(self):
        if self.trainer.iter == self.at:
            pids = [p.pid for p in multiprocessing.active_children()] if self.workers else []
            for signum in self.signums:
                for pid in pids + [os.getpid()]:
                    os.kill(pid, signum)


class _Ones(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return torch.ones(2)


def _train_until_stopped(out_dir, data, signal_at):
    """A one-process training of ``_Linear`` stopped by ``signal_at``; returns the exit code."""
    model = _Linear(2, 1)
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpointer = AtomicCheckpointer(model, str(out_dir), trainer=trainer)
    trainer.register_hooks([signal_at, PreemptionHook(checkpointer)])
    with pytest.raises(SystemExit) as exited:
        trainer.train(0, 100)
    return exited.value.code


def test_every_signal_received_reaches_the_handler_installed_before(tmp_path):
    # submitit sends SIGUSR2 (its requeue handler) and Slurm SIGTERM (its bypass handler):
    # after the checkpoint both run, not only the one of the larger signal number.
    called = []
    signums = (signal.SIGUSR2, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: called.append(signum)) for s in signums}
    try:
        data = iter(lambda: torch.ones(4, 2), None)
        code = _train_until_stopped(tmp_path, data, _SignalSelf(2, signums))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert code == PREEMPTED_EXIT_CODE
    assert sorted(called) == sorted(signums)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"


def test_data_loader_workers_survive_the_signal_sent_to_every_process_of_the_step(tmp_path):
    # Slurm signals every process of a job step, the DataLoader's workers included: the run
    # still stops with a checkpoint instead of "DataLoader worker ... killed by signal".
    loader = torch.utils.data.DataLoader(_Ones(), batch_size=4, num_workers=1)
    code = _train_until_stopped(tmp_path, loader, _SignalSelf(2, [signal.SIGTERM], workers=True))
    assert code == PREEMPTED_EXIT_CODE
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"


# --- Whole runs through train_net.py --------------------------------------------------------


def _tool_env(synthetic_root, **extra):
    return dict(os.environ, OMP_NUM_THREADS="1", SALTNET_SYNTHETIC_ROOT=synthetic_root, **extra)


@pytest.fixture(scope="module")
def spawned_run(two_process_train):
    """Final weights of the 2-process run of detectron2's launch (``--num-gpus 2``)."""
    out, proc = two_process_train
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return final_weights(out)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on the CPU")
def test_torchrun_trains_one_model_as_the_spawned_launch_does(
    synthetic_root, spawned_run, tmp_path
):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["train_net.py", "--config-file", QUICK_YAML, *DIST_OPTS, "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO_ROOT,
        env=_tool_env(synthetic_root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "World size: 2" in log and "World size: 1" not in log
    assert "Evaluation results for bbox" in log
    assert differing_keys(final_weights(tmp_path), spawned_run) == []


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on the CPU")
def test_two_node_torchrun_with_c10d_trains_as_the_spawned_launch_does(
    synthetic_root, spawned_run, tmp_path
):
    # Two "machines" of one worker each, meeting through c10d rendezvous on this host.
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d"]
    rdzv += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test"]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *rdzv, "train_net.py"]
            + ["--config-file", QUICK_YAML, *DIST_OPTS, "OUTPUT_DIR", str(tmp_path)],
            cwd=REPO_ROOT,
            env=_tool_env(synthetic_root),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "World size: 2" in "".join(logs)
    assert differing_keys(final_weights(tmp_path), spawned_run) == []


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on the CPU")
def test_simulated_slurm_allocation_trains_as_the_spawned_launch_does(
    synthetic_root, spawned_run, tmp_path
):
    # Two srun tasks on one node: no RANK/WORLD_SIZE, only SLURM's variables.
    slurm = dict(SLURM_STEP_ID="0", SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2")
    slurm.update(SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()))
    tasks = [
        subprocess.Popen(
            [sys.executable, "train_net.py", "--config-file", QUICK_YAML, *DIST_OPTS]
            + ["OUTPUT_DIR", str(tmp_path)],
            cwd=REPO_ROOT,
            env=_tool_env(synthetic_root, **slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [task.communicate(timeout=600)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "World size: 2" in logs[0]
    assert differing_keys(final_weights(tmp_path), spawned_run) == []


@pytest.mark.slow
def test_restarted_torchrun_worker_group_resumes_by_itself(synthetic_root, tmp_path):
    opts = TINY_OPTS + ["SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "2"]
    opts += ["DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        + ["--max-restarts", "1", "train_net.py", "--config-file", QUICK_YAML, *opts],
        cwd=REPO_ROOT,
        env=_tool_env(synthetic_root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # a worker crash (SIGKILL) after the first checkpoint
        lines.append(line)
        if re.search(r"Saving checkpoint to .*model_0000001\.pth", line):
            while not (tmp_path / "last_checkpoint").exists():  # logged before it is written
                time.sleep(0.05)
            (worker,) = _children(proc.pid)
            os.kill(worker, signal.SIGKILL)
            break
    log = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "TORCHELASTIC_RESTART_COUNT > 0: resuming from the last checkpoint" in log
    started = [int(i) for i in re.findall(r"Starting training from iteration (\d+)", log)]
    assert started[0] == 0 and started[1] >= 2, log[-3000:]
    assert (tmp_path / "model_final.pth").is_file()


def _signal_when(proc, pattern, signum, timeout=300):
    """Read ``proc``'s output until a line matches ``pattern``, then send it ``signum``.
    Returns the output read."""
    lines = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            proc.send_signal(signum)
            break
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
    return "".join(lines) + proc.communicate(timeout=timeout)[0]


def _start(synthetic_root, *args):
    return subprocess.Popen(
        [sys.executable, "train_net.py", *map(str, args)],
        cwd=REPO_ROOT,
        env=_tool_env(synthetic_root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stopped_iteration(log, signame):
    match = re.search(rf"{signame} received: stopping after iteration (\d+)", log)
    assert match, log[-3000:]
    return int(match.group(1))


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_iteration_and_resume_is_exact(
    quick_train, run_tool, synthetic_root, tmp_path
):
    # The quick training's 12 iterations, a periodic checkpoint every 2 and no evaluation (which
    # change no weight): the signal goes out when the first checkpoint is saved (after iteration
    # 1), i.e. during a later iteration. Stopped and resumed, the run ends with the weights of the
    # straight quick training.
    opts = TINY_OPTS + ["SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()"]
    config = ["--config-file", QUICK_YAML]
    stopped = tmp_path / "stopped"
    proc = _start(synthetic_root, *config, *opts, "OUTPUT_DIR", stopped)
    log = _signal_when(proc, r"Saving checkpoint to .*model_0000001\.pth", signal.SIGTERM)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    iteration = _stopped_iteration(log, "SIGTERM")
    assert 1 <= iteration < 11
    name = f"model_{iteration:07d}.pth"
    assert (stopped / "last_checkpoint").read_text() == name
    assert torch.load(stopped / name, weights_only=False)["iteration"] == iteration
    assert not (stopped / "model_final.pth").exists()

    proc = run_tool("train_net.py", *config, "--resume", *opts, "OUTPUT_DIR", stopped)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Starting training from iteration {iteration + 1}" in proc.stdout + proc.stderr
    straight, train = quick_train
    assert train.returncode == 0, train.stderr[-3000:]
    assert differing_keys(final_weights(stopped), final_weights(straight)) == []


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("printer", [CommonMetricPrinter, MetricPrinter])
def test_metric_printer_prints_twice_at_one_iteration_before_iteration_times(printer):
    # A run stopped in its first iterations (before IterationTimer's times) right after a
    # periodic print prints once more when training ends (PeriodicWriter.after_train).
    writer = printer(max_iter=10)
    records, level = _Records(), writer.logger.level  # on the logger itself: whether detectron2's
    writer.logger.addHandler(records)  # loggers propagate depends on the tests run before
    writer.logger.setLevel(logging.INFO)
    try:
        with EventStorage(start_iter=1) as storage:
            storage.put_scalar("total_loss", 1.0)
            writer.write()
            if printer is CommonMetricPrinter:  # detectron2's: the stop would end in this error
                with pytest.raises(ZeroDivisionError):
                    writer.write()
            else:
                writer.write()
                lines = records.messages
                assert len(lines) == 2 and all("iter: 1" in line for line in lines)
                assert "eta:" not in lines[1]
    finally:
        writer.logger.removeHandler(records)
        writer.logger.setLevel(level)


@pytest.mark.slow
def test_lazy_config_training_stops_on_sigusr1_with_a_checkpoint(synthetic_root, tmp_path):
    args = ["--config-file", QUICK_PY, *LAZY_TINY_OVERRIDES]
    args += ["train.max_iter=10", "train.checkpointer.period=2", f"train.output_dir={tmp_path}"]
    proc = _start(synthetic_root, *args)
    log = _signal_when(proc, r"Saving checkpoint to .*model_0000001\.pth", signal.SIGUSR1)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    iteration = _stopped_iteration(log, "SIGUSR1")
    assert (tmp_path / "last_checkpoint").read_text() == f"model_{iteration:07d}.pth"


class _CountingCheckpointer(AtomicCheckpointer):
    """Records the name of every checkpoint it writes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved = []

    def save(self, name, **kwargs):
        self.saved.append(name)
        super().save(name, **kwargs)


def test_preemption_on_a_periodic_checkpoint_iteration_writes_the_checkpoint_once(tmp_path):
    # The periodic checkpoint (every 3 iterations) of iteration 2 is the checkpoint the
    # preemption needs: it is not written a second time.
    model = _Linear(2, 1)
    data = iter(lambda: torch.ones(4, 2), None)
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpointer = _CountingCheckpointer(model, str(tmp_path), trainer=trainer)
    trainer.register_hooks(
        [
            hooks.PeriodicCheckpointer(checkpointer, 3),
            _SignalSelf(2, [signal.SIGUSR1]),
            PreemptionHook(checkpointer),
        ]
    )
    with pytest.raises(SystemExit) as exited:
        trainer.train(0, 100)
    assert exited.value.code == PREEMPTED_EXIT_CODE
    assert checkpointer.saved == ["model_0000002"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"


def test_atomic_checkpoint_fsyncs_its_directory_after_the_rename(tmp_path, monkeypatch):
    # The rename is an entry of the directory: the directory is flushed after it, for the
    # checkpoint and for last_checkpoint.
    synced, fsync = [], os.fsync

    def recording_fsync(fd):
        if S_ISDIR(os.fstat(fd).st_mode):
            synced.append(sorted(p.name for p in tmp_path.iterdir()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    AtomicCheckpointer(_Linear(2, 1), str(tmp_path)).save("model_0000004")
    assert synced == [["model_0000004.pth"], ["last_checkpoint", "model_0000004.pth"]]


# --- submitit ---------------------------------------------------------------------------------


def _import_submit_slurm():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import submit_slurm
    finally:
        sys.path.pop(0)
    return submit_slurm


def test_submit_slurm_requeues_with_resume():
    """The job's checkpoint() (called by submitit on SIGUSR2) resubmits it with --resume."""
    submitit = pytest.importorskip("submitit")
    args = SimpleNamespace(resume=False, opts=["SOLVER.MAX_ITER", "4"])
    requeued = _import_submit_slurm().TrainJob(args).checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert requeued.function.args.resume and requeued.function.args.opts == args.opts
    assert not args.resume  # the running job's arguments are left as they are


def test_submit_slurm_local_starts_one_task_that_spawns_the_workers(tmp_path, monkeypatch):
    """--cluster local: one task that spawns --gpus-per-node workers (gloo/NCCL on one
    address), not one task per GPU that would each spawn them all."""
    submitit = pytest.importorskip("submitit")
    monkeypatch.chdir(REPO_ROOT)
    submitted = {}

    def submit(executor, job):  # what submitit would start, without starting it
        submitted.update(executor._executor.parameters, args=job.args)
        return SimpleNamespace(job_id="0")

    monkeypatch.setattr(submitit.AutoExecutor, "submit", submit)
    _import_submit_slurm().main(
        ["--cluster", "local", "--gpus-per-node", "2", "--job-dir", str(tmp_path)]
        + ["--config-file", QUICK_YAML]
    )
    assert submitted["tasks_per_node"] == 1
    assert submitted["args"].num_gpus == 2 and submitted["args"].num_machines == 1


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.WEIGHTS", "{tmp}/x.pth"], "Checkpoint '{tmp}/x.pth' (MODEL.WEIGHTS) does not"),
        (["SOLVER.MAX_ITERS", "5"], "Unknown config key 'SOLVER.MAX_ITERS'"),
    ],
)
def test_submit_slurm_refuses_what_would_fail_in_the_job(tmp_path, capsys, opts, message):
    # A usage error at submission, not a failed job after its wait in the queue.
    pytest.importorskip("submitit")
    argv = ["--cluster", "local", "--job-dir", str(tmp_path / "jobs")]
    argv += ["--config-file", str(REPO_ROOT / QUICK_YAML), *(o.format(tmp=tmp_path) for o in opts)]
    assert message.format(tmp=tmp_path) in usage_error(capsys, _import_submit_slurm().main, argv)
    assert not (tmp_path / "jobs").exists()


@pytest.mark.slow
def test_submitit_local_job_requeues_after_preemption_and_resumes(
    synthetic_root, tmp_path, monkeypatch
):
    pytest.importorskip("submitit")
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SALTNET_SYNTHETIC_ROOT", synthetic_root)
    # The job unpickles TrainJob from the module the test imported (a script pickles it by value).
    path = os.pathsep.join(filter(None, [str(REPO_ROOT / "tools"), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    out = tmp_path / "out"
    opts = TINY_OPTS + ["SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "2"]
    opts += ["DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    job = _import_submit_slurm().main(
        ["--cluster", "local", "--gpus-per-node", "0", "--time", "10"]
        + ["--job-dir", str(tmp_path / "jobs"), "--config-file", QUICK_YAML, *opts]
    )
    deadline = time.monotonic() + 300
    while not (out / "model_0000001.pth").exists():  # the task is training
        assert time.monotonic() < deadline and not job.done(), job.stdout()
        time.sleep(0.2)
    # As SLURM before the time limit: submitit's signal to the task (the controller's child).
    (task,) = _children(int(job.job_id))
    os.kill(task, signal.SIGUSR2)
    job.result()
    log = job.stdout() + job.stderr()
    iteration = _stopped_iteration(log, "SIGUSR2")
    assert "Requeued job" in log
    assert f"Starting training from iteration {iteration + 1}" in log
    assert (out / "model_final.pth").is_file()
