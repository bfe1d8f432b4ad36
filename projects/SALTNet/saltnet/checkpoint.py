"""A :class:`DetectionCheckpointer` whose files are written atomically.

fvcore's checkpointer writes ``model_XXXX.pth`` and ``last_checkpoint`` in place, so a crash or a
kill during the write leaves a truncated file behind (and ``last_checkpoint`` naming it). Here
each file is written to ``<name>.tmp`` in the same directory, flushed to disk, then renamed over
the target with :func:`os.replace` (atomic on POSIX): readers see the old file or the new one,
never a partial one. Local filesystems only; other storage falls back to the parent's write.
"""

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicCheckpointer"]


def _write_atomically(path: str, write, mode: str) -> None:
    """Run ``write(file)`` on ``path + ".tmp"``, fsync it, then rename it over ``path``."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AtomicCheckpointer(DetectionCheckpointer):
    """Same interface and file layout as :class:`DetectionCheckpointer`; atomic writes."""

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
