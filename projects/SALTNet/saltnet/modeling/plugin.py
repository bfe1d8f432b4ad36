"""SALT as a plug-in for detectron2's own dense detectors: RetinaNet and FCOS with ``salt_on``.

The heads are detectron2's :class:`RetinaNetHead` / :class:`FCOSHead` with the SALT operator
(:class:`SALTOperator`) between the towers and the predictors: the class logits are predicted from
the features sampled at the classification points, the box deltas (and FCOS's centerness) from
those sampled at the regression points. RetinaNet's A anchors of a location share its coarse box
and point sets. With ``salt_on=False`` a head *is* detectron2's (same modules, same random draws,
same outputs) and the detectors equal detectron2's ``RetinaNet`` / ``FCOS``.

The detectors add one loss, ``loss_salt_coarse``: 1 - GIoU of the coarse box (decoded around the
anchor's centre) against the matched ground truth over the detector's own positives, times
``loss_coarse_weight``:

* FCOS, as the authors' release (``fcos_arm.py``, ``loss_bbox_init``): each positive point
  weighted by its centerness target, the sum divided by the sum of those targets (this worker's
  batch, as the release: it does not average them over workers); weight 0.5.
* RetinaNet: every positive anchor weighted 1, divided by RetinaNet's own box-loss normaliser
  (its EMA of the positive count); weight 1.0. The release's ``retina_arm.py`` puts an L1 loss
  between the raw coarse distances and the anchors' encoded deltas, which cannot run with
  RetinaNet's 9 anchors per location (one coarse box per location, one target per anchor).

Units: the coarse distances and the points are in stride units of their level, from the anchor
centre of the location, the point the detector's own box deltas are decoded around (detectron2's
RetinaNet: ``(j, i) x stride``; its FCOS: ``(j + 0.5, i + 0.5) x stride``).
"""

import logging
from typing import Dict, List, NamedTuple, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import FCOS, RetinaNet
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import Boxes, Instances

from .box_coding import distances_to_boxes
from .dense_utils import anchor_points, normal_init_
from .losses import giou_loss
from .point_sets import PointSetOutputs
from .salt import SALTOperator, SALTOutput, SALTPredictions

__all__ = [
    "PluginHeadOutputs",
    "SALTFCOS",
    "SALTFCOSHead",
    "SALTHeadMixin",
    "SALTRetinaNet",
    "SALTRetinaNetHead",
]

logger = logging.getLogger(__name__)


class PluginHeadOutputs(NamedTuple):
    """What a plug-in head returns with SALT on: per-level lists, level i of N images and
    Hi x Wi locations (A anchors each); the first fields named as detectron2's detectors name
    its head's outputs."""

    pred_logits: List[torch.Tensor]  # (N, A x K, Hi, Wi) class logits
    pred_anchor_deltas: List[torch.Tensor]  # (N, A x 4, Hi, Wi) box deltas
    salt: SALTPredictions  # the SALT operator's coarse boxes and point sets (shared by A)
    pred_centerness: Optional[List[torch.Tensor]] = None  # FCOS: (N, 1, Hi, Wi) logits

    def dense_predictions(self) -> List[List[torch.Tensor]]:
        """detectron2's head outputs, as its detectors take them: [logits, deltas] (RetinaNet),
        [logits, deltas, centerness] (FCOS)."""
        groups = [self.pred_logits, self.pred_anchor_deltas]
        return groups if self.pred_centerness is None else groups + [self.pred_centerness]


