"""The model configs: the paper's recipes, every YAML builds a model that runs, LazyConfig twins."""

import pytest
import torch
import yaml
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from helpers import REPO_ROOT
from omegaconf import ListConfig

from saltnet.config.checks import num_classes_of
from saltnet.config.defaults import get_saltnet_cfg, load_yaml_config
from saltnet.modeling import SALTFCOS, SALTFCOSHead, SALTRetinaNet, SALTRetinaNetHead

CONFIGS = REPO_ROOT / "configs"
YAMLS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
PAPER_MODELS = [
    "salt_R_50_FPN_1x.yaml",
    "salt_R_50_FPN_2x_ms.yaml",
    "salt_X_101_32x4d_FPN_2x_ms_dcn.yaml",
    "salt_X_101_32x4d_FPN_2x_ms_dcnx.yaml",
    "salt_R2_101_FPN_2x_ms_dcn.yaml",
    "salt_R2_101_FPN_2x_ms_dcnx.yaml",
    "gflv2_R_50_FPN_1x.yaml",
]


def _cfg(name, *opts):
    return load_yaml_config(str(CONFIGS / name), ["MODEL.DEVICE", "cpu", *opts])


def test_every_paper_model_has_a_config():
    assert set(PAPER_MODELS) <= set(YAMLS)
    assert "quick_schedule/salt_R_18_synthetic.yaml" in YAMLS


def test_base_recipe():
    cfg = _cfg("salt_R_50_FPN_1x.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "SALTNet"
    assert cfg.MODEL.BACKBONE.NAME == "build_saltnet_resnet_fpn_backbone"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RESNETS.NORM == "FrozenStatsBN"
    assert cfg.MODEL.RESNETS.DEPTH == 50 and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.RESNETS.OUT_FEATURES == cfg.MODEL.FPN.IN_FEATURES == ["res3", "res4", "res5"]
    assert cfg.MODEL.FPN.OUT_CHANNELS == 256 and cfg.MODEL.FPN.NORM == ""
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert cfg.INPUT.MIN_SIZE_TRAIN == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert cfg.INPUT.RANDOM_FLIP == "horizontal"
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY) == (16, 0.01, 0.9, 1e-4)
    assert (s.WARMUP_ITERS, s.WARMUP_FACTOR, s.WARMUP_METHOD) == (500, 0.001, "linear")
    assert (s.MAX_ITER, s.STEPS, s.GAMMA) == (90000, (60000, 80000), 0.1)
    node = cfg.MODEL.SALTNET
    assert node.SALT_ON and node.NUM_CONVS == 3 and node.REG_MAX == 16 and node.NUM_CLASSES == 80
    assert node.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    assert (node.NMS_THRESH_TEST, node.SCORE_THRESH_TEST) == (0.6, 0.05)
    assert (node.TOPK_CANDIDATES_TEST, cfg.TEST.DETECTIONS_PER_IMAGE) == (1000, 100)


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_sets_only_the_saltnet_keys_it_changes(name):
    # The defaults are the constructors' (via saltnet/config/defaults.py); a file restating one
    # would hide a change of the default from the configs that rely on it.
    written = yaml.safe_load((CONFIGS / name).read_text()).get("MODEL", {}).get("SALTNET", {})
    defaults = get_saltnet_cfg().MODEL.SALTNET
    assert {k: v for k, v in written.items() if defaults[k] == v} == {}


def test_lr_schedule_of_the_1x_recipe():
    cfg = _cfg("salt_R_50_FPN_1x.yaml")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    multiplier = build_lr_scheduler(cfg, optimizer)._multiplier  # of iteration / MAX_ITER
    lrs = {it: 0.01 * multiplier(it / 90000) for it in (0, 250, 500, 59999, 60000, 80000, 89999)}
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[250] == pytest.approx(0.01 * (0.001 + 0.999 * 0.5))
    assert lrs[500] == lrs[59999] == pytest.approx(0.01)
    assert lrs[60000] == pytest.approx(0.001)
    assert lrs[80000] == lrs[89999] == pytest.approx(0.0001)


def test_2x_multiscale_recipe():
    cfg = _cfg("salt_R_50_FPN_2x_ms.yaml")
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (180000, (120000, 160000))
    assert cfg.INPUT.MIN_SIZE_TRAIN == (480, 960)
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333


