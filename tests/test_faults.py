"""Faults during training: a non-finite loss is named, by the fp32 and the AMP trainer."""

import pytest
import torch
from detectron2.engine import HookBase
from helpers import QUICK_YAML, TINY_OPTS

from saltnet.config.defaults import load_yaml_config
from saltnet.data import register_datasets_from_cfg
from saltnet.engine.trainer import SALTNetAMPTrainer, SALTNetTrainer


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


def test_amp_trainer_is_chosen_and_names_a_non_finite_loss_too(synthetic_root, tmp_path):
    """SOLVER.AMP.ENABLED selects SALTNetAMPTrainer (detectron2's AMPTrainer, which skips a step
    whose gradients overflow); it names a non-finite loss term like the fp32 trainer. Its step
    needs CUDA, so the check is called here with the losses of a diverged step."""
    opts = TINY_OPTS + ["DATASETS.TEST", "()", "DATASETS.SYNTHETIC_ROOT", synthetic_root]
    opts += ["SOLVER.AMP.ENABLED", "True", "OUTPUT_DIR", str(tmp_path)]
    cfg = load_yaml_config(QUICK_YAML, opts)
    register_datasets_from_cfg(cfg)
    trainer = SALTNetTrainer(cfg)._trainer
    assert isinstance(trainer, SALTNetAMPTrainer)
    losses = {"loss_cls": torch.tensor(0.5), "loss_giou": torch.tensor(float("inf"))}
    with pytest.raises(FloatingPointError, match="Non-finite loss loss_giou at iteration 0"):
        trainer._write_metrics(losses, data_time=0.0)
