"""
Property-based tests (hypothesis) of the box coder (``saltnet.modeling.box_coding``, with the
two-bin target split of ``distribution_focal_loss``) and of the ATSS assigner.

The hand-computed examples live in test_box_coding.py and test_atss.py; here every property is
checked on generated inputs: XYXY boxes in pixels with positive width and height inside an
image, points, strides and anchor grids laid out like the model's (``DefaultAnchorGenerator``
with offset 0: centres at ``(j, i) x stride``, square anchors of side ``8 x stride``).

The runs are derandomized (the same examples every time) and keep no example database, so the
suite stays deterministic. (Hypothesis still caches source constants in a .hypothesis/
directory, which ignores itself in git.)
"""

import math
from typing import List, Tuple

import numpy as np
import torch
from detectron2.structures import Boxes, pairwise_iou
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from saltnet.modeling.atss import atss_assign
from saltnet.modeling.box_coding import (
    aligned_giou,
    aligned_iou,
    boxes_to_distances,
    distances_to_boxes,
    distribution_to_distances,
)
from saltnet.modeling.losses import distribution_focal_loss

SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True)

STRIDES = (8, 16, 32, 64)
ANCHOR_SCALE = 8.0
MAX_IMAGE_SIDE = 1024
# float32 has a 24-bit mantissa: a coordinate below 2048 px is exact to 2^-13 px (~1.2e-4);
# encoding then decoding rounds twice.
PIXEL_ATOL = 1e-3


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def f32(low: float, high: float) -> st.SearchStrategy:
    """float32-representable floats in [low, high] (the bounds rounded inwards to float32)."""
    low32, high32 = np.float32(low), np.float32(high)
    if low32 < low:
        low32 = np.nextafter(low32, np.float32(np.inf))
    if high32 > high:
        high32 = np.nextafter(high32, np.float32(-np.inf))
    return st.floats(float(low32), float(high32), width=32)


@st.composite
def xyxy_boxes(draw, width: float, height: float, min_size: float = 1.0) -> List[float]:
    """A box [x1, y1, x2, y2] in pixels with width, height >= min_size inside the image."""
    w = draw(f32(min_size, width))
    h = draw(f32(min_size, height))
    x1 = draw(f32(0.0, width - w))
    y1 = draw(f32(0.0, height - h))
    return [x1, y1, x1 + w, y1 + h]


image_sides = st.integers(16, MAX_IMAGE_SIDE)


