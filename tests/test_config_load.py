"""saltnet.config.load: one entry for both kinds of config, the same answers for the same recipe."""

import re

import pytest
from detectron2.config import CfgNode
from helpers import REPO_ROOT

from saltnet.config import ConfigError, UnknownConfigKeyError
from saltnet.config import load as q
from saltnet.config.load import load_config

CONFIGS = REPO_ROOT / "configs"


def _answers(cfg):
    aug, input_format = q.test_resize(cfg)
    resize = (type(aug).__name__, tuple(aug.short_edge_length), aug.max_size, aug.interp)
    return (q.output_dir(cfg), q.device(cfg), q.weights(cfg), q.test_datasets(cfg)), (
        resize,
        input_format,
    )


def test_yaml_and_lazyconfig_of_one_recipe_answer_alike():
    yaml_cfg = load_config(str(CONFIGS / "salt_R_50_FPN_1x.yaml"))
    lazy_cfg = load_config(str(CONFIGS / "salt_R_50_FPN_1x.py"))
    assert isinstance(yaml_cfg, CfgNode) and not q.is_lazy(yaml_cfg)
    assert q.is_lazy(lazy_cfg)
    assert _answers(yaml_cfg) == _answers(lazy_cfg)
    assert _answers(yaml_cfg)[0][3] == ["coco_2017_val"]


def test_overrides_of_each_kind_are_applied():
    yaml_cfg = load_config(str(CONFIGS / "salt_R_50_FPN_1x.yaml"), ["OUTPUT_DIR", "out/a"])
    lazy_cfg = load_config(str(CONFIGS / "salt_R_50_FPN_1x.py"), ["train.output_dir=out/a"])
    assert q.output_dir(yaml_cfg) == q.output_dir(lazy_cfg) == "out/a"


@pytest.mark.parametrize(
    "name, opts",
    [
        ("salt_R_50_FPN_1x.yaml", ["OUTPT_DIR", "x"]),
        ("salt_R_50_FPN_1x.py", ["train.outptu_dir=x"]),
    ],
)
def test_a_misspelt_key_is_refused_for_both_kinds(name, opts):
    with pytest.raises(UnknownConfigKeyError):
        load_config(str(CONFIGS / name), opts)
    assert issubclass(UnknownConfigKeyError, ConfigError)


def test_a_missing_file_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "name, opts, key",
    [
        ("salt_R_50_FPN_1x.yaml", ["DATASETS.TEST", "('my_val',)"], "DATASETS.REGISTER"),
        ("salt_R_50_FPN_1x.py", ["dataloader.test.dataset.names=my_val"], "dataloader.register"),
    ],
)
def test_an_unregistered_dataset_names_the_key_that_registers_it(name, opts, key):
    cfg = load_config(str(CONFIGS / name), opts)
    with pytest.raises(ValueError, match=f"'my_val' is not registered.*{re.escape(key)}"):
        q.register_datasets(cfg)
