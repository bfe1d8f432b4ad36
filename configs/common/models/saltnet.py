"""SALT-Net, ResNet-50-FPN (P3-P7), COCO: the LazyConfig twin of Base-SALTNet.yaml's model."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet

from saltnet.layers.batch_norm import resolve_norm
from saltnet.modeling import SALTHead, SALTNet
from saltnet.modeling.backbone import P6P7FromP5

model = L(SALTNet)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            # torchvision-style bottlenecks (stride in the 3x3 conv), as torchvision's weights;
            # the release's BatchNorm: frozen statistics, trained scale and shift (res3-res5).
            stages=L(ResNet.make_default_stages)(
                depth=50, stride_in_1x1=False, norm=L(resolve_norm)(norm="FrozenStatsBN")
            ),
            out_features=["res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        norm="",
        # P6 from the FPN's P5 (not from C5), P7 from P6 (no ReLU, as the release).
        top_block=L(P6P7FromP5)(channels="${..out_channels}", norm="${..norm}"),
    ),
    head=L(SALTHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes="${..num_classes}",
        num_convs=3,
        norm="GN",
        tower_last_dcn=False,
        reg_max="${..reg_max}",
        dgqp_topk=4,
        dgqp_add_mean=True,
        dgqp_channels=64,
        prior_prob=0.01,
        salt_on=True,
        deform_backend="auto",
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    num_classes=80,
    reg_max=16,
    atss_topk=9,
    anchor_scale=8.0,
    qfl_beta=2.0,
    loss_qfl_weight=1.0,
    loss_giou_weight=2.0,
    loss_dfl_weight=0.25,
    loss_coarse_weight=1.0,
    sdr_mode="gt",
    sdr_weight=1.0,
    test_topk_candidates=1000,
    test_score_thresh=0.05,
    test_nms_thresh=0.6,
    max_detections_per_image=100,
    # RGB input normalised with torchvision's ImageNet mean / std (pixels in [0, 255]).
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
