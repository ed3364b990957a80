"""The PopAlign LightningModule: a trainable SDXL UNet against a frozen reference."""

from __future__ import annotations

import os

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from popalign.distributed import FSDP_PREFIX
from popalign.ema import EMA
from popalign.errors import UserError
from popalign.models.loading import (
    DEFAULT_LORA_TARGETS,
    FINGERPRINT_KEY,
    add_lora,
    base_fingerprint,
    frozen_copy,
    load_noise_scheduler,
    load_unet,
    parse_dtype,
)
from popalign.objectives import Objective, ObjectiveOutput, PopAlignLoss
from popalign.optimizer_hooks import OptimizerHooks
from popalign.resume import apply_optimizer_settings, check_resumable, complete_state


class PopAlignModule(OptimizerHooks):
    """Fine-tunes a diffusion UNet with a population-level preference objective.

    Each batch holds P preferred and P dispreferred latents (rows ``i`` and ``i + P`` form a pair from
    the same population group, see ``docs/shards.md``). Per step, every pair shares one noise tensor
    ε and one timestep t; both members are noised, the policy (and, when the objective needs it, the
    frozen reference) predicts the target (ε or v), and the per-sample errors
    ``err = mean((f(x_t, t, c) − target)²)`` in float32 go to the objective.

    Args:
        pretrained_model: hub id or local diffusers folder; the UNet is read from ``unet/`` and the
            noise schedule from ``scheduler/``.
        objective: the preference objective (``popalign.objectives``), chosen in YAML.
        optimizer: optimizer factory; default ``AdamW(lr=5e-7, weight_decay=1e-2)``, the paper's rate.
        lr_scheduler: scheduler factory (stepped every optimizer step), e.g.
            ``popalign.optim.ConstantWithWarmup``; default none (constant).
        lora_rank: train LoRA adapters of this rank instead of the full UNet; the reference is then the
            same UNet with adapters disabled, so no second copy exists.
        lora_alpha: LoRA scaling numerator (default: ``lora_rank``).
        lora_target_modules: module names that get adapters.
        reference_dtype: dtype of the frozen reference copy in full fine-tuning.
        gradient_checkpointing: trade compute for memory in the policy UNet: ``false``, ``true`` (full
            recomputation) or a selective policy name (``save_matmuls``, ``save_attention``; see
            :func:`popalign.models.speed.selective_checkpointing`).
        compile_blocks: ``torch.compile`` the UNets' repeated blocks (regional compilation keeps compile
            time in minutes); ``null`` = off, else the compile mode (``default``, ``max-autotune-no-cudagraphs``).
        channels_last: store conv weights channels-last (faster convolutions on recent GPUs).
        prediction_type: ``epsilon`` or ``v_prediction``; default: the scheduler config's.
        ema_decay: keep an exponential moving average of the trainable weights with this decay,
            updated once per applied optimizer step (not per accumulated micro-batch; skipped
            non-finite steps leave it alone).
        skip_nonfinite: skip an optimizer step whose gradients hold NaN/inf; counted in
            ``train/nonfinite_steps``. Fused optimizers skip on the device; others cost one host sync
            per optimizer step.
        max_nonfinite_steps: abort the run when more steps than this were skipped.
        preservation_weight: weight ``w`` of the identity-prompt preservation term. Each preferred
            member is denoised a second time under its own identity-specific caption ``c_s`` (same ε
            and t as its pair) and ``L_keep = mean_i mean((f_θ(x_t, t, c_s) − f_ref(x_t, t, c_s))²)``
            is added: ``loss = objective + w · L_keep``. It holds the prompts that name a class where
            the reference had them while the neutral prompts move (docs/objectives.md). Needs shards
            with source embeddings (``popalign build`` writes them); costs half a batch more of UNet
            passes. 0 (default) turns it off.
    """

    def __init__(
        self,
        pretrained_model: str,
        objective: Objective | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS,
        reference_dtype: str = "bfloat16",
        gradient_checkpointing: bool | str = False,
        compile_blocks: str | None = None,
        channels_last: bool = False,
        prediction_type: str | None = None,
        ema_decay: float | None = None,
        skip_nonfinite: bool = True,
        max_nonfinite_steps: int = 10,
        preservation_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["objective", "optimizer", "lr_scheduler"])
        self.objective = objective if objective is not None else PopAlignLoss()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.skip_nonfinite = skip_nonfinite
        self.max_nonfinite_steps = max_nonfinite_steps
        if preservation_weight < 0:
            raise UserError(f"model: preservation_weight must be >= 0, got {preservation_weight}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise UserError(f"model: ema_decay must be in (0, 1) (or null for none), got {ema_decay}")
        if lora_rank is not None and lora_rank < 1:
            raise UserError(f"model: lora_rank must be >= 1 (or null for full fine-tuning), got {lora_rank}")
        self.preservation_weight = float(preservation_weight)
        self.needs_reference = self.objective.needs_reference or self.preservation_weight > 0

        self.policy = load_unet(pretrained_model).train()  # from_pretrained returns eval mode
        # recorded in checkpoints so an export onto another base (same architecture) is refused
        self.base_fingerprint = base_fingerprint(self.policy)
        self.noise_scheduler = load_noise_scheduler(pretrained_model)
        self.prediction_type = prediction_type or self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"model: prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        self._batch_checked = False
        self._noise_generator: torch.Generator | None = None  # see _training_generator
        # float32 always, so not a buffer: precision plugins cast float buffers (FSDP's bf16
        # MixedPrecision, bf16-true), and in bf16 1 - alpha_bar rounds to 0 at the first timesteps
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.clone().float()

        self.lora = lora_rank is not None
        self.reference: nn.Module | None = None
        if self.lora:
            add_lora(self.policy, lora_rank, lora_alpha, lora_target_modules)
        elif self.needs_reference:
            self.reference = frozen_copy(self.policy, parse_dtype(reference_dtype))
        self._speed_up(gradient_checkpointing, compile_blocks, channels_last)
        self.ema = EMA(self.policy, ema_decay) if ema_decay is not None else None
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        self._step_grad_norm: torch.Tensor | None = None  # the guard's norm, until clipping takes it
        self._step_skipped: torch.Tensor | None = None  # the guard's on-device skip flag (fused optimizers)

    def _speed_up(self, checkpointing: bool | str, compile_mode: str | None, channels_last: bool) -> None:
        from popalign.models import speed

        if checkpointing is True or checkpointing == "full":
            self.policy.enable_gradient_checkpointing()
        elif checkpointing:
            speed.selective_checkpointing(self.policy, checkpointing)
        unets = [m for m in (self.policy, self.reference) if m is not None]
        for unet in unets:
            if channels_last:
                speed.to_channels_last(unet)
            if compile_mode is not None:
                speed.compile_repeated_blocks(unet, mode=compile_mode)

    def setup(self, stage: str) -> None:
        from popalign.distributed import check_one_unit_dtypes, partitions_weights, zero_stage_3

        check_one_unit_dtypes(self.trainer, self)
        selective = self.hparams.gradient_checkpointing not in (False, True, "full", None)
        if selective and zero_stage_3(self.trainer):
            # measured on two CPU processes (tests/test_deepspeed.py): save_matmuls ended 1 % of the
            # training's movement away from DDP's weights after 3 steps, full checkpointing matched
            raise UserError(
                f"gradient_checkpointing: {self.hparams.gradient_checkpointing} (selective checkpointing) "
                "trains other weights under DeepSpeed ZeRO-3 than under DDP; use gradient_checkpointing: "
                "true (full checkpointing) with ZeRO-3, or another strategy"
            )
        if self.ema is not None and partitions_weights(self.trainer):
            raise UserError(
                f"ema_decay keeps a whole copy of the weights, which {type(self.trainer.strategy).__name__} "
                "keeps in pieces (sharded across processes, or partitioned by ZeRO-3); train with DDP or set "
                "ema_decay: null"
            )

    # ------------------------------------------------------------------ the reference stays frozen
    def train(self, mode: bool = True) -> PopAlignModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # Lightning calls .train() on the whole module every epoch
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ the step
    def _unet(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        batch: dict,
        dtype: torch.dtype | None = None,
    ):
        # inputs in the weights' dtype unless given: float32 for the policy (autocast computes in bf16
        # under bf16-mixed; FSDP casts its units' inputs itself), the reference's own, and bf16 for a
        # policy that DeepSpeed's bf16 mode stores in bf16 without autocast
        dtype = dtype or next(model.parameters()).dtype
        cond = {
            "text_embeds": batch["pooled_prompt_embeds"].to(dtype),
            "time_ids": batch["time_ids"].to(dtype),
        }
        out = model(
            x.to(dtype), t, encoder_hidden_states=batch["prompt_embeds"].to(dtype), added_cond_kwargs=cond
        )
        return out.sample.float()

    def _reference_prediction(self, x: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return self._unet(self.reference, x, t, batch)
            self.policy.disable_adapters()
            try:
                return self._unet(self.policy, x, t, batch)
            finally:
                self.policy.enable_adapters()

    def _schedule(self, device: torch.device) -> torch.Tensor:
        # moved once per device, like a buffer would be (a device comparison costs no sync)
        if self.alphas_cumprod.device != device:
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self.alphas_cumprod

    def noise_and_timesteps(
        self, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ε and one t per pair, shared by its preferred (row i) and dispreferred (row i + P) member."""
        n = latents.shape[0]
        if n % 2:
            raise ValueError(f"a batch holds pairs: expected an even number of rows, got {n}")
        p = n // 2
        noise = torch.randn((p, *latents.shape[1:]), generator=generator, device=latents.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (p,), generator=generator, device=latents.device)
        return noise.repeat(2, 1, 1, 1), t.repeat(2)

    def _training_generator(self, device: torch.device) -> torch.Generator | None:
        """The generator of this training batch's noise and timesteps, seeded from the run's seed
        (``seed_everything``), this process's rank and the batch's index in the run: ranks draw their
        own noise (the global generator, seeded alike on every rank, gave every rank the same ε and t
        in each step), and a resumed run draws what the run it continues would have drawn. None (the
        global generator) outside a trainer. Reseeding a generator costs no device synchronisation."""
        trainer = self._trainer
        if trainer is None:
            return None
        run_seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        words = np.random.SeedSequence([run_seed, trainer.global_rank, trainer.fit_loop.total_batch_idx])
        if self._noise_generator is None or self._noise_generator.device != device:
            self._noise_generator = torch.Generator(device=device)
        return self._noise_generator.manual_seed(int(words.generate_state(1, np.uint64)[0]) >> 1)

    def compute_objective(self, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor) -> ObjectiveOutput:
        """Per-sample denoising errors of policy (and reference) for given noise and timesteps -> objective.

        With ``preservation_weight > 0`` the preferred rows are appended once more, conditioned on their
        own captions, so one UNet call per model covers both terms.
        """
        x0 = batch["latents"].float()
        n = x0.shape[0]
        a = self._schedule(x0.device)[timesteps].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if self.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        cond, t = batch, timesteps
        if self.preservation_weight > 0:
            cond, x_t, t = _with_source_captions(batch, x_t, timesteps)
        policy_pred = self._unet(self.policy, x_t, t, cond)
        policy_err = (policy_pred[:n] - target).pow(2).mean(dim=(1, 2, 3))
        ref_pred = ref_err = None
        if self.needs_reference:
            ref_pred = self._reference_prediction(x_t, t, cond)
            ref_err = (ref_pred[:n] - target).pow(2).mean(dim=(1, 2, 3))
        out = self.objective(policy_err, ref_err, batch["preferred"], batch["group"])
        if self.preservation_weight == 0:
            return out
        keep = (policy_pred[n:] - ref_pred[n:]).pow(2).mean()
        metrics = {**out.metrics, "preservation": keep.detach()}
        return ObjectiveOutput(loss=out.loss + self.preservation_weight * keep, metrics=metrics)

    def check_batch_fits(self, batch: dict) -> None:
        """Refuse, once, a batch whose shapes the UNet cannot take (shards built for another model):
        one line naming the groups and the mismatch instead of a matmul error deep inside the UNet."""
        if self._batch_checked:
            return
        config = self.policy.config
        latents, embeds = batch["latents"], batch["prompt_embeds"]
        problems = []
        if latents.shape[1] != config.in_channels:
            problems.append(f"latents have {latents.shape[1]} channels, the UNet takes {config.in_channels}")
        if embeds.shape[-1] != config.cross_attention_dim:
            problems.append(
                f"prompt_embeds are {list(embeds.shape[1:])}, the UNet's cross_attention_dim is "
                f"{config.cross_attention_dim}"
            )
        if config.get("addition_embed_type") == "text_time":
            pooled, time_ids = batch["pooled_prompt_embeds"].shape[-1], batch["time_ids"].shape[-1]
            got = pooled + time_ids * config.addition_time_embed_dim
            if got != config.projection_class_embeddings_input_dim:
                problems.append(
                    f"pooled_prompt_embeds [{pooled}] and time_ids [{time_ids}] give {got} added-condition "
                    f"inputs, the UNet takes {config.projection_class_embeddings_input_dim}"
                )
        if problems:
            keys = batch.get("keys") or []
            raise UserError(
                f"data: groups {', '.join(map(str, keys[:3]))}{' ...' if len(keys) > 3 else ''} do not fit "
                f"{self.hparams.pretrained_model}: {'; '.join(problems)} (shards built with another model?)"
            )
        self._batch_checked = True

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.check_batch_fits(batch)
        noise, t = self.noise_and_timesteps(
            batch["latents"], self._training_generator(batch["latents"].device)
        )
        out = self.compute_objective(batch, noise, t)
        n = batch["latents"].shape[0]
        # not prog_bar: Lightning would read it back every batch (a host sync); train.py's bars read it
        # on logging steps (popalign.progress_bars)
        self.log("train/loss", out.loss.detach(), batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in out.metrics.items()}, batch_size=n)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.check_batch_fits(batch)
        # fixed noise per batch index, so validation curves compare the same draws across epochs
        g = torch.Generator(device=batch["latents"].device).manual_seed(batch_idx)
        noise, t = self.noise_and_timesteps(batch["latents"], generator=g)
        out = self.compute_objective(batch, noise, t)
        n = batch["latents"].shape[0]
        self.log("val/loss", out.loss, batch_size=n, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in out.metrics.items()}, batch_size=n, sync_dist=True)

    # ------------------------------------------------------------------ checkpoints hold trainable state only
    def frozen_keys(self) -> set[str]:
        """State-dict keys of the frozen weights (the reference copy, LoRA's base), which checkpoints
        leave out: a resumed run reloads them from ``pretrained_model``."""
        keys = {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        if self.reference is not None:
            keys |= {f"reference.{n}" for n, _ in self.reference.named_buffers()}
        # FSDP units show up in parameter names, never in checkpoint keys
        return {k.replace(FSDP_PREFIX, "") for k in keys}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # frozen weights (the reference copy, LoRA's base) are reloaded from `pretrained_model`
        state = checkpoint.get("state_dict")
        if state is None:
            return
        # a sharded checkpoint (FSDP's state_dict_type "sharded") is read back key for key by
        # torch.distributed.checkpoint, which refuses missing keys: there the frozen weights stay
        if not any(type(v) not in (torch.Tensor, nn.Parameter) for v in state.values()):
            for key in self.frozen_keys() & set(state):
                del state[key]
        checkpoint["popalign_frozen_from"] = self.hparams.pretrained_model
        checkpoint[FINGERPRINT_KEY] = self.base_fingerprint

    def on_train_start(self) -> None:
        """After a resume restored the checkpoint's optimizer state: the config's optimizer settings
        (learning rate, weight decay, ...) where they changed (:func:`popalign.resume.apply_optimizer_settings`)."""
        source, configured = (
            getattr(self, "_resumed_from", None),
            getattr(self, "_configured_optimizer", None),
        )
        if source is None or configured is None or not self.trainer.optimizers:
            return
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        apply_optimizer_settings(self.trainer.optimizers[0], configured, schedulers, source)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume under the config given (``train.py`` does not parse the checkpoint's arguments over
        it): refuse what a run cannot change (the base model, full vs LoRA), log the rest, reload the
        frozen weights, and start or drop the EMA when ``ema_decay`` was switched
        (:mod:`popalign.resume`)."""
        source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        check_resumable(checkpoint, source, dict(self.hparams), self.base_fingerprint, self.lora)
        self._resumed_from = source
        state = checkpoint.get("state_dict")
        if state is not None:
            complete_state(state, self.state_dict(), self.frozen_keys(), self.ema)


def _with_source_captions(
    batch: dict, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Append the P preferred rows again, conditioned on their own identity-specific captions."""
    if "source_prompt_embeds" not in batch:
        raise UserError(
            "preservation_weight > 0 needs each preferred member's own caption embedding, and these "
            "shards have none: rebuild them with `popalign build` (without --no-source-embeds) or set "
            "preservation_weight: 0"
        )
    p = batch["source_prompt_embeds"].shape[0]
    emb, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    # outside autocast: under bf16 autocast, cat refuses the shards' float16 embeddings ("Unexpected
    # floating ScalarType in at::autocast::prioritize"); the UNet call casts them afterwards anyway
    with torch.autocast(emb.device.type, enabled=False):
        cond = {
            "prompt_embeds": torch.cat([emb, batch["source_prompt_embeds"].to(emb.dtype)]),
            "pooled_prompt_embeds": torch.cat(
                [pooled, batch["source_pooled_prompt_embeds"].to(pooled.dtype)]
            ),
            "time_ids": torch.cat([batch["time_ids"], batch["time_ids"][:p]]),
        }
        return cond, torch.cat([x_t, x_t[:p]]), torch.cat([t, t[:p]])
