"""The atomic checkpointer and the converters of the mmdetection release and backbone weights."""

from .checkpointer import AtomicCheckpointer, CheckpointMismatchError
from .convert_backbone import convert_backbone_state_dict
from .convert_mmdet import convert_mmdet_saltnet_state_dict

__all__ = [
    "AtomicCheckpointer",
    "CheckpointMismatchError",
    "convert_backbone_state_dict",
    "convert_mmdet_saltnet_state_dict",
]
