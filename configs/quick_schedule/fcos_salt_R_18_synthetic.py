"""detectron2's FCOS with SALT (``configs/plugin/fcos_R_50_FPN_1x_salt.py``) on the synthetic
shapes, on the CPU. Everything but the detector is ``salt_R_18_synthetic.py``'s (ResNet-18-FPN
from scratch, 96 px, data pipeline, SGD, schedule, seed), so that SALT-Net, FCOS and RetinaNet
compare on equal terms (``tools/benchmark_accuracy.py``). ``model.head.salt_on=False`` gives
detectron2's FCOS."""

from ..plugin.fcos_R_50_FPN_1x_salt import model

# isort: off
from .salt_R_18_synthetic import dataloader, lr_multiplier, optimizer, train  # noqa: F401
from .salt_R_18_synthetic import model as _saltnet

# isort: on

model.backbone = _saltnet.backbone
model.head.input_shape = _saltnet.head.input_shape
model.head.conv_dims = [64] * 4
model.num_classes = _saltnet.num_classes
model.pixel_mean, model.pixel_std = _saltnet.pixel_mean, _saltnet.pixel_std
train.output_dir = "output/fcos_salt_R_18_synthetic"
