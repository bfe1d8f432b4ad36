"""Start training however the cluster starts processes: spawned by detectron2's ``launch``, or
joining a process group the environment describes (torchrun / any ``env://`` launcher, SLURM's
``srun``).

:func:`distributed_env` reads the environment into a :class:`DistEnv`; :func:`init_distributed`
joins its process group and sets up what detectron2's ``launch`` sets up in each worker (the local
process group of :mod:`detectron2.utils.comm`, the CUDA device), so ``comm.get_local_rank``,
``comm.is_main_process`` and ``comm.synchronize`` work as under ``launch``. :func:`launch_from_args`
picks one of the two ways for ``train_net.py``'s arguments.
"""

import errno
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist
from detectron2.engine import default_argument_parser, launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from .preemption import PREEMPTED_EXIT_CODE, PREEMPTION_SIGNALS

__all__ = [
    "DistEnv",
    "distributed_env",
    "init_distributed",
    "launch_from_args",
    "parse_slurm_nodelist",
    "slurm_hostnames",
]

logger = logging.getLogger(__name__)

# The variables of PyTorch's env:// rendezvous (torchrun sets them all).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """One worker's place in a process group the environment describes.

    ``init_method`` is a ``torch.distributed`` URL; ``source`` names where the values came from
    (``"env"`` or ``"slurm"``) and ``port_var`` the variable that gave the port, for errors.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    init_method: str
    source: str
    port_var: str

    @property
    def num_machines(self) -> int:
        return self.world_size // self.local_world_size


def _int_var(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    value = environ[name]
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from None
    if number < minimum:
        raise ValueError(f"Environment variable {name}={value!r} must be at least {minimum}.")
    return number


def _check_consistent(env: DistEnv, names: Mapping[str, str]) -> DistEnv:
    """Raise if ranks and sizes of ``env`` contradict each other (``names``: field -> variable)."""
    if env.rank >= env.world_size:
        raise ValueError(
            f"{names['rank']}={env.rank} must be smaller than {names['world_size']}="
            f"{env.world_size}."
        )
    if env.local_rank >= env.local_world_size:
        raise ValueError(
            f"{names['local_rank']}={env.local_rank} must be smaller than "
            f"{names['local_world_size']}={env.local_world_size}."
        )
    if env.world_size % env.local_world_size:
        raise ValueError(
            f"{names['world_size']}={env.world_size} is not a multiple of "
            f"{names['local_world_size']}={env.local_world_size}: detectron2's local process "
            "groups need the same number of workers on every machine."
        )
    if not 0 < env.master_port < 65536:
        raise ValueError(f"{env.port_var}={env.master_port} is not a TCP port (1-65535).")
    return env


def _from_env_vars(environ: Mapping[str, str]) -> DistEnv:
    missing = [name for name in ENV_VARS if name not in environ]
    if missing:
        present = [name for name in ENV_VARS if name in environ]
        raise ValueError(
            f"Incomplete distributed environment: {', '.join(present)} set but "
            f"{', '.join(missing)} missing. An env:// launcher must set all of "
            f"{', '.join(ENV_VARS)} (torchrun does)."
        )
    addr, port = environ["MASTER_ADDR"], _int_var(environ, "MASTER_PORT", 1)
    # torchrun's agent hosts the store, which env:// joins (a tcp:// URL would clash with it).
    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    env = DistEnv(
        rank=_int_var(environ, "RANK"),
        world_size=_int_var(environ, "WORLD_SIZE", 1),
        local_rank=_int_var(environ, "LOCAL_RANK"),
        local_world_size=_int_var(environ, "LOCAL_WORLD_SIZE", 1),
        master_addr=addr,
        master_port=port,
        init_method="env://" if agent_store else f"tcp://{addr}:{port}",
        source="env",
        port_var="MASTER_PORT",
    )
    names = {f: f.upper() for f in ("rank", "world_size", "local_rank", "local_world_size")}
    return _check_consistent(env, names)


def _first(environ: Mapping[str, str], *names: str) -> Optional[str]:
    """The first of ``names`` set in ``environ`` (None: none is)."""
    return next((name for name in names if name in environ), None)


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int:
    """The step's tasks on each node, from ``SLURM_STEP_TASKS_PER_NODE`` (``"4(x2)"``; the job's
    ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` where a Slurm sets none); raise when the
    nodes run different numbers of tasks."""
    name = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
                  "SLURM_TASKS_PER_NODE")  # fmt: skip
    if name is None:
        raise ValueError(
            "Incomplete SLURM environment: none of SLURM_STEP_TASKS_PER_NODE, "
            "SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE is set."
        )
    value = environ[name]
    counts = {m.group(1) for m in re.finditer(r"(\d+)(?:\(x\d+\))?(?:,|$)", value)}
    if len(counts) != 1 or not re.fullmatch(r"\d+(\(x\d+\))?(,\d+(\(x\d+\))?)*", value):
        raise ValueError(
            f"{name}={value!r}: detectron2 needs the same number of tasks on every node (e.g. "
            "sbatch --ntasks-per-node)."
        )
    return int(counts.pop())


