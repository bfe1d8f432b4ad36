import math

import pytest
import torch

from saltnet.modeling.losses import distribution_focal_loss, giou_loss, quality_focal_loss


def test_qfl_hand_computed_two_anchors_two_classes():
    pred = torch.tensor([[0.5, 0.2], [0.3, 0.9]])
    gt_classes = torch.tensor([0, 2])  # anchor 0: class 0; anchor 1: background (K = 2)
    gt_quality = torch.tensor([0.8, 0.7])  # 0.7 is at a background anchor: must be ignored
    loss = quality_focal_loss(pred, gt_classes, gt_quality, beta=2.0)

    # anchor 0, class 0 (positive, q = 0.8): -(0.8 ln 0.5 + 0.2 ln 0.5) = ln 2, times 0.3^2
    # anchor 0, class 1 (negative): -ln(1 - 0.2) * 0.2^2
    row0 = math.log(2.0) * 0.09 + -math.log(0.8) * 0.04
    # anchor 1, both negative: -ln(0.7) * 0.3^2 - ln(0.1) * 0.9^2
    row1 = -math.log(0.7) * 0.09 + -math.log(0.1) * 0.81
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(row0, rel=1e-5)
    assert loss[1].item() == pytest.approx(row1, rel=1e-5)


def test_qfl_beta_changes_modulating_factor():
    pred = torch.tensor([[0.5]])
    loss = quality_focal_loss(pred, torch.tensor([0]), torch.tensor([1.0]), beta=1.0)
    # -ln(0.5) * |1 - 0.5|^1
    assert loss.item() == pytest.approx(math.log(2.0) * 0.5, rel=1e-5)


def test_qfl_zero_when_prediction_matches_target():
    # Background anchor predicting 0 everywhere; positive anchor predicting exactly q at its class
    # and 0 elsewhere. The negatives give BCE(0, 0) = 0, the positive |q - p|^beta = 0.
    pred = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.6, 0.0]])
    loss = quality_focal_loss(pred, torch.tensor([3, 1]), torch.tensor([0.0, 0.6]))
    assert torch.allclose(loss, torch.zeros(2), atol=1e-7)


def test_qfl_background_rows_ignore_quality_even_if_nan():
    pred = torch.tensor([[0.25, 0.5]])
    loss = quality_focal_loss(pred, torch.tensor([2]), torch.tensor([float("nan")]))
    expected = -math.log(0.75) * 0.25**2 - math.log(0.5) * 0.5**2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_qfl_finite_loss_and_gradient_at_extreme_probabilities():
    pred = torch.tensor(
        [[0.0, 1.0, 1e-8], [1.0, 0.0, 1.0 - 1e-7], [0.0, 1.0, 0.5]], requires_grad=True
    )
    gt_classes = torch.tensor([0, 1, 3])
    gt_quality = torch.tensor([0.5, 0.9, 0.0])
    loss = quality_focal_loss(pred, gt_classes, gt_quality)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_qfl_gradient_direction():
    # Negative class: pushing p down reduces the loss; positive below its target: pushing up.
    pred = torch.tensor([[0.3, 0.4]], requires_grad=True)
    quality_focal_loss(pred, torch.tensor([1]), torch.tensor([0.9])).sum().backward()
    assert pred.grad[0, 0] > 0
    assert pred.grad[0, 1] < 0


def test_qfl_empty():
    pred = torch.zeros(0, 5, requires_grad=True)
    loss = quality_focal_loss(pred, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert loss.shape == (0,)
    loss.sum().backward()
    assert pred.grad.shape == (0, 5)


def test_qfl_under_autocast_returns_float32():
    pred = torch.tensor([[0.5, 0.2]], dtype=torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = quality_focal_loss(pred, torch.tensor([0]), torch.tensor([0.8]))
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()


# Logits of one row of 5 bins (reg_max = 4); CE(k) = logsumexp(logits) - logits[k].
_DFL_LOGITS = [1.0, 2.0, 0.0, 3.0, 1.0]
_LSE = math.log(sum(math.exp(v) for v in _DFL_LOGITS))
_CE = [_LSE - v for v in _DFL_LOGITS]


def test_dfl_hand_computed():
    logits = torch.tensor([_DFL_LOGITS] * 4)
    targets = torch.tensor([3.0, 3.4, 0.0, 1.75])
    loss = distribution_focal_loss(logits, targets)
    expected = [
        _CE[3],  # exactly on bin 3
        0.6 * _CE[3] + 0.4 * _CE[4],
        _CE[0],
        0.25 * _CE[1] + 0.75 * _CE[2],
    ]
    assert loss.shape == (4,)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_dfl_target_at_reg_max_is_ce_of_last_bin():
    logits = torch.tensor([_DFL_LOGITS])
    loss = distribution_focal_loss(logits, torch.tensor([4.0]))
    assert loss.item() == pytest.approx(_CE[4], rel=1e-5)


def test_dfl_minimised_by_interpolating_distribution():
    # Softmax equal to the interpolation weights (0.6 on bin 3, 0.4 on bin 4) gives a lower
    # loss than a distribution peaked on bin 3.
    good = torch.log(torch.tensor([[1e-6, 1e-6, 1e-6, 0.6, 0.4]]))
    peaked = torch.log(torch.tensor([[1e-6, 1e-6, 1e-6, 0.99, 0.01]]))
    target = torch.tensor([3.4])
    assert distribution_focal_loss(good, target) < distribution_focal_loss(peaked, target)


def test_dfl_empty_and_fp16():
    logits = torch.zeros(0, 17, dtype=torch.float16, requires_grad=True)
    loss = distribution_focal_loss(logits, torch.zeros(0))
    assert loss.shape == (0,)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.shape == (0, 17)


def test_giou_loss_hand_values():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 0.0, 5.0, 2.0], [1.0, 0.0, 3.0, 2.0]])
    # identical: 0; disjoint with enclosing area 10 and union 8: 1 + 0.2; half overlap: 1 - 1/3
    assert giou_loss(pred, gt).tolist() == pytest.approx([0.0, 1.2, 2.0 / 3.0], abs=1e-6)


def test_giou_loss_empty_and_degenerate():
    assert giou_loss(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    loss = giou_loss(pred, torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
