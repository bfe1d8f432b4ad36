import pytest
import torch

from saltnet.modeling.box_coding import (
    aligned_giou,
    aligned_iou,
    boxes_to_distances,
    distances_to_boxes,
    distribution_to_distances,
)


def test_distances_to_boxes_hand_example():
    points = torch.tensor([[10.0, 20.0]])
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    boxes = distances_to_boxes(points, distances)
    assert torch.equal(boxes, torch.tensor([[9.0, 18.0, 13.0, 24.0]]))
    assert torch.equal(boxes_to_distances(points, boxes), distances)


def test_boxes_to_distances_point_outside_is_negative():
    points = torch.tensor([[0.0, 5.0]])
    boxes = torch.tensor([[2.0, 0.0, 6.0, 10.0]])
    assert torch.equal(boxes_to_distances(points, boxes), torch.tensor([[-2.0, 5.0, 6.0, 5.0]]))


def test_round_trip_random():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(50, 2, generator=g) * 500
    distances = torch.rand(50, 4, generator=g) * 100
    back = boxes_to_distances(points, distances_to_boxes(points, distances))
    assert torch.allclose(back, distances, atol=1e-4)

    boxes = torch.rand(50, 4, generator=g) * 500
    boxes[:, 2:] += boxes[:, :2]
    again = distances_to_boxes(points, boxes_to_distances(points, boxes))
    assert torch.allclose(again, boxes, atol=1e-4)


def test_distances_to_boxes_broadcasts_points_over_images():
    points = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])  # (3, 2)
    distances = torch.ones(2, 3, 4)  # (N=2, 3, 4)
    boxes = distances_to_boxes(points, distances)
    assert boxes.shape == (2, 3, 4)
    assert torch.equal(boxes[1, 1], torch.tensor([7.0, -1.0, 9.0, 1.0]))


def test_box_coding_casts_to_float32():
    points = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    distances = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float16)
    assert distances_to_boxes(points, distances).dtype == torch.float32
    assert boxes_to_distances(points, distances).dtype == torch.float32


def test_box_coding_empty():
    assert distances_to_boxes(torch.zeros(0, 2), torch.zeros(0, 4)).shape == (0, 4)
    assert boxes_to_distances(torch.zeros(0, 2), torch.zeros(0, 4)).shape == (0, 4)


def test_distribution_to_distances_peaked_and_uniform():
    reg_max = 7
    logits = torch.zeros(4, reg_max + 1)
    logits[0, 3] = 100.0  # all mass on bin 3
    logits[1, 0] = 100.0  # all mass on bin 0
    logits[2, reg_max] = 100.0  # all mass on the last bin
    # row 3: equal logits -> uniform over 0..7 -> mean 3.5
    out = distribution_to_distances(logits.reshape(1, -1), reg_max)
    assert out.shape == (1, 4)
    assert torch.allclose(out, torch.tensor([[3.0, 0.0, 7.0, 3.5]]), atol=1e-5)


def test_distribution_to_distances_two_equal_bins_and_leading_dims():
    reg_max = 16
    logits = torch.full((2, 5, 4, reg_max + 1), -100.0)
    logits[..., 2] = 0.0
    logits[..., 3] = 0.0  # half of the mass on bin 2, half on bin 3
    out = distribution_to_distances(logits.reshape(2, 5, -1), reg_max)
    assert out.shape == (2, 5, 4)
    assert torch.allclose(out, torch.full((2, 5, 4), 2.5), atol=1e-5)


def test_distribution_to_distances_empty_and_fp16():
    out = distribution_to_distances(torch.zeros(0, 4 * 8, dtype=torch.float16), 7)
    assert out.shape == (0, 4)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "box1, box2, iou, giou",
    [
        # identical
        ([0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], 1.0, 1.0),
        # disjoint side by side: union 8, enclosing box [0, 0, 5, 2] area 10
        ([0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 5.0, 2.0], 0.0, -0.2),
        # disjoint diagonally: union 2, enclosing box area 9
        ([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0], 0.0, -7.0 / 9.0),
        # half overlap: intersection 2, union 6, enclosing box = union
        ([0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], 1.0 / 3.0, 1.0 / 3.0),
        # nested: 4 / 16
        ([0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 3.0], 0.25, 0.25),
        # touching corners: intersection 0, union 2, enclosing box area 4
        ([0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0], 0.0, -0.5),
    ],
)
def test_aligned_iou_giou_hand_values(box1, box2, iou, giou):
    b1, b2 = torch.tensor([box1]), torch.tensor([box2])
    assert aligned_iou(b1, b2).item() == pytest.approx(iou, abs=1e-6)
    assert aligned_giou(b1, b2).item() == pytest.approx(giou, abs=1e-6)
    # symmetric
    assert aligned_giou(b2, b1).item() == pytest.approx(giou, abs=1e-6)


def test_aligned_iou_broadcasts_to_pairwise():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    boxes2 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [10.0, 10.0, 11.0, 11.0]])
    iou = aligned_iou(boxes1[:, None], boxes2[None])
    expected = torch.tensor([[1.0, 1.0 / 3.0, 0.0], [0.25, 0.25, 0.0]])
    assert iou.shape == (2, 3)
    assert torch.allclose(iou, expected, atol=1e-6)


def test_aligned_iou_giou_degenerate_boxes_are_finite():
    boxes1 = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # point vs the same point
            [0.0, 0.0, 0.0, 5.0],  # zero-width line vs a box
            [3.0, 3.0, 1.0, 1.0],  # inverted box vs a box
            [0.0, 0.0, 0.0, 0.0],
        ],
        requires_grad=True,
    )
    boxes2 = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],
            [0.0, 0.0, 2.0, 2.0],
            [0.0, 0.0, 2.0, 2.0],
            [5.0, 5.0, 5.0, 5.0],
        ],
        requires_grad=True,
    )
    iou = aligned_iou(boxes1, boxes2)
    giou = aligned_giou(boxes1, boxes2)
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    assert torch.equal(iou, torch.zeros(4))
    assert (giou >= -1).all() and (giou <= 1).all()
    (iou.sum() + giou.sum()).backward()
    assert torch.isfinite(boxes1.grad).all() and torch.isfinite(boxes2.grad).all()


def test_aligned_iou_giou_empty_and_dtype():
    empty = torch.zeros(0, 4, dtype=torch.float16)
    assert aligned_iou(empty, empty).shape == (0,)
    assert aligned_giou(empty, empty).shape == (0,)
    assert aligned_giou(empty, empty).dtype == torch.float32
