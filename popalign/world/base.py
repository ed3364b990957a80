"""The synthetic world's deliberately biased base model: a tiny SDXL pipeline trained on world images.

:func:`build_base_model` trains every trainable part of a tiny ``StableDiffusionXLPipeline`` (built
by :mod:`popalign.models.tiny`) on a biased dataset of the world (:func:`sample_dataset`): neutral
prompts mostly show each axis's majority class, augmented prompts always show the named classes.

1. an ``AutoencoderKL`` (32x32 RGB -> latents 4x8x8) with reconstruction + small KL loss; its
   ``scaling_factor`` is set to ``1 / std`` of the latents, so scaled latents have unit variance;
2. the two CLIP text encoders stay random and frozen (distinct words still embed apart); the prompt
   embeddings come from the pipeline's own ``encode_prompt``, once per distinct prompt;
3. a ``UNet2DConditionModel`` (``text_time``) with the epsilon objective
   ``E ||eps - eps_theta(sqrt(ab_t) z + sqrt(1 - ab_t) eps, t, c)||^2`` on the scaled latents, the
   condition replaced by zeros with probability ``cond_dropout`` -- the embedding the pipeline uses
   for the empty negative prompt (``force_zeros_for_empty_prompt``), so classifier-free guidance works.

The folder is a plain diffusers pipeline plus ``popalign_base.json`` (cache key, settings, recommended
sampling settings, timings). :func:`evaluate_base` samples it with the stock pipeline and measures
bias, faithfulness and unknowns with the exact world classifier. See ``docs/world_base.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from popalign import files
from popalign.errors import UserError
from popalign.world import WorldAxis, WorldSpec
from popalign.world.render import sample_dataset

CODE_VERSION = "world-base-1"  # bump when training changes so cached models rebuild
META_FILE = "popalign_base.json"
# what save_pretrained writes for the tiny pipeline: checked in folders built before "files" was recorded
REQUIRED_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
    *(f"{part}/config.json" for part in ("unet", "vae", "text_encoder", "text_encoder_2")),
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
)


@dataclass
class BaseTrainConfig:
    """Sizes, steps and sampling settings of the base model (all of it enters the cache key)."""

    n_per_prompt: int = 48  # training images per prompt (7 prompts per occupation)
    text_hidden: int = 64  # 32 loses prompt detail: augmented prompts then fail up to ~15%
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 64)
    attention_head_dim: tuple[int, ...] = (2, 4, 4)
    vae_channels: tuple[int, ...] = (16, 32, 32)  # three blocks: downsampling x4
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    unet_steps: int = 1000
    unet_batch: int = 64
    unet_lr: float = 2e-3
    warmup_steps: int = 50
    cond_dropout: float = 0.1
    num_inference_steps: int = 20  # recommended sampling settings, recorded in popalign_base.json
    guidance_scale: float = 1.5  # CFG amplifies the majority class; of 1.5-5, closest to the training bias
    seed: int = 0


def world_fingerprint(spec: WorldSpec) -> str:
    """sha256 of a fixed small sample of the world (pixels and captions): changes with the renderer."""
    images, prompts, _, _ = sample_dataset(spec, 1, np.random.default_rng(0))
    return hashlib.sha256(images.tobytes() + "\n".join(prompts).encode()).hexdigest()


def cache_key(spec: WorldSpec, config: BaseTrainConfig) -> str:
    """sha256 of the world spec and its :func:`world_fingerprint`, the training config (seed included)
    and :data:`CODE_VERSION`."""
    blob = json.dumps(
        {
            "spec": dataclasses.asdict(spec),
            "world": world_fingerprint(spec),
            "config": dataclasses.asdict(config),
            "code": CODE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def read_meta(path: str | Path) -> dict | None:
    """The ``popalign_base.json`` of a base-model folder, or ``None`` when there is none."""
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{meta}: unreadable base-model metadata ({err})") from err


def file_sizes(path: Path) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file in a base-model folder but the metadata."""
    return {
        f.relative_to(path).as_posix(): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != META_FILE
    }


