"""Specific-prompt accuracy: do identity-specific prompts still produce the class they name?"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class SpecificAccuracy(Metric):
    """Per-axis and joint accuracy of images generated from prompts that name a class.

    For axis ``a``: ``acc_a = #{i: r_ia >= 0, y_ia = r_ia} / #{i: r_ia >= 0}`` where ``r`` is the
    requested class (``-1`` = the prompt named no class on that axis: the axis is ignored for that
    image) and ``y`` the predicted one (``-1`` = unknown, which counts as wrong).
    ``joint = #{i: all named axes correct} / #{i: at least one named axis}``.
    An axis (or ``joint``) with nothing to score reports NaN.

    Args:
        num_axes: number of bias axes ``A`` (columns of ``predicted`` and ``requested``).
        axis_names: keys of :meth:`compute`'s dict; ``axis_0`` ... when ``None``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_axes: int, axis_names: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_axes < 1:
            raise ValueError(f"num_axes must be >= 1, got {num_axes}")
        names = list(axis_names) if axis_names is not None else [f"axis_{a}" for a in range(num_axes)]
        if len(names) != num_axes or len(set(names)) != num_axes or "joint" in names:
            raise ValueError(f"axis_names must be {num_axes} distinct names other than 'joint', got {names}")
        self.num_axes = num_axes
        self.axis_names = names
        self.add_state("correct", torch.zeros(num_axes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("named", torch.zeros(num_axes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("joint_correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("joint_named", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _as_matrix(self, x: Tensor, name: str) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 1 and self.num_axes == 1:
            x = x.unsqueeze(1)
        if x.ndim != 2 or x.shape[1] != self.num_axes:
            raise ValueError(f"{name} must have shape [N, {self.num_axes}], got {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be integer class indices, got dtype {x.dtype}")
        # class counts per axis are not known here; only the -1 convention is checked
        if x.numel() and x.min() < -1:
            raise ValueError(f"{name} must be class indices >= 0 or -1, found {int(x.min())}")
        return x.long()

    def update(self, predicted: Tensor, requested: Tensor) -> None:
        """Add images: ``predicted`` and ``requested`` int ``[N, A]`` (``-1`` = unknown / not named)."""
        predicted = self._as_matrix(predicted, "predicted").to(self.correct.device)
        requested = self._as_matrix(requested, "requested").to(self.correct.device)
        if predicted.shape != requested.shape:
            raise ValueError(
                f"predicted {tuple(predicted.shape)} and requested {tuple(requested.shape)} differ"
            )
        named = requested >= 0
        hit = (predicted == requested) & named  # an unknown prediction (-1) never equals a named class
        self.correct += hit.sum(0)
        self.named += named.sum(0)
        scored = named.any(1)
        self.joint_correct += (scored & (hit == named).all(1)).sum()
        self.joint_named += scored.sum()

    def compute(self) -> dict[str, Tensor]:
        """``{axis name: accuracy, ..., "joint": accuracy}`` as float scalars."""
        acc = self.correct.double() / self.named.double()  # 0/0 -> NaN
        out = {name: acc[a].float() for a, name in enumerate(self.axis_names)}
        out["joint"] = (self.joint_correct.double() / self.joint_named.double()).float()
        return out