@pytest.mark.parametrize("variant, stages", [("dcn", [0, 0, 1, 1]), ("dcnx", [0, 1, 1, 1])])
def test_deformable_recipes(variant, stages):
    x101 = _cfg(f"salt_X_101_32x4d_FPN_2x_ms_{variant}.yaml")
    r = x101.MODEL.RESNETS
    assert (r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP, r.STRIDE_IN_1X1) == (101, 32, 4, False)
    assert r.DEFORM_ON_PER_STAGE == [bool(s) for s in stages] and not r.DEFORM_MODULATED
    r2 = _cfg(f"salt_R2_101_FPN_2x_ms_{variant}.yaml")
    assert r2.MODEL.BACKBONE.NAME == "build_saltnet_res2net_fpn_backbone"
    n = r2.MODEL.RES2NET
    assert (n.DEPTH, n.BASE_WIDTH, n.SCALE) == (101, 26, 4)
    assert n.DEFORM_ON_PER_STAGE == [bool(s) for s in stages] and not n.DEFORM_MODULATED
    for cfg in (x101, r2):
        assert cfg.SOLVER.MAX_ITER == 180000 and cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
        dcnx = variant == "dcnx"
        assert cfg.MODEL.SALTNET.TOWER_LAST_DCN == dcnx
        assert cfg.MODEL.FPN.NORM == ("GN" if dcnx else "")


def test_gflv2_baseline_switches_salt_off():
    assert not _cfg("gflv2_R_50_FPN_1x.yaml").MODEL.SALTNET.SALT_ON


@pytest.mark.slow
@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_builds_a_model_that_runs_on_cpu(name):
    cfg = _cfg(name)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 64, 80)).float()
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 32, "width": 40}])
    instances = out["instances"]
    assert instances.image_size == (32, 40)
    assert len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
    if len(instances):
        assert instances.pred_classes.max() < num_classes_of(cfg)[1]
        assert torch.isfinite(instances.pred_boxes.tensor).all()
    salt_on = {"SALTNet": cfg.MODEL.SALTNET.SALT_ON, "SALTRetinaNet": cfg.MODEL.RETINANET.SALT_ON}
    assert getattr(model.head, "salt_on", False) == salt_on.get(cfg.MODEL.META_ARCHITECTURE, False)


@pytest.mark.parametrize("name", ["salt_R_50_FPN_1x", "gflv2_R_50_FPN_1x"])
def test_lazy_configs_build_the_yaml_models(name):
    lazy = LazyConfig.load(str(CONFIGS / f"{name}.py"))
    lazy_model = instantiate(lazy.model)
    yaml_model = build_model(_cfg(f"{name}.yaml"))
    frozen = {n for n, p in lazy_model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in yaml_model.named_parameters() if not p.requires_grad}
    assert lazy_model.head.salt_on == (name.startswith("salt"))
    assert lazy.optimizer.lr == 0.01 and lazy.train.max_iter == 90000
    assert lazy.dataloader.train.total_batch_size == 16
    multiplier = instantiate(lazy.lr_multiplier)
    assert multiplier(0.0) == pytest.approx(0.001)
    assert multiplier(250 / 90000) == pytest.approx(0.001 + 0.999 * 0.5)
    assert [multiplier(x / 90000) for x in (500, 59999, 60000, 80000)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01]
    )


def _plain(value) -> bool:
    if isinstance(value, (list, tuple, ListConfig)):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str, type(None)))


def _hyper_parameters(model) -> dict:
    """What a config decides about a model besides its weights: every plain attribute
    (loss weights, thresholds, top-k, SDR mode, backend, ...) and buffer of every module, the
    module tree with each module's settings (repr), and the class prior (the score bias)."""
    found = {"repr": repr(model)}
    for name, module in model.named_modules():
        found.update(
            {f"{name}.{k}": v for k, v in vars(module).items() if k[0] != "_" and _plain(v)}
        )
    found.update({k: v.tolist() for k, v in model.named_buffers() if "running_" not in k})
    return found


TWINS = [
    ("quick_schedule/salt_R_18_synthetic.yaml", "quick_schedule/salt_R_18_synthetic.py"),
    ("salt_R_50_FPN_1x.yaml", "salt_R_50_FPN_1x.py"),
    ("gflv2_R_50_FPN_1x.yaml", "gflv2_R_50_FPN_1x.py"),
    (
        "quick_schedule/retinanet_salt_R_18_synthetic.yaml",
        "quick_schedule/retinanet_salt_R_18_synthetic.py",
    ),
]


