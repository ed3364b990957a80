"""Discrepancy: how far the identity-class distribution of generated images is from a target.

For prompt ``j`` with known-label counts ``c_j`` (unknowns excluded), the empirical distribution is
``p̂_j = c_j / sum(c_j)`` and its discrepancy is ``d_j = ||p̂_j - target||_2``. The metric reports
the mean of ``d_j`` over prompts with at least one known label (per prompt), or the distance of the
distribution pooled over all images (``pooled=True``, what the PopAlign paper's code reports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

UNKNOWN = -1


def check_target(target: Sequence[float] | Tensor | None, num_classes: int) -> Tensor:
    """The target distribution as float64 ``[num_classes]``; uniform when ``None``.

    Raises ``ValueError`` for a wrong length, a negative or non-finite entry, or a sum not 1 (±1e-6).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if target is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64).flatten().cpu()
    if t.numel() != num_classes:
        raise ValueError(f"target has {t.numel()} entries but num_classes is {num_classes}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"target must be finite and non-negative, got {t.tolist()}")
    if abs(float(t.sum()) - 1.0) > 1e-6:
        raise ValueError(f"target must sum to 1 (tolerance 1e-6), sums to {float(t.sum()):.8f}")
    return t


def check_labels(
    labels: Tensor, num_classes: int, name: str = "labels", allow_unknown: bool = True
) -> Tensor:
    """Integer labels in ``[-1, num_classes)`` as int64 (``-1`` = unknown); ``ValueError`` otherwise."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    low = UNKNOWN if allow_unknown else 0
    if labels.numel() and (labels.min() < low or labels.max() >= num_classes):
        bad = labels[(labels < low) | (labels >= num_classes)][:5].tolist()
        what = " (-1 = unknown)" if allow_unknown else ""
        raise ValueError(f"{name} must lie in [{low}, {num_classes - 1}]{what}; found {bad}")
    return labels


def discrepancy_from_counts(counts: Tensor, target: Tensor, pooled: bool = False) -> Tensor:
    """The statistic from a count table ``[..., P, C]`` (known labels only) -> ``[...]``.

    Per prompt: mean over prompts with ``sum(c_j) > 0`` of ``||c_j / sum(c_j) - target||_2``;
    pooled: ``||sum_j c_j / sum_jk c_jk - target||_2``. NaN when no prompt has a known label.
    """
    counts = counts.to(torch.float64)
    if pooled:
        counts = counts.sum(-2, keepdim=True)
    n = counts.sum(-1)
    has = n > 0
    dist = (counts / n.clamp(min=1).unsqueeze(-1) - target.to(counts)).norm(dim=-1)
    dist = torch.where(has, dist, torch.zeros_like(dist))
    return dist.sum(-1) / has.sum(-1)  # 0/0 -> NaN when nothing is known


class Discrepancy(Metric):
    """Mean per-prompt (or pooled) L2 distance between the class distribution and a target.

    ``d = mean_{j: n_j > 0} ||p̂_j - t||_2`` with ``p̂_j[k] = c_jk / n_j``, ``n_j = sum_k c_jk``;
    ``pooled=True``: ``d = ||(sum_j c_j) / (sum_j n_j) - t||_2``. Unknown labels (``-1``) never enter
    ``p̂`` but are counted per prompt (:meth:`unknown_rate`). Classes never predicted count as 0.

    Args:
        num_classes: size of the class vocabulary (fixes the length of every distribution).
        target: target distribution (uniform when ``None``); validated, see :func:`check_target`.
        pooled: report the distance of the pooled distribution instead of the per-prompt mean.
        max_prompts: prompt ids must lie in ``[0, max_prompts)`` (rows of the count state).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        target: Sequence[float] | Tensor | None = None,
        pooled: bool = False,
        max_prompts: int = 4096,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
        self.num_classes = num_classes
        self.pooled = pooled
        self.max_prompts = max_prompts
        self.register_buffer("target", check_target(target, num_classes), persistent=False)
        self.add_state(
            "counts", torch.zeros(max_prompts, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("unknown", torch.zeros(max_prompts, dtype=torch.long), dist_reduce_fx="sum")

    def _check_inputs(self, labels: Tensor, prompt_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        labels = check_labels(labels, self.num_classes).flatten()
        if prompt_ids is None:
            return labels, torch.zeros_like(labels)
        prompt_ids = check_labels(prompt_ids, self.max_prompts, "prompt_ids", allow_unknown=False).flatten()
        if prompt_ids.shape != labels.shape:
            raise ValueError(f"prompt_ids has shape {tuple(prompt_ids.shape)}, labels {tuple(labels.shape)}")
        return labels, prompt_ids

    def update(self, labels: Tensor, prompt_ids: Tensor | None = None) -> None:
        """Add images: ``labels`` int ``[N]`` (``-1`` = unknown), ``prompt_ids`` int ``[N]`` or ``None`` (all 0)."""
        labels, prompt_ids = self._check_inputs(labels, prompt_ids)
        labels, prompt_ids = labels.to(self.counts.device), prompt_ids.to(self.counts.device)
        known = labels >= 0
        flat = prompt_ids[known] * self.num_classes + labels[known]
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts)
        self.unknown += torch.bincount(prompt_ids[~known], minlength=self.max_prompts)

    def compute(self) -> Tensor:
        """The scalar discrepancy (NaN when no image had a known label)."""
        return discrepancy_from_counts(self.counts, self.target, self.pooled).float()

    @contextlib.contextmanager
    def _synced(self) -> Iterator[None]:
        # the extra read-outs see the same all-reduced state as compute() (a collective under DDP)
        already = self._is_synced
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=not already and self._to_sync,
            should_unsync=not already,
        ):
            yield

    def distributions(self) -> Tensor:
        """Per-prompt class distributions ``[max_prompts, num_classes]``; NaN rows where nothing is known."""
        with self._synced():
            counts = self.counts.to(torch.float64)
            n = counts.sum(-1, keepdim=True)
            return torch.where(n > 0, counts / n.clamp(min=1), torch.full_like(counts, float("nan")))

    def pooled_distribution(self) -> Tensor:
        """Class distribution of all known labels pooled over prompts ``[num_classes]``."""
        with self._synced():
            counts = self.counts.sum(0).to(torch.float64)
            return counts / counts.sum()

    def per_prompt(self) -> dict[int, float]:
        """``{prompt id: ||p̂_j - target||_2}`` for every prompt with at least one known label."""
        dists = self.distributions()
        seen = ~torch.isnan(dists[:, 0])
        d = (dists[seen] - self.target.to(dists)).norm(dim=-1)
        return {int(j): float(v) for j, v in zip(seen.nonzero().flatten(), d)}

    def unknown_rate(self) -> float:
        """Fraction of all images (known + unknown) whose label was unknown; NaN with no images."""
        with self._synced():
            unknown, known = int(self.unknown.sum()), int(self.counts.sum())
        return unknown / (unknown + known) if unknown + known else float("nan")

    def bootstrap_ci(
        self,
        labels: Tensor,
        prompt_ids: Tensor | None = None,
        num_resamples: int = 1000,
        alpha: float = 0.05,
        seed: int = 0,
    ) -> tuple[float, float]:
        """Percentile bootstrap ``(low, high)`` of this metric's statistic on the raw arrays given.

        An instance method that uses the metric's ``num_classes``, ``target`` and ``pooled`` but not
        its accumulated state. Images are resampled with replacement *within* each prompt (unknowns
        included, so a resample may have fewer known labels); prompts are kept fixed. Resampling
        ``n_j`` images from prompt ``j`` is a multinomial draw from its class+unknown frequencies,
        which is how it is done. Returns ``(quantile(alpha/2), quantile(1 - alpha/2))``.
        """
        if num_resamples < 1 or not 0 < alpha < 1:
            raise ValueError(f"need num_resamples >= 1 and 0 < alpha < 1, got {num_resamples}, {alpha}")
        labels, prompt_ids = (x.cpu() for x in self._check_inputs(labels, prompt_ids))
        if labels.numel() == 0:
            return float("nan"), float("nan")
        # column num_classes holds the unknowns (label -1 -> last column)
        cols = torch.where(labels >= 0, labels, torch.full_like(labels, self.num_classes))
        _, row = torch.unique(prompt_ids, return_inverse=True)
        table = torch.zeros(int(row.max()) + 1, self.num_classes + 1, dtype=torch.long)
        table.index_put_((row, cols), torch.ones_like(row), accumulate=True)
        table_np = table.numpy()
        n = table_np.sum(1)
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(n, table_np / n[:, None], size=(num_resamples, len(n)))
        counts = torch.from_numpy(draws[..., : self.num_classes])
        stats = discrepancy_from_counts(counts, self.target.cpu(), self.pooled)
        low, high = np.nanquantile(stats.numpy(), [alpha / 2, 1 - alpha / 2])
        return float(low), float(high)


def joint_labels(labels_per_axis: Sequence[Tensor], num_classes_per_axis: Sequence[int]) -> Tensor:
    """Intersectional labels: ``(l_0, ..., l_{A-1}) -> ((l_0 * K_1 + l_1) * K_2 + l_2) ...`` (row-major).

    E.g. gender (2) x race (6) gives 12 joint classes, ``joint = gender * 6 + race``. A ``-1``
    (unknown) on any axis makes the joint label ``-1``.
    """
    if len(labels_per_axis) != len(num_classes_per_axis) or not labels_per_axis:
        raise ValueError(
            f"need one class count per axis: {len(labels_per_axis)} label arrays, "
            f"{len(num_classes_per_axis)} class counts"
        )
    first = torch.as_tensor(labels_per_axis[0])
    joint = torch.zeros(first.shape, dtype=torch.long, device=first.device)
    unknown = torch.zeros(first.shape, dtype=torch.bool, device=first.device)
    for i, (lab, k) in enumerate(zip(labels_per_axis, num_classes_per_axis)):
        lab = check_labels(lab, k, name=f"labels of axis {i}")
        if lab.shape != first.shape:
            raise ValueError(f"labels of axis {i} have shape {tuple(lab.shape)}, axis 0 {tuple(first.shape)}")
        joint = joint * k + lab.clamp(min=0)
        unknown |= lab < 0
    return torch.where(unknown, torch.full_like(joint, UNKNOWN), joint)
