"""SALT-Net for Detectron2.

Importing this package registers the ``SALTNet`` meta-architecture and SALT-Net's backbones with
detectron2's registries. What users import: :func:`load_config` (a YAML config or a LazyConfig),
:class:`SALTNetTrainer` (training and evaluation, a ``DefaultTrainer``), :class:`Predictor`
(a trained model on BGR images), and the model classes.
"""

from .config import add_saltnet_config, load_config
from .engine import SALTNetTrainer
from .export import Predictor
from .modeling import SALTHead, SALTNet, build_saltnet_resnet_fpn_backbone

__version__ = "0.1.0"
__all__ = [
    "Predictor",
    "SALTHead",
    "SALTNet",
    "SALTNetTrainer",
    "add_saltnet_config",
    "build_saltnet_resnet_fpn_backbone",
    "load_config",
]