class SALTHeadMixin:
    """What the SALT plug-in adds to a detectron2 dense head (:class:`RetinaNetHead`,
    :class:`FCOSHead`): the SALT operator between the towers and the predictors, if ``salt_on``.

    ``forward(features)`` returns detectron2's lists without SALT, a :class:`PluginHeadOutputs`
    with it.

    Args (besides the head's):
        salt_on: add the SALT operator (needs ``conv_dims[-1]`` = the input channels, for its
            residual connection).
        salt_norm: the norm of the SALT operator's convs ("GN" as in SALT-Net).
        deform_backend: its deformable convs' backend (see ``saltnet.layers.DeformConv``).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape,
        conv_dims: List[int],
        salt_on: bool = True,
        salt_norm: str = "GN",
        deform_backend: Optional[str] = "auto",
        **kwargs,
    ):
        super().__init__(input_shape=input_shape, conv_dims=conv_dims, **kwargs)
        self.salt_on = salt_on
        if not salt_on:
            return
        channels = {s.channels for s in input_shape} | {conv_dims[-1]}
        if len(channels) != 1:
            raise ValueError(
                "The SALT operator adds the head's input to its last tower conv: they need the "
                f"same number of channels, got {sorted(channels)} (input_shape, conv_dims)."
            )
        self.salt = SALTOperator(channels.pop(), len(input_shape), salt_norm, deform_backend)
        normal_init_(self.salt.modules())

    def forward(self, features: List[torch.Tensor]):
        if not self.salt_on:
            return super().forward(features)
        if len(features) != self._num_features:
            raise ValueError(f"Head built for {self._num_features} levels, got {len(features)}.")
        sampled = [
            self.salt(self.cls_subnet(x), self.bbox_subnet(x), x, level)
            for level, x in enumerate(features)
        ]
        return self.predict(sampled)

    def predict(self, sampled: List[SALTOutput]) -> PluginHeadOutputs:
        """detectron2's predictors on the SALT-sampled features of each level: the class logits
        from the classification features, the box deltas from the regression features."""
        return PluginHeadOutputs(
            pred_logits=[self.cls_score(s.cls_feat) for s in sampled],
            pred_anchor_deltas=[self.bbox_pred(s.reg_feat) for s in sampled],
            salt=SALTPredictions.over_levels([s.salt for s in sampled]),
        )


class SALTRetinaNetHead(SALTHeadMixin, RetinaNetHead):
    """detectron2's :class:`RetinaNetHead` with the SALT operator (:class:`SALTHeadMixin`)."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            **super().from_config(cfg, input_shape),
            "salt_on": cfg.MODEL.RETINANET.SALT_ON,
            "salt_norm": cfg.MODEL.RETINANET.SALT_NORM,
            "deform_backend": cfg.MODEL.SALTNET.DEFORM_BACKEND,
        }


class SALTFCOSHead(SALTHeadMixin, FCOSHead):
    """detectron2's :class:`FCOSHead` with the SALT operator (:class:`SALTHeadMixin`), the
    centerness predicted from the regression features."""

    def predict(self, sampled: List[SALTOutput]) -> PluginHeadOutputs:
        centerness = [self.ctrness(s.reg_feat) for s in sampled]
        return super().predict(sampled)._replace(pred_centerness=centerness)


