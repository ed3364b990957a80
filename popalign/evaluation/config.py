"""The settings of one evaluation (the fields of ``popalign evaluate``'s flags)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from popalign.errors import UserError


@dataclass
class EvalConfig:
    """Everything one evaluation needs; :func:`evaluate_model` and the CLI take the same fields.

    Prompt sets are files or shipped names (``occupations_eval``, ``specific_eval``, ``generic_eval``);
    ``specific="expand"`` uses the neutral prompts expanded over the axes (one prompt per joint class).
    ``images`` evaluates images already written by ``popalign generate`` (their prompt table decides
    neutral/augmented) instead of sampling; ``labels`` reuses a ``popalign label`` table for them.
    """

    model: str | None = None
    unet: str | None = None
    lora: str | None = None
    vae: str | None = None
    dtype: str = "float32"
    device: str | None = None
    neutral: str | None = "occupations_eval"
    template: str | None = None
    specific: str | None = None
    generic: str | None = None
    axes: list[str] = field(default_factory=lambda: ["gender", "race"])
    target: list[float] | None = None
    classifier: str = "clip"
    classifier_model: str | None = None
    adherence: str | None = None
    images_per_prompt: int = 8
    specific_images_per_prompt: int | None = None  # None: images_per_prompt

    seed: int = 0
    steps: int = 30
    guidance_scale: float = 5.0
    height: int = 1024
    width: int = 1024
    batch_size: int = 4
    baseline: str | None = None
    images: str | None = None
    labels: str | None = None
    fid_reference: str | None = None
    fid_features: str = "inception"
    clip_model: str | None = None
    bootstrap: int = 1000
    out: str | None = None
    overwrite: bool = False
    progress: bool = True

    def images_for(self, kind: str) -> int:
        """Images sampled per prompt of this kind (specific prompts name their classes: fewer suffice)."""
        if kind == "specific" and self.specific_images_per_prompt is not None:
            return self.specific_images_per_prompt
        return self.images_per_prompt

    def check(self) -> None:
        """``UserError`` for settings no run can use (before anything is loaded)."""
        if (self.model is None) == (self.images is None):
            raise UserError(
                "give exactly one of --model (sample a model) and --images (evaluate stored images)"
            )
        if self.specific_images_per_prompt is not None and self.specific_images_per_prompt < 1:
            raise UserError(f"specific_images_per_prompt must be >= 1, got {self.specific_images_per_prompt}")
        for name in ("images_per_prompt", "steps", "height", "width", "batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.height % 8 or self.width % 8:
            raise UserError(f"--height and --width must be multiples of 8, got {self.height}x{self.width}")
        if not math.isfinite(self.guidance_scale):
            raise UserError(f"--guidance-scale must be a finite number, got {self.guidance_scale}")
        if self.fid_features not in ("inception", "pixel"):
            raise UserError(f"--fid-features must be inception or pixel, got {self.fid_features!r}")
        if self.images and (self.baseline or self.unet or self.lora):
            raise UserError("--baseline, --unet and --lora need a --model to sample; not with --images")
        if self.labels and not self.images:
            raise UserError("--labels labels stored --images; it needs --images")
        if self.unet and self.lora:
            raise UserError("give --unet (a full aligned UNet) or --lora (adapters), not both")
        self._check_sources()

    def _check_sources(self) -> None:
        """A missing local path (``./x``, ``/x``, ``a/b/c``) is an error here, not a lookup on the hub."""
        from popalign.models.loading import check_model_source

        for flag in ("model", "unet", "lora", "vae", "baseline", "clip_model", "classifier_model"):
            if getattr(self, flag):
                check_model_source(getattr(self, flag), f"--{flag.replace('_', '-')}")
