"""popalign.optim: the learning-rate schedules selectable in YAML."""

from __future__ import annotations

import pytest
import torch

from popalign.optim import ConstantWithWarmup


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_constant_with_warmup_by_hand():
    # lr after s optimizer steps = base * min(1, (s + 1) / warmup_steps): 1/4, 2/4, 3/4, then the base
    opt = _optimizer()
    sched = ConstantWithWarmup(opt, warmup_steps=4)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1])

    # restored as Lightning resumes (build both, then load the optimizer's state, then the scheduler's),
    # the warm-up continues where it was
    opt, again = _optimizer(), _optimizer()
    first, resumed = ConstantWithWarmup(opt, warmup_steps=4), ConstantWithWarmup(again, warmup_steps=4)
    for _ in range(2):
        opt.step()
        first.step()
    again.load_state_dict(opt.state_dict())
    resumed.load_state_dict(first.state_dict())
    assert resumed.last_epoch == 2 and again.param_groups[0]["lr"] == pytest.approx(0.075)
    again.step()
    resumed.step()
    assert again.param_groups[0]["lr"] == pytest.approx(0.1)


def test_constant_with_warmup_edges():
    opt = _optimizer()
    ConstantWithWarmup(opt, warmup_steps=0)
    assert opt.param_groups[0]["lr"] == 0.1  # no warm-up: the base from the first step
    opt = _optimizer()
    ConstantWithWarmup(opt, warmup_steps=1)
    assert opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        ConstantWithWarmup(_optimizer(), warmup_steps=-1)
