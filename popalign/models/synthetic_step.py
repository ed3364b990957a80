"""One real PopAlign training step on random inputs, for timing and FLOP counting.

:func:`make_batch` builds random tensors in the DataModule's layout, sized by :func:`read_shapes` from
a diffusers folder; :func:`make_step` wraps ``PopAlignModule.compute_objective`` forward (under bf16
autocast or not), backward and the optimizer step into a no-argument callable. With a VAE it is the
*original-code style* step, which encodes images every step instead of reading stored latents.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from popalign.models.sdxl_arch import random_sdxl_vae


@dataclass
class Shapes:
    """Input sizes of one sample: latent side, text embedding width, pooled width, image side (px)."""

    latent: int
    text_dim: int
    pooled_dim: int
    image: int


def read_shapes(folder: Path) -> Shapes:
    """Input sizes from a diffusers folder's UNet config (and VAE config: its downsampling, else 8)."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = folder / "vae" / "config.json"
    scale = 2 ** (len(json.loads(vae.read_text())["block_out_channels"]) - 1) if vae.exists() else 8
    pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    return Shapes(unet["sample_size"], unet["cross_attention_dim"], pooled, unet["sample_size"] * scale)


def build_vae(folder: Path, device: torch.device):
    """The frozen fp32 VAE the original-style step encodes with: the folder's ``vae/``, else SDXL's config."""
    from diffusers import AutoencoderKL

    if (folder / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    else:
        vae = random_sdxl_vae(device)
    return vae.to(device, torch.float32).requires_grad_(False).eval()


def make_batch(n: int, shapes: Shapes, device: torch.device, images: bool, seed: int = 0) -> dict:
    """Random tensors in the DataModule's layout and dtypes: rows i and i + n/2 are a pair of one group.

    ``images`` adds ``images`` in [-1, 1] at the full resolution, for the original-style step.
    """
    g = torch.Generator().manual_seed(seed)
    p, s = n // 2, float(shapes.image)
    batch = {
        "latents": torch.randn(n, 4, shapes.latent, shapes.latent, generator=g).half(),
        "prompt_embeds": torch.randn(n, 77, shapes.text_dim, generator=g).half(),
        "pooled_prompt_embeds": torch.randn(n, shapes.pooled_dim, generator=g).half(),
        "time_ids": torch.tensor([s, s, 0.0, 0.0, s, s]).expand(n, 6).clone(),
        "preferred": torch.arange(n) < p,
        "group": torch.arange(p).repeat(2),
    }
    if images:
        batch["images"] = torch.rand(n, 3, shapes.image, shapes.image, generator=g) * 2 - 1
    return {k: v.to(device) for k, v in batch.items()}


def make_step(module, optimizer, batch: dict, vae, precision: str) -> Callable[[], None]:
    """One training step, as Lightning runs it: forward under autocast, backward, the module's
    gradient guard (:meth:`~popalign.module.PopAlignModule.guard_gradients`), optimizer step.

    Args:
        module: a ``PopAlignModule`` in train mode.
        optimizer: its optimizer (from ``configure_optimizers``).
        batch: from :func:`make_batch`, on the module's device.
        vae: ``None``, or a VAE that encodes ``batch["images"]`` every step first (original style).
        precision: ``"bf16-mixed"`` runs the forward under bf16 autocast; anything else in float32.
    """
    device_type = batch["latents"].device.type
    autocast = partial(torch.autocast, device_type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        b = batch
        if vae is not None:  # original code: no stored latents, encode the images every step
            with torch.no_grad():
                latents = vae.encode(batch["images"]).latent_dist.sample() * vae.config.scaling_factor
            b = {**batch, "latents": latents.half()}
        with autocast():
            noise, t = module.noise_and_timesteps(b["latents"])
            loss = module.compute_objective(b, noise, t).loss
        loss.backward()
        _, proceed = module.guard_gradients(optimizer)  # the gradient norm and the non-finite skip
        if proceed:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
