"""SALT-Net, ResNet-50-FPN, 1x (LazyConfig twin of salt_R_50_FPN_1x.yaml): 42.5 AP minival."""

from .common.data.coco import dataloader  # noqa: F401
from .common.models.saltnet import model  # noqa: F401
from .common.optim import SGD as optimizer  # noqa: F401
from .common.schedule import lr_multiplier_1x as lr_multiplier  # noqa: F401
from .common.train import train

# torchvision's ImageNet ResNet-50 in detectron2's names (see Base-SALTNet.yaml).
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "output/salt_R_50_FPN_1x"
