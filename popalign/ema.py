"""Exponential moving average of the trainable parameters."""

from __future__ import annotations

import torch
from torch import nn

_CHUNK = 64  # tensors per step of a device-weighted update


class EMA(nn.Module):
    """Shadow copies θ̄ ← d·θ̄ + (1 − d)·θ of the trainable parameters of ``model``, kept as buffers.

    Buffers move with the LightningModule and are saved in its checkpoint (``ema.shadow.<i>``), so a
    resumed run continues the average and ``popalign export --ema`` can read it back. They stay
    float32 whatever dtype the module is cast to (``precision: bf16-true`` casts every float
    buffer): at bf16's resolution an update ``(1 − d)·(θ − θ̄)`` rounds away and the average stalls.
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

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        super()._apply(fn, recurse)
        for name, buf in self.shadow._buffers.items():
            if buf is not None and buf.dtype != torch.float32:
                self.shadow._buffers[name] = buf.float()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module, skipped: torch.Tensor | None = None) -> None:
        """One step of the average; call it once per *applied* optimizer step.

        Args:
            model: the model whose trainable parameters are averaged (the one given at construction).
            skipped: optional 0-dim tensor, 1 when this optimizer step was skipped on the device (a
                fused optimizer's ``found_inf``); the average then stays put, without a host sync.
        """
        params = [p.detach().float() for p in model.parameters() if p.requires_grad]
        shadows = list(self.shadow.buffers())
        if skipped is None:
            torch._foreach_lerp_(shadows, params, 1.0 - self.decay)
            return
        # θ̄ += w·(θ − θ̄) with w on the device: torch's lerp takes its weight as a Python number
        # (a tensor there is read back, a host sync each step), foreach mul takes a 0-dim tensor.
        # In chunks, so the difference held at once stays small next to the model.
        weight = ((1.0 - self.decay) * (1.0 - skipped.float())).to(shadows[0].device)
        for lo in range(0, len(shadows), _CHUNK):
            chunk = shadows[lo : lo + _CHUNK]
            delta = torch._foreach_sub(params[lo : lo + _CHUNK], chunk)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(chunk, delta)

    def state_by_name(self) -> dict[str, torch.Tensor]:
        """The averaged parameters keyed by the policy's parameter names."""
        return dict(zip(self.names, self.shadow.buffers()))
