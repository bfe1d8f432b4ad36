"""detectron2's ``default_setup`` with a terminal a user can read: the environment report, the
config file and the full config go to ``log.txt`` (and ``config.yaml``) in the output folder
only, and the terminal has no colour codes when it is not a terminal (a file, a pipe, a job's
log)."""

import logging
import sys

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config.load import output_dir

__all__ = ["setup"]

# The first words of default_setup's records that print whole files or reports.
FILE_ONLY_RECORDS = (
    "Environment info:",
    "Contents of args.config_file=",
    "Running with full config:",
)
_PLAIN = logging.Formatter(
    "[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S"
)


class _FileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(FILE_ONLY_RECORDS)


def setup(cfg, args) -> None:
    """``default_setup(cfg, args)`` (output folder, loggers, ``config.yaml``, seeds, cuDNN) with
    the long records kept off the terminal. The loggers are built here first, with the arguments
    ``default_setup`` gives ``setup_logger`` (which returns the same loggers for them)."""
    rank = comm.get_rank()
    loggers = [
        setup_logger(output_dir(cfg), distributed_rank=rank, name="fvcore"),
        setup_logger(output_dir(cfg), distributed_rank=rank),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if getattr(handler, "stream", None) is sys.stdout:  # the terminal's, not log.txt's
                handler.addFilter(_FileOnly())
                if not sys.stdout.isatty():
                    handler.setFormatter(_PLAIN)
    default_setup(cfg, args)