@st.composite
def boxes_with_points(draw, inside: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 4) boxes and (N, 2) points: inside (or on the border of) each box, or anywhere in
    the image and up to 64 px around it."""
    width, height = draw(image_sides), draw(image_sides)
    n = draw(st.integers(1, 16))
    boxes = torch.tensor(draw(st.lists(xyxy_boxes(width, height), min_size=n, max_size=n)))
    if inside:
        # Convex combinations of float32 ends, rounded to float32, stay in [x1, x2].
        uv = torch.tensor(draw(st.lists(st.tuples(f32(0, 1), f32(0, 1)), min_size=n, max_size=n)))
        b = boxes.double()
        points = (b[:, :2] + uv.double() * (b[:, 2:] - b[:, :2])).float()
    else:
        xs = st.tuples(f32(-64, width + 64), f32(-64, height + 64))
        points = torch.tensor(draw(st.lists(xs, min_size=n, max_size=n)))
    return boxes, points


def grid_anchors(width: int, height: int, stride: int) -> torch.Tensor:
    """(H_i * W_i, 4) anchors of one level like the model's: centres (j * stride, i * stride)
    on the ceil(height / stride) x ceil(width / stride) feature map, side 8 * stride."""
    xs = torch.arange(math.ceil(width / stride), dtype=torch.float32) * stride
    ys = torch.arange(math.ceil(height / stride), dtype=torch.float32) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centers = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)
    half = ANCHOR_SCALE * stride / 2
    return torch.cat([centers - half, centers + half], dim=1)


@st.composite
def atss_problems(draw, max_side: int = 256, max_gts: int = 8):
    """(levels, gt_boxes, topk): 1 to 4 levels of anchors of a random image (plus an
    empty level now and then); 0 to max_gts random gts, up to 2 gts that copy an anchor and up
    to 2 shrunk copies of other gts; topk in [1, 12]."""
    width, height = draw(st.integers(16, max_side)), draw(st.integers(16, max_side))
    strides = draw(st.lists(st.sampled_from(STRIDES), min_size=1, max_size=4, unique=True))
    strides = sorted(strides)
    levels = [grid_anchors(width, height, s) for s in strides]
    if draw(st.booleans()) and draw(st.booleans()):
        levels.insert(draw(st.integers(0, len(levels))), torch.zeros(0, 4))
    anchors = torch.cat(levels)
    gts = draw(st.lists(xyxy_boxes(width, height), max_size=max_gts))
    planted = draw(st.lists(st.integers(0, len(anchors) - 1), max_size=2))
    gts = gts + anchors[planted].tolist()
    # Crowds: boxes nested in another gt around its centre compete with it for the same anchors.
    for _ in range(draw(st.integers(0, 2)) if gts else 0):
        x1, y1, x2, y2 = gts[draw(st.integers(0, len(gts) - 1))]
        scale = draw(st.floats(0.5, 1.0)) / 2
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        gts.append([cx - scale * w, cy - scale * h, cx + scale * w, cy + scale * h])
    gts = [gts[i] for i in draw(st.permutations(range(len(gts))))]
    return levels, torch.tensor(gts, dtype=torch.float32).reshape(-1, 4), draw(st.integers(1, 12))


def centers_of(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


# ---------------------------------------------------------------------------------------------
# Box coder
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(boxes_with_points(inside=True))
def test_encode_decode_round_trip_for_points_inside(case):
    boxes, points = case
    distances = boxes_to_distances(points, boxes)
    assert distances.shape == boxes.shape
    assert (distances >= 0).all()
    # Opposite sides add up to the box's width and height.
    sizes = boxes[:, 2:] - boxes[:, :2]
    assert torch.allclose(distances[:, :2] + distances[:, 2:], sizes, rtol=0, atol=PIXEL_ATOL)
    back = distances_to_boxes(points, distances)
    assert torch.allclose(back, boxes, rtol=0, atol=PIXEL_ATOL)


@SETTINGS
@given(boxes_with_points(inside=False))
def test_distance_signs_say_which_sides_the_point_is_inside_of(case):
    # The sign of a float32 difference is exact (no rounding to 0 for distinct values), so the
    # signs must equal those of the exact (float64) distances, side by side.
    boxes, points = case
    distances = boxes_to_distances(points, boxes)
    p, b = points.double(), boxes.double()
    exact = torch.cat([p - b[:, :2], b[:, 2:] - p], dim=1)
    assert torch.equal(distances.sign(), exact.sign().float())
    inside = ((p >= b[:, :2]) & (p <= b[:, 2:])).all(dim=1)
    assert torch.equal((distances >= 0).all(dim=1), inside)
    event(f"points inside: {inside.any().item()}, outside: {(~inside).any().item()}")


@SETTINGS
@given(
    stride=st.sampled_from(STRIDES + (128,)),
    reg_max=st.integers(1, 32),
    data=st.data(),
)
def test_decode_encode_round_trip_in_stride_units(stride, reg_max, data):
    # Anchor points on a level's grid, distances in bins (stride units) in [0, reg_max], as the
    # head predicts them; decoding multiplies by the stride.
    n = data.draw(st.integers(1, 16))
    cells = data.draw(st.lists(st.tuples(*[st.integers(0, 127)] * 2), min_size=n, max_size=n))
    points = torch.tensor(cells, dtype=torch.float32) * stride
    bins = st.tuples(*[f32(0, reg_max)] * 4)
    distances = torch.tensor(data.draw(st.lists(bins, min_size=n, max_size=n)))
    boxes = distances_to_boxes(points, distances * stride)
    sizes = boxes[:, 2:] - boxes[:, :2]
    assert (sizes >= 0).all()
    assert (sizes <= 2 * reg_max * stride).all()
    back = boxes_to_distances(points, boxes) / stride
    # Coordinates reach 127 * 128 + 32 * 128 px ~ 2^14.3: float32 keeps ~2^-9 px there.
    atol = 4 * torch.finfo(torch.float32).eps * boxes.abs().max().clamp(min=1) / stride
    assert torch.allclose(back, distances, rtol=0, atol=float(atol))
    # A decoded box is (up to rounding) the box it encodes: IoU 1.
    if (sizes > 0).all():
        again = distances_to_boxes(points, back * stride)
        assert torch.allclose(aligned_iou(boxes, again), torch.ones(n), atol=1e-3)


def two_bin_split(targets: torch.Tensor, reg_max: int) -> torch.Tensor:
    """(..., reg_max + 1) probabilities of the DFL target: a target t between bins l = floor(t)
    and l + 1 puts 1 - (t - l) on bin l and t - l on bin l + 1 (nothing beyond reg_max)."""
    t = targets.double()
    left = t.floor().long().clamp(max=reg_max)
    right = (left + 1).clamp(max=reg_max)
    probs = torch.zeros(*t.shape, reg_max + 1, dtype=torch.float64)
    probs.scatter_add_(-1, left[..., None], (left + 1 - t)[..., None])
    probs.scatter_add_(-1, right[..., None], (t - left)[..., None])
    return probs


@st.composite
def dfl_cases(draw):
    """(reg_max, (n, 4) targets in [0, reg_max] bins, (n, 4, reg_max + 1) arbitrary logits)."""
    reg_max = draw(st.integers(1, 32))
    n = draw(st.integers(1, 8))
    targets = draw(st.lists(st.tuples(*[f32(0, reg_max)] * 4), min_size=n, max_size=n))
    size = n * 4 * (reg_max + 1)
    logits = draw(st.lists(f32(-10, 10), min_size=size, max_size=size))
    return reg_max, targets, logits


@SETTINGS
@given(dfl_cases())
@example((16, [[0.0, 1.0, 16 - 0.01, 16.0]], [0.0] * 4 * 17))  # bins' and clamp's edges
def test_two_bin_split_round_trip_and_dfl_minimum(case):
    """A target distance in [0, reg_max] (bins) is the expectation of its two-bin split, and
    the split is where Distribution Focal Loss is smallest (Gibbs' inequality): DFL at any
    other logits is at least as large, and at the split it equals the split's entropy."""
    reg_max, targets, other = case
    targets = torch.tensor(targets)
    probs = two_bin_split(targets, reg_max)  # (n, 4, reg_max + 1)
    assert torch.allclose(probs.sum(-1), torch.ones(()).double())
    # log(0) = -inf would give DFL 0 * inf = nan at a zero-weight bin; -1e4 underflows to an
    # exactly zero probability instead.
    logits = probs.log().clamp(min=-1e4).float()
    decoded = distribution_to_distances(logits.flatten(1), reg_max)
    assert decoded.shape == targets.shape
    assert torch.allclose(decoded, targets, rtol=0, atol=1e-5 * (reg_max + 1))

    loss_at_split = distribution_focal_loss(logits.flatten(0, 1), targets.flatten())
    entropy = -(probs * probs.clamp(min=1e-300).log()).sum(-1).flatten().float()
    assert torch.isfinite(loss_at_split).all()
    assert torch.allclose(loss_at_split, entropy, rtol=0, atol=1e-4)
    other = torch.tensor(other).view_as(logits)
    loss_other = distribution_focal_loss(other.flatten(0, 1), targets.flatten())
    assert (loss_other >= loss_at_split - 1e-4).all()


@SETTINGS
@given(reg_max=st.integers(1, 24), data=st.data())
def test_distribution_expectation_invariants(reg_max, data):
    n = data.draw(st.integers(1, 4))
    size = n * 4 * (reg_max + 1)
    logits = torch.tensor(data.draw(st.lists(f32(-20, 20), min_size=size, max_size=size)))
    logits = logits.view(n, 4, reg_max + 1)
    out = distribution_to_distances(logits.flatten(1), reg_max)
    assert out.shape == (n, 4)
    tol = 1e-5 * (reg_max + 1)
    # A convex combination of the bins 0..reg_max.
    assert (out >= -tol).all() and (out <= reg_max + tol).all()
    # Softmax: adding a constant to one side's logits changes nothing.
    shift = torch.tensor(data.draw(st.lists(f32(-30, 30), min_size=n * 4, max_size=n * 4)))
    shifted = distribution_to_distances((logits + shift.view(n, 4, 1)).flatten(1), reg_max)
    assert torch.allclose(shifted, out, rtol=0, atol=10 * tol)
    # Reversing a side's bins mirrors its expectation: E' = reg_max - E.
    mirrored = distribution_to_distances(logits.flip(-1).flatten(1), reg_max)
    assert torch.allclose(mirrored, reg_max - out, rtol=0, atol=tol)
    # The four sides are decoded independently: permuting the groups permutes the output.
    perm = torch.tensor(data.draw(st.permutations(range(4))))
    permuted = distribution_to_distances(logits[:, perm].flatten(1), reg_max)
    assert torch.allclose(permuted, out[:, perm], rtol=0, atol=1e-6)


@SETTINGS
@given(width=image_sides, height=image_sides, data=st.data())
def test_iou_giou_invariants(width, height, data):
    n = data.draw(st.integers(1, 16))
    boxes1, boxes2 = (
        torch.tensor(data.draw(st.lists(xyxy_boxes(width, height), min_size=n, max_size=n)))
        for _ in range(2)
    )
    iou, giou = aligned_iou(boxes1, boxes2), aligned_giou(boxes1, boxes2)
    assert ((iou >= 0) & (iou <= 1)).all()
    assert ((giou >= -1) & (giou <= iou + 1e-6)).all()
    assert torch.equal(iou, aligned_iou(boxes2, boxes1))
    assert torch.allclose(giou, aligned_giou(boxes2, boxes1), rtol=0, atol=1e-6)
    overlap = torch.min(boxes1[:, 2:], boxes2[:, 2:]) > torch.max(boxes1[:, :2], boxes2[:, :2])
    assert torch.equal(iou > 0, overlap.all(dim=1))
    assert torch.allclose(aligned_iou(boxes1, boxes1), torch.ones(n))
    assert torch.allclose(aligned_giou(boxes1, boxes1), torch.ones(n))
    # Scaling by a power of two is exact in floating point and leaves (G)IoU unchanged.
    assert torch.allclose(aligned_iou(boxes1 * 4, boxes2 * 4), iou, rtol=0, atol=1e-6)
    assert torch.allclose(aligned_giou(boxes1 / 8, boxes2 / 8), giou, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# ATSS
# ---------------------------------------------------------------------------------------------


def level_index(levels: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.full((len(a),), i) for i, a in enumerate(levels)]).long()


def test_atss_assignment_contract():
    """Output shape, dtype and range; every positive's centre is inside its gt by > 0.01 px on
    all four sides and is among the topk anchors of its level closest to the gt centre; a gt has
    at most min(topk, R_i) positives on level i (so at most topk x num_levels in all)."""
    positives_per_example = []

    @SETTINGS
    @given(atss_problems())
    def check(problem):
        levels, gts, topk = problem
        anchors = torch.cat(levels)
        matched = atss_assign(levels, gts, topk=topk)
        assert matched.shape == (len(anchors),)
        assert matched.dtype == torch.long
        assert ((matched >= -1) & (matched < len(gts))).all()
        pos = matched >= 0
        positives_per_example.append(int(pos.sum()))
        if not pos.any():
            return

        pos_gts = gts[matched[pos]]
        centers = centers_of(anchors[pos])
        assert (centers - pos_gts[:, :2] > 0.01).all()
        assert (pos_gts[:, 2:] - centers > 0.01).all()

        levels_of = level_index(levels)
        counts = torch.zeros(len(gts), len(levels), dtype=torch.long)
        counts.index_put_((matched[pos], levels_of[pos]), torch.ones(()).long(), accumulate=True)
        level_sizes = torch.tensor([len(a) for a in levels])
        assert (counts <= level_sizes.clamp(max=topk)[None, :]).all()
        assert (counts.sum(dim=1) <= topk * len(levels)).all()

        # Candidate check, in float64 with a relative margin for float32 ties.
        all_centers = centers_of(anchors).double()
        gt_centers = centers_of(pos_gts).double()
        sq_to_gt = (all_centers[None] - gt_centers[:, None]).pow(2).sum(-1)  # (P, R)
        own = sq_to_gt[torch.arange(len(centers)), pos.nonzero().flatten()]
        same_level = levels_of[None, :] == levels_of[pos][:, None]
        closer = (sq_to_gt < own[:, None] * (1 - 1e-5) - 1e-6) & same_level
        assert (closer.sum(dim=1) < topk).all()

    check()
    # Not vacuous: most generated problems have positives (planted gts copy an anchor).
    assert sum(p > 0 for p in positives_per_example) >= len(positives_per_example) // 3


@SETTINGS
@given(atss_problems(max_gts=0))
def test_atss_without_gts_assigns_nothing(problem):
    levels, _, topk = problem
    for gts in (torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.float64)):
        matched = atss_assign(levels, gts, topk=topk)
        assert matched.shape == (sum(len(a) for a in levels),)
        assert matched.dtype == torch.long
        assert (matched == -1).all()


