"""
Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020), following
mmdetection's ``ATSSAssigner``.
"""

from typing import List

import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["atss_assign"]


def atss_assign(
    anchors_per_level: List[torch.Tensor], gt_boxes: torch.Tensor, topk: int = 9
) -> torch.Tensor:
    """
    Assign the anchors of one image to its ground-truth boxes with ATSS:

    1. on every level, the ``min(topk, R_i)`` anchors whose centres are closest to a gt's
       centre are that gt's candidates;
    2. the gt's IoU threshold is the mean plus the (unbiased) standard deviation of its
       candidates' IoUs;
    3. a candidate is positive if its IoU reaches the threshold and its centre is inside the
       gt box by more than 0.01 px on all four sides;
    4. an anchor that is positive for several gts goes to the one with the highest IoU.

    Args:
        anchors_per_level: list of (R_i, 4) XYXY anchors of each level, in pixels.
        gt_boxes: (M, 4) XYXY ground-truth boxes, in pixels.
        topk: number of candidates per gt and level.

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

    candidate_idxs = []  # (k_i, M) anchor indices per level
    start = 0
    for anchors_i in anchors_per_level:
        end = start + anchors_i.shape[0]
        k = min(topk, end - start)
        _, idxs = sq_distances[start:end].topk(k, dim=0, largest=False)
        candidate_idxs.append(idxs + start)
        start = end
    candidate_idxs = torch.cat(candidate_idxs, dim=0)  # (C, M)

    # float64: when a gt's candidate IoUs are all equal (std 0), float32's mean + std can round
    # above them and reject every candidate (C * IoU and its mean are exact in float64).
    candidate_ious = ious.gather(0, candidate_idxs).double()  # (C, M)
    # The std of a single candidate is undefined; use 0 so that the candidate is kept.
    correction = 1 if candidate_idxs.shape[0] > 1 else 0
    iou_thresholds = candidate_ious.mean(dim=0) + candidate_ious.std(dim=0, correction=correction)
    is_pos = candidate_ious >= iou_thresholds[None, :]

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
