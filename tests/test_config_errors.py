"""Config mistakes give errors that name the problem, where it is and the valid choices."""


import pytest
from detectron2.modeling import build_model
from helpers import QUICK_YAML, REPO_ROOT

from saltnet.config.checks import (
    ConfigError,
    UnknownConfigKeyError,
    check_config,
    merge_config,
)
from saltnet.config.defaults import get_saltnet_cfg


def saltnet_cfg():
    cfg = get_saltnet_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SALTNet"
    cfg.MODEL.BACKBONE.NAME = "build_saltnet_resnet_fpn_backbone"
    return cfg


def write(path, text):
    path.write_text("VERSION: 2\n" + text)
    return str(path)


def test_unknown_key_on_command_line_suggests_the_key():
    cfg = get_saltnet_cfg()
    with pytest.raises(UnknownConfigKeyError) as info:
        merge_config(cfg, opts=["SOLVER.MAX_ITER", "5", "MODEL.SALTNET.NUM_CLASS", "3"])
    message = str(info.value)
    assert message.startswith("Unknown config key 'MODEL.SALTNET.NUM_CLASS'")
    assert "(from the command line)" in message
    assert "Did you mean: MODEL.SALTNET.NUM_CLASSES" in message
    assert info.value.suggestions[0] == "MODEL.SALTNET.NUM_CLASSES"
    # Both a ValueError and (like yacs' error for a file) a KeyError.
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    # A key at the wrong place: the same name elsewhere; a misspelt node: the node fixed.
    with pytest.raises(KeyError, match="Did you mean: MODEL.SALTNET.NUM_CLASSES"):
        merge_config(cfg, opts=["MODEL.NUM_CLASSES", "3"])
    with pytest.raises(KeyError, match="Did you mean: MODEL.DEVICE[?]"):
        merge_config(cfg, opts=["MODLE.DEVICE", "cpu"])


