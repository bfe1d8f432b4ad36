"""Unknown keys in LazyConfig command-line overrides (``train.max_iter=100``).

detectron2's ``LazyConfig.apply_overrides`` adds a key that does not exist, so a misspelt
override (``train.max_iters=100``) is silently ignored. :func:`check_lazy_overrides` rejects it
first, with the closest valid keys. A key is valid if it exists in the config, or if its parent
is a ``LazyCall`` whose target takes an argument of that name (or ``**kwargs``): overriding a
default argument that the config file does not spell out is normal. Hydra's ``+key=value``
(add a key on purpose) is left alone.
"""

import difflib
import inspect
from typing import Iterator, List, Sequence

from detectron2.utils.registry import locate
from omegaconf import DictConfig, OmegaConf

from .checks import UnknownConfigKeyError

__all__ = ["check_lazy_overrides"]

_ABSENT = object()


def _target_parameters(node) -> List[str]:
    """Argument names of a LazyCall node's target; ["**"] if it takes ``**kwargs``."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if target is None:
        return []
    if isinstance(target, str):
        target = locate(target)
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): accept anything
        return ["**"]
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return ["**"]
    return [p.name for p in parameters if p.kind != p.VAR_POSITIONAL]


def _valid_keys(node, prefix: str = "") -> Iterator[str]:
    """Dotted keys of a config's dicts, plus the unset arguments of its LazyCall targets."""
    if not isinstance(node, DictConfig):
        return
    names = [k for k in node.keys() if k != "_target_"]
    names += [p for p in _target_parameters(node) if p != "**" and p not in names]
    for name in names:
        yield prefix + name
        if name in node:
            yield from _valid_keys(node._get_node(name), prefix + name + ".")


def _is_valid(cfg: DictConfig, key: str) -> bool:
    if (
        OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
        is not _ABSENT
    ):
        return True
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    parameters = _target_parameters(parent)
    return "**" in parameters or name in parameters


def check_lazy_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Raise :class:`UnknownConfigKeyError` for the first ``key=value`` of ``overrides`` whose
    key is not valid in ``cfg`` (see the module doc), naming it and the closest valid keys."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.startswith(("+", "~")) or _is_valid(cfg, key):
            continue
        suggestions = difflib.get_close_matches(key, list(_valid_keys(cfg)), n=5, cutoff=0.6)
        message = f"Unknown config key {key!r} (from the command line)."
        if suggestions:
            message += " Did you mean: " + ", ".join(suggestions) + "?"
        message += f" To add a new key on purpose, write +{override.strip()}."
        raise UnknownConfigKeyError(message, key, "the command line", suggestions)
