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
from detectron2.engine import launch
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
# srun sets these in every task of a job step; SLURM_STEP_ID tells a step from the batch script.
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")


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


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int:
    """The tasks on each node, from ``SLURM_NTASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE``
    (``"4(x2)"``); raise when the nodes run different numbers of tasks."""
    if "SLURM_NTASKS_PER_NODE" in environ:
        return _int_var(environ, "SLURM_NTASKS_PER_NODE", 1)
    value = environ.get("SLURM_TASKS_PER_NODE")
    if value is None:
        raise ValueError(
            "Incomplete SLURM environment: neither SLURM_NTASKS_PER_NODE nor "
            "SLURM_TASKS_PER_NODE is set."
        )
    counts = {m.group(1) for m in re.finditer(r"(\d+)(?:\(x\d+\))?(?:,|$)", value)}
    if len(counts) != 1 or not re.fullmatch(r"\d+(\(x\d+\))?(,\d+(\(x\d+\))?)*", value):
        raise ValueError(
            f"SLURM_TASKS_PER_NODE={value!r}: detectron2 needs the same number of tasks on every "
            "node (e.g. sbatch --ntasks-per-node)."
        )
    return int(counts.pop())


def _slurm_port(environ: Mapping[str, str]) -> tuple:
    """``(port, variable)``: ``MASTER_PORT`` if set, else one derived from ``SLURM_JOB_ID`` (the
    same on every node of a job, different for jobs running side by side)."""
    if "MASTER_PORT" in environ:
        return _int_var(environ, "MASTER_PORT", 1), "MASTER_PORT"
    if "SLURM_JOB_ID" not in environ:
        raise ValueError("Incomplete SLURM environment: set MASTER_PORT or SLURM_JOB_ID.")
    return 20000 + _int_var(environ, "SLURM_JOB_ID") % 20000, "SLURM_JOB_ID (MASTER_PORT unset)"


def _from_slurm_vars(environ: Mapping[str, str]) -> DistEnv:
    environ = dict(environ)
    if "SLURM_JOB_NODELIST" not in environ and "SLURM_NODELIST" in environ:
        environ["SLURM_JOB_NODELIST"] = environ["SLURM_NODELIST"]  # the older name
    missing = [name for name in SLURM_VARS if name not in environ]
    if missing:
        raise ValueError(f"Incomplete SLURM environment: {', '.join(missing)} missing.")
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    else:
        addr = slurm_hostnames(environ["SLURM_JOB_NODELIST"], "SLURM_JOB_NODELIST")[0]
    port, port_var = _slurm_port(environ)
    env = DistEnv(
        rank=_int_var(environ, "SLURM_PROCID"),
        world_size=_int_var(environ, "SLURM_NTASKS", 1),
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
        "world_size": "SLURM_NTASKS",
        "local_rank": "SLURM_LOCALID",
        "local_world_size": "SLURM_NTASKS_PER_NODE",
    }
    return _check_consistent(env, names)


def distributed_env(environ: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    """The process group the environment (default ``os.environ``) describes, or None.

    ``RANK`` or ``WORLD_SIZE`` set: the env:// variables (:data:`ENV_VARS`, all required).
    Otherwise a SLURM job step (``srun``: ``SLURM_STEP_ID``) of more than one task: rank, world
    size and local rank from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is
    the first host of ``SLURM_JOB_NODELIST`` (or ``MASTER_ADDR``). Raises ValueError naming the
    variable for an incomplete or contradictory environment.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_env_vars(environ)
    if "SLURM_STEP_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
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
    """The hosts of a SLURM host list: ``scontrol show hostnames`` where SLURM is installed,
    else :func:`parse_slurm_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return parse_slurm_nodelist(nodelist, var)
    proc = subprocess.run(
        [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    hosts = proc.stdout.split()
    if proc.returncode or not hosts:
        raise ValueError(f"{var}={nodelist!r}: scontrol cannot parse it ({proc.stderr.strip()}).")
    return hosts


def _address_in_use(error: BaseException) -> bool:
    text = str(error).lower()
    return "address already in use" in text or f"errno: {errno.EADDRINUSE}" in text


def init_distributed(env: DistEnv, timeout=DEFAULT_TIMEOUT) -> None:
    """Join the process group of ``env`` (NCCL with CUDA, gloo without) and set up the worker as
    detectron2's ``launch`` does: the CUDA device of ``env.local_rank``, comm's local process
    group, a first synchronize."""
    has_gpu = torch.cuda.is_available()
    if has_gpu and env.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"Local rank {env.local_rank} ({env.source}) but only {torch.cuda.device_count()} "
            "GPUs are visible: start at most one worker per GPU on each machine."
        )
    if has_gpu:
        torch.cuda.set_device(env.local_rank)  # before NCCL's init, so it uses this device
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
            dist_url=args.dist_url,
            args=(args,),
        )
    except ProcessExitedException as e:
        if e.exit_code == PREEMPTED_EXIT_CODE:
            raise SystemExit(PREEMPTED_EXIT_CODE) from e
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def launch_from_args(main_func, args, environ: Optional[Mapping[str, str]] = None) -> None:
    """Run ``main_func(args)`` for ``train_net.py``'s arguments: in the process group of the
    environment (:func:`distributed_env`) if there is one, else through detectron2's ``launch``
    (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``).

    A restarted torchrun worker group (``TORCHELASTIC_RESTART_COUNT`` > 0) sets ``args.resume``:
    it continues from the last checkpoint. Raises ValueError when ``--num-gpus`` or
    ``--num-machines`` contradicts the environment.
    """
    environ = os.environ if environ is None else environ
    env = distributed_env(environ)
    if env is None:
        _spawn(main_func, args)
        return
    if args.num_gpus not in (1, env.local_world_size):  # 1: the default, i.e. not given
        raise ValueError(
            f"--num-gpus {args.num_gpus} contradicts the environment ({env.source}: "
            f"{env.local_world_size} workers per machine). The launcher starts the workers: "
            "drop --num-gpus (or make it match)."
        )
    if args.num_machines not in (1, env.num_machines):
        raise ValueError(
            f"--num-machines {args.num_machines} contradicts the environment ({env.source}: "
            f"{env.num_machines} machines). Drop --num-machines (or make it match)."
        )
    if int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 and not args.resume:
        args.resume = True
        logger.warning("Restarted worker group: resuming from the last checkpoint (--resume).")
    init_distributed(env)
    main_func(args)