def cache_problem(
    path: str | Path, spec: WorldSpec | None = None, config: BaseTrainConfig | None = None
) -> str | None:
    """Why ``path`` is not a usable cached base model of ``spec`` and ``config`` (``None``: it is).

    Usable means: its ``popalign_base.json`` holds the same :func:`cache_key`, and every file recorded
    there at build time is present with its size (folders built before sizes were recorded: the files
    in :data:`REQUIRED_FILES` are present).
    """
    path = Path(path)
    meta = read_meta(path) if path.is_dir() else None
    if meta is None:
        return "no base model"
    if meta.get("key") != cache_key(spec or WorldSpec(), config or BaseTrainConfig()):
        return "built with other settings"
    recorded = meta.get("files")
    if isinstance(recorded, dict):
        have = file_sizes(path)
        bad = [f for f, size in recorded.items() if have.get(f) != size]
    else:
        bad = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if bad:
        return f"incomplete: {bad[0]} is missing or truncated" + (
            f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        )
    return None


def spec_from_dict(data: dict) -> WorldSpec:
    """Rebuild a :class:`WorldSpec` from its ``dataclasses.asdict`` form (as stored in the metadata)."""
    axes = tuple(WorldAxis(a["name"], tuple(a["classes"]), tuple(a["phrases"])) for a in data["axes"])
    return WorldSpec(
        occupations=tuple(data["occupations"]),
        axes=axes,
        image_size=data["image_size"],
        neutral_probs={k: tuple(v) for k, v in data["neutral_probs"].items()},
        occupation_probs={
            o: {k: tuple(v) for k, v in p.items()} for o, p in data["occupation_probs"].items()
        },
    )


def _pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    # uint8 [N,S,S,3] -> float [N,3,S,S] in [-1, 1], the VAE's input range
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)


def _schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    # linear warm-up, then cosine decay to zero: popalign.optim.CosineWithWarmup's curve, rounded in
    # another order (1 ulp apart at some steps), kept so the cached base and docs/results.md stay bitwise
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae, images: torch.Tensor, cfg: BaseTrainConfig, gen: torch.Generator, progress: bool) -> float:
    """Fit the VAE to ``images`` ([N,3,S,S] in [-1,1]); returns the last loss.

    ``loss = ||x - D(z)||^2 / numel + kl_weight * KL(q(z|x) || N(0, I)) / latent numel``, ``z ~ q(z|x)``.
    """
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.warmup_steps, cfg.vae_steps)
    loss = torch.zeros(())
    for _ in tqdm(range(cfg.vae_steps), desc="base: vae", disable=not progress):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(x)).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval().requires_grad_(False)
    return loss.item()


