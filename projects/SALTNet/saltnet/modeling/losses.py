"""
Losses of GFL / GFLV2 (Li et al., "Generalized Focal Loss", 2020 and 2021).

Every function returns per-element losses without reduction; normalising and weighting are
the caller's job. They compute in float32, so they can run under autocast, and never
synchronise the host with the device.
"""

import torch
from torch.nn import functional as F

from .box_coding import aligned_giou

__all__ = ["quality_focal_loss", "distribution_focal_loss", "giou_loss"]


def _binary_cross_entropy(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12):
    """Element-wise BCE of probabilities, with each log clamped at ``log(eps)``.

    ``F.binary_cross_entropy`` rejects a NaN probability with an error from inside torch (a
    device-side assert on CUDA); here it gives a NaN loss, which the trainer then reports by
    loss name and iteration.
    """
    log_p = torch.log(probs.clamp(min=eps))
    log_not_p = torch.log((1 - probs).clamp(min=eps))
    return -(targets * log_p + (1 - targets) * log_not_p)


def quality_focal_loss(
    pred_scores: torch.Tensor,
    gt_classes: torch.Tensor,
    gt_quality: torch.Tensor,
    beta: float = 2.0,
) -> torch.Tensor:
    """
    Quality Focal Loss on probabilities: ``BCE(p, y) * |y - p|^beta`` for every anchor and
    class, where the soft target y is ``gt_quality`` at an anchor's own class and 0 elsewhere.

    Args:
        pred_scores: (R, K) predicted joint scores (classification x quality), probabilities
            in [0, 1], not logits.
        gt_classes: (R,) long labels in [0, K]; K means background.
        gt_quality: (R,) quality targets in [0, 1] (e.g. IoU of the decoded box with its gt).
            Only read at foreground anchors.
        beta: exponent of the modulating factor.

    Returns:
        Tensor: (R,) loss of each anchor, summed over the K classes (no reduction).
    """
    num_classes = pred_scores.shape[1]
    with torch.autocast(device_type=pred_scores.device.type, enabled=False):
        pred_scores = pred_scores.float()
        classes = torch.arange(num_classes, device=pred_scores.device)
        is_target = gt_classes[:, None] == classes[None, :]
        targets = torch.where(is_target, gt_quality.float()[:, None], 0.0)
        bce = _binary_cross_entropy(pred_scores, targets)
        loss = bce * (targets - pred_scores).abs().pow(beta)
    return loss.sum(dim=1)


def distribution_focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """
    Distribution Focal Loss: cross-entropy towards the two bins around a continuous target,
    weighted by the target's linear interpolation weights.

    Args:
        logits: (R, reg_max + 1) bin logits of one box side per row.
        targets: (R,) target distances in bins (stride units), in [0, reg_max].

    Returns:
        Tensor: (R,) loss of each row (no reduction).
    """
    targets = targets.float()
    log_probs = F.log_softmax(logits.float(), dim=1)
    left = targets.floor().long()
    right = left + 1
    weight_left = right.float() - targets
    weight_right = targets - left.float()
    # A target of exactly reg_max has weight_right == 0; clamp so the gather stays in range.
    right = right.clamp(max=logits.shape[1] - 1)
    ce_left = -log_probs.gather(1, left[:, None]).squeeze(1)
    ce_right = -log_probs.gather(1, right[:, None]).squeeze(1)
    return ce_left * weight_left + ce_right * weight_right


def giou_loss(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """
    Args:
        pred_boxes, gt_boxes: (R, 4) XYXY boxes (any unit, the same for both).

    Returns:
        Tensor: (R,) ``1 - GIoU``, in [0, 2] (no reduction).
    """
    return 1.0 - aligned_giou(pred_boxes, gt_boxes)
