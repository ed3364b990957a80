"""popalign.optim: the learning-rate schedules selectable in YAML."""

from __future__ import annotations

import math

import pytest
import torch

from popalign.optim import ConstantWithWarmup, CosineWithWarmup


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


def test_cosine_with_warmup_by_hand():
    # warm-up 2 of 6 steps, then 0.5 * (1 + cos(pi * p)) with p = 0, 1/4, 2/4, 3/4, 1, then held at 0
    opt = _optimizer()
    sched = CosineWithWarmup(opt, total_steps=6, warmup_steps=2)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    c = [0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1.0, 1.0)]
    assert seen == pytest.approx([0.05, 0.1] + [0.1 * v for v in c])
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)
    # a floor: decays to min_lr_ratio * base instead of 0; no warm-up starts at the base
    opt = _optimizer()
    sched = CosineWithWarmup(opt, total_steps=4, min_lr_ratio=0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_steps": 4, "warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"total_steps": 4, "warmup_steps": 4}, "total_steps must exceed warmup_steps"),
        ({"total_steps": 4, "min_lr_ratio": 1.5}, "min_lr_ratio must be in"),
    ],
)
def test_cosine_with_warmup_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CosineWithWarmup(_optimizer(), **kwargs)
