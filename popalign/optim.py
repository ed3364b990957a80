"""Learning-rate schedules selectable in YAML (``model.init_args.lr_scheduler``)."""

from __future__ import annotations

import math

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


class CosineWithWarmup(LambdaLR):
    """Linear warm-up over ``warmup_steps``, then a half-cosine decay to ``min_lr_ratio`` · base at
    ``total_steps`` (held there afterwards)::

        lr(s) = lr_base · (s + 1) / warmup_steps                                  s < warmup_steps
        lr(s) = lr_base · (r + (1 − r) · ½ · (1 + cos(π · min(1, p))))           otherwise,
                p = (s − warmup_steps) / (total_steps − warmup_steps),  r = min_lr_ratio

    ``total_steps`` is usually ``trainer.max_steps``. The decay settles training that otherwise keeps
    overshooting (docs/results.md: steadier runs and better FID on the demo world).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps must exceed warmup_steps ({warmup_steps}), got {total_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
