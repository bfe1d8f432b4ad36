"""BatchNorm with frozen statistics and a trainable scale and shift: the release's backbone norm.

The authors' mmdetection release trains its backbones with ``norm_eval=True`` and
``requires_grad=True``: every BatchNorm normalises with its ImageNet running statistics, which
never change, while its scale and shift keep training (with weight decay). detectron2's
``FrozenBN`` freezes the scale and shift too; ``"BN"`` updates the statistics.
"""

from typing import Callable, Union

from torch import nn
from torch.nn import functional as F

__all__ = ["FrozenStatsBatchNorm2d", "NORMS", "resolve_norm"]


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in train and eval mode.

    Same parameters and statistics as :class:`torch.nn.BatchNorm2d`, without its batch counter
    ``num_batches_tracked`` (never used here; dropped when a checkpoint has one), so BN and
    FrozenBN checkpoints load unchanged; ``weight`` and ``bias`` are trainable parameters, the
    running statistics are never updated. A subclass of ``BatchNorm2d``, so detectron2's
    ``freeze_at`` turns it into ``FrozenBatchNorm2d`` in frozen stages and its optimizer treats
    it as a norm layer (``SOLVER.WEIGHT_DECAY_NORM``). (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)
        self.register_buffer("num_batches_tracked", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        # nn.Module's loader: BatchNorm's would add the counter back for old checkpoints.
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


# Norm names this project adds to detectron2's ("BN", "FrozenBN", "GN", "SyncBN", ...).
NORMS = {"FrozenStatsBN": FrozenStatsBatchNorm2d}


def resolve_norm(norm: Union[str, Callable]) -> Union[str, Callable]:
    """A norm for detectron2's ``get_norm``: our names become their module class, detectron2's
    names and callables pass through."""
    return NORMS.get(norm, norm) if isinstance(norm, str) else norm
