"""Shared fixtures: a tiny SDXL-architecture pipeline saved once per session, and batch builders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threading costs more than it gives, on a shared 2-core box

# 16 px images, VAE downsampling x2 -> latents 4 x 8 x 8; text dims D = 2 * 32, pooled Dp = 32
TINY_IMAGE = 16
TINY_LATENT = 8
TINY_D = 64
TINY_DP = 32


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from popalign.models.tiny import TinySDXLConfig, save_tiny_sdxl

    path = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_sdxl(path, TinySDXLConfig(image_size=TINY_IMAGE))
    return str(path)


def make_batch(pairs: int = 2, groups: int = 1, seed: int = 0, sources: bool = False) -> dict:
    """A batch in the DataModule's layout: rows i and i + P are a pair of group `group[i]`.

    With ``sources`` it also holds each preferred row's own caption embedding (``source_*``)."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    group = torch.arange(pairs) * groups // pairs
    batch = {
        "latents": torch.randn(n, 4, TINY_LATENT, TINY_LATENT, generator=g).half(),
        "prompt_embeds": torch.randn(n, 77, TINY_D, generator=g).half(),
        "pooled_prompt_embeds": torch.randn(n, TINY_DP, generator=g).half(),
        "time_ids": torch.tensor([TINY_IMAGE, TINY_IMAGE, 0, 0, TINY_IMAGE, TINY_IMAGE], dtype=torch.float32)
        .expand(n, 6)
        .clone(),
        "preferred": torch.arange(n) < pairs,
        "group": group.repeat(2),
    }
    if sources:
        batch["source_prompt_embeds"] = torch.randn(pairs, 77, TINY_D, generator=g).half()
        batch["source_pooled_prompt_embeds"] = torch.randn(pairs, TINY_DP, generator=g).half()
    return batch


@pytest.fixture
def batch_factory():
    return make_batch


@pytest.fixture(scope="session")
def world_base(tmp_path_factory) -> str:
    """The synthetic world's default biased base model, built once per session (minutes)."""
    from popalign.world.base import build_base_model

    return str(build_base_model(tmp_path_factory.mktemp("world") / "base", progress=False))
