"""A training batch sampler that can resume mid-stream, so that a resumed run sees exactly the
batches (and augmentations) the uninterrupted run would have seen.

detectron2's ``TrainingSampler`` restarts its stream after a resume, and its augmentations draw
from each worker's global RNG, so a resumed run trains on different batches. Here the stream is
a pure function of ``seed``: every rank shuffles the whole dataset with the same generator
epoch after epoch, takes every ``world_size``-th position of that stream, groups the images by
aspect ratio (as detectron2's ``AspectRatioGroupedDataset``) and emits batches of
``(dataset_index, sample_seed)``. ``sample_seed`` depends only on ``seed`` and the position in
the stream; the dataset seeds the augmentation RNG with it (see ``loader.SeededMapDataset``).
Resuming at iteration ``i`` replays the index stream (cheap: no images are read) and drops the
first ``i`` batches. The seed is saved in the checkpoint (``state_dict``), so a run started with
``SEED -1`` (a random seed) also resumes exactly.
"""

from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler", "aspect_ratio_groups"]


def aspect_ratio_groups(dataset_dicts: Sequence[dict]) -> List[int]:
    """0 for images wider than high, 1 otherwise (0 for all if a dict lacks width/height)."""
    if not all("width" in d and "height" in d for d in dataset_dicts):
        return [0] * len(dataset_dicts)
    return [0 if d["width"] > d["height"] else 1 for d in dataset_dicts]


def _sample_seed(seed: int, position: int) -> int:
    """A 32-bit seed for the sample at ``position`` of the stream of ``seed``."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class ResumableBatchSampler(Sampler):
    """Infinite batches of ``(dataset_index, sample_seed)`` for one rank; see the module doc.

    Args:
        groups: the aspect-ratio group of every image (:func:`aspect_ratio_groups`); one group
            for all images turns grouping off.
        batch_size: images per batch on this rank.
        seed: seed of the stream; None draws one shared by all ranks.
        shuffle: shuffle every epoch (else the dataset order, repeated).
        rank, world_size: default to this process's place in the process group.

    Set ``start_iter`` before iterating to skip the batches of iterations already trained.
    """

    def __init__(
        self,
        groups: Sequence[int],
        batch_size: int,
        *,
        seed=None,
        shuffle: bool = True,
        rank=None,
        world_size=None,
    ):
        if len(groups) == 0:
            raise ValueError("Cannot sample batches from an empty dataset.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.start_iter = 0

    def _positions(self) -> Iterator[Tuple[int, int]]:
        """(dataset_index, position in the global stream) of this rank, forever."""
        generator = torch.Generator().manual_seed(self.seed)
        n, position = len(self.groups), 0
        while True:
            order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
            for index in order.tolist():
                if position % self.world_size == self.rank:
                    yield index, position
                position += 1

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        buckets = {}
        batches_made = 0
        for index, position in self._positions():
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append((index, position))
            if len(bucket) == self.batch_size:
                if batches_made >= self.start_iter:
                    yield [(i, _sample_seed(self.seed, p)) for i, p in bucket]
                batches_made += 1
                buckets[self.groups[index]] = []

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
