"""Every YAML under configs/ (recursively) parses with the training CLI, and builds with a tiny model."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from popalign.train_cli import cli_main

CONFIGS = sorted(str(p) for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_configs_found():
    assert len(CONFIGS) >= 4, CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).name)
def test_config_parses(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", config, "--print_config"])
    assert stop.value.code == 0
    printed = yaml.safe_load(out.getvalue())
    source = yaml.safe_load(Path(config).read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    objective = source["model"]["init_args"].get("objective")
    if objective:
        assert printed["model"]["init_args"]["objective"]["class_path"] == objective["class_path"]
    assert printed["data"]["train_shards"] == source["data"]["train_shards"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).name)
def test_config_builds_on_a_tiny_model(config, tiny_model):
    # the real hub ids are swapped for the tiny pipeline; everything else is the config's own
    cli = cli_main(
        [
            "--config",
            config,
            f"--model.init_args.pretrained_model={tiny_model}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.logger=false",
        ],
        run=False,
    )
    source = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
    assert cli.model.lora == (source.get("lora_rank") is not None)
    assert (cli.model.reference is None) == (cli.model.lora or not cli.model.needs_reference)
    assert cli.trainer.max_steps == yaml.safe_load(Path(config).read_text())["trainer"]["max_steps"]
