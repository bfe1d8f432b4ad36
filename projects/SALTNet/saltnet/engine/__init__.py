"""Training: the trainer, the launcher (spawn, torchrun, srun) and preemption."""

from .launch import launch_from_args
from .preemption import PREEMPTED_EXIT_CODE, PreemptionHook
from .trainer import SALTNetTrainer

__all__ = ["PREEMPTED_EXIT_CODE", "PreemptionHook", "SALTNetTrainer", "launch_from_args"]
