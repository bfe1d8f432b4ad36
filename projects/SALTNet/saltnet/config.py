"""The ``MODEL.SALTNET`` config node: every hyper-parameter of SALT-Net with its default.

Defaults follow ``shared/design/SALTNET-METHOD.md`` (the paper and the authors' release).
"""

from detectron2.config import CfgNode as CN

from .modeling.res2net import add_res2net_config


def add_saltnet_config(cfg):
    """Add the SALT-Net keys to a detectron2 config (in place). Safe to call twice."""
    add_res2net_config(cfg)
    if "SALTNET" in cfg.MODEL:
        return cfg
    cfg.MODEL.SALTNET = CN()
    node = cfg.MODEL.SALTNET
    node.NUM_CLASSES = 80
    node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Towers: NUM_CONVS x (conv3x3 + GN(32) + ReLU), separate for classification and regression.
    node.NUM_CONVS = 3
    node.NORM = "GN"
    # "dcnx" models: the last conv of both towers is a modulated deformable conv (DCNv2).
    node.TOWER_LAST_DCN = False
    # General distribution of each side distance: softmax over REG_MAX + 1 bins (stride units).
    node.REG_MAX = 16
    # Quality branch (GFLV2 DGQP): top-k bin probabilities (+ their mean) -> 1x1 convs -> sigmoid.
    node.DGQP_TOPK = 4
    node.DGQP_ADD_MEAN = True
    node.DGQP_CHANNELS = 64
    node.PRIOR_PROB = 0.01
    # SALT operator on/off. Off gives a plain GFLV2-style head (same towers, losses, quality).
    node.SALT_ON = True
    # Backend of every deformable conv (SALT, "dcnx" towers, DCN backbone stages):
    # "torchvision" or "detectron2" (needs detectron2's compiled ops).
    node.DEFORM_BACKEND = "torchvision"
    # ATSS: top-k closest anchors per level; square anchors of side ANCHOR_SCALE x stride.
    node.ATSS_TOPK = 9
    node.ANCHOR_SCALE = 8.0
    # Loss weights.
    node.QFL_BETA = 2.0
    node.LOSS_QFL_WEIGHT = 1.0
    node.LOSS_GIOU_WEIGHT = 2.0
    node.LOSS_DFL_WEIGHT = 0.25
    node.LOSS_COARSE_WEIGHT = 1.0
    # Supervision of the coarse box (SALT_ON only), with the self-distillation regression (SDR):
    #   "none":    no direct loss on the coarse box,
    #   "gt":      GIoU against the ground truth (what the authors' release trains; the default),
    #   "distill": GIoU against the refined box (detached), weighted by the refined box's IoU,
    #   "both":    "gt" + "distill" ("distill" and "both" are this project's extensions).
    node.SDR_MODE = "gt"
    node.SDR_WEIGHT = 1.0
    # Inference.
    node.TOPK_CANDIDATES_TEST = 1000
    node.SCORE_THRESH_TEST = 0.05
    node.NMS_THRESH_TEST = 0.6
    node.DETECTIONS_PER_IMAGE = 100
    return cfg
