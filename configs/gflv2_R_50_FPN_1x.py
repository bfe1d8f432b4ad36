"""The in-project GFLV2-style baseline (SALT off), ResNet-50-FPN, 1x: twin of the YAML."""

from .salt_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.head.salt_on = False
train.output_dir = "output/gflv2_R_50_FPN_1x"
