"""SALTNet / SALTHead behaviour: point geometry, shapes, losses, training, inference."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import TINY_NUM_CLASSES, tiny_model

from saltnet import SALTHead, SALTNet
from saltnet.modeling.meta_arch import AnchorTargets, FlatPredictions
from saltnet.modeling.salt import KERNEL_GRID, place_points

NUM_CLASSES = TINY_NUM_CLASSES


def salt_model(salt_on=True, sdr_mode="both"):
    """The tests' tiny SALT-Net (helpers.tiny_model) with these switches, in training mode."""
    return tiny_model("MODEL.SALTNET.SALT_ON", str(salt_on), "MODEL.SALTNET.SDR_MODE", sdr_mode)


def batch(with_boxes=(True, True), size=(96, 128)):
    gen = torch.Generator().manual_seed(0)
    h, w = size
    boxes = torch.tensor([[10.0, 20, 60, 90], [50, 40, 120, 90], [70, 5, 90, 30]])
    classes = torch.tensor([0, 2, 1])
    items = []
    for has_boxes in with_boxes:
        n = 3 if has_boxes else 0
        inst = Instances((h, w), gt_boxes=Boxes(boxes[:n]), gt_classes=classes[:n])
        items.append({"image": torch.rand(3, h, w, generator=gen) * 255, "instances": inst})
    return items


def train_steps(model, inputs, steps, lr=0.01):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = []
    with EventStorage():
        for _ in range(steps):
            losses = model(inputs)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append(total.item())
    return history, losses


def test_points_sit_on_and_inside_the_coarse_box():
    gen = torch.Generator().manual_seed(0)
    distances = torch.rand(2, 4, 5, 6, generator=gen) * 4
    factors = torch.rand(2, 14, 5, 6, generator=gen)
    ys, xs = place_points(distances, factors).view(2, 9, 2, 5, 6).unbind(dim=2)
    left, top, right, bottom = distances.unbind(dim=1)
    torch.testing.assert_close(xs[:, 3], -left)  # point 3 on the left side
    torch.testing.assert_close(xs[:, 5], right)  # point 5 on the right side
    torch.testing.assert_close(ys[:, 1], -top)  # point 1 on the top side
    torch.testing.assert_close(ys[:, 7], bottom)  # point 7 on the bottom side
    for k in (1, 7):
        assert ((xs[:, k] >= -left) & (xs[:, k] <= right)).all()
    for k in (3, 5):
        assert ((ys[:, k] >= -top) & (ys[:, k] <= bottom)).all()
    for k in (0, 2, 4, 6, 8):
        assert ((xs[:, k] >= -left) & (xs[:, k] <= right)).all()
        assert ((ys[:, k] >= -top) & (ys[:, k] <= bottom)).all()
    # Factor 0 sets the height of point 3: at 0.25 it is a quarter down the left side.
    factors[:, 0] = 0.25
    ys, _ = place_points(distances, factors).view(2, 9, 2, 5, 6).unbind(dim=2)
    torch.testing.assert_close(ys[:, 3], -top + 0.25 * (top + bottom))


def test_box_equal_to_the_regular_grid_gives_zero_offsets():
    distances = torch.ones(1, 4, 1, 1)  # the box [-1, -1, 1, 1] in stride units
    factors = torch.zeros(1, 14, 1, 1)
    # s0..s3: side points at the middle; then (y, x) factors of points 0, 2, 4, 6, 8.
    values = [0.5, 0.5, 0.5, 0.5, 0, 0, 0, 1, 0.5, 0.5, 1, 0, 1, 1]
    factors[0, :, 0, 0] = torch.tensor(values)
    offsets = place_points(distances, factors) - KERNEL_GRID
    assert torch.equal(offsets, torch.zeros_like(offsets))


@pytest.mark.parametrize("salt_on", [True, False])
def test_head_output_shapes_and_ranges(salt_on):
    shapes = [ShapeSpec(channels=32, stride=2 ** (3 + i)) for i in range(5)]
    head = SALTHead(input_shape=shapes, num_classes=NUM_CLASSES, salt_on=salt_on)
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    features = [torch.randn(2, 32, h, w) for h, w in sizes]
    outputs = head(features)
    scores, box_logits, salt = outputs.scores, outputs.box_logits, outputs.salt
    for level, (h, w) in enumerate(sizes):
        assert scores[level].shape == (2, NUM_CLASSES, h, w)
        assert ((scores[level] >= 0) & (scores[level] <= 1)).all()
        assert box_logits[level].shape == (2, 4 * 17, h, w)
        if salt_on:
            coarse, reg_points, cls_points = salt.coarse, salt.reg_points, salt.cls_points
            assert coarse[level].shape == (2, 4, h, w)
            assert coarse[level].dtype == torch.float32 and (coarse[level] >= 0).all()
            assert reg_points[level].shape == cls_points[level].shape == (2, 18, h, w)
    assert (salt is None) == (not salt_on)
    assert head.output_groups == list(outputs.groups())


def test_forward_backward_reaches_every_parameter():
    model = salt_model()
    with EventStorage():
        losses = model(batch())
    assert set(losses) == {"loss_qfl", "loss_giou", "loss_dfl", "loss_coarse", "loss_sdr"}
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("salt_on", [True, False])
def test_loss_goes_down_on_a_fixed_batch(salt_on):
    model = salt_model(salt_on=salt_on)
    history, _ = train_steps(model, batch(), steps=40)
    assert history[-1] < 0.6 * history[0], history


