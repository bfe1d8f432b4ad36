"""The synthetic shapes dataset (saltnet/data/synthetic.py): 128 x 128 images used at 96 px."""

from .coco import dataloader

dataloader.train.dataset_names = "saltnet_synth_train"
dataloader.train.mapper.augmentations[0].short_edge_length = 96
dataloader.train.mapper.augmentations[0].max_size = 96
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "saltnet_synth_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 96
dataloader.test.mapper.augmentations[0].max_size = 96
dataloader.test.num_workers = 1
