"""Exact resume: N + N iterations with a crash and --resume in between equal 2N straight."""

import itertools
import logging
import shutil

import pytest
import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils.env import seed_all_rng
from helpers import (
    LAZY_TINY_OVERRIDES,
    QUICK_PY,
    QUICK_YAML,
    TINY_OPTS,
    differing_keys,
    final_weights,
)

from saltnet.checkpoint.checkpointer import AtomicCheckpointer
from saltnet.config.checks import ConfigError
from saltnet.config.defaults import load_yaml_config
from saltnet.data import register_datasets_from_cfg
from saltnet.data.image_io import ImageReadError
from saltnet.data.sampler import ResumableBatchSampler
from saltnet.engine.trainer import (
    SALTNetAMPTrainer,
    SALTNetSimpleTrainer,
    SALTNetTrainer,
    build_trainer,
)


def _batches(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_groups_by_aspect_ratio_and_splits_ranks():
    groups = [0, 1] * 10
    ranks = [ResumableBatchSampler(groups, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        for batch in _batches(sampler, 20):
            assert len({groups[i] for i, _ in batch}) == 1
    # One epoch of the stream (20 images = 5 batches of 2 per rank) covers every image once.
    epoch = [i for sampler in ranks for batch in _batches(sampler, 5) for i, _ in batch]
    assert sorted(epoch) == list(range(20))


def test_sampler_is_a_function_of_its_seed_and_skips_to_start_iter():
    groups = [0, 0, 1, 0, 1, 1, 0]
    a = ResumableBatchSampler(groups, 2, seed=5, rank=0, world_size=1)
    b = ResumableBatchSampler(groups, 2, seed=5, rank=0, world_size=1)
    assert _batches(a, 12) == _batches(b, 12)
    b.start_iter = 7
    assert _batches(b, 5) == _batches(a, 12)[7:]
    other = ResumableBatchSampler(groups, 2, seed=6, rank=0, world_size=1)
    assert _batches(other, 12) != _batches(a, 12)
    c = ResumableBatchSampler(groups, 2, seed=None, rank=0, world_size=1)
    c.load_state_dict(a.state_dict())
    assert _batches(c, 12) == _batches(a, 12)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="empty dataset"):
        ResumableBatchSampler([], 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableBatchSampler([0], 0, seed=0)


class _Crash(HookBase):
    """Raise after iteration ``at`` (after the checkpointer hook saved it)."""

    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise RuntimeError("simulated crash")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact CPU kernels
    yield
    torch.set_num_threads(threads)


def _trainer(synthetic_root, out, seed, *extra_opts):
    # 8 iterations, a checkpoint after iteration 3 (the 4th), flips and the LR step included.
    opts = TINY_OPTS + ["SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(6,)", *extra_opts]
    opts += ["SOLVER.CHECKPOINT_PERIOD", "4", "DATASETS.TEST", "()", "SEED", str(seed)]
    opts += ["DATASETS.SYNTHETIC_ROOT", synthetic_root, "OUTPUT_DIR", str(out)]
    cfg = load_yaml_config(QUICK_YAML, opts)
    register_datasets_from_cfg(cfg)
    seed_all_rng(0)  # the same initial weights in every run
    return SALTNetTrainer(cfg)


def _differing(a, b):
    """The parameters and buffers in which trainers ``a`` and ``b`` differ."""
    return differing_keys(a.model.state_dict(), b.model.state_dict())


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    synthetic_root, tmp_path, one_thread
):
    crashed = _trainer(synthetic_root, tmp_path / "resumed", seed=-1)  # a random stream seed
    crashed.register_hooks([_Crash(at=3)])
    crashed.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    assert (tmp_path / "resumed" / "last_checkpoint").read_text() == "model_0000003.pth"

    resumed = _trainer(synthetic_root, tmp_path / "resumed", seed=-1)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert resumed.train_sampler.seed == crashed.train_sampler.seed  # restored from the file
    resumed.train()

    straight = _trainer(synthetic_root, tmp_path / "straight", seed=crashed.train_sampler.seed)
    straight.resume_or_load(resume=False)
    straight.train()
    assert _differing(resumed, straight) == []

    # The check is sensitive: resuming without skipping the batches already seen differs.
    (tmp_path / "resumed" / "last_checkpoint").write_text("model_0000003.pth")
    replayed = _trainer(synthetic_root, tmp_path / "resumed", seed=-1)
    replayed.resume_or_load(resume=True)
    replayed.train_sampler.start_iter = 0
    replayed.train()
    assert _differing(replayed, straight) != []


@pytest.mark.parametrize("amp, precision", [(False, None), (True, "bfloat16"), (True, "float16")])
def test_trainer_replaces_detectron2s_loop_and_checkpointer(
    synthetic_root, tmp_path, amp, precision
):
    opts = ["SOLVER.AMP.ENABLED", str(amp)] + (["SOLVER.AMP.PRECISION", precision] if amp else [])
    trainer = _trainer(synthetic_root, tmp_path, 0, *opts)
    assert type(trainer._trainer) is (SALTNetAMPTrainer if amp else SALTNetSimpleTrainer)
    if amp:
        assert trainer._trainer.precision == getattr(torch, precision)
    # The periodic checkpoints are atomic and carry the sampler's seed.
    assert isinstance(trainer.checkpointer, AtomicCheckpointer)
    assert trainer.checkpointer.checkpointables["train_sampler"] is trainer.train_sampler
    (periodic,) = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert periodic.checkpointer is trainer.checkpointer
    assert trainer._trainer.model is trainer.model and trainer.model is trainer.checkpointer.model


def test_trainer_logs_the_unreadable_images_when_training_ends(synthetic_root, tmp_path, caplog):
    trainer = _trainer(synthetic_root, tmp_path, 0)
    dataset = trainer.data_loader.dataset
    file_name = dataset.dataset_dicts[2]["file_name"]
    dataset._record_unreadable(2, ImageReadError(file_name, "truncated"))  # as a worker does
    (hook,) = [h for h in trainer._hooks if isinstance(h, hooks.CallbackHook)]
    with caplog.at_level(logging.WARNING, logger="saltnet.engine.trainer"):
        hook.after_train()
    assert f"1 unreadable training image(s) skipped 1 time(s) so far: {file_name}" in caplog.text


def test_build_trainer_refuses_an_unknown_amp_precision():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="train.amp.precision.* is 'half'"):
        build_trainer(model, [], optimizer, True, "half")


def test_lazy_config_resume_reproduces_the_uninterrupted_run(lazy_quick_train, run_tool, tmp_path):
    straight, proc = lazy_quick_train
    assert proc.returncode == 0, proc.stderr[-3000:]
    # As if killed after the checkpoint of iteration 3.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "model_0000003.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000003.pth")
    args = ["--config-file", QUICK_PY, "--resume", *LAZY_TINY_OVERRIDES]
    proc = run_tool("train_net.py", *args, f"train.output_dir={resumed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 4" in proc.stdout + proc.stderr
    assert differing_keys(final_weights(straight), final_weights(resumed)) == []
