"""Objectives on hand-written tensors; sp(x) = softplus(x) = log(1 + e^x) = -log sigmoid(-x)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from popalign.objectives import (
    DiffusionDPOLoss,
    Objective,
    ObjectiveOutput,
    PopAlignLoss,
    PopulationBTLoss,
    SFTLoss,
)

T, F = True, False


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def errs(g: list[float], ref: float = 4.0, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors with implicit reward g: ref_err = 4 everywhere, policy_err = 4 - g (exact in float)."""
    r = torch.full((len(g),), ref)
    p = (r - torch.tensor(g)).requires_grad_(grad)
    return p, r


def close(t: torch.Tensor, value: float) -> None:
    torch.testing.assert_close(t, torch.tensor(value), rtol=1e-6, atol=1e-6)


# ---- PopAlignLoss ---------------------------------------------------------------------------


def test_popalign_value_and_metrics() -> None:
    # g = [1, 0 | -1, 0] (preferred | dispreferred); mean 0 -> kappa 0
    # s*(g - kappa) = [1, 0, 1, 0]; beta=1: loss = (sp(-1) + sp(0) + sp(-1) + sp(0)) / 4
    #   = (0.313262 + 0.693147) / 2 = 0.503204
    p, r = errs([1.0, 0.0, -1.0, 0.0])
    out = PopAlignLoss(beta=1.0)(p, r, torch.tensor([T, T, F, F]))
    assert isinstance(out, ObjectiveOutput)
    close(out.loss, 0.5032044340)
    close(out.metrics["kappa"], 0.0)
    close(out.metrics["reward_preferred"], 0.5)  # (1 + 0) / 2
    close(out.metrics["reward_dispreferred"], -0.5)  # (-1 + 0) / 2
    close(out.metrics["reward_margin"], 1.0)
    close(out.metrics["reward_accuracy"], 0.5)  # margins 1, 0, 1, 0: two strictly positive
    close(out.metrics["policy_err"], 4.0)  # 4 - mean g
    close(out.metrics["ref_err"], 4.0)


def test_popalign_positive_kappa() -> None:
    # g = [2, 0 | 1, 1]; mean 1 -> kappa 1; s*(g - 1) = [1, -1, 0, 0]
    # beta=2: (sp(-2) + sp(2) + 2 sp(0)) / 4 = (0.126928 + 2.126928 + 1.386294) / 4 = 0.910038
    p, r = errs([2.0, 0.0, 1.0, 1.0])
    out = PopAlignLoss(beta=2.0)(p, r, torch.tensor([T, T, F, F]))
    close(out.loss, 0.9100375958)
    close(out.metrics["kappa"], 1.0)
    close(out.metrics["reward_accuracy"], 0.25)


def test_popalign_kappa_clamped_at_zero() -> None:
    # g = [-1 | -2]; mean -1.5 < 0 -> kappa 0; s*(g - 0) = [-1, 2]
    # beta=1: (sp(1) + sp(-2)) / 2 = (1.313262 + 0.126928) / 2 = 0.720095
    # (unclamped kappa -1.5 would give margins [0.5, 0.5] instead)
    p, r = errs([-1.0, -2.0])
    out = PopAlignLoss(beta=1.0)(p, r, torch.tensor([T, F]))
    close(out.metrics["kappa"], 0.0)
    close(out.metrics["kappa_unclamped"], -1.5)
    close(out.loss, 0.7200948493)


def test_popalign_lambda_weights() -> None:
    # same g as the first test; terms pref: sp(-1), sp(0); dispref: sp(-1), sp(0)
    # lambda_p=2, lambda_d=0.5: (2 + 0.5) * (0.313262 + 0.693147) / 4 = 0.629006
    p, r = errs([1.0, 0.0, -1.0, 0.0])
    pref = torch.tensor([T, T, F, F])
    close(PopAlignLoss(1.0, lambda_preferred=2.0, lambda_dispreferred=0.5)(p, r, pref).loss, 0.6290055425)
    # lambda_d=0 keeps only the preferred half: (sp(-1) + sp(0)) / 4 = 0.251602
    close(PopAlignLoss(1.0, lambda_dispreferred=0.0)(p, r, pref).loss, 0.2516022170)


