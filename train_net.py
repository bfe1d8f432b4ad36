#!/usr/bin/env python
"""SALT-Net training and evaluation script.

A ``.yaml`` config or a ``.py`` LazyConfig, with the same flags, e.g.::

    python train_net.py --config-file configs/salt_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/salt_R_50_FPN_1x.yaml --eval-only \\
        MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/salt_R_50_FPN_1x.py --resume train.max_iter=1000
    torchrun --nproc_per_node 8 train_net.py --config-file configs/salt_R_50_FPN_1x.yaml

The whole training of both kinds is ``saltnet.engine.SALTNetTrainer``. Under torchrun (any
env:// launcher) or srun the workers join the environment's process group instead of being
spawned (``saltnet.engine.launch``); SIGTERM/SIGUSR1/SIGUSR2 stop training after the current
iteration with a checkpoint of it (``saltnet.engine.preemption``). See docs/CLUSTERS.md.

Datasets besides detectron2's builtin ones are registered from the config: ``DATASETS.REGISTER``
(YAML) or ``dataloader.register`` (LazyConfig), a list of ``NAME=coco:JSON:IMAGE_DIR`` /
``NAME=voc:VOC_DIR:SPLIT[:CLASSES]`` specs; ``saltnet_synth_{train,val}`` need none.
"""

import saltnet  # noqa: F401  # isort: skip (first: it filters known third-party warnings)
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from saltnet.checkpoint import AtomicCheckpointer
from saltnet.config.load import is_lazy, load_config, output_dir, register_datasets, weights
from saltnet.engine import SALTNetTrainer, launch_from_args
from saltnet.engine.preflight import check_command_line
from saltnet.engine.setup import setup


def main(args):
    cfg = load_config(args.config_file, args.opts)
    setup(cfg, args)
    register_datasets(cfg)
    if args.eval_only:
        model = SALTNetTrainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=output_dir(cfg)).resume_or_load(
            weights(cfg), resume=args.resume
        )
        res = SALTNetTrainer.test(cfg, model)
        if comm.is_main_process() and not is_lazy(cfg):
            verify_results(cfg, res)
        return res
    trainer = SALTNetTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    parser = default_argument_parser()
    args = parser.parse_args()
    # A usage error here rather than a traceback from every worker.
    check_command_line(parser, args.config_file, args.opts, args.resume, datasets=True)
    print("Command Line Args:", args)
    launch_from_args(main, args)


if __name__ == "__main__":
    invoke_main()
