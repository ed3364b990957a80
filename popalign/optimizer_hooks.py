"""The optimizer side of :class:`popalign.module.PopAlignModule`: the configured optimizer and
schedule, the non-finite gradient guard, clipping by the guard's norm and the EMA update.

:class:`OptimizerHooks` is a mixin for a LightningModule that provides ``trainable_parameters()`` and
the attributes ``optimizer_factory``, ``lr_scheduler_factory`` (callables from the YAML, or ``None``),
``skip_nonfinite``, ``max_nonfinite_steps``, a ``nonfinite_steps`` long buffer, ``ema``
(:class:`popalign.ema.EMA` or ``None``), ``policy``, and ``_step_grad_norm`` / ``_step_skipped``
(``None`` between steps).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from popalign.distributed import check_offloaded_optimizer
from popalign.errors import UserError
from popalign.resume import optimizer_settings


class OptimizerHooks(L.LightningModule):
    """LightningModule hooks for the optimizer step; see the module docstring for what they need."""

    def configure_optimizers(self) -> Any:
        """The YAML's optimizer over :meth:`trainable_parameters` (default ``AdamW(lr=5e-7,
        weight_decay=1e-2)``) and its schedule, stepped every optimizer step (default: none)."""
        optimizer = self._optimizer(self.trainable_parameters())
        check_offloaded_optimizer(self._trainer and self._trainer.strategy, optimizer)
        self._configured_optimizer = optimizer_settings(optimizer)  # before a schedule or a resume moves them
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = _configured("lr_scheduler", self.lr_scheduler_factory, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=5e-7, weight_decay=1e-2)
        return _configured("optimizer", self.optimizer_factory, params)

    def check_optimizer_config(self, strategy: Any = None) -> None:
        """Build the configured optimizer and schedule on a stand-in parameter, so that a value they
        refuse (an ``lr`` below 0, ``total_steps`` not above ``warmup_steps``) or an optimizer the
        ``strategy`` cannot run (:func:`~popalign.distributed.check_offloaded_optimizer`) stops the run
        before it writes anything; other failures of the stand-in are left to :meth:`configure_optimizers`."""
        try:
            optimizer = self._optimizer([nn.Parameter(torch.zeros(1))])
            if self.lr_scheduler_factory is not None:
                _configured("lr_scheduler", self.lr_scheduler_factory, optimizer)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - e.g. an optimizer that wants GPU parameters: checked later
            return
        check_offloaded_optimizer(strategy, optimizer)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """The optimizer step, skipped when the gradients hold NaN/inf (``skip_nonfinite``).

        Fused optimizers (``AdamW(fused=True)``, the SDXL configs' choice) skip on the device: they
        read a ``found_inf`` flag as they do under a GradScaler, so the step needs no host sync and
        the count is checked against ``max_nonfinite_steps`` at logging steps. Other optimizers
        read the flag on the host (one sync) and skip at once. Under ``precision: 16-mixed`` the
        GradScaler does this job and the guard stands aside (no ``train/grad_norm`` either); under
        DeepSpeed its engine does (it clips, and ``train/grad_norm`` is its norm; docs/scaling.md).
        """
        engine = _deepspeed_engine(self.trainer)
        if engine is not None or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # the guard stands aside. fp16 loss scaling: the GradScaler finds overflowing steps, skips
            # them and lowers its scale; a second guard would count its routine overflows and keep it
            # from adapting. DeepSpeed: ZeRO keeps the gradients in its own partitioned buffers (no
            # `.grad` to guard) and clips them itself (trainer.gradient_clip_val becomes its
            # `gradient_clipping`); its engine has the global norm, before clipping, once it stepped
            optimizer.step(closure=optimizer_closure)
            norm = engine.get_global_grad_norm() if engine is not None else None
            if norm is not None:
                self.log("train/grad_norm", torch.as_tensor(norm, dtype=torch.float32), batch_size=1)
            self._update_ema(applied=True, skipped=None)  # their rare skips still move the EMA
            return
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # under Lightning's wrapper
        applied = [True]

        def guarded_closure():
            loss = optimizer_closure()
            norm, applied[0] = self.guard_gradients(torch_optimizer)
            if norm is not None:
                self.log("train/grad_norm", norm, batch_size=1)
            if applied[0]:
                return loss
            optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without gradients
            return None

        optimizer.step(closure=guarded_closure)
        self._update_ema(applied[0], self._step_skipped)
        self.log("train/nonfinite_steps", self.nonfinite_steps.float(), batch_size=1)
        # a logging step reads the metrics back anyway; Lightning counts this step after the hook
        step = self.trainer.global_step + 1
        if _skips_on_device(torch_optimizer) and step % max(1, self.trainer.log_every_n_steps) == 0:
            self._check_nonfinite_limit()

    def guard_gradients(self, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor | None, bool]:
        """After backward: the gradient norm, and whether ``optimizer.step()`` may use the gradients.

        With ``skip_nonfinite`` a NaN/inf norm skips the step: a fused ``optimizer`` gets the flag as
        its ``found_inf`` (it skips on the device, no host sync, always ``True`` here); any other
        costs one host sync and returns ``False`` (the caller drops the gradients). The norm is the
        same number on every rank (DDP averaged the gradients, FSDP's norm is a collective), so
        every rank skips the same steps.
        """
        norm = self._step_grad_norm = self._gradient_norm()  # configure_gradient_clipping reuses it
        self._step_skipped = None
        if norm is None or not self.skip_nonfinite:
            return norm, True
        bad = ~torch.isfinite(norm)
        if _skips_on_device(optimizer):
            optimizer.found_inf = self._step_skipped = bad.float()  # the fused kernels skip when 1
            self.nonfinite_steps += bad
            return norm, True
        if not bad.item():  # the one host sync of the step
            return norm, True
        self.nonfinite_steps += 1
        self._check_nonfinite_limit()
        return norm, False

    def _check_nonfinite_limit(self) -> None:
        skipped = int(self.nonfinite_steps)
        if skipped > self.max_nonfinite_steps:
            raise RuntimeError(
                f"{skipped} optimizer steps had NaN/inf gradients "
                f"(limit max_nonfinite_steps={self.max_nonfinite_steps}); lower the learning rate or beta"
            )

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``trainer.gradient_clip_val`` by norm with the norm :meth:`guard_gradients` took this step
        (over all shards under FSDP, where Lightning refuses to clip), so the gradients are read once:
        ``g <- g * min(1, clip / (norm + 1e-6))``, torch's ``clip_grad_norm_`` formula. Without that
        norm (fp16 loss scaling, where the guard stands aside) clipping is Lightning's or FSDP's own."""
        norm, self._step_grad_norm = self._step_grad_norm, None
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            if norm is not None:
                grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
                if grads:  # none when the guard dropped a non-finite step
                    torch._foreach_mul_(grads, (gradient_clip_val / (norm + 1e-6)).clamp(max=1.0))
                return
            wrapped = self._fsdp_root()
            if wrapped is not None:
                wrapped.clip_grad_norm_(gradient_clip_val)
                return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _fsdp_root(self):
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = self._trainer.model if self._trainer is not None else None
        return wrapped if isinstance(wrapped, FullyShardedDataParallel) else None

    def _gradient_norm(self) -> torch.Tensor | None:
        """The 2-norm of all trainable gradients, over every rank's slice when FSDP shards them.

        Under FSDP a rank may hold no gradient at all (its shard can be frozen weights), so the norm
        comes from the root FSDP module's ``clip_grad_norm_`` with an infinite bound: a collective
        every rank joins, and a multiplication by 1. Elsewhere gradients are whole on every rank.
        """
        wrapped = self._fsdp_root()
        if wrapped is not None:
            return wrapped.clip_grad_norm_(float("inf"))
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def _update_ema(self, applied: bool, skipped: torch.Tensor | None) -> None:
        # once per optimizer step, not per micro-batch: under gradient accumulation a per-batch
        # update would pull the average k times per step (decay d acting as d**k); steps the guard
        # skipped leave it alone (on the host, or through the fused optimizer's on-device flag)
        if self.ema is not None and applied:
            self.ema.update(self.policy, skipped)


def _configured(key: str, factory: Any, arg: Any) -> Any:
    # torch and popalign.optim check their arguments (a negative lr, betas outside [0, 1)) with a
    # ValueError: the config's mistake, one line naming the key
    try:
        return factory(arg)
    except ValueError as err:
        raise UserError(f"model.init_args.{key}: {err}") from None


def _deepspeed_engine(trainer: Any) -> Any:
    """The trainer's ``DeepSpeedEngine`` under Lightning's DeepSpeed strategy, else None."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    return strategy.deepspeed_engine if isinstance(strategy, DeepSpeedStrategy) else None


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    # fused Adam/AdamW/SGD read `found_inf` (GradScaler's flag) inside their kernels
    return getattr(optimizer, "_step_supports_amp_scaling", False)
