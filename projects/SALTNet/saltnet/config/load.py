"""One entry for both kinds of config: :func:`load_config` reads a YAML config or a LazyConfig
with its overrides, and the functions below answer the questions scripts ask of either kind
(which kind, output folder, device, weights, test datasets, test resize, the model)."""

import os
from typing import List, Sequence, Tuple

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..data.register import (
    lazy_dataset_names,
    register_datasets_from_cfg,
    register_datasets_from_lazy_cfg,
)
from ..data.transforms import with_resize_backend
from .defaults import load_yaml_config
from .lazy_overrides import check_lazy_overrides

__all__ = [
    "build_model",
    "device",
    "is_lazy",
    "load_config",
    "output_dir",
    "register_datasets",
    "test_datasets",
    "test_resize",
    "weights",
]


def load_config(path: str, opts: Sequence[str] = ()):
    """The config of ``path`` with ``opts``: a ``.py`` LazyConfig with
    ``key=value`` overrides (a misspelt key is an error, detectron2 would add it) or a checked,
    frozen YAML config with ``KEY VALUE`` overrides. FileNotFoundError for a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    if path.endswith(".py"):
        cfg = LazyConfig.load(path)
        check_lazy_overrides(cfg, opts)
        return LazyConfig.apply_overrides(cfg, list(opts))
    return load_yaml_config(path, opts)


def register_datasets(cfg) -> None:
    """Register the datasets the config names (``DATASETS.REGISTER`` / ``dataloader.register``
    and the synthetic splits it uses; the synthetic dataset is generated on first use)."""
    if is_lazy(cfg):
        register_datasets_from_lazy_cfg(cfg)
    else:
        register_datasets_from_cfg(cfg)


def is_lazy(cfg) -> bool:
    """Whether ``cfg`` is a LazyConfig (else a YAML :class:`CfgNode`)."""
    return not isinstance(cfg, CfgNode)


def output_dir(cfg) -> str:
    return cfg.train.output_dir if is_lazy(cfg) else cfg.OUTPUT_DIR


def device(cfg) -> str:
    return cfg.train.device if is_lazy(cfg) else cfg.MODEL.DEVICE


def weights(cfg) -> str:
    """The checkpoint the model starts from (``""``: none)."""
    return cfg.train.init_checkpoint if is_lazy(cfg) else cfg.MODEL.WEIGHTS


def test_datasets(cfg) -> List[str]:
    return lazy_dataset_names(cfg, "test") if is_lazy(cfg) else list(cfg.DATASETS.TEST)


def test_resize(cfg) -> Tuple[T.Augmentation, str]:
    """The test-time resize and the model's channel order ("BGR" / "RGB"): ``INPUT.*_SIZE_TEST``
    by ``INPUT.RESIZE_BACKEND`` and ``INPUT.FORMAT``, or the LazyConfig test mapper's first
    augmentation and its ``image_format``."""
    if is_lazy(cfg):
        mapper = cfg.dataloader.test.mapper
        return instantiate(mapper.augmentations[0]), mapper.image_format
    size = cfg.INPUT.MIN_SIZE_TEST
    aug = T.ResizeShortestEdge([size, size], cfg.INPUT.MAX_SIZE_TEST)
    return with_resize_backend(aug, cfg.INPUT.RESIZE_BACKEND), cfg.INPUT.FORMAT


def build_model(cfg, **kwargs) -> nn.Module:
    """The (untrained) model of ``cfg`` on its device; ``kwargs`` override constructor arguments
    of the meta-architecture (e.g. ``output_point_sets``)."""
    if is_lazy(cfg):
        model_cfg = cfg.model.copy()
        for key, value in kwargs.items():
            model_cfg[key] = value
        return instantiate(model_cfg).to(device(cfg))
    model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg, **kwargs)
    return model.to(device(cfg))
