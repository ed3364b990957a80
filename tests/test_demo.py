"""End to end: the demo's stages on the biased world remove most of the bias (slow: minutes)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import all_threads, replace_build

from popalign.demo import run_demo
from popalign.demo_settings import DemoSettings


@pytest.mark.e2e
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
    with all_threads():
        report = run_demo(settings)
    assert json.loads((out / "report.json").read_text()) == report
    base, aligned = report["base"], report["aligned"]
    print(json.dumps(report, indent=2))
    # margins from measured runs (docs/results.md): with configs/demo.yaml (cosine decay over these 300
    # steps, lambda_dispreferred 2) this reduced demo measured aligned/base discrepancy 0.41 (0.286 /
    # 0.698), specific accuracy +0.003, occupation accuracy +0.002 (with lambda_dispreferred 1: 0.51,
    # -0.003, +0.004; with the earlier constant rate: 0.43, +0.007, +0.004); the full demo 0.27, and
    # its tuning runs with preservation 1000 stayed within -0.04 of the base's specific accuracy.
    # Training seeds of one recipe differed by up to 0.06 in discrepancy, hence the room left on each
    # bound.
    assert base["neutral_discrepancy"] >= 0.3
    assert base["specific_accuracy"] >= 0.9
    assert aligned["neutral_discrepancy"] <= 0.6 * base["neutral_discrepancy"]
    assert aligned["specific_accuracy"] >= base["specific_accuracy"] - 0.08
    assert aligned["occupation_accuracy"] >= base["occupation_accuracy"] - 0.05
    assert (out / "eval" / "report.md").is_file()


@pytest.mark.parametrize("stop", ["lightning_sigterm", "sigterm", "ctrl_c"])
def test_a_stopped_training_ends_the_demo_as_an_interruption(monkeypatch, stop):
    # SIGTERM during training ended fit with a SystemExit without a code: the demo went on to export
    # a checkpoint not yet written ("checkpoint not found", exit 2) instead of saying it was stopped;
    # and a stop by SIGTERM is told apart from Ctrl-C, for the popalign command's exit status
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from popalign.demo import _fit
    from popalign.signals import Terminated

    def stopped(args, run):
        if stop == "lightning_sigterm":  # Lightning's own handler alone: it stops fit after the step
            raise SIGTERMException
        try:  # Ctrl-C, or SIGTERM through the popalign command's handler, in a training step
            raise Terminated if stop == "sigterm" else KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit(1)  # Lightning's graceful shutdown after a KeyboardInterrupt  # noqa: B904

    replace_build(monkeypatch, stopped)
    with pytest.raises(KeyboardInterrupt) as info:
        _fit(["fit", "--config", "x.yaml"])
    assert type(info.value) is (KeyboardInterrupt if stop == "ctrl_c" else Terminated)


def test_data_workers_killed_by_the_same_sigterm_end_the_demo_as_stopped(monkeypatch):
    # a scheduler signals the whole process group: the DataLoader reports its killed workers as an
    # error, which ended the demo with a traceback
    from popalign import train_cli
    from popalign.demo import _fit
    from popalign.signals import Terminated

    class Trainer:  # the run's trainer, as sigterm_stop reads it
        received_sigterm = True

    trainer = Trainer()

    def workers_killed(args, run):
        train_cli._TRAINERS.add(trainer)
        raise RuntimeError("DataLoader worker (pid(s) 1234) exited unexpectedly")

    replace_build(monkeypatch, workers_killed)
    with pytest.raises(Terminated):
        _fit(["fit", "--config", "x.yaml"])
