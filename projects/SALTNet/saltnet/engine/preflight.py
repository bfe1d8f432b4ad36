"""What the entry points check before they start workers or queue a job, so that a mistake on
the command line is a usage error naming it, not a traceback from every worker (or from a job
that waited in a queue for hours)."""

import os
from typing import Sequence

from fvcore.common.checkpoint import Checkpointer
from torch import nn

from ..checkpoint.checkpointer import check_weights_file
from ..config.load import is_lazy, load_config, output_dir, weights

__all__ = ["check_before_launch"]


def check_before_launch(config_file: str, opts: Sequence[str] = (), resume: bool = False) -> None:
    """Check a run's command line (``--config-file``, its overrides, ``--resume``): the config
    loads with its overrides, and the weights the run would load exist (the output folder's last
    checkpoint if ``resume`` finds one, else the config's weights).

    Raises:
        FileNotFoundError: the config file, or the weights file, does not exist.
        saltnet.config.ConfigError: an unknown key or an invalid value (the message names it).
    """
    cfg = load_config(os.path.abspath(config_file), opts)
    if resume and Checkpointer(nn.Module(), output_dir(cfg)).has_checkpoint():
        return
    check_weights_file(weights(cfg), "train.init_checkpoint" if is_lazy(cfg) else "MODEL.WEIGHTS")
