"""LazyConfig overrides with unknown keys are rejected (detectron2 would add them silently)."""

import pytest
from detectron2.config import LazyConfig
from helpers import QUICK_PY, REPO_ROOT

from saltnet.config.checks import UnknownConfigKeyError
from saltnet.config.lazy_overrides import check_lazy_overrides

LAZY = str(REPO_ROOT / QUICK_PY)


@pytest.fixture(scope="module")
def cfg():
    return LazyConfig.load(LAZY)


def test_existing_keys_and_unset_arguments_of_lazy_calls_are_accepted(cfg):
    check_lazy_overrides(
        cfg,
        [
            "train.max_iter=5",
            "model.num_classes=3",
            "dataloader.train.num_workers=0",
            "optimizer.nesterov=True",  # torch.optim.SGD's argument, not written in the file
            "train.amp.precision=bfloat16",
            "+train.my_new_key=1",  # an explicit addition
        ],
    )


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.max_iters=5", "train.max_iter"),
        ("optimizer.momentun=0.8", "optimizer.momentum"),
        ("dataloader.train.num_worker=0", "dataloader.train.num_workers"),
        ("optimizer.nesterow=True", "optimizer.nesterov"),
    ],
)
def test_misspelt_keys_are_named_with_the_closest_valid_ones(cfg, override, suggestion):
    with pytest.raises(UnknownConfigKeyError) as info:
        check_lazy_overrides(cfg, ["train.max_iter=5", override])
    message = str(info.value)
    key = override.split("=")[0]
    assert f"Unknown config key '{key}' (from the command line)" in message
    assert suggestion in message.split("Did you mean: ")[1]
    assert f"+{override}" in message


def test_train_net_rejects_a_misspelt_lazy_override(run_tool):
    proc = run_tool("train_net.py", "--config-file", LAZY, "train.max_iters=5")
    assert proc.returncode != 0
    assert "Unknown config key 'train.max_iters'" in proc.stderr
    assert "Starting training" not in proc.stdout + proc.stderr
