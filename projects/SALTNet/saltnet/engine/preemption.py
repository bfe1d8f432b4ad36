"""Stop training on a cluster's signal without losing an iteration.

:class:`PreemptionHook` turns SIGTERM, SIGUSR1 and SIGUSR2 into a graceful stop: the signal
handler only sets a flag; after each iteration the ranks agree on it (one all-reduce), so every
rank stops after the same iteration; the main process saves a checkpoint of that iteration
through the trainer's checkpointer (atomic with :class:`~saltnet.checkpoint.AtomicCheckpointer`,
``last_checkpoint`` updated) and every rank exits with :data:`PREEMPTED_EXIT_CODE`. ``--resume``
continues from that checkpoint exactly as from a periodic one.

A handler that was installed before the hook's (e.g. submitit's requeue on SIGUSR2) is called
after the checkpoint is written.
"""

import logging
import signal
import threading
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["PREEMPTED_EXIT_CODE", "PREEMPTION_SIGNALS", "PreemptionHook"]

logger = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h: "temporary failure, the user is invited to retry" (with --resume).
PREEMPTED_EXIT_CODE = 75
# SLURM and torchrun stop with SIGTERM; sbatch --signal sends SIGUSR1 (or another) ahead of the
# time limit; submitit asks for SIGUSR2.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionHook(HookBase):
    """Checkpoint and exit after the iteration during which a signal of ``signals`` arrived.

    Register it after the trainer's other hooks, so that the checkpoint includes their
    ``after_step`` (the LR scheduler's step), as a periodic checkpoint does. Signal handlers
    can only be installed from the main thread; elsewhere the hook warns and does nothing.
    """

    def __init__(self, checkpointer, signals: Sequence[int] = PREEMPTION_SIGNALS):
        """``checkpointer``: the trainer's (its ``save`` writes ``<name>.pth`` and tags it as
        ``last_checkpoint``)."""
        self.checkpointer = checkpointer
        self.signals = tuple(signals)
        self._received = 0  # the last signal number received, 0 for none
        self._previous = {}

    def _handle(self, signum, frame):
        self._received = signum

    def before_train(self):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Not in the main thread: training will not stop gracefully on signals.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def after_train(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _agreed_signal(self) -> int:
        """The largest signal number any rank received (0: none), the same on every rank."""
        if comm.get_world_size() == 1:
            return self._received
        on_cuda = dist.get_backend() == dist.Backend.NCCL
        flag = torch.tensor(
            [self._received], device=torch.cuda.current_device() if on_cuda else "cpu"
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def after_step(self):
        signum = self._agreed_signal()
        if not signum:
            return
        iteration = self.trainer.iter
        name = signal.Signals(signum).name
        logger.warning(f"{name} received: stopping after iteration {iteration}.")
        if comm.is_main_process():
            # The same name and content as PeriodicCheckpointer's files.
            self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        comm.synchronize()  # no rank exits before the checkpoint is on disk
        previous: Optional[object] = self._previous.get(signum)
        if callable(previous):  # e.g. submitit's requeue; it may exit itself
            previous(signum, None)
        raise SystemExit(PREEMPTED_EXIT_CODE)
