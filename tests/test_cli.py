"""The ``popalign`` entry point: unknown flags reported by their subcommand, and ``popalign tiny``'s
checks, training hint and all-or-nothing replacement of its output."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import assert_usual_modes, run_cli
from conftest import cli_fails as fails

from popalign.cli import build_parser, main
from popalign.commands.tiny import CONFIG_OUT, next_command

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--groups", "2", "--population-size", "1", "--image-size", "8"]


def parse_error(args: list[str], capsys) -> list[str]:
    """stderr lines of an argparse error (exit 2) for ``popalign ARGS``."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_unknown_flag_shows_the_subcommand_usage_and_the_closest_flag(capsys):
    err = parse_error(["prompts", "--prompts", "x.txt", "--axis", "gender", "--out", "p.jsonl"], capsys)
    assert err[0].startswith("usage: popalign prompts ")
    assert err[-1] == "popalign prompts: error: unrecognized arguments: --axis gender (did you mean --axes?)"

    err = parse_error(["tiny", "--population_size=3", "--bogus"], capsys)
    assert err[0].startswith("usage: popalign tiny ")
    assert err[-1] == (
        "popalign tiny: error: unrecognized arguments: --population_size=3 --bogus "
        "(did you mean --population-size?)"
    )
    err = parse_error(["tiny", "--bogus"], capsys)
    assert err[-1] == "popalign tiny: error: unrecognized arguments: --bogus"

    # the parser the demo runs stages with reports the same way
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tiny", "--outt", "x"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "popalign tiny: error: unrecognized arguments: --outt x (did you mean --out?)"
    )


def test_invalid_choice_and_command_errors_are_unchanged(capsys):
    err = parse_error(["export", "x.ckpt", "--out", "o", "--dtype", "fp8"], capsys)
    assert err[0].startswith("usage: popalign export ")
    assert err[-1].startswith("popalign export: error: argument --dtype: invalid choice: 'fp8'")
    err = parse_error(["nope"], capsys)
    assert err[0].startswith("usage: popalign [-h]")
    assert err[-1].startswith("popalign: error: argument COMMAND: invalid choice: 'nope'")


def test_empty_values_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # `--out "$OUT"` with OUT unset: would otherwise write into the current folder
    monkeypatch.chdir(tmp_path)
    for args, name in [
        (["tiny", "--out", ""], "--out"),
        (["prompts", "--prompts", "x.txt", "--axes", "gender", "", "--out", "p.jsonl"], "--axes"),
        (["export", "", "--out", "o"], "checkpoint"),
    ]:
        err = parse_error(args, capsys)
        assert err[0].startswith(f"usage: popalign {args[0]} ")
        assert (
            err[-1] == f"popalign {args[0]}: error: argument {name}: empty value (an unset shell variable?)"
        )
    assert not list(tmp_path.iterdir())


def test_config_out_is_where_configs_tiny_yaml_reads():
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    assert config["model"]["init_args"]["pretrained_model"] == f"{CONFIG_OUT}/model"
    assert config["data"]["train_shards"] == f"{CONFIG_OUT}/shards"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A tiny model and shards (seed 0) built by ``popalign tiny``."""
    out = tmp_path_factory.mktemp("tiny") / "t"
    assert main(["tiny", "--out", str(out), *SMALL]) == 0
    return out


def test_tiny_hint_trains_on_what_was_built(tmp_path, capsys, monkeypatch, umask_022):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["tiny", "--out", "runs/t3", *SMALL], capsys)
    assert code == 0 and (tmp_path / "runs/t3/model/model_index.json").is_file()
    assert_usual_modes(tmp_path / "runs/t3", umask_022)  # the weights too, which safetensors writes 0600
    assert len(list((tmp_path / "runs/t3/shards").glob("*.tar"))) == 2
    assert out.splitlines()[-1] == (
        "next: python train.py fit --config configs/tiny.yaml "
        "--model.init_args.pretrained_model runs/t3/model --data.train_shards runs/t3/shards"
    )
    code, out, _ = run_cli(["tiny", *SMALL], capsys)  # the config's own folder: nothing to override
    assert code == 0 and (tmp_path / CONFIG_OUT / "model/model_index.json").is_file()
    assert out.splitlines()[-1] == "next: python train.py fit --config configs/tiny.yaml"
    for same in ("runs/tiny/", "./runs/tiny", str(tmp_path / "runs/tiny")):
        assert next_command(same) == "python train.py fit --config configs/tiny.yaml"
    assert next_command("my runs/t").endswith(
        "--model.init_args.pretrained_model 'my runs/t/model' --data.train_shards 'my runs/t/shards'"
    )


def test_tiny_out_that_is_a_file_is_one_line(tmp_path, capsys):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("keep\n")
    fails(["tiny", "--out", jobs, *SMALL], capsys, f"{jobs}: is a file, not a folder")
    fails(["tiny", "--out", jobs / "sub", *SMALL], capsys, f"{jobs / 'sub'}: {jobs} is a file")
    assert jobs.read_text() == "keep\n"


def test_tiny_failures_leave_the_previous_model_and_shards(built, tmp_path, capsys, monkeypatch):
    out = tmp_path / "t2"
    shutil.copytree(built, out)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"a training run's checkpoint")
    before = contents(out)

    for flags, message in (
        (["--population-size", "0"], "--population-size must be >= 1, got 0"),
        (["--groups", "0"], "--groups must be >= 1, got 0"),
        (["--image-size", "12"], "--image-size must be a positive multiple of 8, got 12"),
        (["--image-size", "0"], "--image-size must be a positive multiple of 8, got 0"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
    ):
        fails(["tiny", "--out", out, *SMALL, *flags], capsys, message)
        assert contents(out) == before
    fails(["tiny", "--out", tmp_path / "new", "--groups", "0"], capsys, "--groups")
    assert not (tmp_path / "new").exists()

    # a failure half-way through the build: the old folders stay, the partial ones go
    from popalign.data.shards import PopulationShardWriter

    def broken(self, group):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PopulationShardWriter, "write", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["tiny", "--out", str(out), *SMALL, "--seed", "1"])
    assert contents(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "model", "shards"]  # no partial folders
    monkeypatch.undo()

    # a complete build replaces model/ and shards/ and keeps the rest
    code, _, _ = run_cli(["tiny", "--out", out, *SMALL, "--seed", "1"], capsys)
    after = contents(out)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["checkpoints", "model", "shards"]
    assert after["checkpoints/last.ckpt"] == b"a training run's checkpoint"
    unet = "model/unet/diffusion_pytorch_model.safetensors"
    assert after[unet] != before[unet]  # seed 1, not the copied seed-0 model
    assert {k for k in after if k.startswith("shards/")} == {k for k in before if k.startswith("shards/")}


def test_transformers_torchvision_advice_is_dropped_and_its_other_warnings_kept(tmp_path, caplog):
    # transformers >= 5 logs this once per image-processor class diffusers' pipelines name, on every
    # generate and evaluate of a machine without torchvision, which popalign does not use
    (tmp_path / "jobs.txt").write_text("doctor\n")
    out = tmp_path / "p.jsonl"
    assert (
        main(["prompts", "--prompts", str(tmp_path / "jobs.txt"), "--axes", "gender", "--out", str(out)]) == 0
    )
    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        logger.warning("some other note")
    assert [r.getMessage() for r in caplog.records] == ["some other note"]
