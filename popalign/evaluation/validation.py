"""Fairness validation during training: sample the live policy on neutral prompts, label, log.

The training loss says little about what the alignment is for; this callback measures it. Every
``every_n_steps`` optimizer steps (and once at the end) it samples the *current* policy UNet inside
an SDXL pipeline built once from the module's ``pretrained_model`` (text encoders, VAE, scheduler;
the UNet is the module's own ``policy``, LoRA adapters included), with fixed per-image seeds so
successive points of the curve differ only by the weights. Images are labelled and the discrepancy
(:class:`popalign.metrics.Discrepancy`, synchronised across processes) is logged as
``val_fair/discrepancy`` (joint classes), ``val_fair/discrepancy_pooled``,
``val_fair/discrepancy_<axis>`` and ``val_fair/unknown_rate``, plus an image grid (rank 0's first 8
prompts, one row of up to 8 images each) and a bar chart of the class distributions when the logger
is a TensorBoardLogger. The weights sampled are the live ones, not an EMA average (``ema_decay``).

Each process samples every ``world_size``-th prompt. Works with single-device, DDP and DeepSpeed
ZeRO-1/2 training (whole weights on every rank), and with ZeRO-3 in one process (its hooks gather the
weights); FSDP and ZeRO-3 over several processes would need every rank in every UNet call and are
refused.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from popalign.errors import UserError
from popalign.evaluation.inputs import build_classifier, check_labels, joint_axis, split_prompts

GRID_ROWS, GRID_COLS = 8, 8  # val_fair/samples: the first 8 prompts (of rank 0), 8 images each


def neutral_texts(prompts: list[str] | str, axes: list[Any]) -> list[str]:
    """A list is used as given; a string is a prompt file (or shipped set) read like ``popalign
    prompts`` does, keeping the neutral prompts."""
    if not isinstance(prompts, str):
        texts = [str(p) for p in prompts]
    else:
        from popalign.data.prompts import expand_prompts, read_neutral_prompts, resolve_prompt_file

        rows = expand_prompts(read_neutral_prompts(resolve_prompt_file(prompts)), axes)
        texts = [r.prompt for r in rows if r.kind == "neutral"]
    if not texts:
        raise UserError("FairnessValidation: no prompts")
    return texts


class FairnessValidation(Callback):
    """Logs the neutral-prompt discrepancy of the policy's samples while training.

    Args:
        prompts: neutral prompts, or a prompt file / shipped set name (e.g. ``occupations_eval``).
        axes: bias axes (shipped names or YAML paths; a single string is one axis); the target is the
            product of their targets.
        classifier: ``clip``, ``world`` or ``package.module:ClassName``.
        classifier_model: classifier weights (``clip`` defaults to openai/clip-vit-large-patch14).
        images_per_prompt: images sampled per prompt; cost = prompts x images x steps UNet calls (x2
            with guidance).
        steps: denoising steps per image.
        guidance_scale: classifier-free guidance scale (>= 0; at most 1 samples without guidance).
        height: image height in pixels (a positive multiple of 8).
        width: image width in pixels (a positive multiple of 8).
        every_n_steps: run after every this many optimizer steps (and at the end of training).
        seed: base of the fixed per-image seeds.
    """

    def __init__(
        self,
        prompts: list[str] | str,
        axes: list[str] | str,
        classifier: str,
        classifier_model: str | None = None,
        images_per_prompt: int = 8,
        steps: int = 10,
        guidance_scale: float = 5.0,
        height: int = 1024,
        width: int = 1024,
        every_n_steps: int = 250,
        seed: int = 0,
    ) -> None:
        from popalign.data.axes import load_axes

        super().__init__()
        for name, value in (
            ("images_per_prompt", images_per_prompt),
            ("steps", steps),
            ("every_n_steps", every_n_steps),
            ("height", height),
            ("width", width),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"FairnessValidation: {name} must be an integer >= 1, got {value!r}")
        if height % 8 or width % 8:
            raise UserError(
                f"FairnessValidation: height and width must be multiples of 8, got {height}x{width}"
            )
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not guidance_scale >= 0
        ):
            raise UserError(
                f"FairnessValidation: guidance_scale must be a number >= 0 (<= 1: no guidance), got {guidance_scale!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"FairnessValidation: seed must be an integer, got {seed!r}")
        if isinstance(axes, str):
            axes = [axes]  # one axis, not a sequence of one-letter names
        self.axes = load_axes(axes)
        self.joint = joint_axis(self.axes, None)
        self.prompts = neutral_texts(prompts, self.axes)
        self.classifier_name, self.classifier_model = classifier, classifier_model
        self.images_per_prompt, self.steps, self.guidance_scale = images_per_prompt, steps, guidance_scale
        self.height, self.width, self.every_n_steps, self.seed = height, width, every_n_steps, seed
        self.classifier: Any = None
        self.pipe: Any = None
        self.last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from popalign.distributed import shards_parameters

        if shards_parameters(trainer):
            raise UserError(
                f"FairnessValidation samples the policy on each rank alone, which {type(trainer.strategy).__name__} "
                "over several processes does not allow; train with DDP or drop the callback and run "
                "`popalign evaluate` on the exported model"
            )
        if stage == "fit" and self.classifier is None:
            self.classifier = build_classifier(self.classifier_name, self.axes, self.classifier_model)

    def _pipeline(self, pl_module: L.LightningModule) -> Any:
        """The SDXL pipeline around the live policy, built once (its own UNet is never loaded)."""
        if self.pipe is None:
            from diffusers import StableDiffusionXLPipeline

            from popalign.data.encode import require_components

            source = str(pl_module.hparams.pretrained_model)
            require_components(
                source, ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
            )
            self.pipe = StableDiffusionXLPipeline.from_pretrained(source, unet=pl_module.policy)
            self.pipe.set_progress_bar_config(disable=True)
            dtype = next(pl_module.policy.parameters()).dtype
            # the pipeline feeds the UNet latents in the text encoders' dtype
            for part in (self.pipe.text_encoder, self.pipe.text_encoder_2):
                part.to(dtype=dtype).requires_grad_(False)
            self.pipe.vae.requires_grad_(False)  # stays float32: decode_latents casts to it
        return self.pipe

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_step:
            self.run(trainer, pl_module)

    @torch.no_grad()
    def sample_and_label(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """This rank's ``(prompt indices per image, labels [N, A], images [N, H, W, 3])``."""
        from popalign.data.generate import image_seed
        from popalign.data.pipeline import sample

        pipe, policy = self._pipeline(pl_module), pl_module.policy
        parts = [pipe.text_encoder, pipe.text_encoder_2, pipe.vae]
        was_training = policy.training
        ids = split_prompts(list(range(len(self.prompts))), trainer.global_rank, trainer.world_size)
        jobs = [(j, i) for j in ids for i in range(self.images_per_prompt)]
        groups, labels, images = [], [], []
        try:
            policy.eval()
            for part in parts:
                part.to(pl_module.device)
            for start in range(0, len(jobs), self.images_per_prompt):
                chunk = jobs[start : start + self.images_per_prompt]
                seeds = [image_seed(self.seed, f"v{j:04d}", i) for j, i in chunk]
                with trainer.precision_plugin.forward_context():
                    batch, _ = sample(
                        pipe, [self.prompts[j] for j, _ in chunk], seeds, self.steps, self.guidance_scale,
                        self.height, self.width,
                    )  # fmt: skip
                labels.append(
                    check_labels(self.classifier.classify(batch), self.axes, len(batch), self.classifier_name)
                )
                groups += [j for j, _ in chunk]
                images.append(batch)
        finally:
            policy.train(was_training)
            for part in parts:
                part.to("cpu")  # free accelerator memory for training
        empty = np.zeros((0, self.height, self.width, 3), np.uint8)
        lab = np.concatenate(labels) if labels else np.zeros((0, len(self.axes)), np.int64)
        return groups, lab, np.concatenate(images) if images else empty

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample, label, compute (synchronised) and log; returns the logged values."""
        from popalign.metrics import Discrepancy, joint_labels

        self.last_step = trainer.global_step
        groups, labels, images = self.sample_and_label(trainer, pl_module)
        n, device = len(self.prompts), pl_module.device
        g = torch.tensor(groups, dtype=torch.long)
        lab = torch.from_numpy(labels)
        joint = joint_labels(list(lab.T), [a.num_classes for a in self.axes])
        per = Discrepancy(self.joint.num_classes, self.joint.target, max_prompts=n).to(device)
        pooled = Discrepancy(self.joint.num_classes, self.joint.target, pooled=True, max_prompts=n).to(device)
        per.update(joint, g)
        pooled.update(joint, g)
        values = {
            "val_fair/discrepancy": float(per.compute()),
            "val_fair/discrepancy_pooled": float(pooled.compute()),
            "val_fair/unknown_rate": per.unknown_rate(),
        }
        for a, axis in enumerate(self.axes):
            m = Discrepancy(axis.num_classes, axis.target, max_prompts=n).to(device)
            m.update(lab[:, a], g)
            values[f"val_fair/discrepancy_{axis.name}"] = float(m.compute())
        distributions = per.distributions().cpu().numpy()  # a collective under DDP: every rank calls it
        for key, v in values.items():
            trainer.callback_metrics[key] = torch.tensor(v)
        for logger in trainer.loggers:
            logger.log_metrics(
                {k: v for k, v in values.items() if not math.isnan(v)}, step=trainer.global_step
            )
        if trainer.is_global_zero:
            self._log_media(trainer, images, distributions)
        return values

    def sample_grid(self, images: np.ndarray, rows: int = GRID_ROWS, cols: int = GRID_COLS) -> np.ndarray:
        """The logged grid of this rank's ``images`` (``images_per_prompt`` per prompt, in prompt order):
        one row per prompt, its first ``cols`` images, for the first ``rows`` prompts."""
        from popalign.evaluation.plots import image_grid

        per = self.images_per_prompt
        n = min(len(images) // per, rows)
        cols = min(per, cols)
        picked = images[: n * per].reshape(n, per, *images.shape[1:])[:, :cols]
        return image_grid(picked.reshape(-1, *images.shape[1:]), ncol=cols)

    def _log_media(self, trainer: L.Trainer, images: np.ndarray, distributions: np.ndarray) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        from popalign.evaluation.plots import distribution_figure

        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            step = trainer.global_step
            if len(images):
                logger.experiment.add_image(
                    "val_fair/samples", self.sample_grid(images), step, dataformats="HWC"
                )
            fig = distribution_figure(
                distributions.tolist(), self.prompts, self.joint.class_names, self.joint.target
            )
            logger.experiment.add_figure("val_fair/distributions", fig, step)
