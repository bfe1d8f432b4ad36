"""An independent restatement of the authors' release (mmdetection 2.x SALT-Net), for parity tests.

Written from the method description with functional torch ops and loops, sharing no code with
``saltnet``: the release's state-dict layout (``bbox_head.*``, ``neck.*``; the classifier with
K + 1 rows, its background column last), mmdetection's FPN (``add_extra_convs="on_output"``,
no ReLU before P7), the SALT head's forward, mmdetection's ATSS on valid anchors, and the
head's losses (QFL normalised by positives, GIoU / DFL / coarse GIoU weighted by the joint score).
"""

import math

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

REG_MAX = 16
STRIDES = (8, 16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------
# State dicts in the release's layout
# ---------------------------------------------------------------------------------------------
def release_neck_and_head(num_classes, channels=256, in_channels=(512, 1024, 2048), gn=False,
                          dcn_towers=False, seed=0):
    """Random ``neck.*`` + ``bbox_head.*`` tensors of the release (classifier: K + 1 rows).

    ``gn``: GroupNorm in the FPN (P6 / P7 included; ConvModule convs then have no bias).
    ``dcn_towers``: the "dcnx" head, whose last tower convs are mmcv DCNv2 (``conv_offset``).
    """
    gen = torch.Generator().manual_seed(seed)
    c = channels
    state = {}

    def conv(name, out, inp, k, bias=True, std=0.02):
        state[name + ".weight"] = std * torch.randn(out, inp, k, k, generator=gen)
        if bias:
            state[name + ".bias"] = 0.05 * torch.randn(out, generator=gen)

    def norm(name, ch):
        state[name + ".weight"] = 1 + 0.1 * torch.randn(ch, generator=gen)
        state[name + ".bias"] = 0.1 * torch.randn(ch, generator=gen)

    for i, c_in in enumerate(in_channels):
        conv(f"neck.lateral_convs.{i}.conv", c, c_in, 1, bias=not gn, std=0.05)
        if gn:
            norm(f"neck.lateral_convs.{i}.gn", c)
    for i in range(5):
        conv(f"neck.fpn_convs.{i}.conv", c, c, 3, bias=not gn, std=0.03)
        if gn:
            norm(f"neck.fpn_convs.{i}.gn", c)
    for tower in ("cls", "reg"):
        for i in range(3):
            conv(f"bbox_head.{tower}_convs.{i}.conv", c, c, 3, bias=False)
            norm(f"bbox_head.{tower}_convs.{i}.gn", c)
        if dcn_towers:
            conv(f"bbox_head.{tower}_convs.2.conv.conv_offset", 27, c, 3, std=0.005)
    conv("bbox_head.reg_init_out.conv", c, c, 3)
    norm("bbox_head.reg_init_out.bn", c)
    conv("bbox_head.reg_init_out.regression", 4, c, 3, std=0.005)
    # Coarse boxes of a few cells, so that the points spread over the feature map.
    state["bbox_head.reg_init_out.regression.bias"] = torch.tensor([1.5, 2.0, 1.0, 2.5])
    conv("bbox_head.reg_init_out.scale_fs", 14, c, 3)
    conv("bbox_head.salt_reg_conv.conv", c, c, 3, bias=False)
    norm("bbox_head.salt_reg_conv.bn", c)
    conv("bbox_head.salt_reg", 4 * (REG_MAX + 1), c, 3)
    conv("bbox_head.salt_cls_refinement.conv", c, c, 3)
    norm("bbox_head.salt_cls_refinement.bn", c)
    conv("bbox_head.salt_cls_refinement.proposal", 18, c, 3, std=0.005)
    conv("bbox_head.salt_cls_conv.conv", c, c, 3, bias=False)
    norm("bbox_head.salt_cls_conv.bn", c)
    conv("bbox_head.salt_cls", num_classes + 1, c, 3)
    for i in range(5):
        state[f"bbox_head.scales_init.{i}.scale"] = 0.5 + torch.rand((), generator=gen)
        state[f"bbox_head.scales.{i}.scale"] = 0.5 + torch.rand((), generator=gen)
    state["bbox_head.reg_conf.0.weight"] = 0.1 * torch.randn(64, 20, 1, 1, generator=gen)
    state["bbox_head.reg_conf.0.bias"] = 0.1 * torch.randn(64, generator=gen)
    state["bbox_head.reg_conf.2.weight"] = 0.1 * torch.randn(1, 64, 1, 1, generator=gen)
    state["bbox_head.reg_conf.2.bias"] = 0.1 * torch.randn(1, generator=gen)
    state["bbox_head.integral.project"] = torch.linspace(0, REG_MAX, REG_MAX + 1)
    return state


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
def release_fpn(sd, c3_c4_c5, gn=False):
    """mmdetection FPN(start_level=1, add_extra_convs="on_output", num_outs=5): [P3, ..., P7]."""

    def conv_module(x, name, padding, stride=1):
        w = sd[f"neck.{name}.conv.weight"]
        out = F.conv2d(x, w, sd.get(f"neck.{name}.conv.bias"), stride=stride, padding=padding)
        if gn:
            out = F.group_norm(out, 32, sd[f"neck.{name}.gn.weight"], sd[f"neck.{name}.gn.bias"])
        return out

    laterals = [conv_module(c, f"lateral_convs.{i}", 0) for i, c in enumerate(c3_c4_c5)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(
            laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
        )
    outs = [conv_module(lat, f"fpn_convs.{i}", 1) for i, lat in enumerate(laterals)]
    outs.append(conv_module(outs[-1], "fpn_convs.3", 1, stride=2))  # P6 from P5's output
    outs.append(conv_module(outs[-1], "fpn_convs.4", 1, stride=2))  # P7 from P6, no ReLU
    return outs


def _dcn_base():
    """The (y, x) positions of a 3x3 kernel in raster order, (1, 18, 1, 1)."""
    base = np.arange(-1, 2).astype(np.float64)
    base = np.stack([np.repeat(base, 3), np.tile(base, 3)], axis=1).reshape(-1)
    return torch.tensor(base, dtype=torch.float32).view(1, -1, 1, 1)


def release_head_level(sd, x, level, dcn_towers=False):
    """The release's ``SALTHead.forward_single``: (cls_score with K + 1 columns, bbox_pred,
    bbox_distance), all (N, *, H, W); bbox_distance in stride units."""

    def p(name):
        return sd["bbox_head." + name]

    def gn(t, name):
        return F.group_norm(t, 32, p(name + ".weight"), p(name + ".bias"))

    def conv(t, name, bias=True):
        return F.conv2d(t, p(name + ".weight"), p(name + ".bias") if bias else None, padding=1)

    def tower_conv(t, tower, i):
        name = f"{tower}_convs.{i}"
        if dcn_towers and i == 2:  # mmcv ModulatedDeformConv2dPack in a ConvModule with GN
            o1, o2, mask = torch.chunk(conv(t, name + ".conv.conv_offset"), 3, dim=1)
            out = deform_conv2d(
                t, torch.cat((o1, o2), dim=1), p(name + ".conv.weight"), padding=1,
                mask=mask.sigmoid(),
            )
        else:
            out = conv(t, name + ".conv", bias=False)
        return F.relu(gn(out, name + ".gn"))

    cls_feat, reg_feat = x, x
    for i in range(3):
        cls_feat = tower_conv(cls_feat, "cls", i)
        reg_feat = tower_conv(reg_feat, "reg", i)
    cls_feat = cls_feat + x

    feats = F.relu(gn(conv(reg_feat, "reg_init_out.conv"), "reg_init_out.bn"))
    bbox_distance = F.relu(conv(feats, "reg_init_out.regression")) * p(f"scales_init.{level}.scale")
    scale = torch.sigmoid(conv(feats, "reg_init_out.scale_fs"))

    # The release's points_sampler: nine (y, x) points in a 3x3 raster.
    n, _, h, w = bbox_distance.shape
    width = bbox_distance[:, [0]] + bbox_distance[:, [2]]
    height = bbox_distance[:, [1]] + bbox_distance[:, [3]]
    xmin, ymin = -bbox_distance[:, [0]], -bbox_distance[:, [1]]
    xmax, ymax = bbox_distance[:, [2]], bbox_distance[:, [3]]
    pts = bbox_distance.new_zeros(n, 18, h, w)
    pr = pts.view(n, 9, 2, h, w)
    pr[:, [3], 1] = xmin
    pr[:, [5], 1] = xmax
    pr[:, [3, 5], 0] = height * scale[:, [0, 2]] + ymin
    pr[:, [1, 7], 1] = width * scale[:, [1, 3]] + xmin
    pr[:, [1], 0] = ymin
    pr[:, [7], 0] = ymax
    pr[:, [0, 2, 4, 6, 8], 1] = xmin + width * scale[:, [5, 7, 9, 11, 13]]
    pr[:, [0, 2, 4, 6, 8], 0] = ymin + height * scale[:, [4, 6, 8, 10, 12]]
    base = _dcn_base().to(x.dtype)

    reg_dcn = deform_conv2d(reg_feat, pts - base, p("salt_reg_conv.conv.weight"), padding=1)
    reg_dcn = F.relu(gn(reg_dcn, "salt_reg_conv.bn"))
    bbox_pred = conv(reg_dcn, "salt_reg") * p(f"scales.{level}.scale")

    prob = F.softmax(bbox_pred.reshape(n, 4, REG_MAX + 1, h, w), dim=2)
    topk = prob.topk(4, dim=2).values
    stat = torch.cat([topk, topk.mean(dim=2, keepdim=True)], dim=2).reshape(n, -1, h, w)
    quality = torch.sigmoid(
        F.conv2d(
            F.relu(F.conv2d(stat, p("reg_conf.0.weight"), p("reg_conf.0.bias"))),
            p("reg_conf.2.weight"),
            p("reg_conf.2.bias"),
        )
    )

    refine = F.relu(gn(conv(cls_feat, "salt_cls_refinement.conv"), "salt_cls_refinement.bn"))
    class_offset = conv(refine, "salt_cls_refinement.proposal").exp() * pts.detach() - base
    cls_dcn = deform_conv2d(cls_feat, class_offset, p("salt_cls_conv.conv.weight"), padding=1)
    cls_dcn = F.relu(gn(cls_dcn, "salt_cls_conv.bn"))
    cls_score = torch.sigmoid(conv(cls_dcn, "salt_cls")) * quality
    return cls_score, bbox_pred, bbox_distance


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def _iou_and_giou(pred, target, eps=1e-6):
    """mmdetection's aligned ``bbox_overlaps`` (mode iou and giou) of (n, 4) XYXY boxes."""
    area1 = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area2 = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = torch.max(area1 + area2 - overlap, torch.tensor(eps))
    iou = overlap / union
    enclosed = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2]))
    enclose_area = torch.max(enclosed.clamp(min=0).prod(dim=1), torch.tensor(eps))
    return iou, iou - (enclose_area - union) / enclose_area


