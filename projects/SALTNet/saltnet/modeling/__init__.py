from .backbone import build_saltnet_resnet_fpn_backbone
from .head import SALTHead
from .meta_arch import SALTNet

__all__ = ["build_saltnet_resnet_fpn_backbone", "SALTHead", "SALTNet"]
