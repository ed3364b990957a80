"""Figures of an evaluation: class distributions per neutral prompt, before/after, a sample grid.

Built with matplotlib's object API (``Figure``, no pyplot state, no display needed), so the same
figures go to PNG files and to TensorBoard's ``add_figure``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

MAX_PANELS = 24  # beyond this the per-prompt figure gets unreadable; later prompts are left out


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> one uint8 ``[rows*(H+pad)+pad, ncol*(W+pad)+pad, 3]`` grid, white gaps."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"need images [N, H, W, 3] with N >= 1, got {images.shape}")
    n, h, w, _ = images.shape
    ncol = max(1, min(ncol, n))
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            img
        )
    return grid


def save_png(array: np.ndarray, path: str | Path, min_side: int = 256) -> Path:
    """Write a uint8 ``[H, W, 3]`` array as PNG, upscaled (nearest) so tiny images stay visible."""
    from PIL import Image

    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    scale = max(1, math.ceil(min_side / max(1, min(image.size))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return Path(path)


def _bars(ax, series: Sequence[tuple[str, Sequence[float]]], class_names: Sequence[str], target) -> None:
    x = np.arange(len(class_names))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        v = np.nan_to_num(np.asarray(values, dtype=float))
        ax.bar(x - 0.4 + width * (i + 0.5), v, width, label=label, color=("tab:gray", "tab:blue")[i % 2])
    if target is not None:
        # one short horizontal segment per class at its target share
        ax.hlines(target, x - 0.45, x + 0.45, colors="black", linewidth=1.5, label="target")
    ax.set_xticks(x)
    ax.set_xticklabels(class_names, rotation=90 if len(class_names) > 4 else 0, fontsize=7)
    ax.set_ylim(0, 1)


def distribution_figure(
    distributions: Sequence[Sequence[float]],
    titles: Sequence[str],
    class_names: Sequence[str],
    target: Sequence[float] | None = None,
    baseline: Sequence[Sequence[float]] | None = None,
    ncol: int = 4,
) -> Figure:
    """One bar panel per prompt: the class distribution (and the baseline's), target as black marks."""
    n = min(len(distributions), MAX_PANELS)
    ncol = max(1, min(ncol, n))
    rows = max(1, math.ceil(n / ncol))
    fig = Figure(figsize=(3.2 * ncol, 2.8 * rows + 0.3 * (len(class_names) > 4) * rows), layout="constrained")
    axes = fig.subplots(rows, ncol, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        series = [("baseline", baseline[i])] if baseline is not None else []
        _bars(ax, [*series, ("model", distributions[i])], class_names, target)
        ax.set_title(titles[i][:48], fontsize=8)
    if baseline is not None or target is not None:
        axes.flat[0].legend(fontsize=6)
    if len(distributions) > n:
        fig.suptitle(f"first {n} of {len(distributions)} prompts", fontsize=9)
    return fig


def comparison_figure(
    titles: Sequence[str],
    model_discrepancy: Sequence[float | None],
    baseline_discrepancy: Sequence[float | None],
    class_names: Sequence[str],
    model_pooled: Sequence[float],
    baseline_pooled: Sequence[float],
    target: Sequence[float],
) -> Figure:
    """Before/after: per-prompt discrepancy of baseline and model; pooled distributions vs target."""
    fig = Figure(figsize=(max(8.0, 0.45 * len(titles) + 5), 4.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[max(1, len(titles)), max(4, len(class_names))])
    x = np.arange(len(titles))
    for i, (label, values) in enumerate((("baseline", baseline_discrepancy), ("model", model_discrepancy))):
        v = np.array([np.nan if d is None else d for d in values], dtype=float)
        left.bar(x - 0.2 + 0.4 * i, np.nan_to_num(v), 0.4, label=label, color=("tab:gray", "tab:blue")[i])
    left.set_xticks(x)
    left.set_xticklabels([t[:28] for t in short_titles(titles)], rotation=90, fontsize=6)
    left.set_ylabel("discrepancy (L2 to target)")
    left.set_title("per neutral prompt", fontsize=9)
    left.legend(fontsize=7)
    _bars(right, [("baseline", baseline_pooled), ("model", model_pooled)], class_names, target)
    right.set_title("pooled class distribution", fontsize=9)
    right.legend(fontsize=7)
    return fig


def short_titles(titles: Sequence[str]) -> list[str]:
    """Drop the words every title starts with ("a photo of a"), so axis labels show what differs."""
    words = [t.split() for t in titles]
    n = 0
    while len(words) > 1 and all(len(w) > n + 1 and w[n] == words[0][n] for w in words):
        n += 1
    return [" ".join(w[n:]) for w in words]


def save_figure(fig: Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=110)
    return Path(path)


def write_plots(
    folder: Path,
    result: dict,
    class_names: Sequence[str],
    target: Sequence[float],
    grid: Sequence[np.ndarray],
    baseline_grid: Sequence[np.ndarray] | None = None,
) -> list[str]:
    """The PNGs of an evaluation ``result`` (``metrics.json`` content) -> paths relative to its parent.

    ``neutral_distributions.png`` (per neutral prompt, with the baseline's bars when evaluated),
    ``comparison.png`` (baseline vs model), ``samples.png`` (first image of each prompt; the
    baseline's grid below it when given).
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    per_prompt, base_pp = result.get("per_prompt", []), result.get("baseline_per_prompt")
    if per_prompt:
        titles = [p["prompt"] for p in per_prompt]
        dists = [p["distribution"] for p in per_prompt]
        base = [p["distribution"] for p in base_pp] if base_pp else None
        fig = distribution_figure(_nan(dists), titles, class_names, target, _nan(base) if base else None)
        written.append(save_figure(fig, folder / "neutral_distributions.png"))
    if per_prompt and base_pp:
        m, b = result["metrics"], result["baseline"]
        fig = comparison_figure(
            [p["prompt"] for p in per_prompt],
            [p["discrepancy"] for p in per_prompt],
            [p["discrepancy"] for p in base_pp],
            class_names,
            m["neutral.distribution"],
            b["neutral.distribution"],
            target,
        )
        written.append(save_figure(fig, folder / "comparison.png"))
    if len(grid):
        sheet = image_grid(np.stack(grid))
        if baseline_grid is not None and len(baseline_grid):
            below = image_grid(np.stack(baseline_grid))
            width = max(sheet.shape[1], below.shape[1])
            sheet = np.concatenate(
                [_pad_to(sheet, width), np.zeros((4, width, 3), np.uint8), _pad_to(below, width)]
            )
        written.append(save_png(sheet, folder / "samples.png"))
    return [f"{folder.name}/{p.name}" for p in written]


def _nan(rows: Sequence[Sequence[float | None]]) -> list[list[float]]:
    return [[math.nan if v is None else float(v) for v in row] for row in rows]


def _pad_to(image: np.ndarray, width: int) -> np.ndarray:
    pad = np.full((image.shape[0], width - image.shape[1], 3), 255, np.uint8)
    return np.concatenate([image, pad], axis=1)
