#!/usr/bin/env python
"""SALT-Net training and evaluation script.

A ``.yaml`` config runs through detectron2's :class:`DefaultTrainer` (see
``saltnet.engine.trainer.SALTNetTrainer``); a ``.py`` LazyConfig runs the loop of detectron2's
``tools/lazyconfig_train_net.py``. The flags are the same for both, e.g.::

    python train_net.py --config-file configs/salt_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/salt_R_50_FPN_1x.yaml --eval-only \\
        MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/salt_R_50_FPN_1x.py --resume train.max_iter=1000
    torchrun --nproc_per_node 8 train_net.py --config-file configs/salt_R_50_FPN_1x.yaml

Under torchrun (any env:// launcher) or srun the workers join the environment's process group
instead of being spawned (``saltnet.engine.launch``); SIGTERM/SIGUSR1/SIGUSR2 stop training after
the current iteration with a checkpoint of it (``saltnet.engine.preemption``). See docs/CLUSTERS.md.

Datasets besides detectron2's builtin ones are registered from the config: ``DATASETS.REGISTER``
(YAML) or ``dataloader.register`` (LazyConfig), a list of ``NAME=coco:JSON:IMAGE_DIR`` /
``NAME=voc:VOC_DIR:SPLIT[:CLASSES]`` specs; ``saltnet_synth_{train,val}`` need none.
"""

import logging
import os

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format, verify_results
from detectron2.utils import comm

from saltnet.checkpoint.checkpointer import AtomicCheckpointer
from saltnet.config.defaults import load_yaml_config
from saltnet.config.lazy_overrides import check_lazy_overrides
from saltnet.data import register_datasets_from_cfg
from saltnet.engine.launch import launch_from_args
from saltnet.engine.preemption import PreemptionHook
from saltnet.engine.trainer import SALTNetTrainer, build_trainer, build_writers, ddp_device_ids

logger = logging.getLogger("detectron2")


def setup(args):
    """Build the config of ``args.config_file`` (YAML) with ``args.opts`` and set up logging."""
    cfg = load_yaml_config(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def do_test_lazy(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret


def do_train_lazy(args, cfg):
    """The training loop of detectron2's ``tools/lazyconfig_train_net.py``."""
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)  # registers its datasets, checks classes

    model = create_ddp_model(model, device_ids=ddp_device_ids(model), **cfg.train.ddp)
    trainer = build_trainer(
        model, train_loader, optim, cfg.train.amp.enabled, cfg.train.amp.precision
    )
    # The sampler's seed travels in the checkpoint, so that --resume continues the same stream.
    checkpointer = AtomicCheckpointer(
        model,
        cfg.train.output_dir,
        optimizer=optim,
        trainer=trainer,
        train_sampler=train_loader.batch_sampler,
    )
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test_lazy(cfg, model)),
            (
                hooks.PeriodicWriter(
                    build_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
            PreemptionHook(checkpointer),  # last: its checkpoint follows the other hooks' step
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # The checkpoint stores the iteration that just finished: continue at the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    train_loader.batch_sampler.start_iter = start_iter
    trainer.train(start_iter, cfg.train.max_iter)


def main_lazy(args):
    cfg = LazyConfig.load(args.config_file)
    check_lazy_overrides(cfg, args.opts)  # detectron2 would add a misspelt key silently
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = instantiate(cfg.model).to(cfg.train.device)
        model = create_ddp_model(model, device_ids=ddp_device_ids(model))
        AtomicCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test_lazy(cfg, model)
    do_train_lazy(args, cfg)


def main(args):
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"Config file {args.config_file!r} does not exist.")
    if args.config_file.endswith(".py"):
        return main_lazy(args)
    cfg = setup(args)
    register_datasets_from_cfg(cfg)

    if args.eval_only:
        model = SALTNetTrainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = SALTNetTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = SALTNetTrainer(cfg)
    trainer.register_hooks([PreemptionHook(trainer.checkpointer)])  # after the default hooks
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    parser = default_argument_parser()
    args = parser.parse_args()
    if not os.path.isfile(args.config_file):
        parser.error(f"config file {args.config_file!r} does not exist (see --config-file).")
    print("Command Line Args:", args)
    launch_from_args(main, args)


if __name__ == "__main__":
    invoke_main()
