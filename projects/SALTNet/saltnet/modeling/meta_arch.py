"""SALT-Net as a detectron2 meta-architecture (a :class:`DenseDetector` subclass)."""

import logging
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor

from .atss import atss_assign, inside_padded_images
from .box_coding import (
    aligned_iou,
    boxes_to_distances,
    distances_to_boxes,
    distribution_to_distances,
)
from .dense_utils import anchor_points, reduce_mean
from .head import HeadOutputs, SALTHead
from .losses import distribution_focal_loss, giou_loss, quality_focal_loss
from .point_sets import PointSetOutputs

__all__ = ["AnchorTargets", "FlatPredictions", "SALTNet", "SDR_MODES"]

logger = logging.getLogger(__name__)

SDR_MODES = ("none", "gt", "distill", "both")


class FlatPredictions(NamedTuple):
    """The head's outputs with every level's locations in one dimension: R = sum of Hi x Wi."""

    scores: Tensor  # (N, R, K) joint scores
    box_logits: Tensor  # (N, R, 4 x (reg_max + 1)) refined box-distribution logits
    coarse: Optional[Tensor]  # (N, R, 4) coarse distances in stride units; None: plain head


class AnchorTargets(NamedTuple):
    """The anchor points of all levels (R of them) and what each is trained toward."""

    points: Tensor  # (R, 2) xy anchor points, pixels
    strides: Tensor  # (R,) their strides, pixels
    gt_classes: Tensor  # (N, R) ATSS labels, K = background
    gt_boxes: Tensor  # (N, R, 4) matched ground-truth boxes, XYXY pixels
    valid: Tensor  # (N, R) bool, anchors inside their image's own padded area


def head_input_shapes(backbone, in_features: List[str]) -> List[ShapeSpec]:
    """The backbone's output shapes of ``in_features`` (``MODEL.SALTNET.IN_FEATURES``, the
    head's levels); ValueError naming the problem if it is empty or names a missing feature."""
    shapes = backbone.output_shape()
    missing = [f for f in in_features if f not in shapes]
    if missing or not in_features:
        problem = f"names {missing}, which the backbone does not yield" if missing else "is empty"
        raise ValueError(f"MODEL.SALTNET.IN_FEATURES {problem}; it yields {sorted(shapes)}.")
    return [shapes[f] for f in in_features]