@pytest.mark.parametrize("yaml_name, lazy_name", TWINS)
def test_lazy_config_twin_builds_the_yaml_model(yaml_name, lazy_name):
    lazy_model = instantiate(LazyConfig.load(str(CONFIGS / lazy_name)).model)
    yaml_model = build_model(_cfg(yaml_name))
    assert type(lazy_model) is type(yaml_model)
    shapes = {k: v.shape for k, v in lazy_model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in yaml_model.state_dict().items()}
    ours, theirs = _hyper_parameters(lazy_model), _hyper_parameters(yaml_model)
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}
    bias = [m.bias for n, m in yaml_model.named_modules() if n.endswith("cls_score")]
    assert torch.equal(dict(lazy_model.named_modules())["head.cls_score"].bias, bias[0])


def test_quick_lazy_config_schedule_and_data_match_the_quick_yaml():
    lazy = LazyConfig.load(str(CONFIGS / "quick_schedule/salt_R_18_synthetic.py"))
    yaml_cfg = _cfg("quick_schedule/salt_R_18_synthetic.yaml")
    assert lazy.train.max_iter == yaml_cfg.SOLVER.MAX_ITER
    assert lazy.dataloader.train.dataset_names == yaml_cfg.DATASETS.TRAIN[0]
    assert lazy.dataloader.test.dataset.names == yaml_cfg.DATASETS.TEST[0]


@pytest.mark.parametrize(
    "name, zoo, detector, head",
    [
        ("fcos_R_50_FPN_1x_salt", "fcos_R_50_FPN_1x", SALTFCOS, SALTFCOSHead),
        ("retinanet_R_50_FPN_1x_salt", "retinanet_R_50_FPN_1x", SALTRetinaNet, SALTRetinaNetHead),
    ],
)
def test_plugin_lazy_configs_are_the_model_zoo_with_salt(name, zoo, detector, head):
    from detectron2 import model_zoo

    ours = LazyConfig.load(str(CONFIGS / "plugin" / f"{name}.py"))
    reference = model_zoo.get_config(f"COCO-Detection/{zoo}.py")
    assert ours.model._target_ is detector and ours.model.head._target_ is head
    assert ours.model.head.salt_on is True
    # Everything but the SALT switches is the zoo's: schedule, optimiser, weights, model.
    assert ours.train.max_iter == reference.train.max_iter
    assert ours.train.init_checkpoint == reference.train.init_checkpoint
    assert ours.optimizer.lr == reference.optimizer.lr
    augmentations = reference.dataloader.train.mapper.augmentations
    assert ours.dataloader.train.mapper.augmentations == augmentations
    assert ours.dataloader.train.mapper.image_format == "BGR"  # the zoo's MSRA weights
    for key in ("backbone", "num_classes", "head_in_features", "pixel_mean", "pixel_std"):
        assert ours.model[key] == reference.model[key], key
    salt_keys = {"salt_on", "salt_norm", "deform_backend", "_target_"}
    assert {k: v for k, v in ours.model.head.items() if k not in salt_keys} == {
        k: v for k, v in reference.model.head.items() if k != "_target_"
    }


def test_plugin_retinanet_yaml_is_the_model_zoo_with_salt():
    ours = _cfg("plugin/retinanet_R_50_FPN_1x_salt.yaml")
    zoo = _cfg("plugin/Base-RetinaNet.yaml", "MODEL.RESNETS.DEPTH", "50")
    assert ours.MODEL.META_ARCHITECTURE == "SALTRetinaNet" and ours.MODEL.RETINANET.SALT_ON
    assert zoo.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert ours.MODEL.RETINANET == zoo.MODEL.RETINANET
    sizes = [[x * 2 ** (k / 3) for k in range(3)] for x in (32, 64, 128, 256, 512)]
    for ours_level, level in zip(ours.MODEL.ANCHOR_GENERATOR.SIZES, sizes):
        assert ours_level == pytest.approx(level)
    assert ours.SOLVER.MAX_ITER == 90000 and ours.SOLVER.BASE_LR == 0.01