def remap(matched: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Indices into the permuted gts (gts[perm]) -> indices into the original gts."""
    return torch.where(matched >= 0, perm[matched.clamp(min=0)], -1)


def test_atss_is_permutation_equivariant():
    """Permuting the gts permutes the assignment: every anchor goes to the same gt (by box), or,
    where an anchor is positive for several gts with exactly the same IoU, to one of them."""
    changed = []

    @SETTINGS
    @given(atss_problems(), st.data())
    def check(problem, data):
        levels, gts, topk = problem
        if len(gts) == 0:
            return  # see test_atss_without_gts_assigns_nothing
        perm = torch.tensor(data.draw(st.permutations(range(len(gts)))), dtype=torch.long)
        matched = atss_assign(levels, gts, topk=topk)
        back = remap(atss_assign(levels, gts[perm], topk=topk), perm)
        assert torch.equal(back >= 0, matched >= 0)
        differ = (back != matched).nonzero().flatten()
        if len(differ):
            ious = pairwise_iou(Boxes(torch.cat(levels)), Boxes(gts))
            assert torch.equal(ious[differ, back[differ]], ious[differ, matched[differ]])
        changed.append(bool((matched >= 0).any() and not torch.equal(perm, perm.sort().values)))

    check()
    assert sum(changed) >= 10  # non-trivial permutations of problems with positives


def test_atss_gts_are_assigned_independently():
    """ATSS selects each gt's positives from its own candidates and threshold; the gts only
    meet when an anchor is positive for several, and then the highest IoU wins. So, with P_j
    the positives of gt j assigned alone: an anchor is positive iff it is in some P_j, and it
    goes to a j whose P_j holds it with the highest IoU among those."""
    conflicts = []

    @SETTINGS
    @given(atss_problems(max_gts=6))
    def check(problem):
        levels, gts, topk = problem
        if len(gts) == 0:
            return
        matched = atss_assign(levels, gts, topk=topk)
        alone = torch.zeros(len(matched), len(gts), dtype=torch.bool)  # (R, M): anchor in P_j
        for j in range(len(gts)):
            alone[:, j] = atss_assign(levels, gts[j : j + 1], topk=topk) == 0
        assert torch.equal(matched >= 0, alone.any(dim=1))
        pos = (matched >= 0).nonzero().flatten()
        assert alone[pos, matched[pos]].all()
        ious = pairwise_iou(Boxes(torch.cat(levels)), Boxes(gts))
        best = torch.where(alone, ious, -1.0).max(dim=1).values
        assert torch.equal(ious[pos, matched[pos]], best[pos])
        conflicts.append(int((alone.sum(dim=1) > 1).sum()))

    check()
    assert sum(c > 0 for c in conflicts) >= 5  # anchors claimed by several gts do occur


@st.composite
def full_grid_problems(draw):
    """Levels of an image of at least 3 x 64 px per side, so that every level has a grid of at
    least 3 x 3 anchors; topk in [4, 12]; a gt that copies an anchor plus 0-5 random gts."""
    width, height = draw(st.integers(192, 320)), draw(st.integers(192, 320))
    strides = sorted(draw(st.lists(st.sampled_from(STRIDES), min_size=1, max_size=4, unique=True)))
    levels = [grid_anchors(width, height, s) for s in strides]
    anchors = torch.cat(levels)
    k = draw(st.integers(0, len(anchors) - 1))
    others = draw(st.lists(xyxy_boxes(width, height), max_size=5))
    position = draw(st.integers(0, len(others)))
    gts = others[:position] + [anchors[k].tolist()] + others[position:]
    return levels, torch.tensor(gts), k, draw(st.integers(4, 12))


@SETTINGS
@given(full_grid_problems())
def test_atss_gt_equal_to_an_anchor_gets_that_anchor(problem):
    """The anchor has IoU 1 (no other anchor or gt can beat it) and distance 0, so it is a
    candidate; it is positive as long as 1 reaches mean + std of the candidates' IoUs. That is
    NOT guaranteed by ATSS in general (e.g. topk=1 with two levels: IoUs [1, x <= 0.25] give
    mean + std > 1; one level of 2 anchors likewise), but it is on the model's grids as soon as
    each level has at least 3 x 3 anchors and topk >= 4, which is what is generated here."""
    levels, gts, k, topk = problem
    anchors = torch.cat(levels)
    matched = atss_assign(levels, gts, topk=topk)
    assert matched[k] >= 0
    # Several gts may copy the anchor; any of them will do.
    assert torch.equal(gts[matched[k]], anchors[k])


@SETTINGS
@given(
    stride=st.sampled_from(STRIDES),
    half_w=st.floats(0.5, 2.0),
    half_h=st.floats(0.5, 2.0),
    offset_x=st.floats(-0.5, 0.5),
    offset_y=st.floats(-0.5, 0.5),
)
@example(stride=8, half_w=1.0, half_h=1.75, offset_x=0.0, offset_y=0.0)
def test_atss_gt_inside_all_candidates_keeps_its_nearest_anchor(
    stride, half_w, half_h, offset_x, offset_y
):
    """One level of 10 x 10 anchors (side 8 x stride). A gt centred within half a stride of an
    interior anchor, with half-sizes in [0.5, 2] strides, lies inside all its candidate anchors
    (whose centres are at most 2 strides away on each axis): all their IoUs are equal, the
    threshold mean + std equals that IoU, and every candidate whose centre is inside the gt is
    positive, in particular the nearest anchor (the one the gt is centred near)."""
    anchors = grid_anchors(10 * stride, 10 * stride, stride)
    cx, cy = (5 + offset_x) * stride, (5 + offset_y) * stride
    hw, hh = (half_w * stride + 0.02, half_h * stride + 0.02)
    gt = torch.tensor([[cx - hw, cy - hh, cx + hw, cy + hh]])
    matched = atss_assign([anchors], gt)
    nearest = 5 * 10 + 5
    assert matched[nearest] == 0, (gt.tolist(), (matched >= 0).nonzero().flatten().tolist())