class _SALTPlugin(PointSetOutputs):
    """What the SALT plug-in adds to a detectron2 dense detector (RetinaNet, FCOS): the coarse-box
    loss, where each detection was decoded (``pred_levels``, ``pred_locations``), and the point
    sets (``output_point_sets``, see :class:`PointSetOutputs`)."""

    def coarse_loss(self, anchors: List[Boxes], coarse, gt_labels, gt_boxes) -> torch.Tensor:
        """``loss_salt_coarse`` (module doc), float32. ``coarse``: per level (N, 4, Hi, Wi);
        ``gt_labels`` / ``gt_boxes``: per image (R,) / (R, 4) as ``label_anchors`` gives them,
        R = sum of Hi x Wi x A."""
        num_anchors = self.anchor_generator.num_cell_anchors[0]
        coarse = cat([permute_to_N_HWA_K(c, 4) for c in coarse], dim=1).float()
        coarse = coarse.repeat_interleave(num_anchors, dim=1)  # (N, R, 4): A per location
        centers, strides = anchor_points(anchors, self.anchor_generator.strides)
        boxes = distances_to_boxes(centers, coarse * strides[:, None])
        gt_labels = torch.stack(gt_labels)
        positive = (gt_labels >= 0) & (gt_labels != self.num_classes)
        weights, normalizer = self._coarse_weights(anchors, gt_boxes, positive)
        loss = giou_loss(boxes, torch.stack(gt_boxes).float())
        loss = torch.where(positive, loss * weights, torch.zeros_like(loss)).sum()
        return self.loss_coarse_weight * loss / normalizer

    def _coarse_weights(self, anchors, gt_boxes, positive: torch.Tensor):
        """(weights (N, R) of each anchor's coarse loss, read at positives; the normaliser)."""
        raise NotImplementedError

    def forward_inference(self, images, features, predictions):
        salt = None
        if isinstance(predictions, PluginHeadOutputs):
            predictions, salt = predictions.dense_predictions(), predictions.salt
        results = super().forward_inference(images, features, predictions)
        if self.output_point_sets:
            num_anchors = self.anchor_generator.num_cell_anchors[0]
            centers = [a.get_centers()[::num_anchors] for a in self.anchor_generator(features)]
            self.attach_point_sets(results, salt, centers, self.anchor_generator.strides)
        return results

    def forward_training(self, images, features, predictions, gt_instances):
        if not isinstance(predictions, PluginHeadOutputs):  # SALT off: detectron2's detector
            return super().forward_training(images, features, predictions, gt_instances)
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        losses = self.head_losses(anchors, predictions, gt_labels, gt_boxes)
        # After detectron2's losses: RetinaNet's coarse loss reads the normaliser they update.
        coarse = predictions.salt.coarse
        losses["loss_salt_coarse"] = self.coarse_loss(anchors, coarse, gt_labels, gt_boxes)
        return losses

    def head_losses(
        self, anchors, predictions: PluginHeadOutputs, gt_labels, gt_boxes
    ) -> Dict[str, torch.Tensor]:
        """detectron2's losses (its :meth:`losses`) of the head's detectron2 outputs;
        ``gt_labels`` / ``gt_boxes`` as ``label_anchors`` gives them."""
        raise NotImplementedError

    def _decode_multi_level_predictions(
        self, anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size
    ) -> Instances:
        """detectron2's decoding of one image, each detection also recording where it was decoded:
        ``pred_levels`` and ``pred_locations`` (row x Wi + column of its level).

        ``anchors``: per level Hi x Wi x A boxes; ``pred_scores`` / ``pred_deltas``: per level
        (Hi x Wi x A, K) / (Hi x Wi x A, 4). detectron2's decoding runs once, on zero-size boxes
        at (x, y) = (anchor index, level) and zero deltas, which RetinaNet's and FCOS's box
        transforms decode to those boxes exactly: it keeps detectron2's detections (threshold,
        top-k, scores, classes, order) and says where each came from. Only their deltas are then
        decoded around their anchors, level by level on the same rows as detectron2's, so the
        boxes (pixels) are detectron2's bit for bit.
        """
        index_boxes, zeros = [], []
        for level, scores in enumerate(pred_scores):
            index = torch.arange(len(scores), device=scores.device, dtype=torch.float32)
            at_level = torch.full_like(index, level)
            index_boxes.append(Boxes(torch.stack([index, at_level, index, at_level], dim=1)))
            zeros.append(index.new_zeros(len(index), 4))
        pred = super()._decode_multi_level_predictions(
            index_boxes, pred_scores, zeros, score_thresh, topk_candidates, image_size
        )
        anchor_index, level = pred.pred_boxes.tensor[:, :2].long().unbind(dim=1)
        # The detections come level by level: their anchor indices per level.
        per_level = anchor_index.split(torch.bincount(level, minlength=len(anchors)).tolist())
        boxes = [
            self.box2box_transform.apply_deltas(deltas[i], anchors_i.tensor[i])
            for i, deltas, anchors_i in zip(per_level, pred_deltas, anchors)
        ]
        pred.pred_boxes = Boxes(cat(boxes))
        pred.pred_levels = level
        pred.pred_locations = anchor_index // self.anchor_generator.num_cell_anchors[0]
        return pred


