"""SALT as a plug-in on detectron2's RetinaNet and FCOS (saltnet/modeling/plugin.py).

With SALT off the plug-in detectors must *be* detectron2's: same parameters from the same seed,
identical losses and detections with the same weights. With SALT on: the extra outputs, the
coarse-box loss on hand-made cases, gradients, and the point sets of each detection.
"""

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import TINY_BACKBONE_OPTS, TINY_CHANNELS, TINY_NUM_CLASSES
from release_reference import _iou_and_giou

from saltnet.config.defaults import constructor_defaults, get_saltnet_cfg
from saltnet.modeling import SALTFCOS, SALTFCOSHead, SALTRetinaNet, SALTRetinaNetHead
from saltnet.modeling.box_coding import aligned_giou

CHANNELS = TINY_CHANNELS
NUM_CLASSES = TINY_NUM_CLASSES


def small_lazy_model(name: str):
    """detectron2's model-zoo LazyConfig model ``name``, shrunk: ResNet-18, 32-channel FPN,
    two tower convs, three classes."""
    model = model_zoo.get_config(f"COCO-Detection/{name}_R_50_FPN_1x.py").model
    model.backbone.bottom_up = L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=18, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
    )
    model.backbone.out_channels = CHANNELS
    # P6 from C5 (RetinaNet, 512 channels in ResNet-18) or from P5 (FCOS).
    model.backbone.top_block.in_channels = 512 if name == "retinanet" else CHANNELS
    model.head.input_shape = [ShapeSpec(channels=CHANNELS)] * 5
    model.head.conv_dims = [CHANNELS] * 2
    model.num_classes = NUM_CLASSES
    return model


def plugin(model, salt_on: bool):
    """The same LazyConfig model as the SALT plug-in."""
    detector, head = {
        "fcos": (SALTFCOS, SALTFCOSHead),
        "retinanet": (SALTRetinaNet, SALTRetinaNetHead),
    }[model._target_.__name__.lower()]
    model = model.copy()
    model._target_, model.head._target_ = detector, head
    model.head.salt_on = salt_on
    model.head.deform_backend = "torchvision"
    return model


def batch():
    """Two images of different sizes with boxes (one image empty)."""
    generator = torch.Generator().manual_seed(1)
    inputs = []
    for (h, w), boxes in [((96, 128), [[10, 12, 60, 70], [70, 20, 120, 90]]), ((80, 64), [])]:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.arange(len(boxes)) % NUM_CLASSES
        image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        inputs.append({"image": image, "instances": instances, "height": h, "width": w})
    return inputs


def losses_of(model):
    model.train()
    with EventStorage():
        return model(batch())


def detections_of(model):
    model.eval()
    model.test_score_thresh = 0.0  # an untrained model: keep every candidate
    with torch.no_grad():
        return [out["instances"] for out in model(batch())]


@pytest.mark.parametrize("name", ["fcos", "retinanet"])
def test_salt_off_is_detectron2(name):
    lazy = small_lazy_model(name)
    torch.manual_seed(0)
    reference = instantiate(lazy)
    torch.manual_seed(0)
    ours = instantiate(plugin(lazy, salt_on=False))
    # Same modules, same random draws.
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert list(ref_state) == list(our_state)
    for key in ref_state:
        assert torch.equal(ref_state[key], our_state[key]), key

    # Identical losses (the EMA normaliser included) over two steps, and detections.
    for _ in range(2):
        ref_losses, our_losses = losses_of(reference), losses_of(ours)
        assert ref_losses.keys() == our_losses.keys()
        for key in ref_losses:
            assert torch.equal(ref_losses[key], our_losses[key]), key
    for ref, out in zip(detections_of(reference), detections_of(ours)):
        assert len(ref) > 0
        assert torch.equal(ref.pred_boxes.tensor, out.pred_boxes.tensor)
        assert torch.equal(ref.scores, out.scores)
        assert torch.equal(ref.pred_classes, out.pred_classes)


def small_yaml_cfg():
    """A YAML config of detectron2's RetinaNet, shrunk as :func:`small_lazy_model`."""
    cfg = get_saltnet_cfg()
    cfg.merge_from_list(TINY_BACKBONE_OPTS)
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    return cfg


