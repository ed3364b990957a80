"""Discrepancy, joint labels and specific-prompt accuracy: hand-computed values, validation, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from popalign.metrics import Discrepancy, SpecificAccuracy, joint_labels

SQRT2 = math.sqrt(2)


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def test_per_prompt_and_pooled_by_hand():
    labels = _t([0, 0, 0, 1, 0, 1])
    prompts = _t([0, 0, 0, 0, 1, 1])
    # prompt 0: [3, 1] -> p = [.75, .25], d = sqrt(.25^2 + .25^2) = .25 * sqrt2
    # prompt 1: [1, 1] -> p = [.5, .5], d = 0 ; per-prompt mean = .125 * sqrt2
    metric = Discrepancy(num_classes=2)
    metric.update(labels, prompts)
    assert metric.compute().item() == pytest.approx(0.125 * SQRT2)
    assert metric.per_prompt() == pytest.approx({0: 0.25 * SQRT2, 1: 0.0})
    dists = metric.distributions()
    assert dists.shape == (4096, 2)
    assert dists[0].tolist() == pytest.approx([0.75, 0.25]) and torch.isnan(dists[2]).all()
    # pooled: [4, 2] -> p = [2/3, 1/3], d = sqrt(2 * (1/6)^2) = sqrt2 / 6
    pooled = Discrepancy(num_classes=2, pooled=True)
    pooled.update(labels, prompts)
    assert pooled.compute().item() == pytest.approx(SQRT2 / 6)
    assert pooled.pooled_distribution().tolist() == pytest.approx([2 / 3, 1 / 3])


def test_updates_accumulate_and_default_prompt_is_zero():
    metric = Discrepancy(num_classes=2)
    metric.update(_t([0, 0]))
    metric.update(_t([0, 1]))
    # all prompt 0: [3, 1] -> .25 * sqrt2
    assert metric.compute().item() == pytest.approx(0.25 * SQRT2)
    assert list(metric.per_prompt()) == [0]


def test_class_never_predicted_counts_as_zero():
    metric = Discrepancy(num_classes=3)
    metric.update(_t([0, 0, 1, 1]))
    # p = [.5, .5, 0] vs 1/3 each: diff [1/6, 1/6, -1/3] -> sqrt(1/36 + 1/36 + 4/36) = sqrt(6) / 6
    assert metric.compute().item() == pytest.approx(math.sqrt(6) / 6)


def test_unknowns_are_ignored_but_counted():
    metric = Discrepancy(num_classes=2)
    # prompt 0: [0, 0, 0, 1] known + 1 unknown -> p = [.75, .25], d = .25 * sqrt2
    # prompt 1: only unknowns -> no distribution, left out of the mean
    metric.update(_t([0, 0, -1, 0, 1, -1, -1]), _t([0, 0, 0, 0, 0, 1, 1]))
    assert metric.compute().item() == pytest.approx(0.25 * SQRT2)
    assert list(metric.per_prompt()) == [0]
    assert metric.unknown_rate() == pytest.approx(3 / 7)  # 3 unknown of 7 images


def test_nothing_known_gives_nan():
    metric = Discrepancy(num_classes=2)
    metric.update(_t([-1, -1]))
    assert math.isnan(metric.compute().item())
    assert metric.unknown_rate() == 1.0


def test_non_uniform_target():
    metric = Discrepancy(num_classes=3, target=[0.7, 0.2, 0.1])
    metric.update(_t([0] * 5 + [1] * 3 + [2] * 2))
    # p = [.5, .3, .2], diff [-.2, .1, .1] -> sqrt(.04 + .01 + .01) = sqrt(.06)
    assert metric.compute().item() == pytest.approx(math.sqrt(0.06))


def test_opposite_biases_hide_when_pooled():
    labels = _t([0, 0, 0, 1, 0, 1, 1, 1])
    prompts = _t([0, 0, 0, 0, 1, 1, 1, 1])
    # prompt 0 -> [.75, .25], prompt 1 -> [.25, .75]: each .25 * sqrt2 away; pooled [4, 4] -> uniform
    per_prompt, pooled = Discrepancy(2), Discrepancy(2, pooled=True)
    per_prompt.update(labels, prompts)
    pooled.update(labels, prompts)
    assert pooled.compute().item() == pytest.approx(0.0, abs=1e-7)
    assert per_prompt.compute().item() == pytest.approx(0.25 * SQRT2)


@pytest.mark.parametrize(
    ("target", "match"),
    [([0.5, 0.5], "2 entries"), ([1.2, -0.1, -0.1], "non-negative"), ([0.3, 0.3, 0.3], "sum to 1")],
)
def test_bad_target_is_rejected(target, match):
    with pytest.raises(ValueError, match=match):
        Discrepancy(num_classes=3, target=target)


def test_target_within_tolerance_is_accepted():
    Discrepancy(num_classes=2, target=[0.5, 0.5 + 5e-7])


@pytest.mark.parametrize("labels", [[0, 2], [-2, 0]])
def test_out_of_range_labels_are_rejected(labels):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Discrepancy(num_classes=2).update(_t(labels))


def test_bad_label_dtype_and_prompt_ids_are_rejected():
    metric = Discrepancy(num_classes=2, max_prompts=4)
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="prompt_ids"):
        metric.update(_t([0, 1]), _t([0, 4]))
    with pytest.raises(ValueError, match="prompt_ids"):
        metric.update(_t([0, 1]), _t([0, -1]))
    with pytest.raises(ValueError, match="shape"):
        metric.update(_t([0, 1]), _t([0]))


def _biased_sample(n_per_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    # two prompts, each 70% class 0 / 30% class 1: d = sqrt(.2^2 + .2^2) = .2 * sqrt2 per prompt
    one = [0] * (7 * n_per_prompt // 10) + [1] * (3 * n_per_prompt // 10)
    return _t(one + one), _t([0] * len(one) + [1] * len(one))


def test_bootstrap_ci_contains_estimate_and_narrows():
    metric = Discrepancy(num_classes=2)
    small, large = _biased_sample(40), _biased_sample(1000)
    metric.update(*small)
    estimate = metric.compute().item()
    assert estimate == pytest.approx(0.2 * SQRT2)
    low, high = metric.bootstrap_ci(*small, num_resamples=500)
    assert low < estimate < high
    low_l, high_l = metric.bootstrap_ci(*large, num_resamples=500)
    assert low_l < estimate < high_l
    assert high_l - low_l < 0.5 * (high - low)  # width shrinks like 1/sqrt(n): 25x the data
    assert metric.bootstrap_ci(*small, num_resamples=500) == (low, high)  # seeded


def test_joint_labels_row_major_with_unknowns():
    gender = _t([0, 1, 1, -1, 0])
    race = _t([2, 5, 0, 3, -1])
    # gender * 6 + race: 0*6+2 = 2, 1*6+5 = 11, 1*6+0 = 6, unknown, unknown
    assert joint_labels([gender, race], [2, 6]).tolist() == [2, 11, 6, -1, -1]
    # three axes: (1 * 3 + 2) * 4 + 3 = 23
    assert joint_labels([_t([1]), _t([2]), _t([3])], [2, 3, 4]).tolist() == [23]
    with pytest.raises(ValueError, match="axis 1"):
        joint_labels([gender, _t([6, 0, 0, 0, 0])], [2, 6])
    with pytest.raises(ValueError, match="one class count per axis"):
        joint_labels([gender], [2, 6])


def test_specific_accuracy_per_axis_and_joint():
    requested = _t([[0, 2], [1, 3], [1, -1], [0, 1], [-1, -1]])
    predicted = _t([[0, 2], [1, 4], [1, 0], [-1, 1], [0, 0]])
    # gender named in rows 0-3, right in 0, 1, 2 (row 3 unknown = wrong) -> 3/4
    # race named in rows 0, 1, 3, right in 0, 3 -> 2/3
    # joint over rows 0-3 (row 4 names nothing): all named right in rows 0, 2 -> 2/4
    metric = SpecificAccuracy(num_axes=2, axis_names=["gender", "race"])
    metric.update(predicted[:2], requested[:2])
    metric.update(predicted[2:], requested[2:])
    out = metric.compute()
    assert set(out) == {"gender", "race", "joint"}
    assert out["gender"].item() == pytest.approx(0.75)
    assert out["race"].item() == pytest.approx(2 / 3)
    assert out["joint"].item() == pytest.approx(0.5)


def test_specific_accuracy_defaults_and_validation():
    metric = SpecificAccuracy(num_axes=2)
    metric.update(_t([[1, 0]]), _t([[1, -1]]))
    out = metric.compute()
    assert out["axis_0"].item() == 1.0 and math.isnan(out["axis_1"].item()) and out["joint"].item() == 1.0
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        metric.update(_t([1, 0]), _t([1, 0]))
    with pytest.raises(ValueError, match="distinct names"):
        SpecificAccuracy(num_axes=2, axis_names=["gender", "joint"])
    single = SpecificAccuracy(num_axes=1)
    single.update(_t([0, 1, -1]), _t([0, 0, 1]))  # 1-D allowed for one axis: 1 of 3 right
    assert single.compute()["axis_0"].item() == pytest.approx(1 / 3)


def _ddp_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 101  # odd: the ranks get unequal shares
    return {
        "labels": torch.randint(-1, 3, (n,), generator=g),
        "prompts": torch.randint(0, 5, (n,), generator=g),
        "requested": torch.randint(-1, 3, (n, 2), generator=g),
        "predicted": torch.randint(-1, 3, (n, 2), generator=g),
    }


def _metric_values(data: dict[str, torch.Tensor], batches: list[slice]) -> dict:
    per, pooled, acc = (
        Discrepancy(3, max_prompts=8),
        Discrepancy(3, pooled=True, max_prompts=8),
        SpecificAccuracy(2),
    )
    for s in batches:
        per.update(data["labels"][s], data["prompts"][s])
        pooled.update(data["labels"][s], data["prompts"][s])
        acc.update(data["predicted"][s], data["requested"][s])
    return {
        "per_prompt": per.compute().item(),
        "pooled": pooled.compute().item(),
        "by_prompt": {str(k): v for k, v in per.per_prompt().items()},
        "unknown_rate": per.unknown_rate(),
        "accuracy": {k: v.item() for k, v in acc.compute().items()},
    }


def _ddp_worker(rank: int, world_size: int, tmp: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world_size
    )
    try:
        # each rank sees every other image, in two batches
        mine = torch.arange(rank, 101, world_size)
        data = {k: v[mine] for k, v in _ddp_data().items()}
        half = len(mine) // 2
        values = _metric_values(data, [slice(0, half), slice(half, None)])
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(values))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters import torch and torchmetrics
def test_ddp_sync_matches_single_process(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    expected = _metric_values(_ddp_data(), [slice(None)])
    for rank in range(2):
        got = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert got["by_prompt"].keys() == expected["by_prompt"].keys()
        for key in ("per_prompt", "pooled", "unknown_rate"):
            assert got[key] == pytest.approx(expected[key])
        assert got["by_prompt"] == pytest.approx(expected["by_prompt"])
        assert got["accuracy"] == pytest.approx(expected["accuracy"])
