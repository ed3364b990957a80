"""Encoding for the model: SDXL text conditioning and the VAE's latent <-> image conversions.

``StableDiffusionXLPipeline.encode_prompt`` tokenises a caption with each tokenizer (padded and
truncated to ``model_max_length``, 77 for CLIP), takes the *penultimate* hidden states of both
text encoders and concatenates them, ``[77, 768 + 1280] = [77, 2048]``; the pooled embedding is the
projected output of the second encoder, ``[1280]``. :class:`TextEncoders` reproduces that (no
attention mask, as the pipeline passes none), so a caption encoded here and one encoded by the
pipeline at sampling time are the same tensor. ``build`` encodes each neutral caption once.

:func:`decode_latents` and :func:`encode_images` convert between uint8 images and *scaled* latents
(the UNet's space) with the VAE config's ``scaling_factor`` (and ``shift_factor`` / latent
statistics where a VAE has them), as the pipeline does.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from popalign.errors import UserError, load_reason

log = logging.getLogger(__name__)

TEXT_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")  # "org/name"; paths with more parts are folders


def require_components(model: str, components: Sequence[str]) -> None:
    """For a local diffusers folder, check ``model_index.json`` and each component's sub-folder.

    Hub ids are left to ``from_pretrained`` (which reports its own errors). Raises ``UserError``
    naming the folder and the missing part, e.g. ``no 'text_encoder_2/' folder``.
    """
    path = Path(model)
    if not path.exists():
        if not _HUB_ID.fullmatch(model):
            raise UserError(f"{model}: model folder not found")
        return  # a hub id such as stabilityai/stable-diffusion-xl-base-1.0
    if not path.is_dir():
        raise UserError(f"{model}: not a folder; expected a diffusers pipeline folder or a hub id")
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"{model}: no model_index.json; expected a diffusers pipeline folder (save_pretrained)"
        )
    for name in components:
        if not (path / name).is_dir():
            raise UserError(f"{model}: no '{name}/' folder; the pipeline is missing its {name}")


def time_ids(height: int, width: int) -> np.ndarray:
    """SDXL micro-conditioning for an uncropped image: ``(H, W, 0, 0, H, W)``, float32 ``[6]``.

    Original size (h, w), crop top-left (y, x) and target size (h, w), as the pipeline builds them
    when sampling at ``height x width`` without crop or size overrides.
    """
    return np.array([height, width, 0, 0, height, width], dtype=np.float32)


def decode_latents(vae: Any, latents: Any) -> np.ndarray:
    """Scaled latents ``[N, 4, h, w]`` -> uint8 images ``[N, H, W, 3]``, as the pipeline decodes them.

    ``z / scaling_factor`` (or ``z * std / scaling_factor + mean`` when the VAE config has latent
    statistics), ``+ shift_factor`` when set; decoded in the VAE's own dtype; ``x / 2 + 0.5`` clipped
    to [0, 1] and rounded to 8 bits.
    """
    import torch

    cfg = vae.config
    param = next(vae.parameters())
    z = torch.as_tensor(latents).to(param.device, param.dtype)
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None and std is not None:
        view = (1, -1, 1, 1)
        mean_t = torch.tensor(mean).view(view).to(z)
        z = z * torch.tensor(std).view(view).to(z) / cfg.scaling_factor + mean_t
    else:
        z = z / cfg.scaling_factor
    if cfg.get("shift_factor"):
        z = z + cfg.shift_factor
    with torch.no_grad():
        x = vae.decode(z).sample
    x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def encode_images(vae: Any, images: np.ndarray) -> np.ndarray:
    """uint8 images ``[N, H, W, 3]`` -> float16 scaled latents: ``latent_dist.mean`` x scaling_factor.

    The inverse convention of :func:`decode_latents` (shift subtracted, statistics applied).
    """
    import torch

    cfg = vae.config
    param = next(vae.parameters())
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        z = vae.encode(x.to(param.device, param.dtype)).latent_dist.mean.float()
    if cfg.get("shift_factor"):
        z = z - cfg.shift_factor
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None and std is not None:
        z = (
            (z - torch.tensor(mean).view(1, -1, 1, 1).to(z))
            * cfg.scaling_factor
            / torch.tensor(std).view(1, -1, 1, 1).to(z)
        )
    else:
        z = z * cfg.scaling_factor
    return z.to(torch.float16).cpu().numpy()


class TextEncoders:
    """The two SDXL tokenizers and text encoders, encoding captions as the pipeline does.

    Args:
        tokenizer, tokenizer_2: the pipeline's tokenizers (CLIP ViT-L and OpenCLIP bigG for SDXL).
        text_encoder: a ``CLIPTextModel``; text_encoder_2: a ``CLIPTextModelWithProjection``.
        device: where the encoders run.
    """

    def __init__(
        self, tokenizer: Any, tokenizer_2: Any, text_encoder: Any, text_encoder_2: Any, device: Any = "cpu"
    ):
        self.tokenizers = (tokenizer, tokenizer_2)
        self.encoders = tuple(
            enc.to(device).eval().requires_grad_(False) for enc in (text_encoder, text_encoder_2)
        )
        self.device = device

    @classmethod
    def from_pretrained(cls, model: str, dtype: str = "float32", device: Any = "cpu") -> TextEncoders:
        """Load both tokenizers and encoders from a hub id or a diffusers pipeline folder."""
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        from popalign.models.loading import dtype_kwarg, parse_dtype

        require_components(model, TEXT_COMPONENTS)
        kw = dtype_kwarg(parse_dtype(dtype), "transformers")
        try:
            tok = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
            tok2 = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2")
            enc = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw)
            enc2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", **kw)
        except (OSError, ValueError, json.JSONDecodeError) as err:
            raise UserError(f"{model}: cannot load the text encoders ({load_reason(err)})") from None
        return cls(tok, tok2, enc, enc2, device=device)

    def count_truncated(self, prompts: Sequence[str]) -> int:
        """How many ``prompts`` are longer than a tokenizer's ``model_max_length`` (and get cut)."""
        too_long = set()
        for tok in self.tokenizers:
            ids = tok(list(prompts), truncation=False, padding=False)["input_ids"]
            too_long.update(i for i, row in enumerate(ids) if len(row) > tok.model_max_length)
        return len(too_long)

    def encode(self, prompts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> ``(prompt_embeds float16 [N, L, D], pooled_prompt_embeds float16 [N, Dp])``.

        Logs a warning with the count of captions longer than the tokenizer's maximum (truncated).
        """
        import torch

        prompts = list(prompts)
        cut = self.count_truncated(prompts) if prompts else 0
        if cut:
            limit = self.tokenizers[0].model_max_length
            log.warning(
                "%d of %d captions are longer than %d tokens and were truncated", cut, len(prompts), limit
            )
        embeds, pooled = [], []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                e, p = self._encode_batch(prompts[start : start + batch_size])
                embeds.append(e.to(torch.float16).cpu().numpy())
                pooled.append(p.to(torch.float16).cpu().numpy())
        if not embeds:
            return np.zeros((0, 0, 0), np.float16), np.zeros((0, 0), np.float16)
        return np.concatenate(embeds), np.concatenate(pooled)

    def _encode_batch(self, prompts: list[str]) -> tuple[Any, Any]:
        import torch

        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(
                prompts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = enc(ids.to(self.device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projection model's first output is the pooled text embedding
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        if pooled is None:
            raise UserError("text_encoder_2 has no projection output; expected CLIPTextModelWithProjection")
        return torch.cat(hidden, dim=-1), pooled
