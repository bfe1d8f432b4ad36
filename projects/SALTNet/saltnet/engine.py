"""Config setup and the :class:`DefaultTrainer` of SALT-Net, shared by ``train_net.py``,
``demo/demo.py`` and ``tools/demo_job.py``."""

import os
import weakref

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from .checkpoint import AtomicCheckpointer
from .config import add_saltnet_config
from .data import add_dataset_config

__all__ = ["SALTNetTrainer", "get_saltnet_cfg", "load_yaml_config"]


class SALTNetTrainer(DefaultTrainer):
    """detectron2's :class:`DefaultTrainer` (SGD, warm-up + multi-step LR, periodic checkpoints,
    evaluation, CommonMetricPrinter with ETA, TensorBoard and JSON event files), evaluating every
    dataset with :class:`COCOEvaluator` (box AP) and writing checkpoints atomically."""

    def build_hooks(self):
        # DefaultTrainer.__init__ builds the hooks last: swap in the atomic checkpointer first, so
        # that resume_or_load and the PeriodicCheckpointer hook both use it.
        self.checkpointer = AtomicCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox",),
            max_dets_per_image=cfg.MODEL.SALTNET.DETECTIONS_PER_IMAGE,
            output_dir=output_folder,
        )


def get_saltnet_cfg() -> CfgNode:
    """detectron2's default config plus ``MODEL.SALTNET`` and the dataset-registration keys."""
    cfg = get_cfg()
    add_saltnet_config(cfg)
    add_dataset_config(cfg)
    return cfg


def load_yaml_config(config_file: str, opts=()) -> CfgNode:
    """A frozen config from a YAML file and ``KEY VALUE`` overrides.

    Raises FileNotFoundError for a missing file and detectron2's KeyError (naming the key) for a
    key that does not exist.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file {config_file!r} does not exist.")
    cfg = get_saltnet_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg
