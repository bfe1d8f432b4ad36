"""Config errors that name the problem, where it came from and the valid choices.

The YAML files are walked here (unknown keys, wrong types, named with their file or the command
line); the merge itself is yacs'. ``SDR_MODE``, ``IN_FEATURES`` and ``DEFORM_BACKEND`` are checked
once, where the model is built (so for LazyConfigs too); the class count against the training
datasets by the training loader (:func:`saltnet.data.loader.load_train_dataset_dicts`).
"""

import difflib
import os
from functools import reduce
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY
from detectron2.utils.file_io import PathManager

from .. import modeling  # noqa: F401  (registers SALT-Net's meta-architecture and backbones)
from ..data.loader import num_classes_of

__all__ = [
    "AMP_PRECISIONS",
    "ConfigError",
    "UnknownConfigKeyError",
    "amp_precision",
    "check_config",
    "merge_config",
]


class ConfigError(ValueError):
    """An invalid config; the message names the key, the value and the valid choices."""


class UnknownConfigKeyError(ConfigError, KeyError):
    """A key the config does not have (also a KeyError, as yacs' error), with ``key``, ``source``
    (where it came from) and ``suggestions`` (the closest valid keys)."""

    def __init__(self, message: str, key: str, source: str, suggestions: Sequence[str] = ()):
        super().__init__(message)
        self.key, self.source, self.suggestions = key, source, list(suggestions)

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0])


def merge_config(cfg: CfgNode, config_file: Optional[str] = None, opts: Sequence = ()) -> CfgNode:
    """Merge a YAML file (``_BASE_`` files included), then ``KEY VALUE`` overrides, into ``cfg``
    (in place) and return it. Raises FileNotFoundError for a missing file, and before merging
    anything, :class:`UnknownConfigKeyError` for an unknown key and :class:`ConfigError` for a
    value of the wrong type or an odd number of ``opts``.
    """
    opts, trees = list(opts), []
    if len(opts) % 2:
        raise ConfigError(
            f"Config overrides from the command line must be KEY VALUE pairs, got an odd number "
            f"({len(opts)}): {opts}. The last key without a value is {opts[-1]!r}."
        )
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file {config_file!r} does not exist.")
        trees = list(_yaml_files(config_file))
    for key, value in zip(opts[0::2], opts[1::2]):
        tree = reduce(lambda t, k: {k: t}, reversed(key.split(".")), value)
        trees.append((tree, "the command line"))
    for tree, source in trees:
        unknown = next(_unknown_keys(cfg, cfg, tree), None)
        if unknown is not None:
            raise _unknown_key_error(cfg, unknown, source)
        try:  # yacs' type check on a copy, to know where the value came from
            cfg.clone().merge_from_other_cfg(CfgNode(tree))
        except ValueError as e:
            raise ConfigError(f"{e} (from {source})") from None
    if config_file is not None:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    return cfg


def _yaml_files(filename: str, child: Optional[str] = None) -> Iterator[Tuple[Dict, str]]:
    """(YAML dict without ``_BASE_``, description) of a file and its ``_BASE_`` files."""
    with PathManager.open(filename) as f:
        data = yaml.unsafe_load(f) or {}  # unsafe, as detectron2's merge_from_file
    bases = data.pop("_BASE_", [])
    yield data, f"config file {filename!r}" + (f", a _BASE_ of {child!r}" if child else "")
    for base in bases if isinstance(bases, list) else [bases]:
        base = os.path.expanduser(base)  # resolved as fvcore does
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(filename), base)
        yield from _yaml_files(base, filename)


def _unknown_keys(root: CfgNode, node: CfgNode, tree: Dict, prefix: str = "") -> Iterator[str]:
    for name, value in tree.items():
        key = prefix + name
        if root.key_is_deprecated(key) or root.key_is_renamed(key):
            continue  # yacs warns about the former and explains the latter
        if name not in node:
            while isinstance(value, dict) and len(value) == 1:  # the whole key of an override
                ((name, value),) = value.items()
                key += "." + name
            yield key
        elif isinstance(value, dict) and isinstance(node[name], CfgNode):
            yield from _unknown_keys(root, node[name], value, key + ".")


def _all_keys(node: CfgNode, prefix: str = "") -> Iterator[str]:
    for name, value in node.items():
        yield prefix + name
        if isinstance(value, CfgNode):
            yield from _all_keys(value, prefix + name + ".")


def _unknown_key_error(cfg: CfgNode, key: str, source: str) -> UnknownConfigKeyError:
    """The error for ``key``: the closest valid dotted keys, or the keys where it goes wrong."""
    suggestions = difflib.get_close_matches(key, list(_all_keys(cfg)), n=5, cutoff=0.8)
    message = f"Unknown config key {key!r} (from {source})."
    if suggestions:
        message += f" Did you mean: {', '.join(suggestions)}?"
    else:
        parts, node, where = key.split("."), cfg, "the top level"
        for depth in range(1, len(parts)):
            if not isinstance(node.get(parts[depth - 1]), CfgNode):
                break
            node, where = node[parts[depth - 1]], ".".join(parts[:depth])
        message += f" Valid keys at {where}: {', '.join(sorted(node.keys()))}."
    return UnknownConfigKeyError(message, key, source, suggestions)


# The autocast dtypes of SOLVER.AMP.PRECISION (YAML) and train.amp.precision (LazyConfig):
# bfloat16 needs a GPU with bf16 support (Ampere or newer), float16 runs on older ones too.
AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_precision(name: str) -> torch.dtype:
    """The dtype of an AMP precision name; :class:`ConfigError` for another."""
    if name not in AMP_PRECISIONS:
        raise ConfigError(
            f"The AMP precision (SOLVER.AMP.PRECISION, train.amp.precision of a LazyConfig) "
            f"is {name!r}, which is not one of the valid choices: "
            f"{', '.join(AMP_PRECISIONS)}."
        )
    return AMP_PRECISIONS[name]


def check_config(cfg: CfgNode) -> CfgNode:
    """Check ``MODEL.META_ARCHITECTURE`` and ``MODEL.BACKBONE.NAME`` against detectron2's
    registries, ``SOLVER.AMP.PRECISION`` against :data:`AMP_PRECISIONS`, and
    ``SOLVER.IMS_PER_BATCH`` and the class count (:func:`num_classes_of`) >= 1; return ``cfg``.
    Raises :class:`ConfigError` with one line per problem."""
    problems = []
    for key, value, registry in (
        ("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE, META_ARCH_REGISTRY),
        ("MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME, BACKBONE_REGISTRY),
    ):
        choices = sorted(name for name, _ in registry)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.6)
            problems.append(
                f"{key} is {value!r}, which is not one of the valid choices: {', '.join(choices)}."
                + (f" Did you mean: {', '.join(close)}?" if close else "")
            )
    try:
        amp_precision(cfg.SOLVER.AMP.PRECISION)
    except ConfigError as e:
        problems.append(str(e))
    counts = [("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH)]
    if num_classes_of(cfg):
        counts.append(num_classes_of(cfg))
    for key, value in counts:
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key} is {value!r}; it must be an integer >= 1.")
    if problems:
        sep = " " if len(problems) == 1 else "\n  "
        raise ConfigError("Invalid config:" + sep + sep.join(problems))
    return cfg