@pytest.mark.parametrize("with_boxes", [(False, False), (True, False)])
def test_losses_finite_with_images_without_boxes(with_boxes):
    model = salt_model()
    history, losses = train_steps(model, batch(with_boxes), steps=2)
    for name, value in losses.items():
        assert torch.isfinite(value), name
    if not any(with_boxes):
        # Nothing to regress: the box losses vanish, only the background QFL remains.
        for name in ("loss_giou", "loss_dfl", "loss_coarse", "loss_sdr"):
            assert losses[name].item() == 0.0, name
        assert losses["loss_qfl"].item() > 0


def test_sdr_modes_select_coarse_losses():
    expected = {
        "none": set(),
        "gt": {"loss_coarse"},
        "distill": {"loss_sdr"},
        "both": {"loss_coarse", "loss_sdr"},
    }
    for mode, names in expected.items():
        model = salt_model(sdr_mode=mode)
        with EventStorage():
            losses = model(batch())
        assert set(losses) - {"loss_qfl", "loss_giou", "loss_dfl"} == names, mode
    with pytest.raises(ValueError, match="Unknown SDR mode 'sometimes'"):
        salt_model(sdr_mode="sometimes")


def test_perfect_predictions_give_zero_box_losses():
    """Hand-made predictions that decode exactly to the ground truth."""
    model = salt_model()
    points = torch.tensor([[40.0, 40.0], [8.0, 8.0]])
    strides = torch.tensor([8.0, 8.0])
    gt_boxes = torch.tensor([[[24.0, 16.0, 64.0, 72.0], [0.0, 0.0, 0.0, 0.0]]])
    gt_classes = torch.tensor([[1, NUM_CLASSES]])
    distances = torch.tensor([[[2.0, 3.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]])  # stride units
    logits = torch.full((1, 2, 4, 17), -50.0)
    logits.scatter_(3, distances.long().unsqueeze(-1), 50.0)
    scores = torch.zeros(1, 2, NUM_CLASSES)
    scores[0, 0, 1] = 1.0  # a perfect joint score: IoU target 1
    with EventStorage():
        valid = torch.ones(1, 2, dtype=torch.bool)
        losses = model.losses(
            FlatPredictions(scores=scores, box_logits=logits.flatten(2), coarse=distances),
            AnchorTargets(points, strides, gt_classes=gt_classes, gt_boxes=gt_boxes, valid=valid),
        )
    for name in ("loss_qfl", "loss_giou", "loss_dfl", "loss_coarse", "loss_sdr"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-5), name


def test_inference_returns_instances_in_original_coordinates():
    model = salt_model()
    train_steps(model, batch(), steps=30)
    model.eval()
    inputs = batch()
    for item in inputs:
        item["height"], item["width"] = 192, 256  # the image was resized by 0.5 for the model
    with torch.no_grad():
        outputs = model(inputs)
    inst = outputs[0]["instances"]
    assert inst.image_size == (192, 256)
    assert 0 < len(inst) <= 100
    assert set(inst.get_fields()) == {
        "pred_boxes",
        "scores",
        "pred_classes",
        "pred_levels",
        "pred_locations",
    }
    assert (inst.scores >= 0.05).all()
    assert (inst.pred_boxes.tensor[:, 2] <= 256).all() and (
        inst.pred_boxes.tensor[:, 3] <= 192
    ).all()
    # After training on this batch the best box matches a ground-truth box (scaled by 2).
    best = inst.pred_boxes.tensor[inst.scores.argmax()]
    gt = batch()[0]["instances"].gt_boxes.tensor * 2
    from detectron2.structures import pairwise_iou

    assert pairwise_iou(Boxes(best[None]), Boxes(gt)).max() > 0.5


def test_training_under_bfloat16_autocast():
    model = salt_model()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch())
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    sum(losses.values()).backward()


class _TwoLevelBackbone(Backbone):
    """Any backbone works: here two strided convs."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 32, 3, stride=8, padding=1)
        self.b = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1)

    def forward(self, x):
        a = self.a(x)
        return {"s8": a, "s16": self.b(a)}

    def output_shape(self):
        return {"s8": ShapeSpec(channels=32, stride=8), "s16": ShapeSpec(channels=32, stride=16)}


def test_builds_from_plain_keyword_arguments_with_any_backbone():
    backbone = _TwoLevelBackbone()
    head = SALTHead(input_shape=list(backbone.output_shape().values()), num_classes=NUM_CLASSES)
    model = SALTNet(
        backbone=backbone,
        head=head,
        head_in_features=["s8", "s16"],
        num_classes=NUM_CLASSES,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )
    history, _ = train_steps(model, batch(), steps=3)
    assert all(torch.isfinite(torch.tensor(history)))
    with pytest.raises(ValueError, match=r"IN_FEATURES names \['p3'\]"):
        SALTNet(
            backbone=backbone,
            head=head,
            head_in_features=["p3"],
            num_classes=NUM_CLASSES,
            pixel_mean=[0.0, 0.0, 0.0],
            pixel_std=[1.0, 1.0, 1.0],
        )


def test_config_naming_missing_features_fails_clearly():
    with pytest.raises(ValueError, match=r"IN_FEATURES names \['p2'\]"):
        tiny_model("MODEL.SALTNET.IN_FEATURES", "['p2', 'p3']")