@META_ARCH_REGISTRY.register()
class SALTNet(PointSetOutputs, DenseDetector):
    """SALT-Net (Yang et al., ECML PKDD 2022): a GFLV2-style detector with the SALT head.

    One anchor point per location (anchor centres at ``(j, i) x stride``), ATSS assignment with a
    square anchor of side ``anchor_scale x stride`` per point, Quality Focal Loss on the joint
    score, GIoU + Distribution Focal Loss on the refined box, GIoU and self-distillation (SDR) on
    the coarse box.

    Each detection records where it was decoded (``pred_levels``, ``pred_locations``). With
    ``output_point_sets`` set True (SALT head only), it also carries the SALT point sets of its
    location: ``pred_reg_points`` / ``pred_cls_points`` (D, 9, 2) xy pixels, in the input image's
    frame like ``pred_boxes`` (what ``DefaultPredictor`` returns), in the order of a 3x3 kernel
    (see :class:`PointSetOutputs`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        head: SALTHead,
        head_in_features: List[str],
        num_classes: int,
        reg_max: int = 16,
        atss_topk: int = 9,
        anchor_scale: float = 8.0,
        qfl_beta: float = 2.0,
        loss_qfl_weight: float = 1.0,
        loss_giou_weight: float = 2.0,
        loss_dfl_weight: float = 0.25,
        loss_coarse_weight: float = 1.0,
        sdr_mode: str = "gt",
        sdr_weight: float = 1.0,
        test_topk_candidates: int = 1000,
        test_score_thresh: float = 0.05,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean,
        pixel_std,
        input_format: str = "BGR",
        output_point_sets: bool = False,
    ):
        super().__init__(
            backbone,
            head,
            head_in_features,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            output_point_sets=output_point_sets,
        )
        if sdr_mode not in SDR_MODES:
            raise ValueError(f"Unknown SDR mode {sdr_mode!r}; choose one of {SDR_MODES}.")
        self.strides = [s.stride for s in head_input_shapes(backbone, self.head_in_features)]
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.atss_topk = atss_topk
        # Square anchors of side anchor_scale x stride centred on the anchor points; only ATSS
        # uses their extent, everything else uses their centres.
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[anchor_scale * s] for s in self.strides],
            aspect_ratios=[1.0],
            strides=self.strides,
            offset=0.0,
        )
        self.qfl_beta = qfl_beta
        self.loss_qfl_weight = loss_qfl_weight
        self.loss_giou_weight = loss_giou_weight
        self.loss_dfl_weight = loss_dfl_weight
        self.loss_coarse_weight = loss_coarse_weight
        self.sdr_mode = sdr_mode
        self.sdr_weight = sdr_weight
        self.test_topk_candidates = test_topk_candidates
        self.test_score_thresh = test_score_thresh
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format
        if getattr(head, "salt_on", False):
            backend = head.salt.reg_dcn.backend
            logger.info("SALT head: deformable convs run on the %r backend.", backend)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        node = cfg.MODEL.SALTNET
        head = SALTHead(cfg, head_input_shapes(backbone, node.IN_FEATURES))
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": node.IN_FEATURES,
            "num_classes": node.NUM_CLASSES,
            "reg_max": node.REG_MAX,
            "atss_topk": node.ATSS_TOPK,
            "anchor_scale": node.ANCHOR_SCALE,
            "qfl_beta": node.QFL_BETA,
            "loss_qfl_weight": node.LOSS_QFL_WEIGHT,
            "loss_giou_weight": node.LOSS_GIOU_WEIGHT,
            "loss_dfl_weight": node.LOSS_DFL_WEIGHT,
            "loss_coarse_weight": node.LOSS_COARSE_WEIGHT,
            "sdr_mode": node.SDR_MODE,
            "sdr_weight": node.SDR_WEIGHT,
            "test_topk_candidates": node.TOPK_CANDIDATES_TEST,
            "test_score_thresh": node.SCORE_THRESH_TEST,
            "test_nms_thresh": node.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------
    def _flatten_predictions(self, predictions: HeadOutputs) -> FlatPredictions:
        """The head's per-level outputs with all levels' locations in one dimension."""
        groups = [predictions.scores, predictions.box_logits]
        dims = [self.num_classes, 4 * (self.reg_max + 1)]
        if predictions.salt is not None:
            groups, dims = groups + [predictions.salt.coarse], dims + [4]
        flat = [cat(g, dim=1) for g in self._transpose_dense_predictions(groups, dims)]
        return FlatPredictions(flat[0], flat[1], coarse=flat[2] if len(flat) == 3 else None)

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances], valid: Tensor):
        """ATSS labels: (N, R) class per anchor (num_classes = background), (N, R, 4) gt boxes.

        ``valid`` (N, R) bool: the anchors that may be assigned (inside each image's own padded
        area); the others are background.
        """
        anchor_tensors = [a.tensor for a in anchors]
        gt_classes, gt_boxes = [], []
        for inst, valid_i in zip(gt_instances, valid):
            boxes = inst.gt_boxes.tensor.float()
            matched = atss_assign(anchor_tensors, boxes, self.atss_topk, valid_i)
            found = matched >= 0
            idx = matched.clamp(min=0)
            if len(inst) > 0:
                classes = torch.where(found, inst.gt_classes[idx], self.num_classes)
                matched_boxes = boxes[idx] * found[:, None]
            else:
                classes = torch.full_like(matched, self.num_classes)
                matched_boxes = boxes.new_zeros(len(matched), 4)
            gt_classes.append(classes)
            gt_boxes.append(matched_boxes)
        return torch.stack(gt_classes), torch.stack(gt_boxes)

    def forward_training(self, images, features, predictions: HeadOutputs, gt_instances):
        flat = self._flatten_predictions(predictions)
        anchors = self.anchor_generator(features)
        # The release's valid flags: points outside an image's own padded area (size rounded up
        # to 32) are neither ATSS candidates nor counted in any loss.
        valid = inside_padded_images(
            images.image_sizes,
            [f.shape[-2:] for f in features],
            self.strides,
            device=flat.scores.device,
        )
        gt_classes, gt_boxes = self.label_anchors(anchors, gt_instances, valid)
        points, strides = anchor_points(anchors, self.strides)
        return self.losses(flat, AnchorTargets(points, strides, gt_classes, gt_boxes, valid))

    def losses(self, predictions: FlatPredictions, targets: AnchorTargets) -> Dict[str, Tensor]:
        """All SALT-Net losses, in float32, over all anchors at once (masks, no indexing).

        As the authors' release computes them: QFL over the valid anchors, normalised by the sum
        over images of max(positives in the image, 1), averaged across workers, at least 1; the
        box losses (refined GIoU, DFL, coarse GIoU) over the positives, each weighted by its
        detached joint score and normalised by the sum of those weights, averaged across workers
        (the release divides by that sum even when it is 0, which gives NaN for a batch without
        positives; here it is clamped, so such a batch gives 0). One difference remains: the
        release's weight is the maximum over K + 1 score columns (its background column
        included), ours over the K classes.
        """
        points, strides, gt_classes = targets.points, targets.strides, targets.gt_classes
        scores, box_logits = predictions.scores.float(), predictions.box_logits.float()
        gt_boxes, valid, coarse = targets.gt_boxes.float(), targets.valid, predictions.coarse
        pos = (gt_classes >= 0) & (gt_classes < self.num_classes)
        pos_per_image = pos.sum(dim=1)
        get_event_storage().put_scalar(
            "num_pos_anchors", pos_per_image.sum().item() / len(gt_classes)
        )
        # An image without positives counts 1, as the release's num_total_pos.
        num_pos_avg = reduce_mean(pos_per_image.clamp(min=1).sum().float()).clamp(min=1.0)

        scale = strides[None, :, None]
        refined = distribution_to_distances(box_logits, self.reg_max)  # (N, R, 4) stride units
        refined_boxes = distances_to_boxes(points, refined * scale)
        iou = aligned_iou(refined_boxes.detach(), gt_boxes) * pos

        loss_qfl = quality_focal_loss(
            scores.flatten(0, 1), gt_classes.flatten(), iou.flatten(), beta=self.qfl_beta
        )
        loss_qfl = (loss_qfl * valid.flatten()).sum()

        # Box losses: each positive weighted by its detached joint score, normalised by the sum.
        weight = scores.detach().max(dim=2).values * pos
        weight_sum = reduce_mean(weight.sum()).clamp(min=1e-6)
        loss_giou = (giou_loss(refined_boxes, gt_boxes) * weight).sum()
        targets = boxes_to_distances(points, gt_boxes) / scale
        # The release's bbox2distance clamps the targets to reg_max - 0.1.
        targets = targets.clamp(min=0, max=self.reg_max - 0.1)
        loss_dfl = distribution_focal_loss(
            box_logits.reshape(-1, self.reg_max + 1), targets.flatten()
        ).view_as(targets)
        loss_dfl = (loss_dfl.mean(dim=2) * weight).sum()
        losses = {
            "loss_qfl": self.loss_qfl_weight * loss_qfl / num_pos_avg,
            "loss_giou": self.loss_giou_weight * loss_giou / weight_sum,
            "loss_dfl": self.loss_dfl_weight * loss_dfl / weight_sum,
        }
        if coarse is not None:
            coarse_boxes = distances_to_boxes(points, coarse.float() * scale)
            if self.sdr_mode in ("gt", "both"):
                loss = (giou_loss(coarse_boxes, gt_boxes) * weight).sum()
                losses["loss_coarse"] = self.loss_coarse_weight * loss / weight_sum
            if self.sdr_mode in ("distill", "both"):
                # Self-distillation: the coarse box follows the refined one (gradient stopped on
                # the refined side), each positive weighted by how good the refined box is.
                loss = (giou_loss(coarse_boxes, refined_boxes.detach()) * weight * iou).sum()
                losses["loss_sdr"] = self.sdr_weight * loss / weight_sum
        return losses

    # ----------------------------------------------------------------------------------------
    # Inference
    # ----------------------------------------------------------------------------------------
    def forward_inference(self, images, features, predictions: HeadOutputs):
        """Detections of each image: :meth:`decode` of the head's ``predictions`` (``features``
        are not read: the predictions have the levels' sizes)."""
        return self.decode(predictions, images.image_sizes)

    def decode(self, predictions: HeadOutputs, image_sizes: List[Tuple[int, int]]):
        """Detections of each image (:meth:`inference_single_image`) from the head's outputs;
        ``image_sizes``: each image's (height, width) in the batch. Their point sets, with
        ``output_point_sets``, are in pixels of the network's input."""
        groups = self._transpose_dense_predictions(
            [predictions.scores, predictions.box_logits],
            [self.num_classes, 4 * (self.reg_max + 1)],
        )  # (N, Hi x Wi, dim) per level
        # The anchor generator reads only each map's (Hi, Wi).
        centers = [a.get_centers() for a in self.anchor_generator(predictions.scores)]
        results = [
            self.inference_single_image(centers, [[x[i] for x in g] for g in groups], image_size)
            for i, image_size in enumerate(image_sizes)
        ]
        if self.output_point_sets:
            self.attach_point_sets(results, predictions.salt, centers, self.strides)
        return results

    def inference_single_image(self, centers, predictions, image_size) -> Instances:
        """One image, as FCOS's: each level decoded (:meth:`_decode_level`), then class-wise NMS
        and the ``max_detections_per_image`` best. ``centers``: (Ri, 2) anchor points (pixels)
        per level; ``predictions``: (scores, box logits) per level, (Ri, dim) each.
        """
        pred = Instances.cat(
            [
                self._decode_level(level, c, stride, *p, image_size=image_size)
                for level, (c, stride, *p) in enumerate(zip(centers, self.strides, *predictions))
            ]
        )
        keep = batched_nms(
            pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
        )
        return pred[keep[: self.max_detections_per_image]]

    def _decode_level(self, level, centers, stride, scores, box_logits, *, image_size) -> Instances:
        """One level of one image: top-k locations by max joint score, then score threshold.

        centers (R, 2) pixels; scores (R, K); box_logits (R, 4 x (reg_max + 1)); R = H x W of the
        level in raster order. Each detection records ``pred_levels`` (index into
        ``head_in_features``) and ``pred_locations`` (index in 0..R-1, i.e. row x W + column).
        """
        scores = scores.float()
        # The release's nms_pre order: the test_topk_candidates locations with the highest
        # max-over-classes score first, then the score threshold on their (location, class)
        # pairs. DenseDetector._decode_per_level_predictions thresholds first and keeps the top-k
        # pairs, which selects other candidates.
        num_topk = min(self.test_topk_candidates, scores.shape[0])
        top_locations = scores.max(dim=1).values.topk(num_topk).indices
        scores = scores[top_locations]
        location_idx, class_idx = (scores > self.test_score_thresh).nonzero(as_tuple=True)
        top_locations = top_locations[location_idx]
        distances = distribution_to_distances(box_logits[top_locations].float(), self.reg_max)
        boxes = Boxes(distances_to_boxes(centers[top_locations], distances * stride))
        boxes.clip(image_size)
        return Instances(
            image_size,
            pred_boxes=boxes,
            scores=scores[location_idx, class_idx],
            pred_classes=class_idx,
            pred_levels=torch.full_like(class_idx, level),
            pred_locations=top_locations,
        )
