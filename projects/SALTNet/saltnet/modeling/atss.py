"""
Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020), following
mmdetection's ``ATSSAssigner``.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["atss_assign", "inside_padded_images"]


def inside_padded_images(
    image_sizes: Sequence[Tuple[int, int]],
    level_shapes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    pad_divisor: int = 32,
    device=None,
) -> torch.Tensor:
    """Which anchor points lie inside each image's own padded area (mmdetection's valid flags).

    An image of size (h, w) pixels, padded to multiples of ``pad_divisor`` (its own padding, not
    the batch's), covers the first ``ceil(pad_h / stride)`` rows and ``ceil(pad_w / stride)``
    columns of a level's grid; the other points look only at other images' padding.

    Args:
        image_sizes: N (height, width) pairs, input pixels (before batch padding).
        level_shapes: (H_i, W_i) of each level's feature map.
        strides: each level's stride, pixels.

    Returns:
        Tensor: (N, R) bool, R = sum of H_i x W_i, levels concatenated, each in raster order.
    """
    sizes = torch.tensor(image_sizes, dtype=torch.long, device=device).reshape(-1, 2)
    padded = (sizes + pad_divisor - 1) // pad_divisor * pad_divisor
    masks = []
    for (height, width), stride in zip(level_shapes, strides):
        rows_and_cols = (padded + stride - 1) // stride  # (N, 2) valid rows, valid columns
        rows = torch.arange(height, device=device) < rows_and_cols[:, :1]  # (N, H)
        cols = torch.arange(width, device=device) < rows_and_cols[:, 1:]  # (N, W)
        masks.append((rows[:, :, None] & cols[:, None, :]).flatten(1))
    return torch.cat(masks, dim=1)


def atss_assign(
    anchors_per_level: List[torch.Tensor],
    gt_boxes: torch.Tensor,
    topk: int = 9,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    Assign the anchors of one image to its ground-truth boxes with ATSS:

    1. on every level, the ``min(topk, R_i)`` anchors whose centres are closest to a gt's
       centre are that gt's candidates (only anchors flagged ``valid`` count: on a level with
       fewer valid anchors, fewer candidates);
    2. the gt's IoU threshold is the mean plus the (unbiased) standard deviation of its
       candidates' IoUs;
    3. a candidate is positive if its IoU reaches the threshold and its centre is inside the
       gt box by more than 0.01 px on all four sides;
    4. an anchor that is positive for several gts goes to the one with the highest IoU.

    Args:
        anchors_per_level: list of (R_i, 4) XYXY anchors of each level, in pixels.
        gt_boxes: (M, 4) XYXY ground-truth boxes, in pixels.
        topk: number of candidates per gt and level.
        valid: (R,) bool, the anchors that may be assigned (e.g. :func:`inside_padded_images`);
            None: all of them.

    Returns:
        Tensor: (R,) long, R = sum of R_i, with the anchors in level order. The index in
        [0, M) of the gt each anchor is assigned to, or -1 for background.
    """
    anchors = torch.cat([a.float() for a in anchors_per_level], dim=0)
    gt_boxes = gt_boxes.float()
    num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
    matched_idxs = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_anchors == 0 or num_gts == 0:
        return matched_idxs

    ious = pairwise_iou(Boxes(anchors), Boxes(gt_boxes))  # (R, M)
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (R, 2)
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (M, 2)
    # Squared distances rank the anchors the same way as distances.
    sq_distances = (anchor_centers[:, None, :] - gt_centers[None, :, :]).pow(2).sum(dim=-1)
    if valid is None:
        valid = torch.ones(num_anchors, dtype=torch.bool, device=anchors.device)
    sq_distances = torch.where(valid[:, None], sq_distances, math.inf)

    candidate_idxs = []  # (k_i, M) anchor indices per level
    start = 0
    for anchors_i in anchors_per_level:
        end = start + anchors_i.shape[0]
        k = min(topk, end - start)
        _, idxs = sq_distances[start:end].topk(k, dim=0, largest=False)
        candidate_idxs.append(idxs + start)
        start = end
    candidate_idxs = torch.cat(candidate_idxs, dim=0)  # (C, M)
    # Invalid anchors reach the top-k only on levels with fewer than topk valid ones: drop them.
    is_candidate = valid[candidate_idxs]

    # float64: when a gt's candidate IoUs are all equal (std 0), float32's mean + std can round
    # above them and reject every candidate (C * IoU and its mean are exact in float64).
    candidate_ious = ious.gather(0, candidate_idxs).double() * is_candidate  # (C, M)
    count = is_candidate.sum(dim=0)  # (M,) candidates per gt
    mean = candidate_ious.sum(dim=0) / count.clamp(min=1)
    # Unbiased std; that of a single candidate is undefined: use 0 so the candidate is kept.
    sq_dev = ((candidate_ious - mean) * is_candidate).pow(2).sum(dim=0)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()
    is_pos = is_candidate & (candidate_ious >= (mean + std)[None, :])

    candidate_centers = anchor_centers[candidate_idxs]  # (C, M, 2)
    center_to_sides = torch.cat(
        [candidate_centers - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - candidate_centers],
        dim=-1,
    )  # (C, M, 4)
    is_pos &= center_to_sides.amin(dim=-1) > 0.01

    pos_mask = torch.zeros_like(ious, dtype=torch.bool).scatter_(0, candidate_idxs, is_pos)
    pos_ious = torch.where(pos_mask, ious, -1.0)
    _, best_gt = pos_ious.max(dim=1)
    return torch.where(pos_mask.any(dim=1), best_gt, matched_idxs)