# Ports for the master of a Slurm step: below Linux's ephemeral range (32768-60999), where the
# kernel hands out no client ports. Eight per job, one per step id modulo 8.
SLURM_PORT_BASE, SLURM_PORT_COUNT, SLURM_PORTS_PER_JOB = 20000, 12768, 8


def _slurm_port(environ: Mapping[str, str]) -> tuple:
    """``(port, variable)``: ``MASTER_PORT`` if set, else one derived from ``SLURM_JOB_ID`` and
    ``SLURM_STEP_ID``: the same in every task of a step; different for two steps of a job running
    side by side (up to 8) and for jobs less than 1596 ids apart."""
    if "MASTER_PORT" in environ:
        return _int_var(environ, "MASTER_PORT", 1), "MASTER_PORT"
    if "SLURM_JOB_ID" not in environ:
        raise ValueError("Incomplete SLURM environment: set MASTER_PORT or SLURM_JOB_ID.")
    job = _int_var(environ, "SLURM_JOB_ID")
    step = int(environ["SLURM_STEP_ID"]) if environ.get("SLURM_STEP_ID", "").isdigit() else 0
    slot = (job * SLURM_PORTS_PER_JOB + step % SLURM_PORTS_PER_JOB) % SLURM_PORT_COUNT
    return SLURM_PORT_BASE + slot, "SLURM_JOB_ID/SLURM_STEP_ID (MASTER_PORT unset)"


def _check_block_placement(environ: Mapping[str, str], env: DistEnv) -> None:
    """detectron2 builds each machine's local group from consecutive ranks: refuse a step whose
    tasks are placed otherwise (``srun --distribution=cyclic``), where the local rank of DDP's
    device would disagree with ``SLURM_LOCALID``."""
    distribution = environ.get("SLURM_DISTRIBUTION", "block").split(":")[0]
    several_per_node = 1 < env.local_world_size < env.world_size  # else every order is a block
    blocks = distribution in ("block", "") or not several_per_node
    if not blocks or env.rank % env.local_world_size != env.local_rank:
        raise ValueError(
            f"SLURM_DISTRIBUTION={environ.get('SLURM_DISTRIBUTION', '(unset)')}, "
            f"SLURM_PROCID={env.rank}, SLURM_LOCALID={env.local_rank}: the tasks are not placed "
            "in blocks of consecutive ranks per node, which detectron2's local process groups "
            "need. Start the step with srun --distribution=block."
        )


