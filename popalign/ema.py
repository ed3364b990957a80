"""Exponential moving average of the trainable parameters."""

from __future__ import annotations

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copies θ̄ ← d·θ̄ + (1 − d)·θ of the trainable parameters of ``model``, kept as buffers.

    Buffers move with the LightningModule and are saved in its checkpoint (``ema.shadow.<i>``), so a
    resumed run continues the average and ``popalign export --ema`` can read it back.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = nn.Module()
        for i, (_, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad):
            self.shadow.register_buffer(str(i), p.detach().clone().float())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        shadows = list(self.shadow.buffers())
        torch._foreach_lerp_(shadows, [p.detach().float() for p in params], 1.0 - self.decay)

    def state_by_name(self) -> dict[str, torch.Tensor]:
        """The averaged parameters keyed by the policy's parameter names."""
        return dict(zip(self.names, self.shadow.buffers()))
