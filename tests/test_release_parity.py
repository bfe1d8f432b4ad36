"""Parity with the authors' release: a checkpoint in the release's layout, converted with the
command-line tool, makes the whole detector (backbone, FPN, head) compute what the release
computes; and the losses (with their gradients) equal the release's loss computation.

The references are restatements of the release in ``release_reference.py`` (torchvision / timm
backbones, mmdetection's FPN and the SALT head written with functional ops)."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import timm
import torch
import torchvision
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage
from helpers import REPO_ROOT, tiny_model
from release_reference import (
    release_fpn,
    release_head_level,
    release_losses,
    release_neck_and_head,
)
from test_backbone_conversion import randomize_bn_, timm_to_mmdet_res2net

from saltnet.checkpoint.checkpointer import AtomicCheckpointer, CheckpointMismatchError
from saltnet.config.defaults import load_yaml_config
from saltnet.data.mapper import SALTNetDatasetMapper
from saltnet.layers.batch_norm import FrozenStatsBatchNorm2d
from saltnet.modeling.head import HeadOutputs
from saltnet.modeling.salt import SALTPredictions

K = 3  # classes of the tests' models (the release's classifier then has 4 rows)


def convert_with_tool(tmp_path, state_dict, *args):
    """Save ``state_dict`` as an mmdetection checkpoint, convert it with the command-line tool."""
    src, dst = tmp_path / "release.pth", tmp_path / "converted.pth"
    torch.save({"state_dict": state_dict, "meta": {"mmdet_version": "2.x"}}, src)
    tool = str(REPO_ROOT / "tools" / "convert_mmdet_checkpoint.py")
    done = subprocess.run(
        [sys.executable, tool, str(src), str(dst), "--num-classes", str(K), *args],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return dst, done


def build_converted(config, weights, *opts):
    cfg = load_yaml_config(
        str(REPO_ROOT / "configs" / config),
        ["MODEL.SALTNET.NUM_CLASSES", str(K), "MODEL.DEVICE", "cpu", *opts],
    )
    model = build_model(cfg).eval()
    AtomicCheckpointer(model).load(str(weights))
    # Every tensor of the model came from the file (the backbone too), and every tensor was used.
    state = torch.load(weights, weights_only=False)["model"]
    incompatible = model.load_state_dict(state, strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return model


def assert_detector_matches_release(model, release_sd, c3_c4_c5, image, gn, dcn_towers):
    """Our backbone + FPN + head against the release restated, on every level."""
    normalized = (image - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        features = model.backbone(normalized)
        outputs = model.head([features[f] for f in model.head_in_features])
        scores, box_logits, coarse = outputs.scores, outputs.box_logits, outputs.salt.coarse
        pyramid = release_fpn(release_sd, c3_c4_c5(normalized), gn)
        for level, x in enumerate(pyramid):
            torch.testing.assert_close(features[f"p{level + 3}"], x, rtol=1e-4, atol=1e-4)
            ref_scores, ref_logits, ref_coarse = release_head_level(
                release_sd, x, level, dcn_towers
            )
            torch.testing.assert_close(coarse[level], ref_coarse, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(box_logits[level], ref_logits, rtol=1e-4, atol=1e-4)
            # The release's last score column is its background column, unused at inference.
            torch.testing.assert_close(scores[level], ref_scores[:, :K], rtol=1e-4, atol=1e-4)


def torchvision_c3_c4_c5(net):
    def run(x):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        c2 = net.layer1(x)
        c3 = net.layer2(c2)
        c4 = net.layer3(c3)
        return [c3, c4, net.layer4(c4)]

    return run


def test_converted_r50_detector_equals_release(tmp_path):
    """salt_R_50_FPN_1x: torchvision ResNet-50 + FPN (P7 = conv(P6), no ReLU) + SALT head."""
    with torch.no_grad():
        resnet = randomize_bn_(torchvision.models.resnet50())
    release = {
        "backbone." + k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")
    }
    release.update(release_neck_and_head(num_classes=K))
    weights, done = convert_with_tool(tmp_path, release)
    assert "kept the first 3 of 4 rows" in done.stderr + done.stdout
    model = build_converted("salt_R_50_FPN_1x.yaml", weights)
    image = 255 * torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    assert_detector_matches_release(
        model, release, torchvision_c3_c4_c5(resnet), image, gn=False, dcn_towers=False
    )


def test_converted_res2net_dcnx_detector_equals_release(tmp_path):
    """The "dcnx" layout on Res2Net v1d (as salt_R2_101_FPN_2x_ms_dcnx, at depth 50): GN in the
    FPN including P6 / P7, modulated deformable last tower convs, DCN offsets in res3-res5.

    The reference backbone is timm's Res2Net (mmdetection's variant: no pool in res2's first
    block), which has no deformable convs: the release's DCN offsets are zero here, so the
    backbone's DCNs compute plain convs (their sampling is tested in test_deform_conv.py)."""
    with torch.no_grad():
        res2net = randomize_bn_(timm.create_model("res2net50d", pretrained=False))
    res2net.layer1[0].pool = None
    release = timm_to_mmdet_res2net(
        {k: v for k, v in res2net.state_dict().items() if not k.startswith("fc.")}
    )
    for stage, blocks in ((2, 4), (3, 6), (4, 3)):  # res3-res5
        width = 26 * 2 ** (stage - 1)
        for block in range(blocks):
            for i in range(3):
                prefix = f"backbone.layer{stage}.{block}.convs.{i}.conv_offset"
                release[prefix + ".weight"] = torch.zeros(18, width, 3, 3)
                release[prefix + ".bias"] = torch.zeros(18)
    release.update(release_neck_and_head(num_classes=K, gn=True, dcn_towers=True, seed=1))
    weights, _ = convert_with_tool(tmp_path, release)
    model = build_converted("salt_R2_101_FPN_2x_ms_dcnx.yaml", weights, "MODEL.RES2NET.DEPTH", "50")
    assert model.head.cls_tower[2].conv.deformable_groups == 1  # the dcnx tower conv is built

    def c3_c4_c5(x):
        x = res2net.maxpool(res2net.act1(res2net.bn1(res2net.conv1(x))))
        c3 = res2net.layer2(res2net.layer1(x))
        c4 = res2net.layer3(c3)
        return [c3, c4, res2net.layer4(c4)]

    image = 255 * torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    assert_detector_matches_release(model, release, c3_c4_c5, image, gn=True, dcn_towers=True)


