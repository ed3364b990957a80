"""From per-image labels to the metrics dict, ``metrics.json`` and ``report.md``.

Every metric is a flat dotted key (``neutral.discrepancy``); values are numbers, ``[low, high]``
bootstrap intervals (keys ending ``_ci``), or ``{axis: value}`` for per-axis keys. The keys are
listed in ``docs/evaluation.md``; NaN (nothing to score) is written as JSON ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from popalign.files import jsonable
from popalign.metrics import Discrepancy, SpecificAccuracy, joint_labels


def mean_ci(values: np.ndarray, num_resamples: int = 1000, alpha: float = 0.05, seed: int = 0) -> list[float]:
    """Percentile bootstrap ``[low, high]`` of the mean of ``values`` (NaNs dropped; NaN if none left)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    return [float(v) for v in np.quantile(means, [alpha / 2, 1 - alpha / 2])]


def marginal(joint_target: Sequence[float], sizes: Sequence[int], axis: int) -> np.ndarray:
    """Marginal of a row-major joint distribution over ``sizes`` on axis number ``axis``."""
    t = np.asarray(joint_target, dtype=float).reshape(tuple(sizes))
    return t.sum(axis=tuple(i for i in range(len(sizes)) if i != axis))


def _mean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def summarise(
    axis_names: Sequence[str],
    sizes: Sequence[int],
    joint_target: Sequence[float],
    kinds: Sequence[str],
    groups: np.ndarray,
    labels: np.ndarray,
    requested: np.ndarray,
    adherence: np.ndarray | None = None,
    clip: np.ndarray | None = None,
    num_resamples: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fairness metrics of one model's images -> ``(metrics, per-prompt rows of neutral prompts)``.

    Args:
        axis_names, sizes: the bias axes and their class counts (joint classes run row-major).
        joint_target: target distribution over the joint classes.
        kinds: ``neutral`` / ``specific`` / ``generic`` per image.
        groups: neutral prompt index per image (used for neutral images only).
        labels: predicted class per image and axis, int ``[N, A]`` (-1 unknown).
        requested: class the prompt named per axis, int ``[N, A]`` (-1 not named).
        adherence: 1/0 per image, NaN where not judged; ``None`` when no adherence rule is set.
        clip: CLIP score per image; ``None`` when no CLIP model is set.

    Neutral discrepancy (mean over prompts of ``||p̂_j - t||_2`` on the joint class), its pooled
    variant, per axis (against the marginal target), the unknown rate; specific accuracy per axis and
    joint (all named axes right, unknown = wrong); each with a 95% bootstrap interval.
    """
    kinds = np.asarray(kinds)
    labels, requested = np.asarray(labels, dtype=np.int64), np.asarray(requested, dtype=np.int64)
    m: dict[str, Any] = {}
    boot = {"num_resamples": num_resamples, "seed": seed}
    per_prompt: list[dict[str, Any]] = []

    neutral = kinds == "neutral"
    if neutral.any():
        lab, grp = torch.from_numpy(labels[neutral]), torch.from_numpy(np.asarray(groups)[neutral])
        joint = joint_labels(list(lab.T), list(sizes))
        rows = int(grp.max()) + 1
        per, pooled = (
            Discrepancy(int(np.prod(sizes)), joint_target, pooled=p, max_prompts=rows) for p in (False, True)
        )
        for metric in (per, pooled):
            metric.update(joint, grp)
        m["neutral.num_prompts"] = len(np.unique(grp.numpy()))
        m["neutral.num_images"] = int(neutral.sum())
        m["neutral.discrepancy"] = float(per.compute())
        m["neutral.discrepancy_ci"] = list(per.bootstrap_ci(joint, grp, **boot))
        m["neutral.discrepancy_pooled"] = float(pooled.compute())
        m["neutral.discrepancy_pooled_ci"] = list(pooled.bootstrap_ci(joint, grp, **boot))
        m["neutral.discrepancy_per_axis"], m["neutral.discrepancy_per_axis_ci"] = {}, {}
        for a, name in enumerate(axis_names):
            axis_metric = Discrepancy(sizes[a], marginal(joint_target, sizes, a), max_prompts=rows)
            axis_metric.update(lab[:, a], grp)
            m["neutral.discrepancy_per_axis"][name] = float(axis_metric.compute())
            m["neutral.discrepancy_per_axis_ci"][name] = list(
                axis_metric.bootstrap_ci(lab[:, a], grp, **boot)
            )
        unknown = (joint < 0).numpy().astype(float)
        m["neutral.unknown_rate"] = float(unknown.mean())
        m["neutral.unknown_rate_ci"] = mean_ci(unknown, **boot)
        m["neutral.distribution"] = [float(v) for v in pooled.pooled_distribution()]
        dists, dist_of = per.distributions(), per.per_prompt()
        for j in sorted(set(grp.tolist())):
            mine = grp == j
            per_prompt.append(
                {
                    "group": j,
                    "images": int(mine.sum()),
                    "unknown": int((joint[mine] < 0).sum()),
                    "distribution": [None if math.isnan(v) else float(v) for v in dists[j].tolist()],
                    "discrepancy": dist_of.get(j),
                }
            )

    specific = (kinds == "specific") & (requested >= 0).any(axis=1)
    if specific.any():
        acc = SpecificAccuracy(len(axis_names), axis_names)
        acc.update(torch.from_numpy(labels[specific]), torch.from_numpy(requested[specific]))
        out = {k: float(v) for k, v in acc.compute().items()}
        pred, req = labels[specific], requested[specific]
        right = np.where(req >= 0, (pred == req).astype(float), np.nan)  # [n, A], NaN = axis not named
        m["specific.num_images"] = int(specific.sum())
        m["specific.accuracy"] = out["joint"]
        m["specific.accuracy_ci"] = mean_ci(np.nanmin(right, axis=1), **boot)  # all named axes right
        m["specific.accuracy_per_axis"] = {n: out[n] for n in axis_names}
        m["specific.accuracy_per_axis_ci"] = {
            n: mean_ci(right[:, a], **boot) for a, n in enumerate(axis_names)
        }
        m["specific.unknown_rate"] = float((pred < 0).any(axis=1).mean())

    generic = kinds == "generic"
    if generic.any():
        m["generic.num_images"] = int(generic.sum())
        m["generic.unknown_rate"] = float((labels[generic] < 0).any(axis=1).mean())
        if clip is not None:
            m["generic.clip_score"] = _mean(clip[generic])
            m["generic.clip_score_ci"] = mean_ci(clip[generic], **boot)

    if adherence is not None:
        m["adherence.num_images"] = int((~np.isnan(adherence)).sum())
        m["adherence.accuracy"] = _mean(adherence)
        m["adherence.accuracy_ci"] = mean_ci(adherence, **boot)
    if clip is not None:
        m["clip_score"] = _mean(clip)
        m["clip_score_ci"] = mean_ci(clip, **boot)
    return m, per_prompt


def flatten(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a": {"x": 1}}`` -> ``{"a.x": 1}``; lists (intervals) stay values."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = value
    return out


def deltas(model: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float]:
    """``model - baseline`` for every scalar metric both have (counts and intervals excluded)."""
    a, b = flatten(model), flatten(baseline)
    return {
        k: float(a[k]) - float(b[k])
        for k in a
        if k in b and isinstance(a[k], (int, float)) and isinstance(b[k], (int, float)) and "num_" not in k
    }


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(jsonable(row), allow_nan=False) + "\n")


def _fmt(value: Any, ci: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    if (
        isinstance(ci, (list, tuple))
        and len(ci) == 2
        and all(isinstance(v, float) and math.isfinite(v) for v in ci)
    ):
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def render_report(
    metrics: Mapping[str, Any],
    settings: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    plots: Sequence[str] = (),
) -> str:
    """The markdown report: settings, one row per metric (95% CI in brackets), baseline and delta."""
    flat, base = flatten(metrics), flatten(baseline or {})
    delta = deltas(metrics, baseline) if baseline is not None else {}
    header = "| metric | model |" + (" baseline | delta |" if baseline is not None else "")
    lines = ["# popalign evaluation", "", f"- model: `{settings.get('model')}`"]
    for key in ("unet", "lora", "baseline"):
        if settings.get(key):
            lines.append(f"- {key}: `{settings[key]}`")
    axes = ", ".join(settings.get("axes", []))
    lines += [
        f"- axes: {axes}; classifier: `{settings.get('classifier')}`",
        f"- {settings.get('images_per_prompt')} images per prompt"
        + (
            f" ({settings['specific_images_per_prompt']} per specific prompt)"
            if settings.get("specific_images_per_prompt")
            else ""
        )
        + f", seed {settings.get('seed')}, "
        f"{settings.get('steps')} steps, guidance {settings.get('guidance_scale')}, "
        f"{settings.get('height')}x{settings.get('width')} px",
        "",
        "Lower is better for discrepancy, unknown rate and FID; higher for accuracy and CLIP score. "
        "Brackets: 95% bootstrap interval.",
        "",
        header,
        "|---|---|" + ("---|---|" if baseline is not None else ""),
    ]
    for key, value in flat.items():
        if key.endswith("_ci") or "_ci." in key or key == "neutral.distribution":
            continue
        ci_key = key.replace("_per_axis.", "_per_axis_ci.") if "_per_axis." in key else f"{key}_ci"
        row = f"| {key} | {_fmt(value, flat.get(ci_key))} |"
        if baseline is not None:
            d = delta.get(key)
            shown = "–" if d is None or math.isnan(d) else f"{d:+.4f}"  # NaN: neither model scored it
            row += f" {_fmt(base.get(key), base.get(ci_key))} | {shown} |"
        lines.append(row)
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    if plots:
        lines += ["", "## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"
