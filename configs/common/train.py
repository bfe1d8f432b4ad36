"""detectron2's common training settings (configs/common/train.py of its model zoo)."""

from detectron2.model_zoo import get_config

train = get_config("common/train.py").train
train.max_iter = 90000
train.checkpointer.period = 10000
# Seed of the training stream (and of default_setup's RNGs); -1 draws one (saved in checkpoints).
train.seed = -1
# The autocast dtype of AMP training (train.amp.enabled=True): "float16" or "bfloat16".
train.amp.precision = "float16"