def test_popalign_gradient_direction_and_detached_kappa() -> None:
    # g = [3, 0 | 1, 0], kappa = 1 detached, beta=2; m = s*(g - kappa) = [2, -1, 0, 1]
    # term i is sp(-beta m_i), and d m_i / d policy_err_i = -s_i, so
    # d loss / d policy_err_0 = beta * sigmoid(-beta m_0) / B = 2 * sigmoid(-4) / 4 = 0.0089931
    # a kappa carrying gradient would add (beta / B) * sum_i s_i sigmoid(-beta m_i) * (-1/4)
    #   = (2 / 4) * (0.017986 + 0.880797 - 0.5 - 0.119203) * (-1/4) = -0.034947
    pref = torch.tensor([T, T, F, F])
    p, r = errs([3.0, 0.0, 1.0, 0.0], grad=True)
    loss = PopAlignLoss(beta=2.0)(p, r, pref).loss
    loss.backward()
    close(p.grad[0], 0.0089931)
    assert (p.grad[:2] > 0).all() and (p.grad[2:] < 0).all()
    # lowering every preferred policy error by d raises kappa by d/2 and so every margin by d/2:
    # the loss, recomputed with its new kappa, falls. (One sample alone need not: its own term
    # may be saturated while the shifted kappa costs the others.)
    assert PopAlignLoss(beta=2.0)(p.detach() - 0.1 * pref, r, pref).loss < loss


def test_popalign_needs_ref_err() -> None:
    assert PopAlignLoss.needs_reference
    with pytest.raises(ValueError, match="ref_err"):
        PopAlignLoss()(torch.ones(2), None, torch.tensor([T, F]))
    with pytest.raises(ValueError, match="bool"):
        PopAlignLoss()(torch.ones(2), torch.ones(2), torch.tensor([1, 0]))


# ---- PopulationBTLoss -----------------------------------------------------------------------


def test_bt_per_group_average_unequal_sizes() -> None:
    # group 7: preferred g [1, 3] (mean 2), dispreferred [0] (mean 0)       -> margin 2
    # group 3: preferred g [1] (mean 1), dispreferred [0, 0, 3] (mean 1)    -> margin 0
    # beta=1: (sp(-2) + sp(0)) / 2 = (0.126928 + 0.693147) / 2 = 0.410038
    # (pooling samples instead would compare 5/3 with 3/4); groups interleaved in batch order
    g = [1.0, 1.0, 0.0, 3.0, 0.0, 0.0, 3.0]
    pref = torch.tensor([T, T, F, T, F, F, F])
    group = torch.tensor([7, 3, 3, 7, 7, 3, 3])
    p, r = errs(g)
    out = PopulationBTLoss(beta=1.0)(p, r, pref, group)
    close(out.loss, 0.4100375958)
    close(out.metrics["reward_margin"], 1.0)  # (2 + 0) / 2
    close(out.metrics["reward_accuracy"], 0.5)  # only group 7 strictly positive
    close(out.metrics["num_groups"], 2.0)
    close(out.metrics["reward_preferred"], 5.0 / 3.0)  # samples: (1 + 1 + 3) / 3


def test_bt_missing_side() -> None:
    # group 5 has only a preferred member
    p, r = errs([1.0, 0.0, 2.0])
    pref = torch.tensor([T, F, T])
    group = torch.tensor([0, 0, 5])
    with pytest.raises(ValueError, match=r"\[5\]"):
        PopulationBTLoss(beta=1.0)(p, r, pref, group)
    # unchecked: group 5 is left out; group 0 margin 1 - 0 -> sp(-1) = 0.313262
    out = PopulationBTLoss(beta=1.0, check_groups=False)(p, r, pref, group)
    close(out.loss, 0.3132616875)
    with pytest.raises(ValueError, match="group"):
        PopulationBTLoss()(p, r, pref, None)


# ---- DiffusionDPOLoss -----------------------------------------------------------------------


def test_dpo_pairs_within_group_in_batch_order() -> None:
    # batch: A_w1=2, B_w1=0, A_l1=1, A_w2=0, B_l1=0, A_l2=3   (A = group 0, B = group 1)
    # pairs: (A_w1, A_l1) margin 1; (A_w2, A_l2) margin -3; (B_w1, B_l1) margin 0
    # beta=1: (sp(-1) + sp(3) + sp(0)) / 3 = (0.313262 + 3.048587 + 0.693147) / 3 = 1.351665
    p, r = errs([2.0, 0.0, 1.0, 0.0, 0.0, 3.0])
    pref = torch.tensor([T, T, F, T, F, F])
    group = torch.tensor([0, 1, 0, 0, 1, 0])
    out = DiffusionDPOLoss(beta=1.0)(p, r, pref, group)
    close(out.loss, 1.3516654066)
    close(out.metrics["reward_margin"], -2.0 / 3.0)  # (1 - 3 + 0) / 3
    close(out.metrics["reward_accuracy"], 1.0 / 3.0)
    close(out.metrics["num_pairs"], 3.0)


