"""SALT-Net LR schedules: linear warm-up over 500 iterations from 0.001 x lr, then x0.1 steps.

1x = 12 COCO epochs at batch 16 (90k iterations, steps at 60k and 80k); 2x = 24 epochs (180k,
steps at 120k and 160k). For another batch size B scale the iterations by 16 / B.
"""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler


def multi_step_schedule(max_iter, steps, warmup_iters=500):
    """LR multiplier: linear warm-up, then x0.1 at each of ``steps`` (iterations)."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[0.1**k for k in range(len(steps) + 1)],
            milestones=list(steps),
            num_updates=max_iter,
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=0.001,
    )


lr_multiplier_1x = multi_step_schedule(90000, (60000, 80000))
lr_multiplier_2x = multi_step_schedule(180000, (120000, 160000))
