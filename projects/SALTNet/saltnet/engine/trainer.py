"""The training of SALT-Net, for YAML configs and LazyConfigs alike: :class:`SALTNetTrainer`
builds the model, optimizer, loader, DDP, the (AMP) trainer, the atomic checkpointer with the
sampler's state, the writers and hooks (evaluation, preemption) and applies the resume rule;
``train_net.py`` and ``tools/demo_job.py`` use it."""

import logging
import math
import os
import weakref
from typing import Mapping, Optional

import torch
from detectron2.config import instantiate
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_writers,
    hooks,
)
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import AtomicCheckpointer
from ..config.checks import amp_precision
from ..config.load import build_model, is_lazy, output_dir, weights
from ..data.loader import SeededMapDataset, build_saltnet_test_loader, build_saltnet_train_loader
from ..data.sampler import ResumableBatchSampler
from .preemption import PreemptionHook

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
    """The training of SALT-Net for both kinds of config, used like detectron2's
    :class:`DefaultTrainer` (``build_model``, ``test``, ``build_evaluator``, ``resume_or_load``,
    ``train``). A YAML config trains as DefaultTrainer does (SGD, warm-up + multi-step LR,
    periodic checkpoints, evaluation, PreciseBN); a LazyConfig as detectron2's
    ``tools/lazyconfig_train_net.py`` (its ``model``, ``optimizer``, ``lr_multiplier``,
    ``dataloader`` and ``train`` nodes). Both with:

    - the data loaders of :mod:`saltnet.data.loader` (box policy, robust image reading, exact
      resume: the sampler's seed is checkpointed and it skips to the resumed iteration), and
      the count of unreadable images skipped, logged when training ends;
    - :class:`COCOEvaluator` (box AP) for every test dataset of a YAML config;
    - atomic checkpoint writes (:class:`AtomicCheckpointer`) and the preemption hook;
    - the AMP trainer at ``SOLVER.AMP.PRECISION`` / ``train.amp.precision``;
    - DistributedDataParallel on CPU processes too (gloo);
    - a non-finite loss named by its term; the model printed to ``model.txt`` in the output folder.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ composes these parts itself and cannot be told the DDP device
        # ids of a CPU model, the trainer classes or the checkpointer: they are composed here.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        if not is_lazy(cfg):
            cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        if is_lazy(cfg):
            ddp, amp = cfg.train.ddp, cfg.train.amp
            amp_enabled, precision = amp.enabled, amp.precision
        else:
            ddp, amp = {"broadcast_buffers": False}, cfg.SOLVER.AMP
            amp_enabled, precision = amp.ENABLED, amp.PRECISION
        model = create_ddp_model(model, device_ids=ddp_device_ids(model), **ddp)
        self._trainer = build_trainer(model, data_loader, optimizer, amp_enabled, precision)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        sampler = getattr(data_loader, "batch_sampler", None)
        self.train_sampler = sampler if isinstance(sampler, ResumableBatchSampler) else None
        extra = {"train_sampler": self.train_sampler} if self.train_sampler else {}
        self.checkpointer = AtomicCheckpointer(
            model, output_dir(cfg), trainer=weakref.proxy(self), **extra
        )
        self.start_iter = 0
        self.max_iter = cfg.train.max_iter if is_lazy(cfg) else cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = self._lazy_hooks() if is_lazy(self.cfg) else super().build_hooks()
        dataset = getattr(self._trainer.data_loader, "dataset", None)
        if isinstance(dataset, SeededMapDataset):
            ret.append(hooks.CallbackHook(after_train=lambda _: _log_unreadable(dataset)))
        ret.append(PreemptionHook(self.checkpointer))  # last: its checkpoint follows the others
        return ret

    def _lazy_hooks(self):
        """The hooks of detectron2's ``tools/lazyconfig_train_net.py``."""
        cfg = self.cfg

        def test_and_save_results():
            self._last_eval_results = self.test(cfg, self.model)
            return self._last_eval_results

        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        ]
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, **cfg.train.checkpointer))
        ret.append(hooks.EvalHook(cfg.train.eval_period, test_and_save_results))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.train.log_period))
        return ret

    def build_writers(self):
        return build_writers(output_dir(self.cfg), self.max_iter)

    def resume_or_load(self, resume: bool = True) -> None:
        """Load the last checkpoint of the output folder if ``resume`` and there is one (and
        continue at the iteration after it), else the config's weights."""
        self.checkpointer.resume_or_load(weights(self.cfg), resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            # The checkpoint stores the iteration that just finished: continue at the next one.
            self.start_iter = self.iter + 1
        if self.train_sampler is not None:
            self.train_sampler.start_iter = self.start_iter

    def train(self):
        if not is_lazy(self.cfg):
            return super().train()
        TrainerBase.train(self, self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_model(cls, cfg):
        """The model of ``cfg`` on its device; its print goes to ``model.txt`` in the output
        folder (main process) rather than to the terminal."""
        model = build_model(cfg)
        if comm.is_main_process():
            path = os.path.join(output_dir(cfg), "model.txt")
            PathManager.mkdirs(output_dir(cfg))
            with PathManager.open(path, "w") as f:
                f.write(f"{model}\n")
            logging.getLogger("detectron2").info(f"Model printed to {path}")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        if not is_lazy(cfg):
            return super().build_optimizer(cfg, model)
        cfg.optimizer.params.model = model
        return instantiate(cfg.optimizer)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # A LazyConfig's schedule is given to the LRScheduler hook (see _lazy_hooks).
        return None if is_lazy(cfg) else super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        if is_lazy(cfg):
            return instantiate(cfg.dataloader.train)  # registers its datasets, checks classes
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

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test for a YAML config; a LazyConfig's test loader and evaluator
        (``dataloader.test``, ``dataloader.evaluator``; None without an evaluator)."""
        if not is_lazy(cfg):
            return super().test(cfg, model, evaluators)
        if "evaluator" in cfg.dataloader:
            evaluator = instantiate(cfg.dataloader.evaluator)
            ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
            print_csv_format(ret)
            return ret
