"""detectron2's common training settings (configs/common/train.py of its model zoo)."""

from detectron2.model_zoo import get_config

train = get_config("common/train.py").train
train.max_iter = 90000
train.checkpointer.period = 10000
