"""AtomicCheckpointer: an interrupted save never destroys the last good checkpoint."""

import os

import pytest
import torch
from torch import nn

from saltnet.checkpoint.checkpointer import AtomicCheckpointer


class _Interrupted(Exception):
    pass


def _checkpointer(tmp_path, value):
    model = nn.Linear(3, 2)
    nn.init.constant_(model.weight, value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, AtomicCheckpointer(model, str(tmp_path), optimizer=optimizer)


def test_save_then_resume_roundtrip(tmp_path):
    _, checkpointer = _checkpointer(tmp_path, 1.0)
    checkpointer.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    model, fresh = _checkpointer(tmp_path, 0.0)
    extra = fresh.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    assert torch.equal(model.weight, torch.ones(2, 3))


@pytest.mark.parametrize("crash_point", ["torch.save", "tag_last_checkpoint"])
def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, crash_point):
    _, checkpointer = _checkpointer(tmp_path, 1.0)
    checkpointer.save("model_0000009", iteration=9)
    good = (tmp_path / "model_0000009.pth").read_bytes()

    _, later = _checkpointer(tmp_path, 2.0)
    if crash_point == "torch.save":
        real_save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)  # a partial file on disk, then the process "dies"
            raise _Interrupted()

        monkeypatch.setattr(torch, "save", save_half_then_die)
        with pytest.raises(_Interrupted):
            later.save("model_0000019", iteration=19)
        assert not (tmp_path / "model_0000019.pth").exists()
    else:

        def die(*args, **kwargs):
            raise _Interrupted()

        monkeypatch.setattr(os, "replace", die)
        with pytest.raises(_Interrupted):
            later.save("model_0000019", iteration=19)
    monkeypatch.undo()

    # The last good checkpoint is intact and still the one resume picks.
    assert (tmp_path / "model_0000009.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    model, fresh = _checkpointer(tmp_path, 0.0)
    assert fresh.resume_or_load("", resume=True)["iteration"] == 9
    assert torch.equal(model.weight, torch.ones(2, 3))


def test_finetuning_with_another_class_count_drops_only_the_classifier(tmp_path, caplog):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from helpers import tiny_cfg

    cfg = tiny_cfg()
    source = build_model(cfg)
    AtomicCheckpointer(source, str(tmp_path)).save("model_final")

    cfg.MODEL.SALTNET.NUM_CLASSES = 7
    target = build_model(cfg)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level("WARNING"):
        DetectionCheckpointer(target).load(str(tmp_path / "model_final.pth"))
    skipped = {
        k
        for k, v in target.state_dict().items()
        if torch.equal(v, before[k]) and not torch.equal(v, source.state_dict()[k])
    }
    assert skipped == {"head.cls_score.weight", "head.cls_score.bias"}
    assert "head.cls_score.weight" in caplog.text and "incompatible shapes" in caplog.text


def test_checkpoint_of_another_architecture_loads_what_fits_or_is_refused(tmp_path, caplog):
    from detectron2.modeling import build_model
    from helpers import tiny_cfg

    from saltnet.checkpoint.checkpointer import CheckpointMismatchError

    model = build_model(tiny_cfg())
    state = model.state_dict()
    # Same backbone, another head (as a RetinaNet or FCOS checkpoint): the backbone loads, the
    # head keys are named in the log and keep their initialisation.
    other_head = {k.replace("head.", "other_head."): v + 1 for k, v in state.items()}
    torch.save({"model": other_head}, tmp_path / "other_head.pth")
    target = build_model(tiny_cfg())
    head_before = target.head.cls_score.weight.clone()
    with caplog.at_level("WARNING"):
        AtomicCheckpointer(target).load(str(tmp_path / "other_head.pth"))
    assert torch.equal(target.head.cls_score.weight, head_before)
    name = next(k for k in state if k.startswith("backbone."))
    assert torch.equal(target.state_dict()[name], state[name] + 1)
    assert "head.cls_score" in caplog.text and "other_head" in caplog.text

    # Nothing fits (an unconverted or unrelated file): refused, naming the file and the tools.
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "unrelated.pth")
    with pytest.raises(
        CheckpointMismatchError, match="unrelated.pth.*none of its 1 tensors fits"
    ) as e:
        AtomicCheckpointer(build_model(tiny_cfg())).load(str(tmp_path / "unrelated.pth"))
    assert "convert_backbone_weights.py" in str(e.value)


_SAVE_FOREVER = """
import sys, torch
from torch import nn
from saltnet.checkpoint.checkpointer import AtomicCheckpointer
model = nn.Linear(1000, 2000)  # 8 MB: each save takes a while
checkpointer = AtomicCheckpointer(model, sys.argv[1])
for iteration in range(10**9):
    with torch.no_grad():
        model.weight.fill_(iteration)
    checkpointer.save("model_final", iteration=iteration)  # always over the same file
    print(iteration, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.031, 0.057])
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path, delay):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVE_FOREVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    for _ in range(3):  # a few saves done, the next ones under way
        proc.stdout.readline()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    model = nn.Linear(1000, 2000)
    extra = AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] >= 2
    assert torch.all(model.weight == extra["iteration"])  # the file is whole and consistent


def test_missing_weights_file_is_named(tmp_path):
    _, checkpointer = _checkpointer(tmp_path, 1.0)
    with pytest.raises(FileNotFoundError, match="nope.pth.*does not exist"):
        checkpointer.load(str(tmp_path / "nope.pth"))
    assert checkpointer.load("") == {}  # no weights: random initialisation, as detectron2


def test_running_loss_normaliser_is_saved_and_resumed(tmp_path):
    """detectron2's RetinaNet / FCOS keep an EMA of the positive count outside the state dict;
    the checkpoint carries it, so that a resumed run continues it instead of restarting."""
    from detectron2.config import instantiate
    from test_plugin import small_lazy_model

    lazy = small_lazy_model("retinanet")  # detectron2's own RetinaNet
    model = instantiate(lazy)
    model._ema_update("loss_normalizer", 40.0, 100)  # 100 x 0.9 + 40 x 0.1 = 94
    AtomicCheckpointer(model, str(tmp_path)).save("model_0000009")
    assert torch.load(tmp_path / "model_0000009.pth", weights_only=False)["loss_normalizers"] == {
        "loss_normalizer": pytest.approx(94.0)
    }
    fresh = instantiate(lazy)
    AtomicCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert fresh.loss_normalizer == pytest.approx(94.0)
    # Loading weights only (not resuming) leaves it alone.
    other = instantiate(lazy)
    AtomicCheckpointer(other).resume_or_load(str(tmp_path / "model_0000009.pth"), resume=False)
    assert not hasattr(other, "loss_normalizer")