def test_dpo_unequal_counts() -> None:
    # group 0: two preferred, one dispreferred
    p, r = errs([1.0, 2.0, 0.0, 1.0, 1.0])
    pref = torch.tensor([T, T, F, T, F])
    group = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"0: \(2, 1\)"):
        DiffusionDPOLoss(beta=1.0)(p, r, pref, group)
    # unchecked: pairs (g 1 vs 0) and (1 vs 1): (sp(-1) + sp(0)) / 2 = 0.503204
    close(DiffusionDPOLoss(beta=1.0, check_groups=False)(p, r, pref, group).loss, 0.5032044340)


# ---- SFTLoss --------------------------------------------------------------------------------


def test_sft_ignores_dispreferred_and_reference() -> None:
    assert not SFTLoss.needs_reference
    pref = torch.tensor([T, T, F, F])
    p = torch.tensor([1.0, 2.0, 10.0, 20.0], requires_grad=True)
    out = SFTLoss()(p, None, pref)
    close(out.loss, 1.5)  # (1 + 2) / 2
    out.loss.backward()
    torch.testing.assert_close(p.grad, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    close(SFTLoss()(torch.tensor([1.0, 2.0, 99.0, -5.0]), None, pref).loss, 1.5)
    close(out.metrics["policy_err_dispreferred"], 15.0)


# ---- shared ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective", [PopAlignLoss(1.0), PopulationBTLoss(1.0), DiffusionDPOLoss(1.0), SFTLoss()]
)
def test_metrics_detached_scalars(objective: Objective) -> None:
    p, r = errs([1.0, 0.5, 0.0, 2.0], grad=True)
    out = objective(p, r, torch.tensor([T, T, F, F]), torch.tensor([0, 1, 0, 1]))
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert out.metrics
    for name, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
        assert not value.requires_grad and value.grad_fn is None, name
        assert value.dtype == torch.float32, name


def test_float32_compute() -> None:
    p, r = errs([1.0, 0.0])
    out = PopAlignLoss(1.0)(p.to(torch.bfloat16), r.to(torch.bfloat16), torch.tensor([T, F]))
    assert out.loss.dtype == torch.float32


# ---- distributed kappa ----------------------------------------------------------------------

# rank 0 holds g = [1 | 2, 0] (preferred | dispreferred), rank 1 holds g = [5] (preferred)
# global mean (1 + 2 + 0 + 5) / 4 = 2; local means 1 and 5 (and their mean 3) are all wrong
SHARDS = {0: ([1.0, 2.0, 0.0], [T, F, F]), 1: ([5.0], [T])}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g, pref = SHARDS[rank]
        p, r = errs(g)
        out = PopAlignLoss(beta=1.0)(p, r, torch.tensor(pref))
        result = {"kappa": out.metrics["kappa"].item(), "loss": out.loss.item()}
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_kappa_is_global_mean_across_ranks(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    res = {k: json.loads((tmp_path / f"{k}.json").read_text()) for k in (0, 1)}
    assert res[0]["kappa"] == pytest.approx(2.0) and res[1]["kappa"] == pytest.approx(2.0)
    # rank 0: s*(g - 2) = [-1, 0, 2] -> (sp(1) + sp(0) + sp(-2)) / 3 = 0.711112
    assert res[0]["loss"] == pytest.approx(0.7111122930, rel=1e-6)
    # rank 1: s*(g - 2) = [3] -> sp(-3) = 0.048587
    assert res[1]["loss"] == pytest.approx(0.0485873516, rel=1e-6)


def test_objective_from_yaml_class_path() -> None:
    # the form the training config uses; typed __init__ arguments are the schema
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--objective", type=Objective)
    cfg = parser.parse_object(
        {"objective": {"class_path": "popalign.objectives.PopAlignLoss", "init_args": {"beta": 2.0}}}
    )
    objective = parser.instantiate_classes(cfg).objective
    assert isinstance(objective, PopAlignLoss) and objective.beta == 2.0
    assert objective.lambda_dispreferred == 1.0