def test_salt_off_retinanet_from_yaml_is_detectron2():
    cfg = small_yaml_cfg()
    cfg.MODEL.RETINANET.SALT_ON = False
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    reference = build_model(cfg)
    cfg.MODEL.META_ARCHITECTURE = "SALTRetinaNet"
    ours = build_model(cfg)
    assert type(ours) is SALTRetinaNet and not ours.head.salt_on
    ours.load_state_dict(reference.state_dict())
    ref_losses, our_losses = losses_of(reference), losses_of(ours)
    assert all(torch.equal(ref_losses[k], our_losses[k]) for k in ref_losses)
    assert ref_losses.keys() == our_losses.keys()

    cfg.MODEL.RETINANET.SALT_ON = True
    cfg.MODEL.SALTNET.DEFORM_BACKEND = "torchvision"
    salt = build_model(cfg)
    assert salt.head.salt_on and salt.head.salt.reg_dcn.backend == "torchvision"
    assert "loss_salt_coarse" in losses_of(salt)


@pytest.mark.parametrize("salt_on", [False, True])
def test_yaml_retinanet_draws_detectron2s_parameters(salt_on):
    """From the same seed, a YAML SALTRetinaNet holds detectron2's RetinaNet's parameters (SALT
    on: besides the SALT operator's) and leaves the global RNG in the same state."""
    cfg = small_yaml_cfg()
    cfg.MODEL.RETINANET.SALT_ON = salt_on
    built = {}
    for arch in ("RetinaNet", "SALTRetinaNet"):
        cfg.MODEL.META_ARCHITECTURE = arch
        torch.manual_seed(0)
        built[arch] = build_model(cfg).state_dict(), torch.get_rng_state()
    (ref_state, ref_rng), (our_state, our_rng) = built.values()
    assert [k for k in our_state if not k.startswith("head.salt.")] == list(ref_state)
    assert (any(k.startswith("head.salt.") for k in our_state)) == salt_on
    for key in ref_state:
        assert torch.equal(ref_state[key], our_state[key]), key
    assert torch.equal(ref_rng, our_rng)


def test_yaml_keys_default_to_the_constructors():
    retinanet = get_saltnet_cfg().MODEL.RETINANET
    head, detector = constructor_defaults(SALTRetinaNetHead), constructor_defaults(SALTRetinaNet)
    assert (retinanet.SALT_ON, retinanet.SALT_NORM) == (head["salt_on"], head["salt_norm"])
    assert retinanet.SALT_COARSE_LOSS_WEIGHT == detector["loss_coarse_weight"]