def _anchors_and_valid(level_shapes, image_size):
    """Per level: (R_l, 4) anchors (side 8 x stride, centred on (j, i) x stride) and (R_l,) valid
    flags for an image of ``image_size`` padded to 32 (mmdetection's AnchorGenerator)."""
    pad_h, pad_w = (math.ceil(v / 32) * 32 for v in image_size)
    anchors, valid = [], []
    for (h, w), s in zip(level_shapes, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(h) * s, torch.arange(w) * s, indexing="ij")
        cx, cy = xs.reshape(-1).float(), ys.reshape(-1).float()
        half = 4.0 * s
        anchors.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        vh, vw = min(math.ceil(pad_h / s), h), min(math.ceil(pad_w / s), w)
        flags = torch.zeros(h, w, dtype=torch.bool)
        flags[:vh, :vw] = True
        valid.append(flags.reshape(-1))
    return anchors, valid


def _atss(anchors_per_level, gt_boxes, topk=9):
    """mmdetection's ATSSAssigner on one image's valid anchors: gt index per anchor or -1."""
    anchors = torch.cat(anchors_per_level)
    num_anchors, num_gt = len(anchors), len(gt_boxes)
    assigned = torch.full((num_anchors,), -1, dtype=torch.long)
    if num_gt == 0:
        return assigned
    ious = torch.stack([_iou_and_giou(anchors, g.expand(num_anchors, 4))[0] for g in gt_boxes], 1)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    overlaps_inf = torch.full((num_anchors, num_gt), -math.inf)
    for g in range(num_gt):
        gt_center = (gt_boxes[g, :2] + gt_boxes[g, 2:]) / 2
        candidates, start = [], 0
        for level_anchors in anchors_per_level:
            dist = (centers[start : start + len(level_anchors)] - gt_center).norm(dim=1)
            k = min(topk, len(level_anchors))
            candidates.append(dist.topk(k, largest=False).indices + start)
            start += len(level_anchors)
        candidates = torch.cat(candidates)
        cand_ious = ious[candidates, g]
        threshold = cand_ious.mean() + cand_ious.std()
        for a, iou in zip(candidates.tolist(), cand_ious.tolist()):
            cx, cy = centers[a].tolist()
            x0, y0, x1, y1 = gt_boxes[g].tolist()
            inside = min(cx - x0, cy - y0, x1 - cx, y1 - cy) > 0.01
            if iou >= threshold and inside:
                overlaps_inf[a, g] = ious[a, g]
    best, best_gt = overlaps_inf.max(dim=1)
    return torch.where(best > -math.inf, best_gt, assigned)


