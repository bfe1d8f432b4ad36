import statistics

import torch

from saltnet.modeling.atss import atss_assign


def _grid_anchors(n: int, stride: float, offset: float = 0.0) -> torch.Tensor:
    """
    (n * n, 4) square anchors of side 8 * stride centred at ((j + offset) * stride,
    (i + offset) * stride); anchor i * n + j is at row i, column j.
    """
    coords = (torch.arange(n, dtype=torch.float32) + offset) * stride
    cy, cx = torch.meshgrid(coords, coords, indexing="ij")
    centers = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)
    half = 4 * stride
    return torch.cat([centers - half, centers + half], dim=1)


def _positives(matched_idxs: torch.Tensor, gt_idx: int) -> set:
    return set((matched_idxs == gt_idx).nonzero().flatten().tolist())


# Single level: 10 x 10 anchor centres (8j, 8i), anchors of side 64.
# All test gts below are centred on (40, 40) = centre of anchor 55 (row 5, column 5), so their 9
# candidates are the 3 x 3 neighbourhood: anchors 44, 45, 46, 54, 55, 56, 64, 65, 66.
LEVEL0 = _grid_anchors(10, 8.0)
NEIGHBOURHOOD = {44, 45, 46, 54, 55, 56, 64, 65, 66}


def test_grid_helper():
    assert LEVEL0.shape == (100, 4)
    assert torch.equal(LEVEL0[55], torch.tensor([8.0, 8.0, 72.0, 72.0]))
    assert torch.equal(LEVEL0[56], torch.tensor([16.0, 8.0, 80.0, 72.0]))


def test_single_gt_threshold_is_mean_plus_std():
    gt = torch.tensor([[8.0, 24.0, 72.0, 56.0]])  # 64 x 32, area 2048
    # Anchors in column 5 (x from 8 to 72) contain the gt's x-range and, for rows 4..6, its
    # y-range: IoU = 2048 / 4096. Anchors in columns 4 and 6 overlap 56 px in x:
    # IoU = 56 * 32 / (4096 + 2048 - 1792).
    iou_col5 = 2048 / 4096
    iou_side = 1792 / 4352
    candidate_ious = [iou_col5] * 3 + [iou_side] * 6
    threshold = statistics.mean(candidate_ious) + statistics.stdev(candidate_ious)
    assert iou_side < threshold <= iou_col5  # ~0.485

    matched = atss_assign([LEVEL0], gt)
    assert matched.shape == (100,)
    assert matched.dtype == torch.long
    assert _positives(matched, 0) == {45, 55, 65}
    assert (matched[[i for i in range(100) if i not in {45, 55, 65}]] == -1).all()


def test_threshold_uses_unbiased_std():
    # 64 x 64 gt centred at (40, 34). Its 9 nearest centres are (40, 32), (40, 40), (32, 32),
    # (48, 32), (40, 24), (32, 40), (48, 40), (32, 24), (48, 24). Overlaps are 64 or 56 px wide
    # and 62, 58 or 54 px high; union = 8192 - intersection.
    gt = torch.tensor([[8.0, 2.0, 72.0, 66.0]])
    iou_40_32 = 64 * 62 / (8192 - 64 * 62)  # ~0.939
    iou_40_40 = 64 * 58 / (8192 - 64 * 58)  # ~0.829
    candidate_ious = [
        iou_40_32,
        iou_40_40,
        64 * 54 / (8192 - 64 * 54),  # (40, 24)
        *[56 * 62 / (8192 - 56 * 62)] * 2,  # (32, 32), (48, 32)
        *[56 * 58 / (8192 - 56 * 58)] * 2,  # (32, 40), (48, 40)
        *[56 * 54 / (8192 - 56 * 54)] * 2,  # (32, 24), (48, 24)
    ]
    mean = statistics.mean(candidate_ious)
    # (40, 40) passes with the population std (~0.825) but not with the sample std (~0.831).
    assert mean + statistics.pstdev(candidate_ious) < iou_40_40
    assert iou_40_40 < mean + statistics.stdev(candidate_ious) < iou_40_32
    assert _positives(atss_assign([LEVEL0], gt), 0) == {45}


def test_candidates_with_centre_outside_gt_are_rejected():
    # 40 x 4 horizontal bar centred at (40, 40): every candidate anchor contains it, so all 9
    # IoUs are equal, std = 0 and all reach the threshold. Only the centres of row 5 (y = 40)
    # lie inside it; rows 4 and 6 (y = 32, 48) are outside.
    gt = torch.tensor([[20.0, 38.0, 60.0, 42.0]])
    matched = atss_assign([LEVEL0], gt)
    assert _positives(matched, 0) == {54, 55, 56}


def test_centre_must_be_more_than_0p01_px_inside():
    # Bars centred at (40, 40) whose left/right sides are 1/128 px (< 0.01) or 1/64 px (> 0.01)
    # beyond the centres x = 32 and x = 48. The sizes are dyadic so all 9 IoUs are exactly equal.
    for margin, expected in [(1 / 128, {55}), (1 / 64, {54, 55, 56})]:
        gt = torch.tensor([[32.0 - margin, 38.0, 48.0 + margin, 42.0]])
        assert _positives(atss_assign([LEVEL0], gt), 0) == expected, margin


def test_gt_away_from_all_anchor_centres_gets_nothing():
    # Nearest candidates are around anchor (72, 72); none of their centres is inside the gt.
    gt = torch.tensor([[200.0, 200.0, 240.0, 240.0]])
    assert (atss_assign([LEVEL0], gt) == -1).all()


