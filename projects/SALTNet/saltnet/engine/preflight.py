"""What the entry points check before they start workers or queue a job, so that a mistake on
the command line is a usage error naming it, not a traceback from every worker (or from a job
that waited in a queue for hours)."""

import os
from typing import Sequence

from fvcore.common.checkpoint import Checkpointer
from torch import nn

from ..checkpoint.checkpointer import check_weights_file
from ..config.load import is_lazy, load_config, output_dir, register_datasets, weights

__all__ = ["check_before_launch", "check_command_line"]


def check_before_launch(
    config_file: str, opts: Sequence[str] = (), resume: bool = False, datasets: bool = False
) -> None:
    """Check a run's command line (``--config-file``, its overrides, ``--resume``): the config
    loads with its overrides, and the weights the run would load exist (the output folder's last
    checkpoint if ``resume`` finds one, else the config's weights). With ``datasets``, the
    config's datasets are registered too (their files exist, every name is known), as the run
    does first on this machine; leave it off for a job that starts elsewhere and later (its data
    may be staged then).

    Raises:
        FileNotFoundError: the config file, the weights file or a dataset's file does not exist.
        ValueError: an unknown key or an invalid value (``saltnet.config.ConfigError``), or a
            dataset name that is not registered; the message names it.
    """
    cfg = load_config(os.path.abspath(config_file), opts)
    if datasets:
        register_datasets(cfg)
    if resume and Checkpointer(nn.Module(), output_dir(cfg)).has_checkpoint():
        return
    check_weights_file(weights(cfg), "train.init_checkpoint" if is_lazy(cfg) else "MODEL.WEIGHTS")


def check_command_line(
    parser, config_file: str, opts: Sequence[str] = (), resume: bool = False, datasets: bool = False
) -> None:
    """:func:`check_before_launch`, a failure reported as ``parser``'s usage error (argparse's
    ``parser.error``: the message, exit code 2)."""
    try:
        check_before_launch(config_file, opts, resume, datasets)
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        parser.error(str(e))