def train_unet(
    unet,
    data: dict[str, torch.Tensor],
    alphas_cumprod: torch.Tensor,
    cfg: BaseTrainConfig,
    gen: torch.Generator,
    progress: bool,
) -> float:
    """Epsilon-objective training with condition dropout to zeros. Returns the mean loss of the last 10%.

    ``data``: ``latents`` [N,4,h,w] (scaled), ``prompt`` [N] (index into the embedding tables),
    ``embeds`` [P,77,D], ``pooled`` [P,Dp], ``time_ids`` [6].
    """
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.warmup_steps, cfg.unet_steps)
    dev = data["latents"].device
    ab = alphas_cumprod.to(dev)
    losses = []
    for _ in tqdm(range(cfg.unet_steps), desc="base: unet", disable=not progress):
        idx = torch.randint(len(data["latents"]), (cfg.unet_batch,), generator=gen).to(dev)
        z0, p = data["latents"][idx], data["prompt"][idx]
        t = torch.randint(len(ab), (cfg.unet_batch,), generator=gen).to(dev)
        eps = torch.randn(z0.shape, generator=gen).to(dev)
        a = ab[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        keep = (torch.rand(cfg.unet_batch, generator=gen) >= cfg.cond_dropout).float().to(dev)
        cond = {
            "text_embeds": data["pooled"][p] * keep[:, None],
            "time_ids": data["time_ids"].expand(len(t), 6),
        }
        pred = unet(
            zt, t, encoder_hidden_states=data["embeds"][p] * keep[:, None, None], added_cond_kwargs=cond
        )
        loss = F.mse_loss(pred.sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    unet.eval().requires_grad_(False)
    return torch.stack(losses[-max(1, len(losses) // 10) :]).mean().item()


def _recon_accuracy(vae, spec: WorldSpec, seed: int, device: torch.device) -> float:
    """Fraction of held-out world images whose VAE reconstruction keeps every attribute readable and right."""
    from popalign.world.classify import WorldClassifier

    images, _, attrs, occ = sample_dataset(spec, 4, np.random.default_rng(seed), biased=False)
    with torch.no_grad():
        recon = vae.decode(vae.encode(_pixels(images, device)).latent_dist.mean).sample
    out = recon.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    clf = WorldClassifier(spec)
    ok = clf.occupation(out) == occ
    for name, got in clf.classify(out).items():
        ok &= got == attrs[name]
    return float(ok.mean())


def _train(spec: WorldSpec, cfg: BaseTrainConfig, device: torch.device, progress: bool) -> tuple[dict, dict]:
    """Build and train the components; returns them and a summary for the metadata."""
    from diffusers import StableDiffusionXLPipeline

    from popalign.models.tiny import TinySDXLConfig, build_tiny_components

    tiny = TinySDXLConfig(
        image_size=spec.image_size,
        text_hidden=cfg.text_hidden,
        text_layers=cfg.text_layers,
        projection_dim=cfg.text_hidden,
        unet_channels=tuple(cfg.unet_channels),
        attention_head_dim=tuple(cfg.attention_head_dim),
        vae_channels=tuple(cfg.vae_channels),
        vocab_words=spec.vocabulary(),
        seed=cfg.seed,
    )
    parts = build_tiny_components(tiny)
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    images, prompts, _, _ = sample_dataset(spec, cfg.n_per_prompt, np.random.default_rng(cfg.seed))
    pixels = _pixels(images, device)
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vae = parts["vae"]
    vae_loss = train_vae(vae, pixels, cfg, gen, progress)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.mean for x in pixels.split(512)])
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    recon_acc = _recon_accuracy(vae, spec, cfg.seed + 1, device)
    timings["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for name in ("text_encoder", "text_encoder_2"):
        parts[name].eval().requires_grad_(False)
    pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    unique = sorted(set(prompts))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(unique, device=device, do_classifier_free_guidance=False)
    s = spec.image_size
    data = {
        "latents": latents * scale,
        "prompt": torch.tensor([unique.index(p) for p in prompts], device=device),
        "embeds": embeds,
        "pooled": pooled,
        "time_ids": torch.tensor([s, s, 0, 0, s, s], dtype=torch.float32, device=device),  # SDXL micro-cond.
    }
    unet_loss = train_unet(parts["unet"], data, parts["scheduler"].alphas_cumprod, cfg, gen, progress)
    timings["unet_s"] = time.perf_counter() - t0
    summary = {
        "vae_scaling_factor": scale,
        "vae_final_loss": vae_loss,
        "vae_recon_accuracy": recon_acc,
        "unet_final_loss": unet_loss,
        "parameters": {
            k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "text_encoder")
        },
        "train_images": len(prompts),
        "timings": timings,
    }
    return {k: (v.to("cpu") if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}, summary


def build_base_model(
    out_dir: str | Path,
    spec: WorldSpec | None = None,
    config: BaseTrainConfig | None = None,
    force: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Train and save the biased base model at ``out_dir``, or return at once when it is cached.

    The folder is reused when :func:`cache_problem` finds nothing wrong with it (the same
    :func:`cache_key`, every recorded file present with its size); otherwise
    (or with ``force``) the model is rebuilt in a temporary folder beside ``out_dir`` and renamed into
    place only when complete. A non-empty folder that is not a base model is never overwritten.
    """
    from diffusers import StableDiffusionXLPipeline

    spec, cfg, out = spec or WorldSpec(), config or BaseTrainConfig(), Path(out_dir)
    key = cache_key(spec, cfg)
    meta = read_meta(out) if out.is_dir() else None
    if meta is not None and not force:
        problem = cache_problem(out, spec, cfg)
        if problem is None:
            return out
        if problem.startswith("incomplete"):
            print(f"{out}: the cached base model is {problem}; rebuilding it", file=sys.stderr, flush=True)
    if out.exists() and (not out.is_dir() or (meta is None and any(out.iterdir()))):
        raise UserError(f"{out}: exists and is not a popalign base model; choose another output folder")

    t0 = time.perf_counter()
    parts, summary = _train(spec, cfg, torch.device(device), progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.sibling(out, "building")
    try:
        StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True).save_pretrained(tmp)
        summary["timings"]["total_s"] = time.perf_counter() - t0
        sampling = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale}
        meta = {
            "key": key,
            "code_version": CODE_VERSION,
            "spec": dataclasses.asdict(spec),
            "config": dataclasses.asdict(cfg),
            "sampling": {**sampling, "height": spec.image_size, "width": spec.image_size},
            **summary,
        }
        meta["files"] = file_sizes(tmp)  # checked when the folder is reused
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        files.replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
