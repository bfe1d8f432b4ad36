"""SGD of SALT-Net: lr 0.01 at batch 16, momentum 0.9, weight decay 1e-4 on all weights
(norm layers included, as the original mmdetection recipe)."""

from detectron2.model_zoo import get_config

SGD = get_config("common/optim.py").SGD
SGD.lr = 0.01
SGD.momentum = 0.9
SGD.weight_decay = 1e-4
SGD.params.weight_decay_norm = 1e-4
