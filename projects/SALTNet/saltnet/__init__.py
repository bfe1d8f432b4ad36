"""SALT-Net for Detectron2.

Importing this package registers the ``SALTNet`` meta-architecture and SALT-Net's backbones with
detectron2's registries. What users import: :func:`load_config` (a YAML config or a LazyConfig),
:class:`SALTNetTrainer` (training and evaluation, a ``DefaultTrainer``), :class:`Predictor`
(a trained model on BGR images), and the model classes. It also filters the known third-party
warnings of :mod:`saltnet.utils.known_warnings`, before it imports detectron2.
"""

from .utils.known_warnings import ignore_known_warnings

ignore_known_warnings()

from .config import add_saltnet_config, load_config  # noqa: E402 (after the filters)
from .engine import SALTNetTrainer  # noqa: E402
from .export import Predictor  # noqa: E402
from .modeling import SALTHead, SALTNet, build_saltnet_resnet_fpn_backbone  # noqa: E402

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
