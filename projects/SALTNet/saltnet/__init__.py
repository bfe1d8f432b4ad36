"""SALT-Net for Detectron2.

Importing this package registers the ``SALTNet`` meta-architecture and the
``build_saltnet_resnet_fpn_backbone`` backbone with detectron2's registries.
"""

from .config import add_saltnet_config
from .modeling import SALTHead, SALTNet, build_saltnet_resnet_fpn_backbone

__version__ = "0.1.0"
__all__ = ["add_saltnet_config", "SALTHead", "SALTNet", "build_saltnet_resnet_fpn_backbone"]