def test_competing_gts_anchor_goes_to_higher_iou():
    gts = torch.tensor(
        [
            [24.0, 24.0, 56.0, 56.0],  # 32 x 32 inside all 9 candidates: IoU 1024 / 4096
            [8.0, 24.0, 72.0, 56.0],  # as in the first test: column 5 positive with IoU 0.5
        ]
    )
    matched = atss_assign([LEVEL0], gts)
    # gt 0: equal IoUs, all 9 centres inside -> all 9 positive. Column 5 is also positive for
    # gt 1 with the higher IoU 0.5 > 0.25.
    assert _positives(matched, 1) == {45, 55, 65}
    assert _positives(matched, 0) == NEIGHBOURHOOD - {45, 55, 65}
    assert (matched >= 0).sum() == 9

    # Same with the order of the gts swapped.
    swapped = atss_assign([LEVEL0], gts.flip(0))
    assert _positives(swapped, 0) == {45, 55, 65}
    assert _positives(swapped, 1) == NEIGHBOURHOOD - {45, 55, 65}


def test_no_gt_returns_all_background():
    matched = atss_assign([LEVEL0, _grid_anchors(2, 64.0)], torch.zeros(0, 4))
    assert matched.shape == (104,)
    assert matched.dtype == torch.long
    assert (matched == -1).all()


def test_no_anchors():
    gt = torch.tensor([[8.0, 24.0, 72.0, 56.0]])
    matched = atss_assign([torch.zeros(0, 4)], gt)
    assert matched.shape == (0,)
    assert matched.dtype == torch.long


def test_empty_level_is_skipped():
    gt = torch.tensor([[8.0, 24.0, 72.0, 56.0], [-200.0, -200.0, 264.0, 264.0]])
    level1 = _grid_anchors(2, 64.0)
    with_empty = atss_assign([LEVEL0, torch.zeros(0, 4), level1], gt)
    assert torch.equal(with_empty, atss_assign([LEVEL0, level1], gt))


# Second level: 2 x 2 anchors of side 512 centred at (0, 0), (64, 0), (0, 64), (64, 64);
# R_1 = 4 < topk, so all 4 are candidates of every gt.
LEVEL1 = _grid_anchors(2, 64.0)


def test_small_level_candidates_enter_the_threshold():
    gt = torch.tensor([[8.0, 24.0, 72.0, 56.0]])
    # Level 0 alone gives {45, 55, 65} (first test). With level 1 the 4 large anchors, which
    # all contain the gt (IoU 2048 / 512^2), join the candidates; the spread of the 13 IoUs
    # raises the threshold above 0.5 and the gt gets no positive at all.
    candidate_ious = [2048 / 4096] * 3 + [1792 / 4352] * 6 + [2048 / 512**2] * 4
    threshold = statistics.mean(candidate_ious) + statistics.stdev(candidate_ious)
    assert threshold > 0.5  # ~0.519
    matched = atss_assign([LEVEL0, LEVEL1], gt)
    assert matched.shape == (104,)
    assert (matched == -1).all()


def test_small_level_anchors_can_win():
    # 464 x 464 gt centred at (32, 32). The 4 level-1 anchors overlap it 456 x 456:
    # IoU = 456^2 / (512^2 + 464^2 - 456^2) ~ 0.77. The 9 level-0 candidates lie inside it:
    # IoU = 64^2 / 464^2 ~ 0.019. The threshold falls between the two.
    gt = torch.tensor([[-200.0, -200.0, 264.0, 264.0]])
    iou_l1 = 456**2 / (512**2 + 464**2 - 456**2)
    iou_l0 = 64**2 / 464**2
    candidate_ious = [iou_l1] * 4 + [iou_l0] * 9
    threshold = statistics.mean(candidate_ious) + statistics.stdev(candidate_ious)
    assert iou_l0 < threshold <= iou_l1
    matched = atss_assign([LEVEL0, LEVEL1], gt)
    assert _positives(matched, 0) == {100, 101, 102, 103}
    assert (matched[:100] == -1).all()


def _random_problem(seed: int, num_gts: int):
    g = torch.Generator().manual_seed(seed)
    levels = [_grid_anchors(256 // s, float(s), offset=0.5) for s in (8, 16, 32, 64)]
    xy = torch.rand(num_gts, 2, generator=g) * 256
    wh = 2 + torch.rand(num_gts, 2, generator=g) * 160
    gts = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
    return levels, gts


def test_gt_outside_image_does_not_disturb_others():
    levels, gts = _random_problem(seed=3, num_gts=40)
    matched = atss_assign(levels, gts)
    far = torch.tensor([[5000.0, 5000.0, 5100.0, 5100.0]])
    matched_more = atss_assign(levels, torch.cat([gts, far]))
    assert torch.equal(matched_more, matched)


def test_topk_larger_than_every_level():
    levels, gts = _random_problem(seed=4, num_gts=5)
    matched = atss_assign(levels, gts, topk=10_000)
    anchors = torch.cat(levels)
    assert matched.shape == (anchors.shape[0],)
    pos = matched >= 0
    centers = (anchors[pos, :2] + anchors[pos, 2:]) / 2
    assert (centers > gts[matched[pos], :2]).all() and (centers < gts[matched[pos], 2:]).all()


def test_single_candidate_uses_zero_std():
    # One anchor in total: its std is undefined and taken as 0, so the anchor is kept when its
    # centre is inside the gt.
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    gts = torch.tensor([[16.0, 16.0, 48.0, 48.0], [40.0, 40.0, 60.0, 60.0]])
    assert atss_assign([anchors], gts).tolist() == [0]
