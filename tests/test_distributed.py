"""Two CPU processes (gloo) through detectron2's ``launch``: training, evaluation and loss
normalisation reduced across workers."""

import re

import pytest
import torch
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from helpers import ONE_IMAGE_OPTS, free_port, tiny_model, two_image_batch

# detectron2's launch uses NCCL (one process per GPU) whenever CUDA is available.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (gloo) processes only")


def _losses(model, inputs):
    # The tiny model's FrozenBN: a batch-statistics BN would make one 2-image batch differ from
    # two 1-image ones.
    with EventStorage():
        return {k: v.detach() for k, v in model(inputs).items()}


def _rank_losses(out_dir):
    torch.set_num_threads(1)
    rank = comm.get_rank()
    losses = _losses(tiny_model(*ONE_IMAGE_OPTS), two_image_batch()[rank : rank + 1])
    torch.save(losses, f"{out_dir}/losses_{rank}.pth")


def test_loss_normalisation_is_reduced_across_workers(tmp_path):
    launch(_rank_losses, 2, dist_url=f"tcp://127.0.0.1:{free_port()}", args=(str(tmp_path),))
    per_rank = [torch.load(tmp_path / f"losses_{r}.pth") for r in (0, 1)]
    # DDP averages gradients over ranks, so the mean of the ranks' losses must equal the loss of
    # one process seeing both images: the normalisers (positives, quality weights) are global.
    together = _losses(tiny_model(*ONE_IMAGE_OPTS), two_image_batch())
    assert set(per_rank[0]) == set(together)
    for name, value in together.items():
        mean = (per_rank[0][name] + per_rank[1][name]) / 2
        assert mean.item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name
    # Rank 1 has no box: without the reduction its box losses would be normalised by 1.
    assert per_rank[1]["loss_giou"] == 0 and per_rank[0]["loss_giou"] > 0


def test_two_process_training_and_evaluation(two_process_train):
    out, proc = two_process_train
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "World size: 2" in log
    assert re.search(r"iter: 3 .*total_loss: \d", log), log[-4000:]
    assert "Evaluation results for bbox" in log
    assert (out / "model_final.pth").is_file()
