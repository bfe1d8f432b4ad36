"""Config errors that name the problem and the valid choices.

* :func:`merge_config` merges a YAML file (with its ``_BASE_`` files) and ``KEY VALUE``
  overrides like ``merge_from_file`` + ``merge_from_list``, but an unknown key, a value of the
  wrong type or an odd number of overrides raise an error that says where the key came from (which
  file, or the command line) and, for an unknown key, the closest valid keys.
* :func:`check_config` checks the choices of a merged config: registered meta-architecture and
  backbone, SDR mode, deformable-conv backend, class count, input features, batch size.
* :func:`check_num_classes` compares ``MODEL.SALTNET.NUM_CLASSES`` with the training datasets'
  ``thing_classes``.

All errors are :class:`ConfigError` (a :class:`ValueError`); an unknown key is the subclass
:class:`UnknownConfigKeyError`, which is also a :class:`KeyError` (what yacs raises for an unknown
key in a file) but prints its message without KeyError's quotes.
"""

import difflib
import logging
import os
import re
from typing import List, Optional, Sequence, Tuple

import yaml
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

from .layers.deform_conv import BACKENDS
from .modeling.meta_arch import SDR_MODES  # importing .modeling registers SALT-Net's classes

__all__ = [
    "ConfigError",
    "UnknownConfigKeyError",
    "check_config",
    "check_num_classes",
    "merge_config",
]

logger = logging.getLogger(__name__)

_BASE_KEY = "_BASE_"
_COMMAND_LINE = "the command line"
_UNKNOWN_KEY_RE = re.compile(r"Non-existent (?:config )?key: (\S+)")
_TYPE_MISMATCH_KEY_RE = re.compile(r"for config key: (\S+)\s*$")


class ConfigError(ValueError):
    """An invalid config: unknown key, value of the wrong type, or a value that is not a valid
    choice. The message names the key, the value and the valid choices."""


class UnknownConfigKeyError(ConfigError, KeyError):
    """A config key that does not exist. ``key`` is the dotted key, ``source`` where it came from
    and ``suggestions`` the closest valid keys."""

    def __init__(self, message: str, key: str, source: str, suggestions: Sequence[str] = ()):
        super().__init__(message)
        self.key = key
        self.source = source
        self.suggestions = list(suggestions)

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------


def merge_config(cfg: CfgNode, config_file: Optional[str] = None, opts: Sequence = ()) -> CfgNode:
    """Merge a YAML file (``_BASE_`` files included), then ``KEY VALUE`` overrides, into ``cfg``
    (not frozen; modified in place, also partly when an error is raised) and return it.

    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        UnknownConfigKeyError: a key that ``cfg`` does not have, in the file, one of its
            ``_BASE_`` files or ``opts``; the message names the key, where it came from and the
            closest valid keys.
        ConfigError: a value whose type does not match the default's, or an odd number of
            ``opts``; the message names the key and where it came from.
    """
    if config_file is not None:
        _merge_file(cfg, config_file)
    if opts:
        _merge_opts(cfg, list(opts))
    return cfg


def _merge_file(cfg: CfgNode, config_file: str) -> None:
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file {config_file!r} does not exist.")
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        if isinstance(e, UnknownConfigKeyError):
            raise
        match = _UNKNOWN_KEY_RE.search(str(e.args[0]) if e.args else "")
        if match is None:  # e.g. yacs' "Key ... was renamed to ...": already clear
            raise
        key = match.group(1)
        files = _files_defining(cfg, config_file, key)
        source = " and ".join(files) if files else f"config file {config_file!r}"
        raise _unknown_key_error(cfg, key, source) from None
    except ValueError as e:
        match = _TYPE_MISMATCH_KEY_RE.search(str(e))
        if match is None:
            raise
        files = _files_defining(cfg, config_file, match.group(1))
        source = files[0] if files else f"config file {config_file!r}"
        raise ConfigError(f"{e} (in {source})") from None