@pytest.mark.parametrize("name, num_anchors", [("fcos", 1), ("retinanet", 9)])
def test_salt_on_outputs_losses_and_gradients(name, num_anchors):
    torch.manual_seed(0)
    model = instantiate(plugin(small_lazy_model(name), salt_on=True))
    features = [torch.randn(2, CHANNELS, 12 // 2**i + 1, 16 // 2**i + 1) for i in range(5)]
    outputs = model.head(features)
    assert (outputs.pred_centerness is not None) == (name == "fcos")
    salt = outputs.salt
    per_level = zip(
        features,
        outputs.pred_logits,
        outputs.pred_anchor_deltas,
        salt.coarse,
        salt.reg_points,
        salt.cls_points,
    )
    for level, (x, lg, dl, c, rp, cp) in enumerate(per_level):
        n, _, h, w = x.shape
        assert lg.shape == (n, num_anchors * NUM_CLASSES, h, w)
        assert dl.shape == (n, num_anchors * 4, h, w)
        assert c.shape == (n, 4, h, w) and c.dtype == torch.float32 and (c >= 0).all()
        assert rp.shape == cp.shape == (n, 18, h, w)
        if name == "fcos":
            assert outputs.pred_centerness[level].shape == (n, 1, h, w)

    losses = losses_of(model)
    assert "loss_salt_coarse" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for param_name, param in model.head.salt.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    assert model.head.salt.coarse_pred.weight.grad.abs().sum() > 0


def test_salt_operator_channels_must_match_the_input():
    with pytest.raises(ValueError, match="same number of channels"):
        SALTRetinaNetHead(
            input_shape=[ShapeSpec(channels=32)] * 5,
            num_classes=2,
            num_anchors=1,
            conv_dims=[16, 16],
            salt_on=True,
        )


def test_retinanet_coarse_loss_on_hand_made_boxes():
    """One level of 2 x 2 points at stride 8 (anchor centres (0, 0), (8, 0), (0, 8), (8, 8));
    two positive locations: one coarse box equal to its ground truth (loss 0), one a known box."""
    torch.manual_seed(0)
    model = instantiate(plugin(small_lazy_model("retinanet"), salt_on=True))
    model.anchor_generator.strides = [8]
    num_anchors = model.anchor_generator.num_cell_anchors[0]
    centers = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]])
    centers = centers.repeat_interleave(num_anchors, dim=0)
    anchors = [Boxes(torch.cat([centers - 4, centers + 4], dim=1))]
    # (left, top, right, bottom), stride units, per location, as a (1, 4, 2, 2) map.
    distances = torch.tensor([[1.0, 1, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    coarse = [distances.t().reshape(1, 4, 2, 2)]
    gt_box_0 = torch.tensor([-8.0, -8, 16, 16])  # = the coarse box of location 0
    gt_box_3 = torch.tensor([0.0, 0, 24, 16])
    labels = torch.full((4 * num_anchors,), NUM_CLASSES)
    boxes = torch.zeros(4 * num_anchors, 4)
    labels[0], boxes[0] = 1, gt_box_0  # first anchor of location 0
    last = 3 * num_anchors  # first anchor of location 3
    labels[last], boxes[last] = 0, gt_box_3
    labels[1 if num_anchors > 1 else 2] = -1  # ignored (RetinaNet) / background (FCOS)
    model.loss_normalizer = 2.0
    model.loss_coarse_weight = 3.0
    loss = model.coarse_loss(anchors, coarse, [labels], [boxes])
    coarse_box_3 = torch.tensor([0.0, 0, 16, 16])
    expected = 1 - aligned_giou(coarse_box_3[None], gt_box_3[None])[0]  # 1 - 256/384
    assert torch.allclose(expected, torch.tensor(1 - 256 / 384))
    assert torch.allclose(loss, 3.0 * expected / 2.0)


def release_fcos_coarse_loss(coarse, positives, num_images, strides, loss_weight=0.5):
    """``fcos_arm.py``'s ``loss_bbox_init`` (``norm_on_bbox``), restated: the coarse maps and the
    targets flattened level by level, image by image; per positive point its (l, t, r, b) target
    over the stride, its centerness target sqrt(min/max(l, r) x min/max(t, b)); GIoU of the boxes
    decoded around the point, weighted by the centerness, over the centerness sum.

    ``coarse``: per level (N, 4, H, W), stride units; ``positives``: (image, level, y, x, box)
    with the matched ground-truth box in pixels."""
    points, distances, targets, is_positive = [], [], [], []
    for level, (c, stride) in enumerate(zip(coarse, strides)):
        h, w = c.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        level_points = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1) * stride + stride // 2
        for image in range(num_images):
            points.append(level_points.float())
            distances.append(c[image].permute(1, 2, 0).reshape(-1, 4))
            level_targets = torch.zeros(h * w, 4)
            level_positive = torch.zeros(h * w, dtype=torch.bool)
            for i, lv, y, x, box in positives:
                if (i, lv) == (image, level):
                    px, py = level_points[y * w + x].tolist()
                    box = torch.tensor(box)
                    level_targets[y * w + x] = torch.stack(
                        [px - box[0], py - box[1], box[2] - px, box[3] - py]
                    ) / stride
                    level_positive[y * w + x] = True
            targets.append(level_targets)
            is_positive.append(level_positive)
    pos = torch.cat(is_positive).nonzero().reshape(-1)
    points, distances, targets = (torch.cat(t)[pos] for t in (points, distances, targets))
    lr, tb = targets[:, [0, 2]], targets[:, [1, 3]]
    centerness = ((lr.min(-1)[0] / lr.max(-1)[0]) * (tb.min(-1)[0] / tb.max(-1)[0])).sqrt()

    def distance2bbox(p, d):
        x, y = p.unbind(1)
        return torch.stack([x - d[:, 0], y - d[:, 1], x + d[:, 2], y + d[:, 3]], -1)

    _, giou = _iou_and_giou(distance2bbox(points, distances), distance2bbox(points, targets))
    return loss_weight * ((1 - giou) * centerness).sum() / centerness.sum(), centerness


def test_fcos_coarse_loss_is_the_releases():
    """Crafted positives on three levels of two images (the second without boxes), matched boxes
    giving unequal centerness targets: value and gradient equal the release's restatement."""
    torch.manual_seed(0)
    model = instantiate(plugin(small_lazy_model("fcos"), salt_on=True))
    shapes = [(4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    features = [torch.zeros(2, CHANNELS, h, w) for h, w in shapes]
    anchors = model.anchor_generator(features)
    strides = model.anchor_generator.strides
    # (image, level, y, x, matched gt box in pixels) around the point ((x, y) + 0.5) x stride.
    positives = [
        (0, 0, 0, 0, [1.0, 2.0, 30.0, 9.0]),
        (0, 0, 2, 3, [20.0, 11.0, 33.0, 40.0]),
        (0, 0, 3, 4, [30.0, 20.0, 37.0, 31.0]),
        (0, 1, 1, 2, [20.0, 3.0, 90.0, 30.0]),
        (0, 2, 0, 1, [33.0, 10.0, 120.0, 20.0]),
    ]
    coarse = [(torch.rand(2, 4, h, w) * 3 + 0.2).requires_grad_() for h, w in shapes]
    sizes = [h * w for h, w in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    labels = [torch.full((sum(sizes),), NUM_CLASSES) for _ in range(2)]
    boxes = [torch.zeros(sum(sizes), 4) for _ in range(2)]
    for image, level, y, x, box in positives:
        index = offsets[level] + y * shapes[level][1] + x
        labels[image][index], boxes[image][index] = level % NUM_CLASSES, torch.tensor(box)

    loss = model.coarse_loss(anchors, coarse, labels, boxes)
    grads = torch.autograd.grad(loss, coarse)
    reference = [c.detach().clone().requires_grad_() for c in coarse]
    expected, centerness = release_fcos_coarse_loss(reference, positives, 2, strides)
    expected_grads = torch.autograd.grad(expected, reference)
    assert centerness.max() - centerness.min() > 0.3  # the weighting matters
    assert model.loss_coarse_weight == 0.5
    assert torch.allclose(loss, expected, atol=1e-5, rtol=0), (loss, expected)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-5, rtol=0)
    assert expected_grads[0].abs().sum() > 0

    # No positive anywhere: 0, with finite (zero) gradients.
    empty = [torch.full_like(lb, NUM_CLASSES) for lb in labels]
    loss = model.coarse_loss(anchors, coarse, empty, [torch.zeros_like(b) for b in boxes])
    grads = torch.autograd.grad(loss, coarse)
    assert loss.item() == 0 and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("name", ["fcos", "retinanet"])
def test_point_sets_of_plugin_detections(name):
    torch.manual_seed(0)
    model = instantiate(plugin(small_lazy_model(name), salt_on=True))
    model.eval()
    inputs = batch()
    model.output_point_sets = True
    model.test_score_thresh = 0.0
    with torch.no_grad():
        outputs = model(inputs)
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        salt = model.head(features).salt
        reg_points, cls_points = salt.reg_points, salt.cls_points
    strides = model.anchor_generator.strides
    # The anchor centre of each location (FCOS: offset 0.5, RetinaNet: 0).
    num_anchors = model.anchor_generator.num_cell_anchors[0]
    centers = [a.get_centers()[::num_anchors] for a in model.anchor_generator(features)]
    for i, output in enumerate(outputs):
        instances = output["instances"]
        assert len(instances) > 0
        for det in range(min(len(instances), 20)):
            level = int(instances.pred_levels[det])
            location = int(instances.pred_locations[det])
            row, col = divmod(location, reg_points[level].shape[-1])
            for field, maps in [("pred_reg_points", reg_points), ("pred_cls_points", cls_points)]:
                yx = maps[level][i, :, row, col].reshape(9, 2)
                expected = yx.flip(1) * strides[level] + centers[level][location]
                assert torch.allclose(instances.get(field)[det], expected, atol=1e-4), field

    model.output_point_sets = False
    plain = [o["instances"] for o in model(inputs)]
    assert not plain[0].has("pred_reg_points")
    off = instantiate(plugin(small_lazy_model(name), salt_on=False)).eval()
    off.output_point_sets = True
    with pytest.raises(ValueError, match="SALT_ON False"):
        off(inputs)


@pytest.mark.parametrize("salt_on", [False, True])
def test_fcos_plugin_trains_under_bfloat16_autocast(salt_on):
    """Under autocast the FCOS deltas are bfloat16: the plug-in decodes them in float32, so its
    losses are finite, close to the float32 ones, and reach every trainable parameter."""
    lazy = plugin(small_lazy_model("fcos"), salt_on=salt_on)
    torch.manual_seed(0)
    reference = losses_of(instantiate(lazy))  # a twin: the loss normaliser is an EMA
    torch.manual_seed(0)
    model = instantiate(lazy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = losses_of(model)
    assert losses.keys() == reference.keys()
    for key, value in losses.items():
        assert value.dtype == torch.float32, key
        # bfloat16 keeps 8 bits of mantissa: relative error of a few 2^-8 through the layers.
        assert torch.isclose(value, reference[key], rtol=0.05, atol=1e-3), key
    sum(losses.values()).backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unreached