def test_unknown_key_without_close_match_lists_the_valid_keys():
    with pytest.raises(UnknownConfigKeyError) as info:
        merge_config(get_saltnet_cfg(), opts=["MODEL.SALTNET.ZZZZZZZZ", "1"])
    assert "Valid keys at MODEL.SALTNET: " in str(info.value)
    assert "SDR_MODE" in str(info.value) and "NUM_CLASSES" in str(info.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    config = write(tmp_path / "bad.yaml", "MODEL:\n  SALTNET:\n    NUM_CLASS: 3\n")
    with pytest.raises(UnknownConfigKeyError) as info:
        merge_config(get_saltnet_cfg(), config)
    message = str(info.value)
    assert f"Unknown config key 'MODEL.SALTNET.NUM_CLASS' (from config file {config!r})" in message
    assert "Did you mean: MODEL.SALTNET.NUM_CLASSES" in message


def test_unknown_key_in_base_file_names_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", "MODEL:\n  SALTNET:\n    SDR_MOD: gt\n")
    child = write(tmp_path / "child.yaml", '_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 5\n')
    with pytest.raises(UnknownConfigKeyError) as info:
        merge_config(get_saltnet_cfg(), child)
    message = str(info.value)
    assert f"(from config file {base!r}, a _BASE_ of {child!r})" in message
    assert "Did you mean: MODEL.SALTNET.SDR_MODE" in message


def test_type_mismatch_names_key_and_source(tmp_path):
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER .from the command line.$"):
        merge_config(get_saltnet_cfg(), opts=["SOLVER.MAX_ITER", "many"])
    config = write(tmp_path / "bad.yaml", "MODEL:\n  SALTNET:\n    REG_MAX: sixteen\n")
    with pytest.raises(ConfigError) as info:
        merge_config(get_saltnet_cfg(), config)
    assert "Type mismatch" in str(info.value)
    assert f"MODEL.SALTNET.REG_MAX (from config file {config!r})" in str(info.value)


def test_odd_number_of_overrides():
    with pytest.raises(ConfigError, match="odd number.*'SOLVER.BASE_LR'"):
        merge_config(get_saltnet_cfg(), opts=["SOLVER.MAX_ITER", "5", "SOLVER.BASE_LR"])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        merge_config(get_saltnet_cfg(), str(tmp_path / "no_such.yaml"))


def test_valid_file_and_overrides_merge(tmp_path):
    base = write(tmp_path / "base.yaml", "MODEL:\n  SALTNET:\n    NUM_CLASSES: 7\n")
    child = write(tmp_path / "child.yaml", '_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 5\n')
    assert base
    cfg = merge_config(saltnet_cfg(), child, ["MODEL.SALTNET.SDR_MODE", "gt"])
    assert (cfg.MODEL.SALTNET.NUM_CLASSES, cfg.SOLVER.MAX_ITER) == (7, 5)
    assert cfg.MODEL.SALTNET.SDR_MODE == "gt"
    assert check_config(cfg) is cfg


def test_repository_configs_pass_the_checks():
    cfg = merge_config(get_saltnet_cfg(), str(REPO_ROOT / QUICK_YAML))
    check_config(cfg)


def test_wrong_backbone_lists_the_registered_backbones():
    cfg = saltnet_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_saltnet_resnet_fpn"
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    message = str(info.value)
    assert "MODEL.BACKBONE.NAME is 'build_saltnet_resnet_fpn'" in message
    for name in (
        "build_saltnet_resnet_fpn_backbone",
        "build_saltnet_res2net_fpn_backbone",
        "build_resnet_fpn_backbone",
    ):
        assert name in message
    assert "Did you mean: build_saltnet_resnet_fpn_backbone" in message


def test_wrong_meta_architecture():
    cfg = saltnet_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SaltNet"
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE is 'SaltNet'.*SALTNet"):
        check_config(cfg)


def test_bad_saltnet_choices():
    cfg = saltnet_cfg()
    cfg.MODEL.SALTNET.NUM_CLASSES = 0
    cfg.SOLVER.IMS_PER_BATCH = 0
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    message = str(info.value)
    assert "MODEL.SALTNET.NUM_CLASSES is 0" in message
    assert "SOLVER.IMS_PER_BATCH is 0" in message


def test_amp_precision_is_one_of_the_autocast_dtypes():
    cfg = saltnet_cfg()
    assert cfg.SOLVER.AMP.PRECISION == "float16"  # detectron2's AMPTrainer's precision
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    check_config(cfg)
    cfg.SOLVER.AMP.PRECISION = "fp16"
    with pytest.raises(ConfigError, match="SOLVER.AMP.PRECISION.* is 'fp16'.*float16, bfloat16"):
        check_config(cfg)


def test_retinanet_class_count_is_checked_under_its_own_key():
    cfg = saltnet_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SALTRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 0
    cfg.MODEL.SALTNET.NUM_CLASSES = 0  # not this model's key: not reported
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert str(info.value) == (
        "Invalid config: MODEL.RETINANET.NUM_CLASSES is 0; it must be an integer >= 1."
    )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MODEL.SALTNET.SDR_MODE", "distil", r"Unknown SDR mode 'distil'.*'distill'"),
        ("MODEL.SALTNET.IN_FEATURES", [], r"MODEL.SALTNET.IN_FEATURES is empty; it yields \['p3'"),
        ("MODEL.SALTNET.DEFORM_BACKEND", "cuda", r"'cuda'.*'torchvision'"),
    ],
)
def test_model_choices_are_checked_where_the_model_is_built(key, value, message):
    """One check for YAML and LazyConfig: the model's constructor (check_config leaves them)."""
    cfg = merge_config(get_saltnet_cfg(), str(REPO_ROOT / QUICK_YAML))
    cfg.merge_from_list([key, str(value)])
    check_config(cfg)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_renamed_detections_per_image_key_points_to_detectron2s(tmp_path):
    config = write(tmp_path / "old.yaml", "MODEL:\n  SALTNET:\n    DETECTIONS_PER_IMAGE: 50\n")
    for args in ((config,), (None, ["MODEL.SALTNET.DETECTIONS_PER_IMAGE", "50"])):
        with pytest.raises(KeyError, match="renamed to TEST.DETECTIONS_PER_IMAGE"):
            merge_config(get_saltnet_cfg(), *args)
    cfg = merge_config(get_saltnet_cfg(), opts=["TEST.DETECTIONS_PER_IMAGE", "50"])
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 50


def test_saltnet_keys_not_checked_for_other_architectures():
    cfg = get_saltnet_cfg()  # GeneralizedRCNN
    cfg.MODEL.SALTNET.SDR_MODE = "bogus"
    check_config(cfg)
