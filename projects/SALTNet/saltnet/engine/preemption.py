"""Stop training on a cluster's signal without losing an iteration.

:class:`PreemptionHook` turns SIGTERM, SIGUSR1 and SIGUSR2 into a graceful stop: the signal
handler only sets a flag; after each iteration the ranks agree on it (one all-reduce), so every
rank stops after the same iteration; the main process saves a checkpoint of that iteration
through the trainer's checkpointer (atomic with :class:`~saltnet.checkpoint.AtomicCheckpointer`,
``last_checkpoint`` updated) and every rank exits with :data:`PREEMPTED_EXIT_CODE`. ``--resume``
continues from that checkpoint exactly as from a periodic one.

A handler that was installed before the hook's (e.g. submitit's requeue on SIGUSR2) is called
after the checkpoint is written, for every signal any rank received (submitit sends SIGUSR2 and
SIGTERM: both handlers run); the exit code of one that exits (submitit's requeue) is kept.

Processes forked while the hook is active (DataLoader workers) block these signals: Slurm
signals every process of a job step, and PyTorch's workers die of SIGTERM, which would end the
run with an error before its checkpoint. The main process ends its workers itself.
"""

import logging
import os
import signal
import threading
from typing import List, Optional, Sequence

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

_active_hooks = 0  # PreemptionHooks between before_train and after_train in this process


def _shield_forked_child() -> None:
    if _active_hooks:
        signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)


os.register_at_fork(after_in_child=_shield_forked_child)


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
        self._received = set()  # the signal numbers received
        self._previous = {}

    def _handle(self, signum, frame):
        self._received.add(signum)

    def before_train(self):
        global _active_hooks
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Not in the main thread: training will not stop gracefully on signals.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        _active_hooks += 1

    def after_train(self):
        global _active_hooks
        if self._previous:
            _active_hooks -= 1
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _agreed_signals(self) -> List[int]:
        """The signals any rank received (empty: none), the same list on every rank."""
        flags = [int(signum in self._received) for signum in self.signals]
        if comm.get_world_size() > 1:
            on_cuda = dist.get_backend() == dist.Backend.NCCL
            tensor = torch.tensor(flags, device=torch.cuda.current_device() if on_cuda else "cpu")
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flags = tensor.tolist()
        return [signum for signum, flag in zip(self.signals, flags) if flag]

    def _save(self, iteration: int) -> None:
        """Save ``model_<iteration>``, unless a periodic checkpoint of this iteration is the
        last one already."""
        name = f"model_{iteration:07d}"  # the same name and content as PeriodicCheckpointer's
        last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""
        if os.path.basename(last) != f"{name}.pth":
            self.checkpointer.save(name, iteration=iteration)

    def after_step(self):
        received = self._agreed_signals()
        if not received:
            return
        iteration = self.trainer.iter
        names = "+".join(signal.Signals(signum).name for signum in received)
        logger.warning(f"{names} received: stopping after iteration {iteration}.")
        if comm.is_main_process():
            self._save(iteration)
        comm.synchronize()  # no rank exits before the checkpoint is on disk
        exit_code = PREEMPTED_EXIT_CODE
        for signum in received:
            previous: Optional[object] = self._previous.get(signum)
            if callable(previous):  # e.g. submitit's requeue
                try:
                    previous(signum, None)
                except SystemExit as e:  # its exit code is its protocol (submitit's requeue)
                    exit_code = e.code if exit_code == PREEMPTED_EXIT_CODE else exit_code
        raise SystemExit(exit_code)
