"""Faults during training: a non-finite loss is named; gradient overflow under a GradScaler skips
the step without touching the weights."""

import pytest
import torch
from conftest import QUICK_YAML, TINY_OPTS, two_image_batch
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from saltnet.config import load_yaml_config
from saltnet.data import register_datasets_from_cfg
from saltnet.engine import SALTNetTrainer


class _PoisonBoxBranch(HookBase):
    """Before iteration ``at``, set the box regression weights to NaN (a diverged model)."""

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            with torch.no_grad():
                self.trainer.model.head.bbox_pred.weight.fill_(float("nan"))


def test_non_finite_loss_names_the_terms_and_the_iteration(synthetic_root, tmp_path):
    opts = TINY_OPTS + ["DATASETS.TEST", "()", "DATASETS.SYNTHETIC_ROOT", synthetic_root]
    cfg = load_yaml_config(QUICK_YAML, opts + ["OUTPUT_DIR", str(tmp_path)])
    register_datasets_from_cfg(cfg)
    trainer = SALTNetTrainer(cfg)
    trainer.register_hooks([_PoisonBoxBranch(at=2)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert "at iteration 2 on rank 0" in message
    bad_terms = message.split("Non-finite loss ")[1].split(" at iteration")[0].split(", ")
    assert "loss_giou" in bad_terms and "loss_dfl" in bad_terms
    assert "SOLVER.BASE_LR" in message


def test_gradient_overflow_under_a_grad_scaler_skips_the_step():
    # detectron2's AMPTrainer needs CUDA; its GradScaler logic is the same on the CPU.
    torch.manual_seed(0)
    model = build_model(load_yaml_config(QUICK_YAML, ["MODEL.RESNETS.NORM", "FrozenBN"])).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # scaled loss overflows fp32
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def step():
        optimizer.zero_grad()
        with EventStorage():
            losses = model(two_image_batch())
        assert all(torch.isfinite(v) for v in losses.values())  # the loss itself is fine
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    step()
    assert scaler.get_scale() == 2.0**126  # overflow found: scale halved ...
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ... no update
    scaler.update(2.0**10)
    step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values())
