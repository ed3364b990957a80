"""The README's tiny run: `popalign tiny`, `train.py fit --config configs/tiny.yaml`, then resume from `last`."""

from __future__ import annotations

from pathlib import Path

import torch

from popalign.cli import main
from popalign.train_cli import cli_main

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def test_tiny_fit_writes_checkpoint_and_logs_then_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "4"]) == 0
    cli_main(["fit", "--config", CONFIG, "--trainer.max_steps=4", "--trainer.enable_progress_bar=false"])
    last = tmp_path / "runs/tiny/checkpoints/last.ckpt"
    assert last.exists()
    assert list((tmp_path / "runs/tiny/logs").rglob("events.out.tfevents.*")), "no TensorBoard logs"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])

    # a restart picks up the step counter, the optimizer and the schedule from `last`
    cli = cli_main(
        [
            "fit",
            "--config",
            CONFIG,
            "--trainer.max_steps=6",
            "--ckpt_path=last",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 6
    adam_steps = {int(s["step"]) for s in cli.trainer.optimizers[0].state.values()}
    assert adam_steps == {6}


def test_bad_shards_path_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    try:
        cli_main(["fit", "--config", CONFIG, "--data.train_shards=nowhere/shards"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("a missing shard folder must stop the run")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error:") and "nowhere/shards" in err[-1]
