"""Tiny SDXL-*architecture* pipelines built from config in code.

Tests and the synthetic-world demo never download weights: they build a
``StableDiffusionXLPipeline`` whose every component has SDXL's structure (two CLIP text encoders,
the second with a projection for the pooled embedding, an ``AutoencoderKL``, a
``UNet2DConditionModel`` with ``addition_embed_type="text_time"``), only very small, save it with
``save_pretrained`` and load it back with ``from_pretrained`` -- so the loading path every later
stage uses is the real one.

The tokenizer is word-level (one token per lower-cased word, unknown words map to ``<unk>``), built
with the ``tokenizers`` library and wrapped as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

BASE_VOCAB = (
    "a an the of photo picture portrait image person people man woman male female young old "
    "middle aged elderly child adult with and in on at by standing sitting smiling working "
    "doctor nurse teacher engineer chef pilot farmer lawyer scientist artist firefighter "
    "police officer judge programmer mechanic cashier janitor ceo dancer singer writer "
    "white black asian indian latino hispanic middle-eastern eastern southeast east south "
    "couple friends two gay straight lesbian wearing uniform office city street park"
)


def word_tokenize(text: str) -> list[str]:
    """The word split the tiny tokenizer uses (lower-cased, punctuation dropped)."""
    return re.findall(r"[a-z0-9][a-z0-9'\-]*", text.lower())


def build_word_tokenizer(words: list[str] | tuple[str, ...] = (), max_length: int = 77):
    """A word-level ``PreTrainedTokenizerFast``: ``<bos> w1 w2 ... <eos>`` padded with ``<pad>``.

    Args:
        words: vocabulary beyond :data:`BASE_VOCAB` (any text; split with :func:`word_tokenize`).
        max_length: ``model_max_length`` (SDXL uses 77).
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab_words: list[str] = list(SPECIAL_TOKENS)
    for w in word_tokenize(BASE_VOCAB + " " + " ".join(words)):
        if w not in vocab_words:
            vocab_words.append(w)
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^a-z0-9'\-]+"), behavior="removed")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )


@dataclass
class TinySDXLConfig:
    """Sizes of a tiny SDXL-architecture pipeline.

    ``image_size`` is the pixel resolution; the VAE downsamples by ``2 ** (len(vae_channels) - 1)``,
    so the latents are ``4 x image_size/f x image_size/f``.
    """

    image_size: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    projection_dim: int = 32
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    attention_head_dim: tuple[int, ...] = (2, 4)
    addition_time_embed_dim: int = 8
    vae_channels: tuple[int, ...] = (16, 32)
    vae_layers_per_block: int = 1
    vocab_words: list[str] = field(default_factory=list)
    prediction_type: str = "epsilon"
    seed: int = 0

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale


def build_tiny_components(config: TinySDXLConfig | None = None) -> dict:
    """The components of a tiny ``StableDiffusionXLPipeline``, randomly initialised with ``config.seed``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = config or TinySDXLConfig()
    torch.manual_seed(cfg.seed)
    tokenizer = build_word_tokenizer(cfg.vocab_words)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=cfg.projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=cfg.attention_head_dim,
        use_linear_projection=True,
        cross_attention_dim=2 * cfg.text_hidden,  # penultimate states of both encoders, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * cfg.addition_time_embed_dim + cfg.projection_dim,
        transformer_layers_per_block=1,
        norm_num_groups=min(8, cfg.unet_channels[0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=min(8, cfg.vae_channels[0]),
        sample_size=cfg.image_size,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=cfg.prediction_type,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
    }


def save_tiny_sdxl(
    path: str | Path, config: TinySDXLConfig | None = None, components: dict | None = None
) -> Path:
    """Build (unless ``components`` are given) and ``save_pretrained`` a tiny SDXL pipeline at ``path``."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    parts = components if components is not None else build_tiny_components(config)
    pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
