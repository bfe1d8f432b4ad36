"""The :class:`DefaultTrainer` of SALT-Net, shared by ``train_net.py`` and
``tools/demo_job.py``."""

import contextlib
import logging
import math
import os
import weakref
from typing import Mapping, Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_writers
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

from ..checkpoint.checkpointer import AtomicCheckpointer
from ..config.checks import amp_precision
from ..data.loader import SeededMapDataset, build_saltnet_test_loader, build_saltnet_train_loader
from ..data.sampler import ResumableBatchSampler

__all__ = [
    "SALTNetAMPTrainer",
    "SALTNetSimpleTrainer",
    "SALTNetTrainer",
    "MetricPrinter",
    "build_trainer",
    "build_writers",
    "ddp_device_ids",
]


def ddp_device_ids(model: torch.nn.Module) -> Optional[list]:
    """``device_ids`` for DistributedDataParallel: this process's GPU (the current device, which
    is the local rank unless each worker sees one GPU only) for a CUDA model, None for a CPU
    model (DDP rejects device ids there; detectron2's ``create_ddp_model`` always passes them)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return [torch.cuda.current_device()] if on_cuda else None


@contextlib.contextmanager
def _ddp_device_ids_of_the_model():
    """Within this context, ``create_ddp_model`` (called by DefaultTrainer.__init__ without
    device ids, so it would pass this process's GPU, which DDP rejects for a CPU model) passes
    :func:`ddp_device_ids`."""
    create_ddp_model = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = lambda model, **kwargs: create_ddp_model(
        model, device_ids=ddp_device_ids(model), **kwargs
    )
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create_ddp_model


class MetricPrinter(CommonMetricPrinter):
    """detectron2's :class:`CommonMetricPrinter`, which divides by zero when it prints twice at
    one iteration before ``IterationTimer`` has recorded times: the last print of a run stopped
    (preempted, or by an error) in its first iterations, right after a periodic print. The run
    then ended with a ZeroDivisionError instead of its own exit (a preempted run's status 75)."""

    def _get_eta(self, storage):
        if (
            "time" not in storage.histories()
            and self._last_write is not None
            and self._last_write[0] == storage.iter
        ):
            return None  # no iteration since the last estimate: no ETA to print
        return super()._get_eta(storage)


def build_writers(output_dir: str, max_iter: int) -> list:
    """detectron2's ``default_writers`` (metric printer, JSON, TensorBoard), printing with
    :class:`MetricPrinter`."""
    return [
        MetricPrinter(max_iter) if type(w) is CommonMetricPrinter else w
        for w in default_writers(output_dir, max_iter)
    ]


class _NamedNonFiniteLoss:
    """Stops training at a non-finite loss with a FloatingPointError that names the loss terms,
    the iteration and the rank (detectron2 checks the sum only, on the main process)."""

    def _write_metrics(
        self,
        loss_dict: Mapping[str, torch.Tensor],
        data_time: float,
        prefix: str = "",
        iter: Optional[int] = None,
    ) -> None:
        iter = self.iter if iter is None else iter
        if (iter + 1) % self.gather_metric_period:  # detectron2 checks on these iterations only
            return
        # One host sync for the check; the values are fetched only to write the error.
        if not torch.isfinite(torch.stack([v.detach().float() for v in loss_dict.values()])).all():
            values = {k: float(v.detach()) for k, v in loss_dict.items()}
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise FloatingPointError(
                f"Non-finite loss {', '.join(bad)} at iteration {iter} on rank {comm.get_rank()} "
                f"({terms}). Training stopped; the checkpoints already written are intact and "
                "--resume continues from the last one. Usual causes: a learning rate too high "
                "for the batch size (SOLVER.BASE_LR, SOLVER.WARMUP_ITERS), or broken input."
            )
        super()._write_metrics(loss_dict, data_time, prefix, iter)


class SALTNetSimpleTrainer(_NamedNonFiniteLoss, SimpleTrainer):
    """detectron2's SimpleTrainer with the non-finite loss message of ``_NamedNonFiniteLoss``."""


class SALTNetAMPTrainer(_NamedNonFiniteLoss, AMPTrainer):
    """detectron2's AMPTrainer (gradient overflow skips the step through its GradScaler) with
    the non-finite loss message of ``_NamedNonFiniteLoss``."""


def build_trainer(
    model, data_loader, optimizer, amp: bool = False, precision: str = "float16"
) -> SimpleTrainer:
    """The training loop: :class:`SALTNetAMPTrainer` autocasting to ``precision``
    (``"float16"`` or ``"bfloat16"``) if ``amp``, else :class:`SALTNetSimpleTrainer`.
    Raises :class:`ConfigError` for another precision."""
    if not amp:
        return SALTNetSimpleTrainer(model, data_loader, optimizer)
    return SALTNetAMPTrainer(model, data_loader, optimizer, precision=amp_precision(precision))


def _log_unreadable(dataset: SeededMapDataset) -> None:
    if dataset.unreadable_files():
        logging.getLogger(__name__).warning(dataset.unreadable_summary())


class SALTNetTrainer(DefaultTrainer):
    """detectron2's :class:`DefaultTrainer` (SGD, warm-up + multi-step LR, periodic checkpoints,
    evaluation, CommonMetricPrinter with ETA, TensorBoard and JSON event files) with:

    - the data loaders of :mod:`saltnet.data.loader` (box policy, robust image reading, exact
      resume: the sampler's seed is checkpointed and it skips to the resumed iteration), and
      the count of unreadable images skipped, logged when training ends;
    - :class:`COCOEvaluator` (box AP) for every test dataset;
    - atomic checkpoint writes (:class:`AtomicCheckpointer`);
    - DistributedDataParallel on CPU processes too (gloo);
    - a non-finite loss named by its term.
    """

    def __init__(self, cfg: CfgNode):
        with _ddp_device_ids_of_the_model():
            super().__init__(cfg)
        # What DefaultTrainer.__init__ cannot be told: our trainer classes and AMP precision
        # (on the parts it built), and the checkpointer (replaced in build_hooks).
        old = self._trainer
        amp = self.cfg.SOLVER.AMP
        self._trainer = build_trainer(
            old.model, old.data_loader, old.optimizer, amp.ENABLED, amp.PRECISION
        )

    def build_hooks(self):
        # The last step of DefaultTrainer.__init__: the checkpointer exists, its hook does not.
        sampler = getattr(self._trainer.data_loader, "batch_sampler", None)
        self.train_sampler = sampler if isinstance(sampler, ResumableBatchSampler) else None
        extra = {"train_sampler": self.train_sampler} if self.train_sampler else {}
        self.checkpointer = AtomicCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **extra
        )
        ret = super().build_hooks()
        dataset = getattr(self._trainer.data_loader, "dataset", None)
        if isinstance(dataset, SeededMapDataset):
            ret.append(hooks.CallbackHook(after_train=lambda _: _log_unreadable(dataset)))
        return ret

    def build_writers(self):
        return build_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if self.train_sampler is not None:
            self.train_sampler.start_iter = self.start_iter

    @classmethod
    def build_train_loader(cls, cfg):
        return build_saltnet_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_saltnet_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox",),
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            output_dir=output_folder,
        )
