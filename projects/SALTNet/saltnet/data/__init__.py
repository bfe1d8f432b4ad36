"""Dataset registration (COCO json, VOC folders, config keys) and the synthetic dataset."""

from .register import (
    add_dataset_config,
    register_coco_json,
    register_dataset_spec,
    register_datasets,
    register_datasets_from_cfg,
    register_datasets_from_lazy_cfg,
    register_voc_folder,
)
from .synthetic import (
    SYNTHETIC_CLASSES,
    prepare_synthetic_dataset,
    register_synthetic,
    synthetic_dataset_name,
)

__all__ = [
    "SYNTHETIC_CLASSES",
    "add_dataset_config",
    "prepare_synthetic_dataset",
    "register_coco_json",
    "register_dataset_spec",
    "register_datasets",
    "register_datasets_from_cfg",
    "register_datasets_from_lazy_cfg",
    "register_synthetic",
    "register_voc_folder",
    "synthetic_dataset_name",
]