@META_ARCH_REGISTRY.register()
class SALTRetinaNet(_SALTPlugin, RetinaNet):
    """detectron2's :class:`RetinaNet` with a :class:`SALTRetinaNetHead` (module doc).

    YAML: ``MODEL.META_ARCHITECTURE "SALTRetinaNet"`` with detectron2's ``MODEL.RETINANET`` keys
    and ``MODEL.RETINANET.SALT_ON`` / ``SALT_NORM`` / ``SALT_COARSE_LOSS_WEIGHT``.
    """

    @configurable
    def __init__(self, *, loss_coarse_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.loss_coarse_weight = loss_coarse_weight

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        # RetinaNet.from_config built a plain RetinaNetHead from detectron2's random draws:
        # replace it with a SALTRetinaNetHead holding its parameters, built on a fork of the RNG
        # (its SALT operator's draws are kept) so that the global RNG stays where detectron2's
        # RetinaNet leaves it.
        shapes = ret["backbone"].output_shape()
        head_shapes = [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        with torch.random.fork_rng(devices=[]):  # modules are initialised on the CPU
            head = SALTRetinaNetHead(cfg, head_shapes)
        head.load_state_dict(ret["head"].state_dict(), strict=False)  # missing: the SALT operator
        ret["head"] = head
        ret["loss_coarse_weight"] = cfg.MODEL.RETINANET.SALT_COARSE_LOSS_WEIGHT
        return ret

    def head_losses(self, anchors, predictions, gt_labels, gt_boxes):
        logits, deltas = self._transpose_dense_predictions(
            predictions.dense_predictions(), [self.num_classes, 4]
        )
        return self.losses(anchors, logits, gt_labels, deltas, gt_boxes)

    def _coarse_weights(self, anchors, gt_boxes, positive):
        """Every positive 1, over the EMA of the positive count that ``losses`` updates."""
        return positive.float(), self.loss_normalizer


@META_ARCH_REGISTRY.register()
class SALTFCOS(_SALTPlugin, FCOS):
    """detectron2's :class:`FCOS` with a :class:`SALTFCOSHead` (module doc); LazyConfig only,
    as detectron2's FCOS (``configs/plugin/fcos_R_50_FPN_1x_salt.py``)."""

    def __init__(self, *, loss_coarse_weight: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.loss_coarse_weight = loss_coarse_weight

    def head_losses(self, anchors, predictions, gt_labels, gt_boxes):
        logits, deltas, centerness = self._transpose_dense_predictions(
            predictions.dense_predictions(), [self.num_classes, 4, 1]
        )
        return self.losses(anchors, logits, gt_labels, deltas, gt_boxes, centerness)

    def losses(
        self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
    ):
        """detectron2's, the box deltas in float32: detectron2's FCOS decodes them in their own
        dtype, and fvcore's ``giou_loss`` cannot mix float16/bfloat16 boxes (autocast) with
        float32 targets. A no-op on float32 deltas."""
        pred_anchor_deltas = [d.float() for d in pred_anchor_deltas]
        return super().losses(
            anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
        )

    def _coarse_weights(self, anchors, gt_boxes, positive):
        """Each positive's centerness target (detectron2's ``compute_ctrness_targets``), over
        their sum in this batch (0 without positives)."""
        centerness = self.compute_ctrness_targets(anchors, gt_boxes)
        centerness = torch.where(positive, centerness, torch.zeros_like(centerness))
        return centerness, centerness.sum().clamp(min=torch.finfo(torch.float32).tiny)
