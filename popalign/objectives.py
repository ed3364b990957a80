"""Training objectives: small modules chosen in YAML, fed per-sample denoising errors.

Every objective receives, for a batch of B latents, the policy's and the frozen reference's
per-sample denoising MSE and returns a scalar loss plus detached scalar metrics. The implicit
reward of a sample is the denoising-error gain of the policy over the reference,
``g = ref_err - policy_err`` (Diffusion-DPO, Wallace et al. 2023, arXiv 2311.12908).
Derivations and guidance: ``docs/objectives.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from popalign.errors import UserError


def _positive_beta(beta: float) -> float:
    # beta 0 makes the loss the constant log 2 (nothing is learned); below 0 it trains towards the bias
    if not beta > 0:
        raise UserError(f"objective: beta must be > 0, got {beta}")
    return float(beta)


class ObjectiveOutput(NamedTuple):
    """What an objective hands back to the training step (a named tuple: DeepSpeed's ZeRO-3 hooks
    find the tensors of a module's output only in tuples, lists and dicts, and warn otherwise)."""

    loss: Tensor
    """Scalar, differentiable."""
    metrics: dict[str, Tensor]
    """Detached scalar tensors, left on device (no ``.item()``, so no host sync)."""


class Objective(nn.Module):
    """Base class: ``forward(policy_err, ref_err, preferred, group) -> ObjectiveOutput``.

    ``policy_err`` and ``ref_err`` are float [B] per-sample denoising errors, ``preferred`` is
    bool [B] and ``group`` long [B] names each sample's population group. Subclasses set
    ``needs_reference = False`` when ``ref_err`` is not used, so the caller skips that pass.
    """

    needs_reference: bool = True
    needs_group: bool = False  # forward reads `group`, so _inputs insists on it

    def forward(
        self, policy_err: Tensor, ref_err: Tensor | None, preferred: Tensor, group: Tensor | None = None
    ) -> ObjectiveOutput:
        raise NotImplementedError

    def _inputs(self, policy_err: Tensor, ref_err: Tensor | None, preferred: Tensor, group: Tensor | None):
        """Check shapes and dtypes (no host sync); return float32 errors and the implicit reward."""
        name, shape = type(self).__name__, policy_err.shape
        _check(policy_err.dim() == 1, name, "policy_err must be a float [B] tensor", policy_err)
        ok = preferred.dtype == torch.bool and preferred.shape == shape
        _check(ok, name, "preferred must be a bool [B] tensor", preferred)
        if self.needs_group:
            _check(group is not None and group.shape == shape, name, "group must be a long [B] tensor", group)
        policy_err = policy_err.float()
        if not self.needs_reference:
            return policy_err, None, None
        ok = ref_err is not None and ref_err.shape == shape
        _check(ok, name, "ref_err must be a float [B] tensor", ref_err)
        ref_err = ref_err.float()
        return policy_err, ref_err, ref_err - policy_err


def _check(ok: bool, name: str, what: str, t: Tensor | None) -> None:
    if not ok:
        got = None if t is None else f"{t.dtype} {tuple(t.shape)}"
        raise ValueError(f"{name}: {what}, got {got}")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` where ``mask``; NaN when the mask is empty (honest "no data", no sync)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum()


def _global_mean(x: Tensor, sync: bool) -> Tensor:
    """Mean of ``x`` over every rank's samples: all-reduce (sum, count), exact for unequal sizes."""
    stats = torch.stack([x.sum(), torch.full((), x.numel(), dtype=x.dtype, device=x.device)])
    if sync and dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats[0] / stats[1]


def _first_index(group: Tensor) -> Tensor:
    """For each sample, the batch index of its group's first member: a slot id in [0, B)."""
    n = group.shape[0]
    same = group[:, None] == group[None, :]
    cols = torch.arange(n, device=group.device).expand(n, n)
    return torch.where(same, cols, n).amin(dim=1)


def _base_metrics(g: Tensor, policy_err: Tensor, ref_err: Tensor, preferred: Tensor) -> dict[str, Tensor]:
    g = g.detach()
    return {
        "reward_preferred": _masked_mean(g, preferred),
        "reward_dispreferred": _masked_mean(g, ~preferred),
        "policy_err": policy_err.detach().mean(),
        "ref_err": ref_err.detach().mean(),
    }


class PopAlignLoss(Objective):
    """Per-sample PopAlign objective with a reference point (Li, Singh, Grover 2024, arXiv 2406.19668).

    With ``g = ref_err - policy_err`` and ``kappa = max(0, mean g over the global batch)``
    (detached; all-reduced across ranks as a (sum, count) pair)::

        loss = mean_i  w_i * -log sigmoid(s_i * beta * (g_i - kappa))

    where ``s_i = +1, w_i = lambda_preferred`` for preferred samples and ``s_i = -1,
    w_i = lambda_dispreferred`` for dispreferred ones. For equal population sizes and unit weights
    it upper-bounds the population Bradley-Terry loss for every kappa (see docs/objectives.md).
    Under ``torch.distributed`` every rank must call it the same number of times (a collective).

    Args:
        beta: inverse temperature on the implicit reward; depends on the latent scale.
        lambda_preferred: weight of the preferred samples' terms.
        lambda_dispreferred: weight of the dispreferred samples' terms.
        sync_kappa: all-reduce kappa across ranks when torch.distributed is initialised.
    """

    def __init__(
        self,
        beta: float = 5000.0,
        lambda_preferred: float = 1.0,
        lambda_dispreferred: float = 1.0,
        sync_kappa: bool = True,
    ) -> None:
        super().__init__()
        self.beta = _positive_beta(beta)
        self.lambda_preferred = float(lambda_preferred)
        self.lambda_dispreferred = float(lambda_dispreferred)
        self.sync_kappa = sync_kappa

    def forward(
        self, policy_err: Tensor, ref_err: Tensor | None, preferred: Tensor, group: Tensor | None = None
    ) -> ObjectiveOutput:
        policy_err, ref_err, g = self._inputs(policy_err, ref_err, preferred, group)
        mean_g = _global_mean(g.detach(), self.sync_kappa)
        kappa = mean_g.clamp(min=0.0)
        pref = preferred.to(g.dtype)
        sign = 2.0 * pref - 1.0
        weight = self.lambda_preferred * pref + self.lambda_dispreferred * (1.0 - pref)
        margin = sign * (g - kappa)
        loss = (weight * -F.logsigmoid(self.beta * margin)).mean()
        metrics = _base_metrics(g, policy_err, ref_err, preferred)
        metrics["reward_margin"] = metrics["reward_preferred"] - metrics["reward_dispreferred"]
        metrics["reward_accuracy"] = (margin.detach() > 0).float().mean()
        metrics["kappa"] = kappa
        metrics["kappa_unclamped"] = mean_g
        return ObjectiveOutput(loss=loss, metrics=metrics)


class _GroupedObjective(Objective):
    """Shared constructor of the objectives that compare samples within population groups."""

    needs_group = True

    def __init__(self, beta: float = 5000.0, check_groups: bool = True) -> None:
        super().__init__()
        self.beta = _positive_beta(beta)
        self.check_groups = check_groups

    def _output(
        self, margin: Tensor, counted: Tensor, count_name: str, g: Tensor, policy_err: Tensor,
        ref_err: Tensor | None, preferred: Tensor,
    ) -> ObjectiveOutput:  # fmt: skip
        """``loss = sum_{counted} -log sigmoid(beta * margin) / |counted|`` plus the shared metrics;
        ``margin`` holds one entry per row, used where ``counted`` (a group's slot, a pair's winner)."""
        count = counted.float().sum()
        loss = (counted * -F.logsigmoid(self.beta * margin)).sum() / count.clamp(min=1.0)
        metrics = _base_metrics(g, policy_err, ref_err, preferred)
        metrics["reward_margin"] = _masked_mean(margin.detach(), counted)
        metrics["reward_accuracy"] = _masked_mean((margin.detach() > 0).float(), counted)
        metrics[count_name] = count
        return ObjectiveOutput(loss=loss, metrics=metrics)


class PopulationBTLoss(_GroupedObjective):
    """Exact population-level Bradley-Terry loss inside each group (Li, Singh, Grover 2024).

    The reward of a population is the mean implicit reward of its members; per group ``k``::

        loss_k = -log sigmoid(beta * (mean_{i in W_k} g_i - mean_{j in L_k} g_j))
        loss   = mean_k loss_k

    ``W_k``/``L_k`` are the group's preferred/dispreferred samples in the batch. Groups are
    averaged with equal weight whatever their size. With ``check_groups`` a group lacking either
    side raises ValueError (one host sync); without it such groups are left out of the mean.

    Args:
        beta: inverse temperature on the population reward difference.
        check_groups: raise when a group lacks a side (costs one host sync per step).
    """

    def forward(
        self, policy_err: Tensor, ref_err: Tensor | None, preferred: Tensor, group: Tensor | None = None
    ) -> ObjectiveOutput:
        policy_err, ref_err, g = self._inputs(policy_err, ref_err, preferred, group)
        n = g.shape[0]
        slot = _first_index(group)
        pref = preferred.float()
        zeros = g.new_zeros(n)
        count_w = zeros.index_add(0, slot, pref)
        count_l = zeros.index_add(0, slot, 1.0 - pref)
        sum_w = zeros.index_add(0, slot, g * pref)
        sum_l = zeros.index_add(0, slot, g * (1.0 - pref))
        is_slot = slot == torch.arange(n, device=g.device)
        valid = is_slot & (count_w > 0) & (count_l > 0)
        if self.check_groups and bool((is_slot & ~valid).any()):
            bad = group[is_slot & ~valid].tolist()
            raise ValueError(
                f"PopulationBTLoss: group(s) {bad} lack a preferred or a dispreferred member in this batch"
            )
        # clamp keeps empty slots finite so their zero weight cannot turn into NaN gradients
        margin = sum_w / count_w.clamp(min=1.0) - sum_l / count_l.clamp(min=1.0)
        return self._output(margin, valid, "num_groups", g, policy_err, ref_err, preferred)


class DiffusionDPOLoss(_GroupedObjective):
    """Pairwise Diffusion-DPO loss (Wallace et al. 2023, arXiv 2311.12908).

    Within each group the i-th preferred sample (in batch order) is paired with the i-th
    dispreferred one::

        loss = mean_pairs -log sigmoid(beta * (g_w - g_l))

    Unequal preferred/dispreferred counts within a group raise ValueError when ``check_groups``
    (one host sync); otherwise unpaired samples are left out.

    Args:
        beta: inverse temperature on the implicit reward difference.
        check_groups: raise on unequal counts within a group (costs one host sync per step).
    """

    def forward(
        self, policy_err: Tensor, ref_err: Tensor | None, preferred: Tensor, group: Tensor | None = None
    ) -> ObjectiveOutput:
        policy_err, ref_err, g = self._inputs(policy_err, ref_err, preferred, group)
        n = g.shape[0]
        idx = torch.arange(n, device=g.device)
        same_group = group[:, None] == group[None, :]
        same_side = same_group & (preferred[:, None] == preferred[None, :])
        # rank of a sample among its group's samples of the same side, in batch order
        rank = (same_side & (idx[None, :] < idx[:, None])).sum(dim=1)
        match = same_group & preferred[:, None] & ~preferred[None, :] & (rank[:, None] == rank[None, :])
        unpaired = ~(match.any(dim=1) | match.any(dim=0))
        if self.check_groups and bool(unpaired.any()):
            counts = {
                k: (int((preferred & (group == k)).sum()), int((~preferred & (group == k)).sum()))
                for k in sorted(set(group[unpaired].tolist()))
            }
            raise ValueError(f"DiffusionDPOLoss: unequal preferred/dispreferred counts per group {counts}")
        # elementwise select rather than a matmul: TF32 matmuls would round g
        g_l = (match * g[None, :]).sum(dim=1)
        return self._output(g - g_l, match.any(dim=1), "num_pairs", g, policy_err, ref_err, preferred)


class SFTLoss(Objective):
    """Supervised fine-tuning on the preferred population only; needs no reference pass.

    ``loss = mean_{i preferred} policy_err_i`` (0 when the batch holds no preferred sample).
    """

    needs_reference = False

    def forward(
        self, policy_err: Tensor, ref_err: Tensor | None, preferred: Tensor, group: Tensor | None = None
    ) -> ObjectiveOutput:
        policy_err, _, _ = self._inputs(policy_err, ref_err, preferred, group)
        pref = preferred.float()
        loss = (policy_err * pref).sum() / pref.sum().clamp(min=1.0)
        err = policy_err.detach()
        metrics = {
            "policy_err": err.mean(),
            "policy_err_preferred": _masked_mean(err, preferred),
            "policy_err_dispreferred": _masked_mean(err, ~preferred),
        }
        return ObjectiveOutput(loss=loss, metrics=metrics)
