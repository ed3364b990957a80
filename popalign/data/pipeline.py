"""Loading an SDXL pipeline (with another VAE, UNet or LoRA) and sampling images with their final
latents: what ``popalign generate`` stores and what evaluation and validation sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from popalign.data.encode import decode_latents, require_components
from popalign.errors import UserError

PIPELINE_COMPONENTS = (
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)


COMPONENT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def component_kwargs(path: str, subfolder: str) -> dict[str, Any]:
    """``from_pretrained`` keywords that load component ``subfolder`` (``unet``, ``vae``) from ``path``:
    the component folder itself or a pipeline/export folder holding it. A folder that is neither, or
    holds another component's config, is a :class:`UserError`."""
    kw = {"subfolder": subfolder} if (Path(path) / subfolder / "config.json").is_file() else {}
    config = Path(path) / kw.get("subfolder", "") / "config.json"
    if Path(path).exists() and not config.is_file():
        raise UserError(
            f"{path}: neither a {subfolder} folder (config.json) nor a folder with '{subfolder}/'"
        )
    # another component's folder (a VAE given as --unet) fails inside diffusers with a page of
    # "weights not used" and "Cannot copy out of meta tensor"
    try:
        found = (
            json.loads(config.read_text(encoding="utf-8")).get("_class_name") if config.is_file() else None
        )
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        found = None  # diffusers reports an unreadable config in its own words
    if found is not None and found != COMPONENT_CLASSES[subfolder]:
        raise UserError(
            f"{config}: the config of {found}, not of the {COMPONENT_CLASSES[subfolder]} that --{subfolder} takes"
        )
    return kw


def load_pipeline(
    model: str,
    vae: str | None = None,
    unet: str | None = None,
    lora: str | None = None,
    dtype: str = "float32",
    vae_dtype: str | None = None,
    device: Any = None,
) -> Any:
    """``StableDiffusionXLPipeline.from_pretrained(model)``, optionally with another VAE, UNet or LoRA.

    Args:
        model: hub id or local diffusers folder.
        vae: an ``AutoencoderKL`` folder/id replacing the pipeline's (e.g. the fp16-fix VAE).
        unet: a ``UNet2DConditionModel`` folder (or an export folder holding ``unet/``).
        lora: LoRA weights for ``pipe.load_lora_weights``.
        dtype: dtype of the pipeline (``float32``, ``bfloat16``, ``float16``).
        vae_dtype: dtype the VAE decodes in; default float32 when ``dtype`` is float16 (the stock
            SDXL VAE overflows in fp16), else ``dtype``.
        device: where to put the pipeline (None leaves it on the CPU).
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    from popalign.models.loading import cast, dtype_kwarg, load_lora_weights, loaded, parse_dtype

    torch_dtype = parse_dtype(dtype)
    # the stock SDXL VAE overflows in fp16: decode in float32 unless told otherwise
    decode_dtype = (
        parse_dtype(vae_dtype)
        if vae_dtype
        else (torch.float32 if torch_dtype == torch.float16 else torch_dtype)
    )
    replaced = {"vae": vae, "unet": unet}
    require_components(model, [c for c in PIPELINE_COMPONENTS if replaced.get(c) is None])

    parts: dict[str, Any] = {}
    if vae:
        kw = component_kwargs(vae, "vae")
        parts["vae"] = loaded(
            vae, "VAE", lambda: AutoencoderKL.from_pretrained(vae, **dtype_kwarg(decode_dtype), **kw)
        )
    if unet:
        kw = component_kwargs(unet, "unet")
        parts["unet"] = loaded(
            unet, "UNet", lambda: UNet2DConditionModel.from_pretrained(unet, **dtype_kwarg(torch_dtype), **kw)
        )
    pipe = loaded(
        model,
        "pipeline",
        lambda: StableDiffusionXLPipeline.from_pretrained(model, **dtype_kwarg(torch_dtype), **parts),
    )
    if lora:
        loaded(lora, "LoRA weights", lambda: load_lora_weights(pipe, lora))
    if pipe.vae.dtype != decode_dtype:
        cast(pipe.vae, decode_dtype)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample one image per (prompt, seed): ``(images uint8 [N, H, W, 3], latents float16 [N, 4, h, w])``.

    The pipeline runs with ``output_type="latent"``; those final latents (scaled space) are kept and
    decoded with :func:`decode_latents`. Each image's starting noise comes from its own CPU
    generator seeded with its seed, so it is the same on any device and in any batch.
    """
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        latents = pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generators,
            output_type="latent",
        ).images
        images = decode_latents(pipe.vae, latents)
    return images, latents.to(torch.float16).cpu().numpy()