def _from_slurm_vars(environ: Mapping[str, str]) -> DistEnv:
    """The step's process group: its size, layout and first host, never the job's (a step may
    run on part of the job's nodes)."""
    world_var = _first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or "SLURM_NTASKS"
    nodes_var = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    missing = [name for name in ("SLURM_PROCID", "SLURM_LOCALID", world_var) if name not in environ]
    if nodes_var is None:
        missing.append("SLURM_STEP_NODELIST")
    if missing:
        raise ValueError(f"Incomplete SLURM environment: {', '.join(missing)} missing.")
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    else:
        addr = slurm_hostnames(environ[nodes_var], nodes_var)[0]
    port, port_var = _slurm_port(environ)
    env = DistEnv(
        rank=_int_var(environ, "SLURM_PROCID"),
        world_size=_int_var(environ, world_var, 1),
        local_rank=_int_var(environ, "SLURM_LOCALID"),
        local_world_size=_slurm_tasks_per_node(environ),
        master_addr=addr,
        master_port=port,
        init_method=f"tcp://{addr}:{port}",
        source="slurm",
        port_var=port_var,
    )
    names = {
        "rank": "SLURM_PROCID",
        "world_size": world_var,
        "local_rank": "SLURM_LOCALID",
        "local_world_size": "SLURM_STEP_TASKS_PER_NODE",
    }
    _check_consistent(env, names)
    _check_block_placement(environ, env)
    return env


def _interactive_slurm_shell(environ: Mapping[str, str]) -> bool:
    """A command typed into ``srun --pty``'s shell: its terminal is the step's pty. (The tasks of
    a step never read a terminal; ``SLURM_PTY_PORT`` alone is inherited by steps started there.)"""
    return "SLURM_PTY_PORT" in environ and os.isatty(0)


