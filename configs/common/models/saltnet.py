"""SALT-Net, ResNet-50-FPN (P3-P7), COCO: the LazyConfig twin of Base-SALTNet.yaml's model."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet

from saltnet.config.defaults import constructor_defaults
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
    # The hyper-parameters not written here are the constructors' defaults (as the YAML keys').
    head=L(SALTHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes="${..num_classes}",
        reg_max="${..reg_max}",
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    num_classes=80,
    reg_max=constructor_defaults(SALTNet)["reg_max"],  # the head's and the losses'
    # RGB input normalised with torchvision's ImageNet mean / std (pixels in [0, 255]).
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
