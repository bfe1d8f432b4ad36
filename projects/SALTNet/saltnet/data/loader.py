"""Training and test data loaders of SALT-Net: checked data, exact resume, robust image reading.

The training loader differs from detectron2's ``build_detection_train_loader`` in three ways:
the dataset dicts go through the box policy of :mod:`saltnet.data.sanitize`; batches come from
:class:`ResumableBatchSampler`, and every sample's augmentation RNG is seeded from its place in
the stream, so that a resumed run continues with exactly the data of an uninterrupted one; an
image that cannot be read is skipped (the next image of the dataset takes its place) instead of
killing a long run, with one warning per file and a summary of the count.
"""

import logging
import math
import multiprocessing
from functools import reduce
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from detectron2.config import configurable
from detectron2.data import (
    DatasetCatalog,
    DatasetFromList,
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.data.build import (
    filter_images_with_only_crowd_annotations,
    get_detection_dataset_dicts,
    print_instances_class_histogram,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset

from .image_io import ImageReadError
from .mapper import SALTNetDatasetMapper
from .register import register_datasets
from .sampler import ResumableBatchSampler, aspect_ratio_groups
from .sanitize import check_image_files, check_num_classes, sanitize_dataset_dicts

__all__ = [
    "NUM_CLASSES_KEYS",
    "SeededMapDataset",
    "build_saltnet_test_loader",
    "build_saltnet_train_loader",
    "get_registered_dataset_dicts",
    "load_train_dataset_dicts",
    "num_classes_of",
]

# Where each YAML-built meta-architecture of this project keeps its class count.
NUM_CLASSES_KEYS = {
    "SALTNet": "MODEL.SALTNET.NUM_CLASSES",
    "SALTRetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
}


def num_classes_of(cfg) -> Optional[Tuple[str, int]]:
    """(key, value) of a YAML config's class count (``NUM_CLASSES_KEYS``), None if not known."""
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    return (key, reduce(getattr, key.split("."), cfg)) if key else None


logger = logging.getLogger(__name__)


class SeededMapDataset(Dataset):
    """``mapper(dataset_dicts[index])`` for keys ``(index, sample_seed)``, with numpy's global
    RNG (which detectron2's augmentations draw from) seeded by ``sample_seed`` during the call
    and restored afterwards. An :class:`ImageReadError` skips to the next image, up to
    ``max_skips`` times in a row.

    Each unreadable file is logged once (across the loader's worker processes, which share the
    record), and a summary with the number of skips after 10, 100, 1000, ... of them;
    :meth:`unreadable_summary` gives it at any time (e.g. after training).
    """

    def __init__(self, dataset_dicts: Sequence[dict], mapper: Callable, max_skips: int = 10):
        # Serialised once, so that workers share it instead of copying it on access.
        self.dataset_dicts = DatasetFromList(list(dataset_dicts), copy=False, serialize=True)
        self.mapper = mapper
        self.max_skips = max_skips
        # Shared memory, inherited by the workers: 1 per unreadable image, and the skip count.
        self._unreadable = multiprocessing.RawArray("B", len(self.dataset_dicts))
        self._skips = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def _map_seeded(self, index: int, seed: int) -> dict:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            return self.mapper(self.dataset_dicts[index])
        finally:
            np.random.set_state(state)

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        index, seed = key
        for skip in range(self.max_skips + 1):
            try:
                return self._map_seeded((index + skip) % len(self), seed)
            except ImageReadError as e:
                self._record_unreadable((index + skip) % len(self), e)
                error = e
        raise RuntimeError(
            f"{self.max_skips + 1} images in a row could not be read (last: {error}); "
            "check the dataset's image files."
        )

    def _record_unreadable(self, index: int, error: ImageReadError) -> None:
        with self._skips.get_lock():
            self._skips.value += 1
            skips, first = self._skips.value, not self._unreadable[index]
            self._unreadable[index] = 1
        if first:
            logger.warning(
                f"Skipping an unreadable training image (logged once, later skips counted): {error}"
            )
        if skips >= 10 and math.log10(skips).is_integer():
            logger.warning(self.unreadable_summary())

    def unreadable_files(self) -> List[str]:
        """The files found unreadable so far, in dataset order."""
        flags = bytes(self._unreadable)
        return [self.dataset_dicts[i]["file_name"] for i, bad in enumerate(flags) if bad]

    def unreadable_summary(self) -> str:
        """How many files were found unreadable and how often they were skipped so far."""
        files = self.unreadable_files()
        listed = ", ".join(files[:10]) + (", ..." if len(files) > 10 else "")
        return (
            f"{len(files)} unreadable training image(s) skipped {self._skips.value} time(s) so "
            f"far: {listed}"
        )


def load_train_dataset_dicts(
    dataset_names: Union[str, Sequence[str]],
    filter_empty: bool = True,
    num_classes: Optional[int] = None,
    num_classes_key: str = "model.num_classes",
) -> List[dict]:
    """The dicts of all ``dataset_names``, checked and fixed by :mod:`saltnet.data.sanitize`
    (category ids against each dataset's ``thing_classes``; the model's ``num_classes``, named
    ``num_classes_key`` in errors, against them with :func:`check_num_classes` if given).

    Raises KeyError (listing the registered names) for an unknown dataset, FileNotFoundError for
    missing image files and ValueError for an empty dataset, a dataset without ``thing_classes``,
    a dataset whose images all lack boxes (with ``filter_empty``), and annotations that break
    the box policy.
    """
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    if not names:
        raise ValueError("No training dataset given (DATASETS.TRAIN is empty).")
    dataset_dicts = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        if not dicts:
            raise ValueError(f"Dataset {name!r} has no images.")
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            raise ValueError(
                f"Dataset {name!r} has no thing_classes in its MetadataCatalog entry; set them "
                "(the name of class i = category_id i)."
            )
        check_image_files(dicts, name)
        dataset_dicts += sanitize_dataset_dicts(dicts, len(classes), name)
    if num_classes is not None:  # after DatasetCatalog.get: a COCO json sets the classes then
        check_num_classes(num_classes, names, num_classes_key)
    if filter_empty:
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
    if not dataset_dicts:
        raise ValueError(f"Datasets {names} have no image with a usable box.")
    print_instances_class_histogram(dataset_dicts, MetadataCatalog.get(names[0]).thing_classes)
    return dataset_dicts


def _train_loader_from_config(cfg, mapper=None):
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN is {cfg.DATALOADER.SAMPLER_TRAIN!r}; SALT-Net's resumable "
            "training loader samples like 'TrainingSampler' (uniform, shuffled every epoch) only."
        )
    num_classes_key, num_classes = num_classes_of(cfg) or (None, None)
    return {
        "dataset_names": cfg.DATASETS.TRAIN,
        "mapper": mapper if mapper is not None else SALTNetDatasetMapper(cfg, is_train=True),
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "filter_empty": cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "seed": cfg.SEED,
        "num_classes": num_classes,
        "num_classes_key": num_classes_key,
        "register": cfg.DATASETS.REGISTER,
        "synthetic_root": cfg.DATASETS.SYNTHETIC_ROOT,
    }


@configurable(from_config=_train_loader_from_config)
def build_saltnet_train_loader(
    dataset_names: Union[str, Sequence[str]],
    mapper: Callable,
    total_batch_size: int,
    *,
    aspect_ratio_grouping: bool = True,
    filter_empty: bool = True,
    num_workers: int = 0,
    seed=None,
    num_classes: Optional[int] = None,
    num_classes_key: str = "model.num_classes",
    register: Sequence[str] = (),
    synthetic_root: Optional[str] = None,
) -> DataLoader:
    """An infinite loader of lists of mapped dicts (``total_batch_size / world_size`` per rank).

    ``register`` specs (``DATASETS.REGISTER`` / ``dataloader.register``) and the synthetic
    splits ``dataset_names`` mention (under ``synthetic_root``) are registered first, so that
    any tool that builds the loader from a config can use them. ``num_classes``: the model's
    class count, checked against the datasets' classes (see :func:`load_train_dataset_dicts`).

    ``loader.batch_sampler`` is the :class:`ResumableBatchSampler`: set its ``start_iter`` when
    resuming and checkpoint it (its state is the seed; None or negative draws one).
    """
    world_size = comm.get_world_size()
    if total_batch_size % world_size:
        raise ValueError(
            f"Total batch size ({total_batch_size}) must be divisible by the number of "
            f"processes ({world_size})."
        )
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    register_datasets(register, names, synthetic_root)
    dataset_dicts = load_train_dataset_dicts(names, filter_empty, num_classes, num_classes_key)
    groups = (
        aspect_ratio_groups(dataset_dicts) if aspect_ratio_grouping else [0] * len(dataset_dicts)
    )
    seed = None if seed is None or seed < 0 else seed
    sampler = ResumableBatchSampler(groups, total_batch_size // world_size, seed=seed)
    logger.info(f"Training stream seed: {sampler.seed} ({len(dataset_dicts)} images).")
    return DataLoader(
        SeededMapDataset(dataset_dicts, mapper),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
    )


def get_registered_dataset_dicts(
    names: Union[str, Sequence[str]],
    register: Sequence[str] = (),
    synthetic_root: Optional[str] = None,
    **kwargs,
) -> List[dict]:
    """detectron2's ``get_detection_dataset_dicts(names, **kwargs)`` after registering the
    ``register`` specs and the synthetic splits ``names`` mention (as the training loader)."""
    register_datasets(register, [names] if isinstance(names, str) else names, synthetic_root)
    return get_detection_dataset_dicts(names, **kwargs)


def build_saltnet_test_loader(cfg, dataset_name: str) -> DataLoader:
    """detectron2's test loader (batch 1, every image once across ranks) with
    :class:`SALTNetDatasetMapper`, after checking that every image file exists."""
    dataset_dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    check_image_files(dataset_dicts, dataset_name)
    return build_detection_test_loader(
        dataset_dicts,
        mapper=SALTNetDatasetMapper(cfg, is_train=False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
