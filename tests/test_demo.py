"""End to end: the demo's stages on the biased world remove most of the bias (slow: minutes)."""

from __future__ import annotations

import json
import shutil

import pytest

from popalign.demo import DemoSettings, run_demo


@pytest.mark.slow
def test_reduced_demo_debiases(world_base, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(world_base, out / "base")  # the cache key matches: no second base build
    settings = DemoSettings(
        out=str(out),
        neutral_images=48,
        augmented_images=8,
        groups_per_prompt=6,
        train_steps=300,
        eval_images=48,
        eval_specific_images=8,
        progress=False,
    )
    report = run_demo(settings)
    assert json.loads((out / "report.json").read_text()) == report
    base, aligned = report["base"], report["aligned"]
    print(json.dumps(report, indent=2))
    # margins from measured runs (docs/results.md): this reduced demo measured aligned/base discrepancy
    # 0.43 (0.299 / 0.687) with specific accuracy +0.007 and occupation accuracy +0.004 (500 steps:
    # 0.43, +0.0, -0.009); the full demo 0.33 with specific accuracy unchanged, and its tuning runs
    # with preservation 1000 stayed within -0.04 of the base's specific accuracy. Two training seeds
    # of one recipe differed by 0.06 in discrepancy, hence the room left on each bound.
    assert base["neutral_discrepancy"] >= 0.3
    assert base["specific_accuracy"] >= 0.9
    assert aligned["neutral_discrepancy"] <= 0.6 * base["neutral_discrepancy"]
    assert aligned["specific_accuracy"] >= base["specific_accuracy"] - 0.08
    assert aligned["occupation_accuracy"] >= base["occupation_accuracy"] - 0.05
    assert (out / "eval" / "report.md").is_file()
