"""A :class:`DetectionCheckpointer` whose files are written atomically and which refuses a
checkpoint that shares no parameter with the model.

fvcore's checkpointer writes ``model_XXXX.pth`` and ``last_checkpoint`` in place, so a crash or a
kill during the write leaves a truncated file behind (and ``last_checkpoint`` naming it). Here
each file is written to ``<name>.tmp`` in the same directory, flushed to disk, then renamed over
the target with :func:`os.replace` (atomic on POSIX) and the directory flushed: readers see the
old file or the new one, never a partial one. Local filesystems only; other storage falls back
to the parent's write.

Loading keeps detectron2's behaviour for partial matches (fine-tuning from ImageNet weights or
with another class count: the missing and mismatched keys are logged, the rest is loaded), but a
checkpoint of which not a single tensor fits the model is almost always the wrong file or an
unconverted one, so :class:`CheckpointMismatchError` stops there instead of training from
random weights. A file written by ``tools/convert_mmdet_checkpoint.py`` (the authors' release)
must fill the head and the neck completely: a tensor there that is missing or skipped for its
shape (another class count, ``REG_MAX`` or FPN width) is an error naming the tensors, since the
converted detector would silently differ from the release.
"""

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .convert_mmdet import RELEASE_CHECKPOINT_AUTHOR

__all__ = [
    "AtomicCheckpointer",
    "CheckpointMismatchError",
    "LossNormalizerState",
    "check_weights_file",
]


class CheckpointMismatchError(ValueError):
    """No tensor of a checkpoint fits the model (another architecture or an unconverted file),
    or a converted release checkpoint does not fill the model's head and neck."""


# Parameter names of the head and the FPN neck (laterals, outputs, P6/P7).
_HEAD_AND_NECK = ("head.", "backbone.fpn_", "backbone.top_block.")


def _check_release_checkpoint_complete(not_loaded) -> None:
    """Raise if a converted release checkpoint left a head or neck tensor of the model unset."""
    skipped = sorted(k for k in not_loaded if k.startswith(_HEAD_AND_NECK))
    if skipped:
        raise CheckpointMismatchError(
            f"it is a converted release checkpoint, but the model's head/neck tensors {skipped} "
            "did not load (missing or another shape: check MODEL.SALTNET.NUM_CLASSES, REG_MAX "
            "and MODEL.FPN.OUT_CHANNELS against the checkpoint). To fine-tune it with another "
            "class count, convert it again with tools/convert_mmdet_checkpoint.py --finetune."
        )


def _fsync_directory(path: str) -> None:
    """fsync the directory ``path``, so that a rename in it survives a crash of the machine;
    a filesystem that cannot (some network ones refuse) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(path: str, write, mode: str) -> None:
    """Run ``write(file)`` on ``path + ".tmp"``, fsync it, rename it over ``path``, then fsync
    the directory (the rename is an entry of the directory: without it a power loss may leave
    the old file, or none, after the run went on as if saved)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class LossNormalizerState:
    """The running loss normalisers of a detectron2 dense detector, as a checkpointable.

    detectron2's RetinaNet and FCOS divide their losses by an EMA of the positive count
    (``DenseDetector._ema_update``), kept in a plain attribute (``loss_normalizer``) outside the
    state dict: a resumed run would restart it and train differently. Saved with the
    checkpoint, it resumes with the run (in multi-GPU training, the main process's value is
    saved and every process resumes from it). SALT-Net has none (it normalises per batch).
    """

    NAMES = ("loss_normalizer",)

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return {name: getattr(self.model, name) for name in self.NAMES if hasattr(self.model, name)}

    def load_state_dict(self, state):
        for name, value in state.items():
            setattr(self.model, name, value)


def check_weights_file(path: str, key: str = "MODEL.WEIGHTS") -> None:
    """FileNotFoundError naming ``path`` (the config's ``key``) if it is a local file that does
    not exist. No weights (``""``), URLs and detectron2's ``scheme://`` paths pass: their loaders
    resolve them."""
    if path and "://" not in path and "?" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} ({key}) does not exist.")


class AtomicCheckpointer(DetectionCheckpointer):
    """Same interface and file layout as :class:`DetectionCheckpointer`; atomic writes; raises
    :class:`CheckpointMismatchError` when no tensor of a loaded checkpoint fits the model; saves
    and resumes the model's running loss normalisers (:class:`LossNormalizerState`)."""

    def __init__(self, model, save_dir: str = "", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.checkpointables.setdefault("loss_normalizers", LossNormalizerState(self.model))

    def load(self, path: str, *args, **kwargs):
        check_weights_file(path)
        try:
            return super().load(path, *args, **kwargs)
        except CheckpointMismatchError as e:
            self._parsed_url_during_load = None  # DetectionCheckpointer.load resets it on success
            raise CheckpointMismatchError(f"Checkpoint {path!r}: {e}") from None

    def _load_model(self, checkpoint):
        checkpoint_keys = sorted(checkpoint.get("model", {}))
        incompatible = super()._load_model(checkpoint)
        not_loaded = set(incompatible.missing_keys)
        not_loaded.update(key for key, *_ in incompatible.incorrect_shapes)
        if checkpoint.get("__author__") == RELEASE_CHECKPOINT_AUTHOR:
            _check_release_checkpoint_complete(not_loaded)
        # Parameters only: some buffers (e.g. FrozenBN statistics) fill themselves in when missing.
        model_keys = sorted(name for name, _ in self.model.named_parameters())
        if model_keys and not set(model_keys) - not_loaded:
            raise CheckpointMismatchError(
                f"none of its {len(checkpoint_keys)} tensors fits a parameter of the model (it has "
                f"e.g. {checkpoint_keys[:3]}, the model expects e.g. {model_keys[:3]}). Is it for "
                "another architecture? Convert mmdetection SALT-Net checkpoints with "
                "tools/convert_mmdet_checkpoint.py and backbone weights with "
                "tools/convert_backbone_weights.py."
            )
        return incompatible

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # remote storage through iopath: no rename there
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _write_atomically(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        _write_atomically(path, lambda f: f.write(last_filename_basename), "w")
