"""SALT-Net's config keys and defaults, and the checks on configs and LazyConfig overrides."""

from .checks import ConfigError, UnknownConfigKeyError
from .defaults import add_saltnet_config, get_saltnet_cfg, load_yaml_config
from .lazy_overrides import check_lazy_overrides
from .load import load_config

__all__ = [
    "ConfigError",
    "UnknownConfigKeyError",
    "add_saltnet_config",
    "check_lazy_overrides",
    "get_saltnet_cfg",
    "load_config",
    "load_yaml_config",
]
