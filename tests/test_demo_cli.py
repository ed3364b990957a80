"""`popalign demo` without its minutes of work: argument and config checks, the size record, interrupts,
resuming training, reusing finished --compare runs and removing stale outputs (stages stubbed)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import yaml
from conftest import replace_build, torch_threads

from popalign import demo, demo_compare, demo_settings
from popalign.cli import main as cli_main
from popalign.errors import UserError


def _run(args, capsys):
    code = cli_main(["demo", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train-steps", "0"], "--train-steps must be an integer >= 1, got 0"),
        (["--train-steps", "-1"], "--train-steps must be an integer >= 1, got -1"),
        (["--neutral-images", "0"], "--neutral-images must be an integer >= 1, got 0"),
        (["--augmented-images", "-2"], "--augmented-images must be an integer >= 1, got -2"),
        (["--eval-images", "0"], "--eval-images must be an integer >= 1, got 0"),
        (["--eval-specific-images", "0"], "--eval-specific-images must be an integer >= 1, got 0"),
        (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
        (["--compare-seeds", "1"], "--compare-seeds and --compare-objectives need --compare"),
        (
            ["--compare", "--compare-seeds", "1", "1"],
            "--compare-seeds must be distinct seeds >= 0, got [1, 1]",
        ),
        # numpy refuses negative seeds, after minutes of the base model's build
        (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["--compare", "--compare-seeds", "-1"], "--compare-seeds must be distinct seeds >= 0, got [-1]"),
    ],
)
def test_bad_flags_are_one_line_errors_before_any_stage(tmp_path, capsys, flags, message):
    out = tmp_path / "demo"
    code, err = _run(["--out", str(out), *flags], capsys)
    assert (code, err) == (2, f"popalign demo: error: {message}")
    assert not out.exists()


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").touch()
    code, err = _run(["--out", str(tmp_path / "afile")], capsys)
    assert (code, err) == (2, f"popalign demo: error: --out {tmp_path / 'afile'}: exists and is not a folder")


def _config(tmp_path, change) -> Path:
    config = yaml.safe_load(demo_settings.find_config().read_text())
    change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _no_checkpoint(config):
    config["trainer"]["callbacks"] = []


def _no_save_last(config):
    config["trainer"]["callbacks"][0]["init_args"]["save_last"] = False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["trainer"].pop("logger"), "trainer.logger must be a logger with init_args"),
        (_no_checkpoint, "needs a ModelCheckpoint with save_last: true"),
        (_no_save_last, "needs a ModelCheckpoint with save_last: true"),
        (lambda c: c.pop("data"), "no data section"),
    ],
)
def test_unusable_config_is_refused_up_front(tmp_path, capsys, change, message):
    config = _config(tmp_path, change)
    code, err = _run(["--out", str(tmp_path / "demo"), "--config", str(config)], capsys)
    assert code == 2 and err.startswith(f"popalign demo: error: --config {config}: ") and message in err
    assert "\n" not in err and not (tmp_path / "demo").exists()


def test_missing_config(tmp_path, capsys):
    code, err = _run(["--out", str(tmp_path / "demo"), "--config", str(tmp_path / "none.yaml")], capsys)
    assert (code, err) == (2, f"popalign demo: error: --config {tmp_path / 'none.yaml'}: no such file")


def test_other_sizes_or_seed_in_the_same_out_are_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    s = demo_settings.DemoSettings(out=str(out), neutral_images=16, augmented_images=4)
    demo_settings.check_data_record(s, write=True)  # what make_shards records before generating
    assert json.loads((out / "demo_data.json").read_text())["neutral_images"] == 16
    (out / "images").mkdir()
    demo_settings.check_data_record(s)  # the same sizes: accepted
    code, err = _run(["--out", str(out), "--neutral-images", "8", "--augmented-images", "4"], capsys)
    assert code == 2 and "--neutral-images 16 (asked: 8)" in err and "--augmented-images" not in err
    assert "use another --out" in err and "\n" not in err
    code, err = _run(
        ["--out", str(out), "--neutral-images", "16", "--augmented-images", "4", "--seed", "1"], capsys
    )
    assert code == 2 and "--seed 0 (asked: 1)" in err


def test_images_without_a_record_are_refused(tmp_path):
    out = tmp_path / "demo"
    (out / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="did not record its sizes"):
        demo_settings.check_data_record(demo_settings.DemoSettings(out=str(out)))
    (out / "images").rmdir()
    demo_settings.check_data_record(
        demo_settings.DemoSettings(out=str(out)), write=True
    )  # no data yet: recorded


def test_stage_interrupt_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    from popalign.commands import generate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "run", interrupted)
    monkeypatch.setattr(
        demo, "base_and_shards", lambda s, stage: demo.make_shards(s, tmp_path, 2, 1.5, stage)
    )
    code = cli_main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert (code, err) == (130, "popalign demo: interrupted; run the same command again to resume")


def test_stage_error_names_the_stage_once(tmp_path, capsys, monkeypatch):
    from popalign.commands import generate

    def bad(args):
        raise UserError("base: cannot load the pipeline")

    monkeypatch.setattr(generate, "run", bad)
    monkeypatch.setattr(
        demo, "base_and_shards", lambda s, stage: demo.make_shards(s, tmp_path, 2, 1.5, stage)
    )
    code = cli_main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert (code, err) == (2, "popalign demo: error: generate: base: cannot load the pipeline")


def test_interrupted_training_is_a_keyboard_interrupt(monkeypatch):

    def lightning_fit(args, run):
        # what Lightning does on Ctrl-C: catch it, ignore SIGINT from then on, sys.exit(1)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            sys.exit(1)

    # a process started in the background by a non-interactive shell inherits SIGINT ignored: install
    # Python's usual handler, so that the signal below is the Ctrl-C of a terminal
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    replace_build(monkeypatch, lightning_fit)
    try:
        with pytest.raises(KeyboardInterrupt):
            demo._fit(["fit"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    finally:
        signal.signal(signal.SIGINT, inherited)

    def config_error(args, run):
        raise ValueError("while instantiating") from UserError("model: lora_rank must be >= 1")

    replace_build(monkeypatch, config_error)
    with pytest.raises(UserError, match="^train: model: lora_rank must be >= 1$"):
        demo._fit(["fit"])


@pytest.fixture
def fake_training(monkeypatch):
    """Stubs train.py fit and export: records the fit arguments; a fit writes last.ckpt (and, when
    ``interrupt`` holds True, stops with KeyboardInterrupt after writing it)."""
    calls, interrupt = [], [False]

    def fit(args):
        calls.append(args)
        config = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
        ckpt = Path(config["trainer"]["callbacks"][0]["init_args"]["dirpath"])
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "last.ckpt").write_text("step")
        if interrupt[0]:
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_fit", fit)
    monkeypatch.setattr(demo, "_cli", lambda args: None)
    return calls, interrupt


def test_training_resumes_or_is_reused(tmp_path, fake_training):
    calls, interrupt = fake_training
    s, run = demo_settings.DemoSettings(out=str(tmp_path), train_steps=30), tmp_path / "train"
    interrupt[0] = True
    with pytest.raises(KeyboardInterrupt):
        demo.train_and_export(s, tmp_path / "base", tmp_path / "shards", run, 0)
    assert "--ckpt_path" not in calls[-1]
    interrupt[0] = False
    demo.train_and_export(s, tmp_path / "base", tmp_path / "shards", run, 0)  # the same command again
    assert calls[-1][-2:] == ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    demo.train_and_export(s, tmp_path / "base", tmp_path / "shards", run, 0)  # finished: not retrained
    assert len(calls) == 2
    other = demo_settings.DemoSettings(out=str(tmp_path), train_steps=40)  # another config: from step 0
    (run / "checkpoints" / "epoch=0-step=20.ckpt").write_text("stale")
    demo.train_and_export(other, tmp_path / "base", tmp_path / "shards", run, 0)
    assert len(calls) == 3 and "--ckpt_path" not in calls[-1]
    assert not (run / "checkpoints" / "epoch=0-step=20.ckpt").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 40


def test_shards_built_anew_are_trained_on_anew(tmp_path, fake_training):
    # the cache key is the config and the shards' build fingerprint: the same config on shards drawn
    # from other inputs (or by another rule) trains from step 0, and once finished is reused
    calls, _ = fake_training
    s, run, shards = demo_settings.DemoSettings(out=str(tmp_path)), tmp_path / "train", tmp_path / "shards"
    shards.mkdir()
    for inputs, trained in (("aaa", 1), ("aaa", 1), ("bbb", 2), ("bbb", 2)):
        (shards / "summary.json").write_text(json.dumps({"inputs": inputs}))
        demo.train_and_export(s, tmp_path / "base", shards, run, 0)
        assert len(calls) == trained and "--ckpt_path" not in calls[-1]
    assert (run / "config.yaml").read_text().startswith("# trained on shards built from inputs bbb ")


def test_a_decaying_schedule_spans_the_run(tmp_path, fake_training):
    calls, _ = fake_training
    config = yaml.safe_load(demo_settings.find_config().read_text())
    config["model"]["init_args"]["lr_scheduler"] = {
        "class_path": "popalign.optim.CosineWithWarmup",
        "init_args": {"total_steps": 1200, "warmup_steps": 10},
    }
    path = tmp_path / "cosine.yaml"
    path.write_text(yaml.safe_dump(config))
    for steps, warmup in ((30, 10), (5, 4)):
        s = demo_settings.DemoSettings(out=str(tmp_path), config=str(path), train_steps=steps)
        demo.train_and_export(s, tmp_path / "base", tmp_path / "shards", tmp_path / f"t{steps}", 0)
        written = yaml.safe_load((tmp_path / f"t{steps}" / "config.yaml").read_text())
        args = written["model"]["init_args"]["lr_scheduler"]["init_args"]
        assert (
            written["trainer"]["max_steps"] == args["total_steps"] == steps and args["warmup_steps"] == warmup
        )
    assert len(calls) == 2


ROW = dict.fromkeys(demo.REPORT_KEYS, 0.5)


@pytest.fixture
def fake_compare(tmp_path, monkeypatch):
    """Stubs the stages of run_compare; returns the list of evaluated runs (their output folders)."""
    evaluated, fail_at = [], [None]
    monkeypatch.setattr(
        demo, "base_and_shards", lambda s, stage: (tmp_path / "base", 20, 1.5, tmp_path / "sh")
    )
    monkeypatch.setattr(demo, "train_and_export", lambda s, base, shards, run, seed: run / "aligned")

    def evaluate_pair(s, base, aligned, out, steps, guidance, with_baseline=True):
        if len(evaluated) == fail_at[0]:
            raise KeyboardInterrupt
        evaluated.append(out)
        return {"metrics": {"neutral.discrepancy": 0.5, "specific.accuracy": 0.5, "adherence.accuracy": 0.5,
                            "fid": 0.5}}  # fmt: skip

    monkeypatch.setattr(demo, "evaluate_pair", evaluate_pair)
    return evaluated, fail_at


def test_compare_reuses_finished_runs_and_never_leaves_stale_results(tmp_path, fake_compare):
    evaluated, fail_at = fake_compare
    out = tmp_path / "demo"
    out.mkdir()
    (out / "compare.md").write_text("old results")
    (out / "compare.json").write_text("{}")
    s = demo_settings.DemoSettings(out=str(out), train_steps=5, eval_images=4)
    objectives = demo_compare.COMPARE_OBJECTIVES[:2]
    fail_at[0] = 3  # interrupted in the third run (base, PopAlign s0, PopAlign s1, ...)
    with pytest.raises(KeyboardInterrupt):
        demo_compare.run_compare(s, (0, 1), objectives)
    assert not (out / "compare.md").exists() and not (out / "compare.json").exists()
    fail_at[0] = None
    path = demo_compare.run_compare(s, (0, 1), objectives)  # the same command again: 3 runs are reused
    assert [p.parent.name if p.name == "eval" else p.name for p in evaluated[3:]] == [
        "PopulationBTLoss-s0",
        "PopulationBTLoss-s1",
    ]
    text = path.read_text()
    command = "popalign demo --compare --out {} --train-steps 5 --eval-images 4 --compare-seeds 0 1 "
    command += "--compare-objectives PopAlignLoss PopulationBTLoss"
    assert f"Command: `{command.format(out)}`" in text and "2 seeds" in text
    result = json.loads((out / "compare.json").read_text())
    assert result["settings"]["train_steps"] == 5 and result["settings"]["seeds"] == [0, 1]
    assert result["rows"]["PopAlignLoss"] == [ROW, ROW]
    demo_compare.run_compare(dataclass_replace(s, eval_images=8), (0, 1), objectives)  # other settings: rerun
    assert len(evaluated) == 5 + 5
    (tmp_path / "sh").mkdir()
    (tmp_path / "sh" / "summary.json").write_text(json.dumps({"inputs": "other"}))  # shards drawn anew
    demo_compare.run_compare(dataclass_replace(s, eval_images=8), (0, 1), objectives)
    assert len(evaluated) == 10 + 4  # every training again; the base's evaluation does not use them


def dataclass_replace(s, **kw):
    import dataclasses

    return dataclasses.replace(s, **kw)


def test_demo_removes_the_previous_results_and_runs_in_its_threads(tmp_path, monkeypatch):
    import torch

    out = tmp_path / "demo"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "report.md").write_text("old")
    (out / "report.json").write_text("{}")

    threads = []

    def interrupted(s, stage):
        threads.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "base_and_shards", interrupted)
    with torch_threads(2):
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(demo_settings.DemoSettings(out=str(out), threads=3))
        assert threads == [3]  # the run's setting, and the caller's back after it
        assert torch.get_num_threads() == 2
    assert not (out / "eval").exists() and not (out / "report.json").exists()