def release_losses(cls_scores, bbox_preds, bbox_distances, gt_boxes_list, gt_labels_list,
                   image_sizes, qfl_beta=2.0):
    """The release's ``SALTHead.loss`` (single process) for per-level predictions.

    Args:
        cls_scores: per level (N, K, H, W) joint scores (probabilities).
        bbox_preds: per level (N, 4 x 17, H, W) distribution logits.
        bbox_distances: per level (N, 4, H, W) coarse distances, stride units.
        gt_boxes_list, gt_labels_list: per image (M, 4) XYXY pixels, (M,) classes (no crowd:
            mmdetection passes crowd boxes as ``gt_bboxes_ignore``, which ATSS does not use).
        image_sizes: per image (h, w) pixels before padding.

    Returns:
        dict with loss_cls, loss_bbox, loss_dfl, loss_bbox_init (loss weights 1, 2, 0.25, 1).
    """
    num_classes = cls_scores[0].shape[1]
    level_shapes = [tuple(s.shape[-2:]) for s in cls_scores]
    per_image = []
    num_total_pos = 0
    for img, (gt_boxes, gt_labels, size) in enumerate(
        zip(gt_boxes_list, gt_labels_list, image_sizes)
    ):
        anchors, valid = _anchors_and_valid(level_shapes, size)
        valid_anchors = [a[v] for a, v in zip(anchors, valid)]
        assigned_valid = _atss(valid_anchors, gt_boxes)
        valid_all = torch.cat(valid)
        assigned = torch.full((len(valid_all),), -1, dtype=torch.long)
        assigned[valid_all] = assigned_valid
        labels = torch.full_like(assigned, num_classes)
        targets = torch.zeros(len(assigned), 4)
        pos = assigned >= 0
        labels[pos] = gt_labels[assigned[pos]]
        targets[pos] = gt_boxes[assigned[pos]]
        num_total_pos += max(int(pos.sum()), 1)
        per_image.append((torch.cat(anchors), valid_all, labels, targets))
    num_total_samples = max(float(num_total_pos), 1.0)

    loss_cls = loss_bbox = loss_dfl = loss_init = 0.0
    weight_sum = 0.0
    start = 0
    for level, stride in enumerate(STRIDES):
        h, w = level_shapes[level]
        stop = start + h * w
        for img, (anchors, valid, labels, targets) in enumerate(per_image):
            score = cls_scores[level][img].permute(1, 2, 0).reshape(-1, num_classes)
            pred = bbox_preds[level][img].permute(1, 2, 0).reshape(-1, 4 * (REG_MAX + 1))
            dist = bbox_distances[level][img].permute(1, 2, 0).reshape(-1, 4)
            lab, tgt, flag = labels[start:stop], targets[start:stop], valid[start:stop]
            anc = anchors[start:stop]
            pos = ((lab >= 0) & (lab < num_classes)).nonzero().squeeze(1)
            quality = torch.zeros(len(lab))
            if len(pos) > 0:
                centers = (anc[pos, :2] + anc[pos, 2:]) / 2 / stride
                weight = score.detach().max(dim=1).values[pos]
                prob = F.softmax(pred[pos].reshape(-1, REG_MAX + 1), dim=1)
                corners = (prob * torch.arange(REG_MAX + 1.0)).sum(1).reshape(-1, 4)
                decoded = torch.cat([centers - corners[:, :2], centers + corners[:, 2:]], 1)
                coarse = torch.cat([centers - dist[pos, :2], centers + dist[pos, 2:]], 1)
                target = tgt[pos] / stride
                quality[pos] = _iou_and_giou(decoded.detach(), target)[0]
                loss_bbox = loss_bbox + (weight * (1 - _iou_and_giou(decoded, target)[1])).sum()
                loss_init = loss_init + (weight * (1 - _iou_and_giou(coarse, target)[1])).sum()
                sides = torch.cat([centers - target[:, :2], target[:, 2:] - centers], 1)
                sides = sides.clamp(min=0, max=REG_MAX - 0.1).reshape(-1)
                left = sides.long()
                logp = F.log_softmax(pred[pos].reshape(-1, REG_MAX + 1), dim=1)
                dfl = -logp.gather(1, left[:, None]).squeeze(1) * (left + 1 - sides) - logp.gather(
                    1, (left + 1)[:, None]
                ).squeeze(1) * (sides - left)
                loss_dfl = loss_dfl + (weight[:, None].expand(-1, 4).reshape(-1) * dfl).sum() / 4
                weight_sum = weight_sum + weight.sum()
            # Quality focal loss with probabilities, over the valid anchors.
            zero = torch.zeros_like(score)
            qfl = F.binary_cross_entropy(score, zero, reduction="none") * score.pow(qfl_beta)
            if len(pos) > 0:
                s = score[pos, lab[pos]]
                qfl = qfl.clone()
                qfl[pos, lab[pos]] = F.binary_cross_entropy(
                    s, quality[pos], reduction="none"
                ) * (quality[pos] - s).abs().pow(qfl_beta)
            loss_cls = loss_cls + (qfl.sum(dim=1) * flag).sum() / num_total_samples
        start = stop
    return {
        "loss_cls": loss_cls,
        "loss_bbox": 2.0 * loss_bbox / weight_sum,
        "loss_dfl": 0.25 * loss_dfl / weight_sum,
        "loss_bbox_init": 1.0 * loss_init / weight_sum,
    }