def test_release_classifier_shape_is_checked(tmp_path):
    release = release_neck_and_head(num_classes=K)
    release["bbox_head.salt_cls.weight"] = release["bbox_head.salt_cls.weight"][:2]
    tool = str(REPO_ROOT / "tools" / "convert_mmdet_checkpoint.py")
    src = tmp_path / "bad.pth"
    torch.save({"state_dict": release}, src)
    done = subprocess.run(
        [sys.executable, tool, str(src), str(tmp_path / "out.pth"), "--num-classes", str(K)],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "bbox_head.salt_cls.weight has 2 output rows" in done.stderr
    assert not (tmp_path / "out.pth").exists()


def test_converted_checkpoint_must_fill_head_unless_converted_for_finetuning(tmp_path):
    resnet = torchvision.models.resnet50()
    release = {
        "backbone." + k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")
    }
    release.update(release_neck_and_head(num_classes=K))
    weights, _ = convert_with_tool(tmp_path, release)
    cfg = load_yaml_config(
        str(REPO_ROOT / "configs" / "salt_R_50_FPN_1x.yaml"),
        ["MODEL.SALTNET.NUM_CLASSES", "5", "MODEL.DEVICE", "cpu"],
    )
    model = build_model(cfg)
    with pytest.raises(CheckpointMismatchError, match="head.cls_score.bias.*--finetune"):
        AtomicCheckpointer(model).load(str(weights))
    finetune, _ = convert_with_tool(tmp_path, release, "--finetune")
    before = model.head.cls_score.weight.clone()
    AtomicCheckpointer(model).load(str(finetune))  # the classifier is skipped, the rest loads
    assert torch.equal(model.head.cls_score.weight, before)
    torch.testing.assert_close(
        model.head.bbox_pred.weight, release["bbox_head.salt_reg.weight"], rtol=0, atol=0
    )


def test_frozen_stats_batch_norm_trains_scale_and_shift_only():
    bn = FrozenStatsBatchNorm2d(4).train()
    bn.running_mean.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 9.0, 16.0]))
    x = torch.randn(2, 4, 3, 3)
    y = bn(x)
    expected = (x - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + 1e-5).sqrt()
    torch.testing.assert_close(y, expected)  # running statistics, also in train mode
    y.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None
    assert torch.equal(bn.running_mean, torch.tensor([0.0, 1.0, 2.0, 3.0]))  # not updated
    assert "num_batches_tracked" not in bn.state_dict()


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def loss_batch():
    """Three images of different sizes: boxes of three classes (one so long that its DFL targets
    reach the clamp at reg_max - 0.1, one near the padding), a crowd box, an empty image."""
    sizes = [(100, 300), (64, 64), (90, 50)]
    annotations = [
        [
            {"bbox": [10.0, 12.0, 70.0, 80.0], "category_id": 0},
            {"bbox": [60.0, 20.0, 130.0, 60.0], "category_id": 2},
            {"bbox": [0.0, 0.0, 140.0, 100.0], "category_id": 1, "iscrowd": 1},
            {"bbox": [100.0, 70.0, 124.0, 96.0], "category_id": 1},
            {"bbox": [5.0, 84.0, 295.0, 95.0], "category_id": 0},
        ],
        # The second box's ATSS candidates on P6 / P7 include points outside the image's own
        # padded area: with them the assignment would differ (6 positives instead of 4).
        [
            {"bbox": [8.0, 8.0, 40.0, 56.0], "category_id": 1},
            {"bbox": [0.0, 0.0, 24.0, 56.0], "category_id": 2},
        ],
        [],
    ]
    mapper = SALTNetDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    instances = []
    for size, annos in zip(sizes, annotations):
        record = {"annotations": [{**a, "bbox_mode": 0} for a in annos]}
        mapper._transform_annotations(record, T.TransformList([]), size)  # drops crowd boxes
        instances.append(record["instances"])
    return sizes, instances