def distributed_env(environ: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    """The process group the environment (default ``os.environ``) describes, or None.

    ``RANK`` or ``WORLD_SIZE`` set: the env:// variables (:data:`ENV_VARS`, all required).
    Otherwise a SLURM job step (``srun``: ``SLURM_STEP_ID``) of more than one task
    (``SLURM_STEP_NUM_TASKS``; the job's ``SLURM_NTASKS`` counts tasks a shell in an interactive
    allocation is not one of), unless the process runs in ``srun --pty``'s interactive shell:
    rank, world size and local rank from ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
    ``SLURM_LOCALID``; the master is the first host of ``SLURM_STEP_NODELIST`` (or
    ``MASTER_ADDR``). Raises ValueError naming the variable for an incomplete or contradictory
    environment, or for tasks not placed in blocks.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_env_vars(environ)
    tasks_var = _first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if "SLURM_STEP_ID" not in environ or tasks_var is None or _interactive_slurm_shell(environ):
        return None
    if _int_var(environ, tasks_var, 1) > 1:
        return _from_slurm_vars(environ)
    return None


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_brackets(prefix: str, body: str, suffix: str, nodelist: str, var: str) -> List[str]:
    hosts = []
    for part in body.split(","):
        match = _RANGE.match(part)
        if not match:
            raise ValueError(f"{var}={nodelist!r}: cannot parse the range {part!r}.")
        start, end = match.group(1), match.group(2) or match.group(1)
        if int(end) < int(start):
            raise ValueError(f"{var}={nodelist!r}: the range {part!r} is empty.")
        for number in range(int(start), int(end) + 1):
            hosts.append(f"{prefix}{str(number).zfill(len(start))}{suffix}")
    return hosts


def parse_slurm_nodelist(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> List[str]:
    """Expand a SLURM host list, e.g. ``"node[001-003,007],gpu5"`` -> ``["node001", "node002",
    "node003", "node007", "gpu5"]`` (zero padding kept; one bracket per host name). Raises
    ValueError naming ``var`` when it cannot be parsed."""
    items = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist)  # split at commas outside brackets
    if not nodelist or ",".join(items) != nodelist:
        raise ValueError(f"{var}={nodelist!r} is not a SLURM host list (e.g. node[01-04],gpu5).")
    hosts = []
    for item in items:
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\]([^\[\]]*)", item)
        if match:
            hosts += _expand_brackets(*match.groups(), nodelist, var)
        elif re.fullmatch(r"[A-Za-z0-9._-]+", item):
            hosts.append(item)
        else:
            raise ValueError(f"{var}={nodelist!r}: cannot parse the host {item!r}.")
    return hosts


def slurm_hostnames(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> List[str]:
    """The hosts of a SLURM host list: :func:`parse_slurm_nodelist`, or ``scontrol show
    hostnames`` for a list it cannot parse (several brackets in one name). Raises ValueError
    naming ``var`` if neither can (``scontrol`` may be missing, or installed without a
    configuration, e.g. on a workstation)."""
    try:
        return parse_slurm_nodelist(nodelist, var)
    except ValueError:
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            raise
        try:
            proc = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True, text=True, check=False, timeout=10,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ValueError(f"{var}={nodelist!r}: scontrol did not answer in 10 s.") from None
        if proc.returncode or not proc.stdout.split():
            raise ValueError(f"{var}={nodelist!r}: {proc.stderr.strip()}") from None
        return proc.stdout.split()


def _address_in_use(error: BaseException) -> bool:
    text = str(error).lower()
    return "address already in use" in text or f"errno: {errno.EADDRINUSE}" in text


def cuda_device(local_rank: int, local_world_size: int, device_count: int) -> int:
    """The CUDA device of a worker: its local rank where the machine's workers share the
    devices; device 0 where each worker sees only its own (``srun --gpus-per-task=1``,
    ``--gpu-bind=single:1``). Raises ValueError where the workers outnumber the devices."""
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise ValueError(
        f"Local rank {local_rank} of {local_world_size} workers, but {device_count} GPUs are "
        "visible: start at most one worker per GPU on each machine (or give each one GPU)."
    )


def init_distributed(env: DistEnv, timeout=DEFAULT_TIMEOUT) -> None:
    """Join the process group of ``env`` (NCCL with CUDA, gloo without) and set up the worker as
    detectron2's ``launch`` does: its CUDA device (:func:`cuda_device`), comm's local process
    group, a first synchronize."""
    has_gpu = torch.cuda.is_available()
    if has_gpu:  # before NCCL's init, so it uses this device
        torch.cuda.set_device(
            cuda_device(env.local_rank, env.local_world_size, torch.cuda.device_count())
        )
    try:
        dist.init_process_group(
            backend="NCCL" if has_gpu else "GLOO",
            init_method=env.init_method,
            world_size=env.world_size,
            rank=env.rank,
            timeout=timeout,
        )
    except (RuntimeError, OSError) as e:
        if _address_in_use(e):
            raise RuntimeError(
                f"Port {env.master_port} ({env.port_var}) on {env.master_addr} is already in "
                "use: choose a free port with MASTER_PORT."
            ) from e
        raise
    comm.create_local_process_group(env.local_world_size)
    # As in detectron2's launch: avoids a timeout after init_process_group.
    comm.synchronize()


def _forward_to_workers(signum, frame):
    for worker in multiprocessing.active_children():
        os.kill(worker.pid, signum)


def _single_machine_dist_url(args) -> str:
    """``args.dist_url``, or ``"auto"`` (detectron2's launch picks a free port) for a run on one
    machine left at detectron2's default URL, whose port is fixed per user: a second run on the
    machine would collide with the first."""
    default = default_argument_parser().get_default("dist_url")
    return "auto" if args.num_machines == 1 and args.dist_url == default else args.dist_url


def _spawn(main_func, args) -> None:
    """detectron2's ``launch``; the parent passes preemption signals on to the workers it
    spawned, and exits with their :data:`PREEMPTED_EXIT_CODE`."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    spawns = args.num_gpus * args.num_machines > 1 and in_main_thread  # handlers need both
    previous = {s: signal.signal(s, _forward_to_workers) for s in PREEMPTION_SIGNALS if spawns}
    try:
        launch(
            main_func,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=_single_machine_dist_url(args),
            args=(args,),
        )
    except ProcessExitedException as e:
        if e.exit_code == PREEMPTED_EXIT_CODE:
            raise SystemExit(PREEMPTED_EXIT_CODE) from e
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def requeue_slurm_job(environ: Mapping[str, str]) -> bool:
    """Requeue the Slurm batch job this process runs in (``scontrol requeue``) if it is still
    RUNNING: stopped by a warning signal (``--signal``), submitit's, or preemption within a
    ``GraceTime``. Slurm requeues a job it preempts with ``PreemptMode=REQUEUE`` by itself, and
    one that is cancelled or at its time limit (COMPLETING by then) is left to end; only batch
    jobs can be requeued (not the allocation ``srun`` or ``salloc`` made). Returns whether the
    job was requeued."""
    job = environ.get("SLURM_JOB_ID")
    scontrol = shutil.which("scontrol")
    if job is None or scontrol is None:
        return False
    show = subprocess.run(
        [scontrol, "-o", "show", "job", job], capture_output=True, text=True, check=False
    )
    if re.search(r"\bBatchFlag=0\b", show.stdout):
        logger.info(f"Slurm job {job} is not a batch job: not requeued by the run.")
        return False
    state = re.search(r"\bJobState=(\S+)", show.stdout)
    if state is None or state.group(1) != "RUNNING":
        logger.info(f"Slurm job {job} is {state and state.group(1)}: not requeued by the run.")
        return False
    proc = subprocess.run(
        [scontrol, "requeue", job], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        logger.warning(f"scontrol requeue {job} failed: {proc.stderr.strip()}")
        return False
    logger.warning(f"Requeued Slurm job {job}: it continues from the checkpoint (--resume).")
    return True


def _restarted(environ: Mapping[str, str]) -> Optional[str]:
    """The variable saying this is a restart of the run (a torchrun worker group restarted, a
    Slurm job requeued), or None."""
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if environ.get(name, "0").isdigit() and int(environ.get(name, "0")) > 0:
            return name
    return None


def launch_from_args(main_func, args, environ: Optional[Mapping[str, str]] = None) -> None:
    """Run ``main_func(args)`` for ``train_net.py``'s arguments: in the process group of the
    environment (:func:`distributed_env`) if there is one, else through detectron2's ``launch``
    (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``; ``"auto"`` for
    detectron2's default on one machine).

    A restarted torchrun worker group (``TORCHELASTIC_RESTART_COUNT`` > 0) or a requeued Slurm
    job (``SLURM_RESTART_COUNT`` > 0) sets ``args.resume``: it continues from the last
    checkpoint. A run stopped by a preemption signal (:data:`PREEMPTED_EXIT_CODE`) inside a
    Slurm job requeues the job from its rank 0 (:func:`requeue_slurm_job`). Raises ValueError
    when ``--num-gpus`` or ``--num-machines`` contradicts the environment.
    """
    environ = os.environ if environ is None else environ
    env = distributed_env(environ)
    restarted = _restarted(environ)
    if restarted and not args.resume:
        args.resume = True
        logger.warning(f"{restarted} > 0: resuming from the last checkpoint (--resume).")
    if env is not None:
        if args.num_gpus not in (1, env.local_world_size):  # 1: the default, i.e. not given
            raise ValueError(
                f"--num-gpus {args.num_gpus} contradicts the environment ({env.source}: "
                f"{env.local_world_size} workers per machine). The launcher starts the "
                "workers: drop --num-gpus (or make it match)."
            )
        if args.num_machines not in (1, env.num_machines):
            raise ValueError(
                f"--num-machines {args.num_machines} contradicts the environment "
                f"({env.source}: {env.num_machines} machines). Drop --num-machines (or make it "
                "match)."
            )
    try:
        if env is None:
            _spawn(main_func, args)
        else:
            init_distributed(env)
            main_func(args)
    except SystemExit as e:
        rank = 0 if env is None else env.rank
        if e.code == PREEMPTED_EXIT_CODE and rank == 0 and "SLURM_JOB_ID" in environ:
            requeue_slurm_job(environ)
        raise
