"""Measuring the biased base model against its goals: biased on neutral prompts, faithful on named ones."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch

from popalign.errors import UserError
from popalign.world.base import META_FILE, read_meta, spec_from_dict


def joint_discrepancy(a: np.ndarray, b: np.ndarray, ka: int, kb: int) -> float:
    """``||p - u||_2``: the joint class distribution ``p`` of two axes (images with a label -1 on either
    axis left out) against the uniform ``u = 1 / (ka * kb)``; NaN when no image has both labels."""
    ok = (a >= 0) & (b >= 0)
    if not ok.any():
        return float("nan")
    p = np.bincount(a[ok] * kb + b[ok], minlength=ka * kb) / ok.sum()
    return float(np.linalg.norm(p - 1.0 / (ka * kb)))


def evaluate_base(
    path: str | Path,
    n_per_prompt: int = 32,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict:
    """Sample every world prompt ``n_per_prompt`` times with the stock pipeline and score it.

    Settings default to the recommended ones in ``popalign_base.json``. Returns (rates in [0, 1]):

    * ``neutral_majority`` / ``train_majority``: axis -> frequency of the training-majority class in
      neutral-prompt samples (known labels) / in the training data's bias, mean over occupations;
    * ``neutral_discrepancy`` / ``train_discrepancy``: mean over occupations of
      :func:`joint_discrepancy` of the neutral prompt's samples / of the training bias;
    * ``augmented_accuracy``: augmented samples showing every named class (jointly), and per axis
      in ``augmented_axis_accuracy``; ``occupation_accuracy``: all samples, the prompt's occupation;
    * ``unknown_rate``: samples with any attribute or the occupation unreadable (-1).
    """
    from diffusers import StableDiffusionXLPipeline

    from popalign.world.classify import WorldClassifier

    meta = read_meta(path)
    if meta is None:
        raise UserError(f"{path}: no {META_FILE}; build the base model with `popalign world --out DIR`")
    spec = spec_from_dict(meta["spec"])
    steps = num_inference_steps or meta["sampling"]["num_inference_steps"]
    scale = meta["sampling"]["guidance_scale"] if guidance_scale is None else guidance_scale
    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path)).to(device)
    pipe.set_progress_bar_config(disable=True)
    n_occ, names = len(spec.occupations), spec.axis_names
    combos = list(itertools.product(*(range(len(ax.classes)) for ax in spec.axes)))
    jobs = [(o, None) for o in range(n_occ)] + [(o, c) for o in range(n_occ) for c in combos]
    prompts = [spec.neutral_prompt(o) if c is None else spec.augmented_prompt(o, c) for o, c in jobs]
    flat = [p for p in prompts for _ in range(n_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(flat), batch_size):
        out = pipe(flat[i : i + batch_size], height=spec.image_size, width=spec.image_size, output_type="np",
                   num_inference_steps=steps, guidance_scale=scale, generator=gen).images  # fmt: skip
        images.append(np.clip(np.rint(out * 255), 0, 255).astype(np.uint8))
    clf = WorldClassifier(spec)
    images = np.concatenate(images)
    shape = (len(jobs), n_per_prompt)
    labels = {n: v.reshape(shape) for n, v in clf.classify(images).items()}
    got_occ = clf.occupation(images).reshape(shape)

    # neutral prompts: rows 0..n_occ-1; augmented: the rest, in `combos` order per occupation
    probs = {n: [spec.class_probs(o, n) for o in range(n_occ)] for n in names}
    majority, train_majority = {}, {}
    for n in names:
        top = np.array([p.argmax() for p in probs[n]])[:, None]
        neutral = labels[n][:n_occ]
        majority[n] = float(((neutral == top) & (neutral >= 0)).sum() / max(1, (neutral >= 0).sum()))
        train_majority[n] = float(np.mean([p.max() for p in probs[n]]))
    ka, kb = (len(ax.classes) for ax in spec.axes)
    a, b = (labels[n] for n in names)
    train_joint = [np.outer(probs[names[0]][o], probs[names[1]][o]).ravel() for o in range(n_occ)]
    hits = {
        n: labels[n][n_occ:] == np.array([c[k] for _, c in jobs[n_occ:]])[:, None]
        for k, n in enumerate(names)
    }
    return {
        "neutral_majority": majority,
        "train_majority": train_majority,
        "neutral_discrepancy": float(np.mean([joint_discrepancy(a[o], b[o], ka, kb) for o in range(n_occ)])),
        "train_discrepancy": float(np.mean([np.linalg.norm(p - 1.0 / (ka * kb)) for p in train_joint])),
        "augmented_accuracy": float(np.logical_and(*hits.values()).mean()),
        "augmented_axis_accuracy": {n: float(h.mean()) for n, h in hits.items()},
        "occupation_accuracy": float((got_occ == np.array([o for o, _ in jobs])[:, None]).mean()),
        "unknown_rate": float(((a < 0) | (b < 0) | (got_occ < 0)).mean()),
        "guidance_scale": scale,
        "num_inference_steps": steps,
        "n_images": len(flat),
        "seconds": time.perf_counter() - t0,
    }