def head_outputs(scores, box_logits, coarse):
    """The head's outputs that the losses read (no point sets)."""
    salt = SALTPredictions(coarse=coarse, reg_points=None, cls_points=None)
    return HeadOutputs(scores=scores, box_logits=box_logits, salt=salt)


def test_losses_and_gradients_equal_the_release():
    model = tiny_model("MODEL.SALTNET.NUM_CLASSES", str(K))  # SDR_MODE: the default, gt
    sizes, instances = loss_batch()
    assert [len(i) for i in instances] == [4, 2, 0]  # the crowd box is not a training target
    images = ImageList.from_tensors([torch.zeros(3, h, w) for h, w in sizes], 32)
    shapes = [(16, 40), (8, 20), (4, 10), (2, 5), (1, 3)]  # P3-P7 of the 128 x 320 batch
    features = [torch.zeros(3, 1, h, w) for h, w in shapes]
    gen = torch.Generator().manual_seed(0)
    scores = [(0.8 * torch.rand(3, K, h, w, generator=gen) + 0.1) for h, w in shapes]
    logits = [torch.randn(3, 4 * 17, h, w, generator=gen) for h, w in shapes]
    coarse = [3 * torch.rand(3, 4, h, w, generator=gen) + 0.5 for h, w in shapes]
    inputs = [t.requires_grad_() for t in scores + logits + coarse]

    with EventStorage():
        predictions = head_outputs(scores, logits, coarse)
        ours = model.forward_training(images, features, predictions, instances)
    ref = release_losses(
        scores,
        logits,
        coarse,
        [i.gt_boxes.tensor for i in instances],
        [i.gt_classes for i in instances],
        sizes,
    )
    pairs = {
        "loss_qfl": "loss_cls",
        "loss_giou": "loss_bbox",
        "loss_dfl": "loss_dfl",
        "loss_coarse": "loss_bbox_init",
    }
    assert set(ours) == set(pairs)  # the default SDR mode trains the coarse box as the release
    for name, ref_name in pairs.items():
        torch.testing.assert_close(ours[name], ref[ref_name], rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(ours[name], inputs, retain_graph=True, allow_unused=True)
        ref_grads = torch.autograd.grad(ref[ref_name], inputs, retain_graph=True, allow_unused=True)
        for g, r in zip(grads, ref_grads):
            if r is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_batch_without_positives_stays_finite():
    """The release divides the box losses by a zero weight sum here (NaN); ours are 0."""
    model = tiny_model("MODEL.SALTNET.NUM_CLASSES", str(K))  # SDR_MODE: the default, gt
    _, instances = loss_batch()
    images = ImageList.from_tensors([torch.zeros(3, 90, 50)], 32)
    shapes = [(12, 7), (6, 4), (3, 2), (2, 1), (1, 1)]
    features = [torch.zeros(1, 1, h, w) for h, w in shapes]
    scores = [torch.full((1, K, h, w), 0.3, requires_grad=True) for h, w in shapes]
    logits = [torch.zeros(1, 68, h, w, requires_grad=True) for h, w in shapes]
    coarse = [torch.ones(1, 4, h, w, requires_grad=True) for h, w in shapes]
    with EventStorage():
        predictions = head_outputs(scores, logits, coarse)
        losses = model.forward_training(images, features, predictions, instances[2:])
    assert losses["loss_qfl"] > 0
    for name in ("loss_giou", "loss_dfl", "loss_coarse"):
        assert losses[name].item() == 0.0


# ---------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, expected",
    [((480, 640), (800, 1067)), ((500, 2000), (333, 1333)), ((800, 800), (800, 800))],
)
def test_release_resize_is_opencv_bilinear_with_mmcv_sizes(shape, expected):
    cfg = load_yaml_config(
        str(REPO_ROOT / "configs" / "salt_R_50_FPN_1x.yaml"), ["INPUT.RESIZE_BACKEND", "opencv"]
    )
    (resize,) = SALTNetDatasetMapper(cfg, is_train=False).augmentations.augs
    image = (255 * torch.rand(*shape, 3, generator=torch.Generator().manual_seed(0))).byte()
    image = image.numpy()
    transform = resize.get_transform(image)
    out = transform.apply_image(image)
    assert out.shape[:2] == expected  # mmcv: int(side x min(1333 / long, 800 / short) + 0.5)
    np.testing.assert_array_equal(
        out, cv2.resize(image, expected[::-1], interpolation=cv2.INTER_LINEAR)
    )
    boxes = transform.apply_box(np.array([[0.0, 0.0, shape[1], shape[0]]]))
    np.testing.assert_allclose(boxes, [[0, 0, expected[1], expected[0]]])


def test_default_resize_stays_detectron2s_and_bad_backend_is_named():
    cfg = load_yaml_config(str(REPO_ROOT / "configs" / "salt_R_50_FPN_1x.yaml"))
    (resize,) = SALTNetDatasetMapper(cfg, is_train=False).augmentations.augs
    assert type(resize) is T.ResizeShortestEdge
    cfg.defrost()
    cfg.INPUT.RESIZE_BACKEND = "cv2"
    with pytest.raises(ValueError, match="INPUT.RESIZE_BACKEND is 'cv2'.*'pil', 'opencv'"):
        SALTNetDatasetMapper(cfg, is_train=False)
