"""
Box coding for point-based dense detectors: (left, top, right, bottom) distances from a point,
the discrete distribution over those distances used by GFL, and element-wise IoU/GIoU.

All functions compute in float32 (inputs are cast with ``.float()``), so they are safe to call
under autocast.
"""

from typing import Tuple

import torch

__all__ = [
    "distances_to_boxes",
    "boxes_to_distances",
    "distribution_to_distances",
    "aligned_iou",
    "aligned_giou",
]


def distances_to_boxes(points: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """
    Args:
        points: (..., 2) xy coordinates in pixels.
        distances: (..., 4) (left, top, right, bottom) distances from each point, in pixels.
            Broadcastable with ``points`` over the leading dims.

    Returns:
        Tensor: (..., 4) boxes in XYXY format, in pixels.
    """
    points = points.float()
    distances = distances.float()
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def boxes_to_distances(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """
    Inverse of :func:`distances_to_boxes`.

    Args:
        points: (..., 2) xy coordinates in pixels.
        boxes: (..., 4) XYXY boxes in pixels, broadcastable with ``points``.

    Returns:
        Tensor: (..., 4) (left, top, right, bottom) distances in pixels. They are negative
        for sides the point lies outside of.
    """
    points = points.float()
    boxes = boxes.float()
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)


def distribution_to_distances(logits: torch.Tensor, reg_max: int) -> torch.Tensor:
    """
    Expected value of the discrete distance distribution of GFL.

    Args:
        logits: (..., 4 * (reg_max + 1)) bin logits, ordered as 4 groups (left, top, right,
            bottom) of ``reg_max + 1`` consecutive bins.
        reg_max: index of the last bin; the bins are the distances 0, 1, ..., reg_max.

    Returns:
        Tensor: (..., 4) expected (left, top, right, bottom) distances in bins, i.e. in
        units of the level's stride (multiply by the stride to get pixels).
    """
    num_bins = reg_max + 1
    probs = logits.float().reshape(*logits.shape[:-1], 4, num_bins).softmax(dim=-1)
    bins = torch.arange(num_bins, dtype=torch.float32, device=logits.device)
    return (probs * bins).sum(dim=-1)


def _aligned_iou_terms(
    boxes1: torch.Tensor, boxes2: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Returns (intersection, union) areas of two broadcastable (..., 4) XYXY box tensors.
    Boxes with x2 < x1 or y2 < y1 count as having zero area.
    """
    boxes1 = boxes1.float()
    boxes2 = boxes2.float()
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (
        boxes1[..., 3] - boxes1[..., 1]
    ).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (
        boxes2[..., 3] - boxes2[..., 1]
    ).clamp(min=0)
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    return inter, area1 + area2 - inter


def aligned_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """
    Element-wise IoU.

    Args:
        boxes1, boxes2: (..., 4) XYXY boxes (any unit, the same for both), broadcastable.
        eps: lower bound of the union area, so that degenerate (zero-area) pairs give 0.

    Returns:
        Tensor: (...) IoU in [0, 1].
    """
    inter, union = _aligned_iou_terms(boxes1, boxes2)
    return inter / union.clamp(min=eps)


def aligned_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """
    Element-wise generalized IoU (Rezatofighi et al., 2019):
    ``IoU - (enclosing_area - union) / enclosing_area``.

    Args:
        boxes1, boxes2: (..., 4) XYXY boxes (any unit, the same for both), broadcastable.
        eps: lower bound of the union and enclosing areas, so that degenerate pairs are finite.

    Returns:
        Tensor: (...) GIoU in [-1, 1].
    """
    inter, union = _aligned_iou_terms(boxes1, boxes2)
    iou = inter / union.clamp(min=eps)
    boxes1 = boxes1.float()
    boxes2 = boxes2.float()
    enclose_wh = (
        torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])
    ).clamp(min=0)
    enclose = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return iou - (enclose - union) / enclose