def _merge_opts(cfg: CfgNode, opts: List) -> None:
    if len(opts) % 2:
        raise ConfigError(
            f"Config overrides from {_COMMAND_LINE} must be KEY VALUE pairs, got an odd number "
            f"({len(opts)}): {opts}. The last key without a value is {opts[-1]!r}."
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        key = str(key)
        if not cfg.key_is_deprecated(key) and not cfg.key_is_renamed(key):
            if not _has_key(cfg, key):
                raise _unknown_key_error(cfg, key, _COMMAND_LINE)
        try:
            cfg.merge_from_list([key, value])
        except ValueError as e:
            raise ConfigError(f"{e} (from {_COMMAND_LINE})") from None


def _has_key(cfg: CfgNode, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return False
        node = node[part]
    return True


def _all_keys(node: CfgNode, prefix: str = "") -> List[str]:
    """Dotted names of all keys of ``node``: its sub-nodes and their leaves."""
    keys = []
    for name, value in node.items():
        full = prefix + name
        keys.append(full)
        if isinstance(value, CfgNode):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _deepest_node(cfg: CfgNode, parts: List[str]) -> Tuple[CfgNode, int]:
    """The deepest node on the path ``parts`` of a key that exists, and its depth: ``parts[depth]``
    is the first name below it that is not a node of the config."""
    node, depth = cfg, 0
    while depth < len(parts) - 1 and isinstance(node.get(parts[depth]), CfgNode):
        node, depth = node[parts[depth]], depth + 1
    return node, depth


def _suggest_keys(cfg: CfgNode, key: str, n: int = 5) -> List[str]:
    """The valid keys of ``cfg`` closest to the (unknown) dotted ``key``, best first."""
    parts = key.split(".")
    node, depth = _deepest_node(cfg, parts)
    prefix = ".".join(parts[:depth] + [""])
    suggestions = []
    # 1. A misspelt name at its place: MODEL.SALTNET.NUM_CLASS -> MODEL.SALTNET.NUM_CLASSES.
    for name in difflib.get_close_matches(parts[depth], list(node.keys()), n=n, cutoff=0.6):
        fixed = prefix + ".".join([name] + parts[depth + 1 :])
        suggestions.append(fixed if _has_key(cfg, fixed) else prefix + name)
    # 2. The right name in another place: MODEL.NUM_CLASSES -> MODEL.SALTNET.NUM_CLASSES.
    all_keys = _all_keys(cfg)
    leaf_names = {k.rsplit(".", 1)[-1] for k in all_keys}
    close_names = set(difflib.get_close_matches(parts[-1], leaf_names, n=n, cutoff=0.75))
    elsewhere = [k for k in all_keys if k.rsplit(".", 1)[-1] in close_names]
    elsewhere.sort(key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())
    for k in suggestions + elsewhere:
        if k not in suggestions:
            suggestions.append(k)
    return suggestions[:n]


def _unknown_key_error(cfg: CfgNode, key: str, source: str) -> UnknownConfigKeyError:
    suggestions = _suggest_keys(cfg, key)
    message = f"Unknown config key {key!r} (from {source})."
    if suggestions:
        message += " Did you mean: " + ", ".join(suggestions) + "?"
    else:
        parts = key.split(".")
        node, depth = _deepest_node(cfg, parts)
        where = ".".join(parts[:depth]) or "the top level"
        message += f" Valid keys at {where}: " + ", ".join(sorted(node.keys())) + "."
    return UnknownConfigKeyError(message, key, source, suggestions)


def _yaml_chain(cfg: CfgNode, filename: str, child: Optional[str] = None) -> List[Tuple]:
    """(file, the file that names it in ``_BASE_`` or None, its YAML dict) of ``filename`` and
    its ``_BASE_`` files (resolved as fvcore does), the file that wins a key first."""
    with cfg._open_cfg(filename) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.constructor.ConstructorError:
            f.seek(0)
            data = yaml.unsafe_load(f)
    if not isinstance(data, dict):
        return [(filename, child, {})]
    chain = [(filename, child, data)]
    bases = data.get(_BASE_KEY, [])
    for base in reversed(bases if isinstance(bases, list) else [bases]):
        base = os.path.expanduser(base)
        if not any(map(base.startswith, ["/", "https://", "http://"])):
            base = os.path.join(os.path.dirname(filename), base)
        chain.extend(_yaml_chain(cfg, base, filename))
    return chain


def _files_defining(cfg: CfgNode, config_file: str, key: str) -> List[str]:
    """Descriptions of the files in ``config_file``'s ``_BASE_`` chain that set ``key``."""
    try:
        chain = _yaml_chain(cfg, config_file)
    except Exception:  # only used for the message: the merge itself already read the files
        return []
    *parents, name = key.split(".")
    found = []
    for filename, child, data in chain:
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            found.append(
                f"config file {filename!r}" + (f", a {_BASE_KEY} of {child!r}" if child else "")
            )
    return found


# ---------------------------------------------------------------------------------------------
# Choices
# ---------------------------------------------------------------------------------------------


def _choice_problem(key: str, value, choices: Sequence[str]) -> Optional[str]:
    if value in choices:
        return None
    message = f"{key} is {value!r}, which is not one of the valid choices: {', '.join(choices)}."
    close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.6)
    if close:
        message += " Did you mean: " + ", ".join(close) + "?"
    return message


def check_config(cfg: CfgNode) -> CfgNode:
    """Check the choices of a merged config and return it.

    Checks ``MODEL.META_ARCHITECTURE`` and ``MODEL.BACKBONE.NAME`` against detectron2's
    registries, ``SOLVER.IMS_PER_BATCH`` >= 1 and, for ``SALTNet``, ``MODEL.SALTNET.SDR_MODE``,
    ``DEFORM_BACKEND``, ``NUM_CLASSES`` >= 1 and a non-empty ``IN_FEATURES``.

    Raises:
        ConfigError: one line per invalid key, naming the key, its value and the valid choices.
    """
    problems = [
        _choice_problem(
            "MODEL.META_ARCHITECTURE",
            cfg.MODEL.META_ARCHITECTURE,
            sorted(name for name, _ in META_ARCH_REGISTRY),
        ),
        _choice_problem(
            "MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME, sorted(n for n, _ in BACKBONE_REGISTRY)
        ),
    ]
    batch = cfg.SOLVER.IMS_PER_BATCH
    if not isinstance(batch, int) or batch < 1:
        problems.append(f"SOLVER.IMS_PER_BATCH is {batch!r}; it must be a positive integer.")
    if cfg.MODEL.META_ARCHITECTURE == "SALTNet":
        node = cfg.MODEL.SALTNET
        problems.append(_choice_problem("MODEL.SALTNET.SDR_MODE", node.SDR_MODE, SDR_MODES))
        problems.append(
            _choice_problem("MODEL.SALTNET.DEFORM_BACKEND", node.DEFORM_BACKEND, BACKENDS)
        )
        if not isinstance(node.NUM_CLASSES, int) or node.NUM_CLASSES < 1:
            problems.append(
                f"MODEL.SALTNET.NUM_CLASSES is {node.NUM_CLASSES!r}; it must be an integer >= 1."
            )
        if len(node.IN_FEATURES) == 0:
            problems.append(
                "MODEL.SALTNET.IN_FEATURES is empty; name the backbone features the head runs on, "
                "e.g. ['p3', 'p4', 'p5', 'p6', 'p7']."
            )
    problems = [p for p in problems if p]
    if problems:
        sep = " " if len(problems) == 1 else "\n  "
        raise ConfigError("Invalid config:" + sep + sep.join(problems))
    return cfg


# ---------------------------------------------------------------------------------------------
# Class counts
# ---------------------------------------------------------------------------------------------


def _class_list(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def check_num_classes(cfg: CfgNode, dataset_names: Sequence[str]) -> None:
    """Compare ``MODEL.SALTNET.NUM_CLASSES`` with the ``thing_classes`` of the datasets named
    (normally ``cfg.DATASETS.TRAIN``). Does nothing unless the meta-architecture is ``SALTNet``;
    skips datasets whose metadata has no ``thing_classes``. detectron2's COCO-json datasets set
    ``thing_classes`` only when their dicts are loaded, so call this after ``DatasetCatalog.get``
    (e.g. after building the training data loader). Logs a warning when the datasets have fewer
    classes than the model.

    Raises:
        ConfigError: two datasets have different class names, or a dataset has more classes than
            ``MODEL.SALTNET.NUM_CLASSES`` (the message gives the value to set).
    """
    if cfg.MODEL.META_ARCHITECTURE != "SALTNet":
        return
    num_classes = cfg.MODEL.SALTNET.NUM_CLASSES
    first = None  # (dataset name, its thing_classes)
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            continue
        classes = list(classes)
        if first is None:
            first = (name, classes)
        elif classes != first[1]:
            raise ConfigError(
                f"The training datasets have different classes: {first[0]!r} has "
                f"{len(first[1])} {_class_list(first[1])} but {name!r} has {len(classes)} "
                f"{_class_list(classes)}. Datasets trained together must share one class list."
            )
        if len(classes) > num_classes:
            raise ConfigError(
                f"Dataset {name!r} has {len(classes)} classes {_class_list(classes)} but "
                f"MODEL.SALTNET.NUM_CLASSES is {num_classes}; set MODEL.SALTNET.NUM_CLASSES "
                f"{len(classes)}."
            )
    if first is not None and len(first[1]) < num_classes:
        logger.warning(
            f"Dataset {first[0]!r} has {len(first[1])} classes but MODEL.SALTNET.NUM_CLASSES is "
            f"{num_classes}: {num_classes - len(first[1])} classifier outputs are never trained "
            f"as positives. Set MODEL.SALTNET.NUM_CLASSES {len(first[1])} unless intended."
        )
