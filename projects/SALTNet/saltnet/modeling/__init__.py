from .backbone import build_saltnet_resnet_fpn_backbone
from .head import SALTHead
from .meta_arch import SALTNet
from .plugin import SALTFCOS, SALTFCOSHead, SALTRetinaNet, SALTRetinaNetHead
from .res2net import build_saltnet_res2net_backbone, build_saltnet_res2net_fpn_backbone
from .resnet import build_saltnet_resnet_backbone
from .salt import SALTOperator

__all__ = [
    "build_saltnet_res2net_backbone",
    "build_saltnet_res2net_fpn_backbone",
    "build_saltnet_resnet_backbone",
    "build_saltnet_resnet_fpn_backbone",
    "SALTFCOS",
    "SALTFCOSHead",
    "SALTHead",
    "SALTNet",
    "SALTOperator",
    "SALTRetinaNet",
    "SALTRetinaNetHead",
]
