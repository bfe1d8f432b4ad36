"""LazyConfig twin of salt_R_18_synthetic.yaml: ResNet-18-FPN (64 channels) from scratch on the
synthetic shapes, on the CPU."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BasicStem, ResNet

from ..common.data.synthetic import dataloader  # noqa: F401
from ..common.models.saltnet import model
from ..common.optim import SGD as optimizer
from ..common.schedule import multi_step_schedule
from ..common.train import train

model.backbone.bottom_up = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
    stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
    out_features=["res3", "res4", "res5"],
    freeze_at=0,
)
model.backbone.out_channels = 64
model.backbone.norm = "GN"
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.num_classes = 4

optimizer.lr = 0.05
lr_multiplier = multi_step_schedule(800, (620, 740), warmup_iters=100)
train.max_iter = 800
train.init_checkpoint = ""
train.device = "cpu"
train.checkpointer.period = 1000
train.eval_period = 0
train.log_period = 20
train.seed = 0
train.output_dir = "output/salt_R_18_synthetic_lazy"
