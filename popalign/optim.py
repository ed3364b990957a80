"""Learning-rate schedules selectable in YAML (``model.init_args.lr_scheduler``)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class ConstantWithWarmup(LambdaLR):
    """Linear warm-up from 0 to the base learning rate over ``warmup_steps`` optimizer steps, then constant.

    lr(s) = lr_base · min(1, (s + 1) / warmup_steps)   (the PopAlign recipe: 200 warm-up steps).
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 200, last_epoch: int = -1) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)
