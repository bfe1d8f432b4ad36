"""FCOS R50-FPN 1x of detectron2's model zoo (``COCO-Detection/fcos_R_50_FPN_1x.py``) with SALT:
the SALT operator between FCOS's towers and its predictors, plus the coarse-box GIoU loss of the
authors' release (centerness-weighted, weight 0.5; see ``saltnet/modeling/plugin.py``).
``model.head.salt_on=False`` gives detectron2's FCOS exactly.

    python train_net.py --config-file configs/plugin/fcos_R_50_FPN_1x_salt.py --num-gpus 8
"""

from detectron2.model_zoo import get_config

from saltnet.modeling import SALTFCOS, SALTFCOSHead

from ..common.data.coco import dataloader

_zoo = get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
lr_multiplier, model, optimizer, train = _zoo.lr_multiplier, _zoo.model, _zoo.optimizer, _zoo.train
# SALT-Net's loader (resumable sampler, box policy) with the zoo's augmentations, in BGR for the
# zoo's MSRA ImageNet weights and pixel mean.
dataloader.train.mapper.augmentations = _zoo.dataloader.train.mapper.augmentations
dataloader.train.mapper.image_format = "BGR"
train.seed = -1

model._target_ = SALTFCOS
model.head._target_ = SALTFCOSHead
model.head.salt_on = True
model.head.salt_norm = "GN"  # SALT's own convs, as in SALT-Net
model.head.deform_backend = "auto"
model.loss_coarse_weight = 0.5  # the release's, centerness-weighted (plugin.py)
train.output_dir = "output/fcos_R_50_FPN_1x_salt"
