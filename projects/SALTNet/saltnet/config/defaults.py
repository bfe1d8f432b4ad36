"""SALT-Net's config: the keys it adds to detectron2's (``MODEL.SALTNET``, ``MODEL.RES2NET``,
the dataset keys) with their defaults, and the checked loader of YAML configs.

Defaults follow the paper and the authors' release; SALT-Net's hyper-parameters and the SALT
plug-in's take theirs from the models' constructors (:func:`constructor_defaults`).
"""

import inspect
from typing import Any, Dict

from detectron2.config import CfgNode
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from ..data.register import add_dataset_config
from ..modeling import SALTHead, SALTNet, SALTRetinaNet, SALTRetinaNetHead
from .checks import check_config, merge_config

__all__ = [
    "add_res2net_config",
    "add_saltnet_config",
    "constructor_defaults",
    "get_saltnet_cfg",
    "load_yaml_config",
]


def constructor_defaults(cls) -> Dict[str, Any]:
    """The keyword arguments of ``cls.__init__`` that have a default, with their defaults."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty}


def add_res2net_config(cfg):
    """Add the ``MODEL.RES2NET`` keys to a detectron2 config (in place). Safe to call twice.

    Frozen stages follow ``MODEL.BACKBONE.FREEZE_AT`` as for every detectron2 backbone.
    """
    if "RES2NET" in cfg.MODEL:
        return cfg
    cfg.MODEL.RES2NET = CN()
    node = cfg.MODEL.RES2NET
    node.DEPTH = 50  # 50, 101 or 152
    # "26w x 4s": each block splits its bottleneck into SCALE groups of
    # BASE_WIDTH x (stage width / 64) channels (26, 52, 104, 208 in res2-res5).
    node.SCALE = 4
    node.BASE_WIDTH = 26
    node.NORM = "FrozenBN"
    node.OUT_FEATURES = ["res3", "res4", "res5"]
    # Deformable 3x3 convs (in every split) per stage res2-res5: DCN v1, or v2 if MODULATED.
    node.DEFORM_ON_PER_STAGE = [False, False, False, False]
    node.DEFORM_MODULATED = False
    node.DEFORM_NUM_GROUPS = 1
    # The first block of a stage average-pools (3x3) its last, unconvolved split to the block's
    # stride. mmdetection (whose open-mmlab weights the paper uses) skips that pool where the
    # stride is 1 (res2); the original Res2Net and timm apply it there too: set True for them.
    node.STRIDE1_SPLIT_POOL = False
    return cfg


def add_saltnet_config(cfg):
    """Add the SALT-Net keys to a detectron2 config (in place). Safe to call twice.

    The number of detections per image is detectron2's ``TEST.DETECTIONS_PER_IMAGE``, as for
    RetinaNet; the former ``MODEL.SALTNET.DETECTIONS_PER_IMAGE`` stops with yacs' rename error.
    """
    add_res2net_config(cfg)
    if "SALTNET" in cfg.MODEL:
        return cfg
    cfg.register_renamed_key("MODEL.SALTNET.DETECTIONS_PER_IMAGE", "TEST.DETECTIONS_PER_IMAGE")
    cfg.MODEL.SALTNET = CN()
    node = cfg.MODEL.SALTNET
    # The hyper-parameters' defaults are the model constructors' (one source for YAML configs,
    # LazyConfigs and code); the dataset's class count and the FPN levels are choices here.
    head, detector = constructor_defaults(SALTHead), constructor_defaults(SALTNet)
    node.NUM_CLASSES = 80
    node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Towers: NUM_CONVS x (conv3x3 + GN(32) + ReLU), separate for classification and regression.
    node.NUM_CONVS = head["num_convs"]
    node.NORM = head["norm"]
    # "dcnx" models: the last conv of both towers is a modulated deformable conv (DCNv2).
    node.TOWER_LAST_DCN = head["tower_last_dcn"]
    # General distribution of each side distance: softmax over REG_MAX + 1 bins (stride units).
    node.REG_MAX = head["reg_max"]
    # Quality branch (GFLV2 DGQP): top-k bin probabilities (+ their mean) -> 1x1 convs -> sigmoid.
    node.DGQP_TOPK = head["dgqp_topk"]
    node.DGQP_ADD_MEAN = head["dgqp_add_mean"]
    node.DGQP_CHANNELS = head["dgqp_channels"]
    node.PRIOR_PROB = head["prior_prob"]
    # SALT operator on/off. Off gives a plain GFLV2-style head (same towers, losses, quality).
    node.SALT_ON = head["salt_on"]
    # Backend of every deformable conv (SALT, "dcnx" towers, DCN backbone stages):
    # "auto" (gather on CPU tensors, torchvision on CUDA tensors), "gather", "torchvision",
    # "triton" or "detectron2" (needs detectron2's compiled ops); see saltnet.layers.deform_conv.
    node.DEFORM_BACKEND = head["deform_backend"]
    # ATSS: top-k closest anchors per level; square anchors of side ANCHOR_SCALE x stride.
    node.ATSS_TOPK = detector["atss_topk"]
    node.ANCHOR_SCALE = detector["anchor_scale"]
    # Loss weights.
    node.QFL_BETA = detector["qfl_beta"]
    node.LOSS_QFL_WEIGHT = detector["loss_qfl_weight"]
    node.LOSS_GIOU_WEIGHT = detector["loss_giou_weight"]
    node.LOSS_DFL_WEIGHT = detector["loss_dfl_weight"]
    node.LOSS_COARSE_WEIGHT = detector["loss_coarse_weight"]
    # Supervision of the coarse box (SALT_ON only), with the self-distillation regression (SDR):
    #   "none":    no direct loss on the coarse box,
    #   "gt":      GIoU against the ground truth (what the authors' release trains; the default),
    #   "distill": GIoU against the refined box (detached), weighted by the refined box's IoU,
    #   "both":    "gt" + "distill" ("distill" and "both" are this project's extensions).
    node.SDR_MODE = detector["sdr_mode"]
    node.SDR_WEIGHT = detector["sdr_weight"]
    # Inference.
    node.TOPK_CANDIDATES_TEST = detector["test_topk_candidates"]
    node.SCORE_THRESH_TEST = detector["test_score_thresh"]
    node.NMS_THRESH_TEST = detector["test_nms_thresh"]
    # How images are resized: "pil" (detectron2's) or "opencv" (the release's: cv2 bilinear
    # and mmcv's size rounding; use it to evaluate converted release checkpoints).
    cfg.INPUT.RESIZE_BACKEND = "pil"
    # SALT as a plug-in on detectron2's RetinaNet (MODEL.META_ARCHITECTURE "SALTRetinaNet", see
    # saltnet/modeling/plugin.py): the SALT operator on/off (off = detectron2's RetinaNet), the
    # norm of its convs, the weight of the coarse-box GIoU loss (the constructors' defaults).
    # Deformable convs: DEFORM_BACKEND.
    plugin_head = constructor_defaults(SALTRetinaNetHead)
    cfg.MODEL.RETINANET.SALT_ON = plugin_head["salt_on"]
    cfg.MODEL.RETINANET.SALT_NORM = plugin_head["salt_norm"]
    coarse_weight = constructor_defaults(SALTRetinaNet)["loss_coarse_weight"]
    cfg.MODEL.RETINANET.SALT_COARSE_LOSS_WEIGHT = coarse_weight
    # The autocast dtype of AMP training (SOLVER.AMP.ENABLED): "float16" or "bfloat16".
    cfg.SOLVER.AMP.PRECISION = "float16"
    return cfg


def get_saltnet_cfg() -> CfgNode:
    """detectron2's default config with SALT-Net's keys (``MODEL.SALTNET``, ``MODEL.RES2NET``,
    ``DATASETS.REGISTER``, ``DATASETS.SYNTHETIC_ROOT``)."""
    cfg = get_cfg()
    add_saltnet_config(cfg)
    add_dataset_config(cfg)
    return cfg


def load_yaml_config(config_file: str, opts=()) -> CfgNode:
    """A checked, frozen config from a YAML file and ``KEY VALUE`` overrides.

    Raises FileNotFoundError for a missing file and :class:`ConfigError` for an unknown key (with
    the closest valid keys), a value of the wrong type or an invalid choice (with the choices).
    """
    cfg = merge_config(get_saltnet_cfg(), config_file, opts)
    check_config(cfg)
    cfg.freeze()
    return cfg
