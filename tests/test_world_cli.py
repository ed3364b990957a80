"""A cached world base model is reused only when it is complete, and `popalign world` says whether it
built or reused the folder."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from conftest import TINY_WORLD_BASE, torch_threads

from popalign.cli import main as cli_main
from popalign.demo_settings import DemoSettings
from popalign.world import base as wb

TINY = TINY_WORLD_BASE


def test_build_records_every_file_size(tiny_base):
    files = wb.read_meta(tiny_base)["files"]
    assert set(wb.REQUIRED_FILES) <= set(files)
    assert (
        files["unet/diffusion_pytorch_model.safetensors"]
        == (tiny_base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    )
    assert wb.cache_problem(tiny_base, config=TINY) is None


@pytest.mark.parametrize("damage", ["delete_weights", "delete_config", "truncate"])
def test_incomplete_cache_is_rebuilt(tiny_base, tmp_path, count_training, capsys, damage):
    out = tmp_path / "model"
    shutil.copytree(tiny_base, out)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "delete_weights":
        weights.unlink()
    elif damage == "delete_config":
        (out / "unet" / "config.json").unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    assert wb.cache_problem(out, config=TINY).startswith("incomplete: unet/")
    wb.build_base_model(out, config=TINY, progress=False)
    assert count_training == [1]
    assert "the cached base model is incomplete" in capsys.readouterr().err
    assert wb.cache_problem(out, config=TINY) is None and weights.stat().st_size > 100


def test_folder_without_recorded_sizes_checks_the_required_files(tiny_base, tmp_path):
    # base models built before the sizes were recorded (e.g. an existing runs/demo/base)
    out = tmp_path / "model"
    shutil.copytree(tiny_base, out)
    meta = wb.read_meta(out)
    del meta["files"]
    (out / wb.META_FILE).write_text(json.dumps(meta))
    assert wb.cache_problem(out, config=TINY) is None
    (out / "text_encoder_2" / "model.safetensors").unlink()
    assert (
        wb.cache_problem(out, config=TINY)
        == "incomplete: text_encoder_2/model.safetensors is missing or truncated"
    )
    assert wb.cache_problem(out, config=dataclasses.replace(TINY, seed=1)) == "built with other settings"
    assert wb.cache_problem(tmp_path / "none", config=TINY) == "no base model"


def test_world_command_says_built_or_reused(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wb, "BaseTrainConfig", lambda seed: dataclasses.replace(TINY, seed=seed))
    out = tmp_path / "model"
    shutil.copytree(tiny_base, out)
    assert cli_main(["world", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "up to date, reused (built earlier in" in text and "build took" not in text
    (out / "vae" / "config.json").unlink()
    threads = []
    build = wb.build_base_model
    monkeypatch.setattr(
        wb, "build_base_model", lambda *a, **k: threads.append(torch.get_num_threads()) or build(*a, **k)
    )
    with torch_threads(1):
        assert cli_main(["world", "--out", str(out), "--quiet", "--threads", "2"]) == 0
        assert threads == [2] and torch.get_num_threads() == 1  # the caller's count is given back
    text = capsys.readouterr().out
    assert "  built in " in text and "reused" not in text


@pytest.mark.parametrize("command", ["world", "demo"])
def test_help_has_no_none_defaults(command, capsys):
    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text)  # no flag shows two defaults
    if command == "demo":
        assert (
            f"optimizer steps (default: {DemoSettings().train_steps})" in text
            and "(default: configs/demo.yaml)" in text
        )
