"""COCO 2017 detection: RGB input, shorter side 800 (longer at most 1333), horizontal flip.

Training goes through SALT-Net's loader (box policy, robust image reading, exact resume); see
``saltnet/data/loader.py``. ``seed`` comes from ``train``.
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from saltnet.data.loader import build_saltnet_train_loader, get_registered_dataset_dicts
from saltnet.data.mapper import SALTNetDatasetMapper

dataloader = OmegaConf.create()

dataloader.train = L(build_saltnet_train_loader)(
    dataset_names="coco_2017_train",
    mapper=L(SALTNetDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=800, sample_style="choice", max_size=1333),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
    ),
    total_batch_size=16,
    num_workers=4,
    seed="${train.seed}",
    num_classes="${model.num_classes}",  # checked against the datasets' classes
    register="${..register}",
    synthetic_root="${..synthetic_root}",
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_registered_dataset_dicts)(
        names="coco_2017_val",
        filter_empty=False,
        register="${...register}",
        synthetic_root="${...synthetic_root}",
    ),
    mapper=L(SALTNetDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

# Results (and, for datasets not in COCO format, their COCO conversion) go to the run's
# output_dir/inference, as detectron2's DefaultTrainer does.
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=("bbox",),
    output_dir="${...train.output_dir}/inference",
)

# Datasets the loaders register before loading (so any detectron2 tool can use them): a list of
# "NAME=coco:JSON_FILE:IMAGE_ROOT" / "NAME=voc:VOC_DIR:SPLIT[:CLASSES]" specs, and where the
# synthetic dataset lives ("" = $SALTNET_SYNTHETIC_ROOT or datasets/saltnet_synthetic).
dataloader.register = []
dataloader.synthetic_root = ""
