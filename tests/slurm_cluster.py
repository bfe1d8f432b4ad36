"""A real Slurm cluster on this machine, for the tests of tests/test_slurm.py.

:class:`SlurmCluster` writes a ``slurm.conf`` into a folder and starts a private ``munged`` (its
own key and socket), one ``slurmctld`` and six ``slurmd`` (nodes ``saltnet-n1`` to
``saltnet-n6``, all this machine at 127.0.0.1, each on its own port, two CPUs each);
:meth:`SlurmCluster.stop` ends them by their process ids. Two partitions on n1 and n2 make
preemption happen: jobs of ``high`` preempt jobs of ``low`` (the default partition,
``PreemptMode=REQUEUE`` with a ``GraceTime``; at its start the job's
``--signal`` signal, else SIGTERM: ``SlurmctldParameters=preempt_send_user_signal``, which
Slurm 22.05 reads there and not from ``SchedulerParameters``); ``high2`` and ``low2`` are the
same on n5 and n6, for a second such test at the same time. The partition ``side`` (n3 and
n4) runs jobs beside them that nothing preempts. Clients find the cluster
through ``SLURM_CONF`` (:attr:`SlurmCluster.env`).

Debian's ``slurm-wlm`` and ``munge`` provide the programs (the README's ``make test`` installs
them where it can). ``python tests/slurm_cluster.py DIR`` starts a cluster and keeps it running
until Ctrl-C, for trying the commands of docs/CLUSTERS.md by hand.
"""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

NODES = tuple(f"saltnet-n{i}" for i in range(1, 7))
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
# The states of a job that is not over (SIGNALING: preempted, within its GraceTime).
UNFINISHED = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
              "SUSPENDED", "SIGNALING")  # fmt: skip
# Seconds a preempted job of the low partition has to stop before Slurm requeues it by force.
GRACE_TIME = 20

CONFIG = """\
ClusterName=saltnet
FirstJobId={first_job_id}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
KillWait=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=sched_interval=2
SlurmctldParameters=preempt_send_user_signal
{nodes}
PartitionName=low Nodes={n1},{n2} Default=YES PriorityTier=1 PreemptMode=REQUEUE \
GraceTime={grace} OverSubscribe=EXCLUSIVE MaxTime=INFINITE State=UP
PartitionName=high Nodes={n1},{n2} PriorityTier=2 PreemptMode=REQUEUE MaxTime=INFINITE State=UP
PartitionName=side Nodes={n3},{n4} PriorityTier=1 MaxTime=INFINITE State=UP
PartitionName=low2 Nodes={n5},{n6} PriorityTier=1 PreemptMode=REQUEUE GraceTime={grace} \
OverSubscribe=EXCLUSIVE MaxTime=INFINITE State=UP
PartitionName=high2 Nodes={n5},{n6} PriorityTier=2 PreemptMode=REQUEUE MaxTime=INFINITE State=UP
"""
NODE = "NodeName={} NodeAddr=127.0.0.1 Port={} CPUs=2 RealMemory=1000 State=UNKNOWN"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable_reason() -> Optional[str]:
    """Why no cluster can start here (None: it can)."""
    if os.geteuid() != 0:
        return "slurmd runs jobs as root here: the tests need root"
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge)"
    return None


class SlurmCluster:
    """munged, slurmctld and six slurmd configured in ``root`` (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.config = self.root / "slurm.conf"
        self.env: Dict[str, str] = dict(os.environ, SLURM_CONF=str(self.config))
        self._daemons: List[subprocess.Popen] = []
        self._hosts_line: Optional[str] = None

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self._daemons.append(
            subprocess.Popen(
                args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def _resolve_nodes(self) -> None:
        """The node names serve as master addresses: make them resolve (to 127.0.0.1)."""
        try:
            for node in NODES:
                socket.gethostbyname(node)
        except OSError:
            self._hosts_line = f"127.0.0.1 {' '.join(NODES)}  # tests/slurm_cluster.py\n"
            with open("/etc/hosts", "a") as hosts:
                hosts.write(self._hosts_line)

    def start(self, timeout: float = 30) -> "SlurmCluster":
        for sub in ("state", "log", *(f"spool/{node}" for node in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged wants its socket's folder searchable by all
        self.config.write_text(
            CONFIG.format(
                host=socket.gethostname().split(".")[0],
                root=self.root,
                ctld_port=_free_port(),
                nodes="\n".join(NODE.format(node, _free_port()) for node in NODES),
                **{f"n{i}": node for i, node in enumerate(NODES, 1)},
                grace=GRACE_TIME,
                # Training derives its port from the job id (saltnet.engine.launch), and every
                # "node" here is this machine: clusters of test sessions running side by side
                # (another checkout's) must not number their jobs alike.
                first_job_id=random.randrange(1000, 1_000_000),
            )
        )
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._resolve_nodes()
        self._daemon(
            "munged", "munged", "-F", "--force", f"--socket={self.root}/munge.sock",
            f"--key-file={key}", f"--pid-file={self.root}/munged.pid",
            f"--log-file={self.root}/log/munged.log", f"--seed-file={self.root}/munged.seed",
        )  # fmt: skip
        self._wait(lambda: (self.root / "munge.sock").exists(), timeout, "munged")
        self._daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.config))
        for node in NODES:
            self._daemon(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(self.config))
        self._wait(self._nodes_idle, timeout, "slurmctld/slurmd")
        return self

    def _nodes_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in proc.stdout.splitlines())
        return all(states.get(node) == "idle" for node in NODES)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [d for d in self._daemons if d.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "".join(p.read_text()[-1500:] for p in (self.root / "log").glob("*"))
                self.stop()
                raise RuntimeError(f"{what} did not start: {logs}")
            time.sleep(0.2)

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command (``sbatch``, ``scontrol``, ...) against this cluster."""
        kwargs.setdefault("env", self.env)
        proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
        return proc

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def wait_job(self, job_id: str, timeout: float = 300) -> Dict[str, str]:
        """Wait until the job ends; its fields."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields["JobState"] not in UNFINISHED:
                return fields
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still {fields['JobState']} after {timeout} s")
            time.sleep(0.3)

    def _kill_step_daemons(self) -> None:
        """slurmstepd of this cluster's jobs left behind (a step that did not end when the
        daemons stopped), found by this cluster's ``SLURM_CONF`` in their environment."""
        for proc in Path("/proc").iterdir():
            try:
                if (proc / "comm").read_text().strip() != "slurmstepd":
                    continue
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"SLURM_CONF={self.config}".encode() in environ:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """Cancel what still runs, end the daemons (by pid) and remove the hosts entry."""
        if self._daemons:
            try:
                self.run("scancel", "--full", "--user=root", check=False, timeout=20)
            except subprocess.TimeoutExpired:
                pass  # the daemons end their jobs' processes with them
        for daemon in reversed(self._daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
        for daemon in self._daemons:
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self._daemons = []
        self._kill_step_daemons()
        if self._hosts_line:
            hosts = Path("/etc/hosts")
            hosts.write_text(hosts.read_text().replace(self._hosts_line, ""))
            self._hosts_line = None


if __name__ == "__main__":
    cluster = SlurmCluster(Path(sys.argv[1]).resolve()).start()
    print(f"Slurm runs: export SLURM_CONF={cluster.config}  (Ctrl-C stops it)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short (daemons and the hosts
        # entry left behind).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
