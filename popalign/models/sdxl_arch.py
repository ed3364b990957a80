"""The stock SDXL base 1.0 architecture as config dictionaries, for random-weight models.

``UNet2DConditionModel(**SDXL_UNET)`` and ``AutoencoderKL(**SDXL_VAE)`` have exactly SDXL's structure
and parameter counts, with random weights, so nothing is downloaded. Built under
``torch.device("meta")`` they hold shapes only and cost no memory, which is enough to count
parameters or FLOPs. ``tests/test_benchmark.py`` checks both parameter counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

# fmt: off
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2,567,463,684 parameters)
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True, "norm_num_groups": 32,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + pooled 1280
    "flip_sin_to_cos": True, "freq_shift": 0,
}
# the SDXL VAE (83,653,863 parameters)
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.13025,
}
# the SDXL scheduler (EulerDiscreteScheduler)
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
}
# fmt: on


def save_random_sdxl(folder: str | Path, device: str | torch.device = "cpu") -> Path:
    """Save a diffusers folder with an SDXL UNet of random weights (``unet/``) and ``scheduler/``.

    The UNet is initialised on ``device`` (2.6 B weights: seconds on a GPU, minutes on a CPU) and
    written in bf16 (about 5 GB) to halve the write; ``popalign.models.loading.load_unet`` reads it
    back as float32. Returns ``folder``.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    folder = Path(folder)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet.to("cpu", torch.bfloat16).save_pretrained(folder / "unet", safe_serialization=True)
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    return folder


def random_sdxl_vae(device: str | torch.device = "cpu"):
    """An ``AutoencoderKL`` with the SDXL VAE's architecture and random weights, built on ``device``."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**SDXL_VAE)
