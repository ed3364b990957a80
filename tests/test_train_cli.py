"""The README's tiny run: `popalign tiny`, `train.py fit --config configs/tiny.yaml`, then resume from `last`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from popalign.cli import main
from popalign.train_cli import cli_main

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


WARMUP = [
    "--model.init_args.lr_scheduler.class_path=popalign.optim.ConstantWithWarmup",
    "--model.init_args.lr_scheduler.init_args.warmup_steps=8",
]


def _logged(run: Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of a scalar over every TensorBoard event file under ``run``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in run.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def test_tiny_fit_writes_checkpoint_and_logs_then_resumes(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "4"]) == 0
    fit = ["fit", "--config", CONFIG, *WARMUP, "--trainer.enable_progress_bar=false"]
    cli_main([*fit, "--trainer.max_steps=4"])
    last = tmp_path / "runs/tiny/checkpoints/last.ckpt"
    assert last.exists()
    assert list((tmp_path / "runs/tiny/logs").rglob("events.out.tfevents.*")), "no TensorBoard logs"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])

    # a restart picks up the step counter, the optimizer and the schedule from `last`
    cli = cli_main([*fit, "--trainer.max_steps=6", "--ckpt_path=last"])
    assert cli.trainer.global_step == 6
    adam_steps = {int(s["step"]) for s in cli.trainer.optimizers[0].state.values()}
    assert adam_steps == {6}
    # warm-up over 8 steps, stepped every optimizer step (not every epoch of 5 batches), across the
    # restart: step s trains with lr = 1e-4 * (s + 1) / 8, as LearningRateMonitor logged it
    assert cli.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4 * 7 / 8)
    lr = _logged(tmp_path / "runs/tiny/logs", "lr-AdamW")
    assert sorted(lr) == list(range(6))
    assert [lr[s] for s in range(6)] == pytest.approx([1e-4 * (s + 1) / 8 for s in range(6)], rel=1e-6)

    # the config's optimizer settings win over the checkpoint's (README): a new peak rate continues
    # the warm-up at step 6 from the new base, and the change is logged
    new = [
        "--model.init_args.optimizer.init_args.lr=2e-4",
        "--model.init_args.optimizer.init_args.weight_decay=0.05",
    ]
    with caplog.at_level(logging.WARNING, logger="popalign.resume"):
        cli = cli_main([*fit, "--trainer.max_steps=8", "--ckpt_path=last", *new])
    group = cli.trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == 2e-4 and group["weight_decay"] == 0.05
    lr = _logged(tmp_path / "runs/tiny/logs", "lr-AdamW")
    assert [lr[s] for s in (6, 7)] == pytest.approx([2e-4 * 7 / 8, 2e-4 * 8 / 8], rel=1e-6)
    changed = [r.getMessage() for r in caplog.records if "changed optimizer settings" in r.getMessage()]
    assert len(changed) == 1 and changed[0].endswith("lr: 0.0001 -> 0.0002; weight_decay: 0.01 -> 0.05")

    # a fresh run into the same checkpoint folder would write last-v1.ckpt beside this run's last.ckpt
    # (which export would then take): refused in one line, nothing written
    before = sorted(p.name for p in last.parent.iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli_main([*fit, "--trainer.max_steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"train.py: error: {last.parent}: holds the checkpoints of an earlier run")
    assert "last.ckpt" in err[0] and "--ckpt_path last" in err[0]
    assert sorted(p.name for p in last.parent.iterdir()) == before


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
    # checked before the logger starts a run: no empty version_N folder is left behind
    assert not (tmp_path / "runs/tiny/logs").exists()


def _fails(capsys, args: list[str]) -> list[str]:
    """Run train.py with ``args``; it must exit 2; returns its stderr lines."""
    try:
        cli_main(args)
    except SystemExit as stop:
        assert stop.code == 2, capsys.readouterr().err
    else:
        raise AssertionError(f"expected exit 2: {args}")
    return capsys.readouterr().err.strip().splitlines()


QUIET = ["--trainer.enable_progress_bar=false"]


def test_resume_runs_the_config_given_and_refuses_what_cannot_change(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    assert main(["tiny", "--out", "runs/other", "--groups", "2", "--seed", "1"]) == 0
    cli_main(["fit", "--config", CONFIG, "--trainer.max_steps=2", *QUIET])
    resume = ["fit", "--config", CONFIG, "--ckpt_path=last", *QUIET]

    # a setting switched on at resume is used (LightningCLI would parse the checkpoint's over it)
    with caplog.at_level(logging.WARNING, logger="popalign.resume"):
        cli = cli_main([*resume, "--trainer.max_steps=3", "--model.init_args.ema_decay=0.9"])
    assert cli.trainer.global_step == 3 and cli.model.ema is not None
    # the changed setting is logged (README: "the changed settings are logged")
    changed = [r.getMessage() for r in caplog.records if "with changed settings" in r.getMessage()]
    assert len(changed) == 1 and changed[0].endswith("with changed settings: ema_decay: None -> 0.9"), changed
    ckpt = torch.load(tmp_path / "runs/tiny/checkpoints/last.ckpt", weights_only=True)
    assert any(k.startswith("ema.shadow.") for k in ckpt["state_dict"])
    # a moved base with the same weights resumes
    (tmp_path / "runs/tiny/model").rename(tmp_path / "moved")
    cli = cli_main([*resume, "--trainer.max_steps=4", "--model.init_args.pretrained_model=moved"])
    assert cli.trainer.global_step == 4

    runs = sorted(p.name for p in (tmp_path / "runs/tiny/logs").rglob("version_*"))
    err = _fails(
        capsys, [*resume, "--model.init_args.pretrained_model=moved", "--model.init_args.lora_rank=4"]
    )
    assert err[-1].startswith("train.py: error:") and "trained with lora_rank=None, this run has 4" in err[-1]
    assert err[-1].endswith("(pass --model.init_args.lora_rank null)")
    err = _fails(capsys, [*resume, "--model.init_args.pretrained_model=runs/other/model"])
    assert "trained from another base model than runs/other/model" in err[-1]
    # refused before the logger starts: no run folder holding only a config and an empty event file
    assert sorted(p.name for p in (tmp_path / "runs/tiny/logs").rglob("version_*")) == runs
    # a checkpoint file named directly is checked the same way
    err = _fails(
        capsys,
        [
            "fit",
            "--config",
            CONFIG,
            *QUIET,
            "--ckpt_path=runs/tiny/checkpoints/last.ckpt",
            "--model.init_args.pretrained_model=runs/other/model",
        ],
    )
    assert err[-1] == (
        "train.py: error: runs/tiny/checkpoints/last.ckpt: trained from another base model than "
        "runs/other/model (weights or architecture differ); resume with the run's own base"
    ), err
    assert sorted(p.name for p in (tmp_path / "runs/tiny/logs").rglob("version_*")) == runs


def test_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    (tmp_path / "garbage.ckpt").write_text("not a checkpoint")
    (tmp_path / "binary.yaml").write_bytes(b"\xb9\x00\xff\xfe")
    (tmp_path / "broken.yaml").write_text("model:\n  class_path: [a, b\n")
    capsys.readouterr()  # `popalign tiny`'s progress bars
    fit = ["fit", "--config", CONFIG, *QUIET]
    for args, message in (
        (["--model.init_args.preservation_weight=-1"], "preservation_weight must be >= 0"),
        (["--model.init_args.lora_rank=0"], "lora_rank must be >= 1"),
        (["--model.init_args.pretrained_model=runs/tiny/shards"], "runs/tiny/shards: no 'unet/' folder"),
        (["--model.init_args.pretrained_model=./runs/nowhere"], "./runs/nowhere: model not found"),
        # a hub id that cannot be fetched (the tests run offline): one line, not jsonargparse's dump
        (
            ["--model.init_args.pretrained_model=nobody/no-such-sdxl"],
            "nobody/no-such-sdxl: cannot load the UNet (not in the local cache, and the hub could not be reached:",
        ),
        (["--ckpt_path=nowhere.ckpt"], "nowhere.ckpt: checkpoint not found"),
        (["--ckpt_path=garbage.ckpt"], "garbage.ckpt: not a PyTorch checkpoint"),
        # config files: named (jsonargparse's YAML errors say "<unicode string>"; binary: a traceback)
        (["--config", "binary.yaml"], "binary.yaml: not a text file (not UTF-8)"),
        (
            ["--config=broken.yaml"],
            'broken.yaml: invalid YAML (while parsing a flow sequence in "broken.yaml"',
        ),
        # Lightning's and torch's own checks of a value: one line naming the key
        (["--trainer.max_steps=-5"], "trainer: `max_steps` must be a non-negative integer or -1"),
        (["--model.init_args.optimizer.init_args.lr=-1"], "model.init_args.optimizer: Invalid learning rate"),
        (["--trainer.strategy=bogus"], "trainer: You selected an invalid strategy name: `strategy='bogus'`"),
        # values that train without an error, but nothing (beta 0) or towards the bias (beta < 0)
        (["--model.init_args.objective.init_args.beta=0"], "objective: beta must be > 0, got 0.0"),
        (["--model.init_args.objective.init_args.beta=-1"], "objective: beta must be > 0, got -1.0"),
        (
            ["--model.init_args.ema_decay=1.5"],
            "model: ema_decay must be in (0, 1) (or null for none), got 1.5",
        ),
        (
            [
                "--model.init_args.lr_scheduler.class_path=popalign.optim.CosineWithWarmup",
                "--model.init_args.lr_scheduler.init_args.total_steps=5",
                "--model.init_args.lr_scheduler.init_args.warmup_steps=10",
            ],
            "model.init_args.lr_scheduler: total_steps must exceed warmup_steps (10), got 5",
        ),
    ):
        err = _fails(capsys, fit + args)
        assert len(err) <= 2 and err[-1].startswith("train.py: error:") and message in err[-1], err
    # each refused before the logger makes a run folder (one holding only a config would be left)
    assert not (tmp_path / "runs/tiny/logs").exists(), list((tmp_path / "runs/tiny/logs").rglob("*"))
    # validate without validation shards; test and predict, which this module cannot run
    err = _fails(capsys, ["validate", "--config", CONFIG, *QUIET])
    assert (
        err[-1]
        == "train.py: error: validate needs validation shards: pass --data.val_shards (popalign build's --out)"
    )
    for sub in ("test", "predict"):
        err = _fails(capsys, [sub, "--config", CONFIG])
        assert "invalid choice: '" + sub + "' (choose from 'fit', 'validate')" in err[0], err
    # parse errors: the refused key, without the page of usage text before it
    for args, message in (
        (["--model.init_args.lr=1e-3"], "Option 'lr' is not accepted"),
        (["--optimizer=SGD"], "unrecognized arguments: --optimizer"),  # one optimizer knob: the model's
        (  # a class_path that does not import: why, and the close name, not every union subtype tried
            ["--model.init_args.objective.class_path=popalign.objectives.PopAlignLos"],
            "class_path 'popalign.objectives.PopAlignLos': module 'popalign.objectives' has no attribute "
            "'PopAlignLos' (did you mean popalign.objectives.PopAlignLoss?)",
        ),
        (
            ["--model.init_args.objective.class_path=popalign_nowhere.Loss"],
            "No module named 'popalign_nowhere'",
        ),
        (  # optimizers are a callable type: jsonargparse words it differently
            ["--model.init_args.optimizer.class_path=torch.optim.SGDD"],
            "class_path 'torch.optim.SGDD': module 'torch.optim' has no attribute 'SGDD' (did you mean",
        ),
    ):
        err = _fails(capsys, fit + args)
        assert len(err) == 2 and " fit: error: " in err[0] and message in err[0], err
    # no config at all: what is missing, where it comes from, and the subcommand's help
    err = _fails(capsys, ["fit", *QUIET])
    assert len(err) == 2 and err[0].endswith(
        " fit: error: the following arguments are required: fit.data.train_shards, fit.model "
        "(a --config gives them, e.g. --config configs/tiny.yaml)"
    )
    assert err[1].endswith(" fit --help` lists every option)"), err


def test_a_requeued_job_passing_ckpt_path_last_every_time_gets_plain_messages(tmp_path, monkeypatch):
    # the first run, before any checkpoint: Lightning's warning advised save_last=True, which the config
    # has; every resume: "Checkpoint directory ... exists and is not empty", though the folder is fixed
    # on purpose and a fresh run into it is refused (processes of their own: pytest shows warnings its
    # own way)
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    train = Path(__file__).parents[1] / "train.py"

    def job(steps: int) -> str:
        fit = ["fit", "--config", CONFIG, f"--trainer.max_steps={steps}", "--ckpt_path=last", *QUIET]
        proc = subprocess.run([sys.executable, str(train), *fit], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    first = job(2)
    folder = tmp_path / "runs/tiny/checkpoints"
    assert f"--ckpt_path last: no last checkpoint in {folder} yet; training from step 0" in first, first
    assert "HINT" not in first and "Restored" not in first, first
    resumed = job(3)
    assert "Restored all states from the checkpoint" in resumed
    assert "exists and is not empty" not in resumed, resumed


def test_a_checkpoint_callback_without_dirpath_resumes_from_last(tmp_path, monkeypatch):
    # Lightning's default folder is the logger's version_N: a restart (version_N+1) would not find `last`
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    plain = [
        "--trainer.callbacks=null",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
    ]
    cli_main(
        ["fit", "--config", CONFIG, *plain, "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"]
    )
    assert (tmp_path / "runs/tiny/logs/checkpoints/last.ckpt").exists()
    cli = cli_main(
        [
            "fit",
            "--config",
            CONFIG,
            *plain,
            "--trainer.max_steps=3",
            "--ckpt_path=last",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 3  # continued from 2


def test_arguments_from_python_are_not_taken_for_a_mistake(monkeypatch, recwarn, capsys):
    """The demo runs the training in-process with its own arguments while sys.argv holds `popalign
    demo ...`; Lightning's warning about args= beside a command line is not for that case."""
    import sys

    monkeypatch.setattr(sys, "argv", ["popalign", "demo", "--out", "runs/demo"])
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--help"])
    assert exit_.value.code == 0 and "--trainer.max_steps" in capsys.readouterr().out
    assert not [str(w.message) for w in recwarn if "args parameter" in str(w.message)]


def test_rich_progress_bar_shows_no_negative_epoch_and_an_integer_version(
    tmp_path, monkeypatch, capsys, caplog
):
    # Lightning's rich bar (its default when rich is installed) printed "Epoch 0/-2" (max_epochs is -1
    # when max_steps limits the run) and "v_num: 0.000"
    pytest.importorskip("rich")
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        cli = cli_main(["fit", "--config", CONFIG, "--trainer.max_steps=2"])
    out = capsys.readouterr().out
    # Lightning's own lines still show, its litlogger advert does not
    said = [r.getMessage() for r in caplog.records]
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in said and not [m for m in said if "Tip:" in m]
    assert cli.trainer.max_epochs == -1 and "Epoch 0 " in out and "/-2" not in out, out
    assert "v_num: 0 " in out, out  # the version, not a metric "0.000"
    # a run limited by epochs keeps the stock "Epoch 0/0"
    shutil.rmtree(tmp_path / "runs/tiny/checkpoints")
    args = ["fit", "--config", CONFIG, "--trainer.max_steps=-1", "--trainer.max_epochs=1"]
    cli = cli_main([*args, "--trainer.limit_train_batches=1"])
    assert cli.trainer.max_epochs == 1 and "Epoch 0/0 " in capsys.readouterr().out


def test_last_checkpoint_is_the_final_step_and_a_truncated_one_is_refused(tmp_path, monkeypatch, capsys):
    # checkpoints every 2 steps, 3 steps: Lightning left last.ckpt at step 2 (it saves `last` at the end
    # only when nothing was saved before), so a resume or an export took a step that was not the last
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    cli_main(["fit", "--config", CONFIG, "--trainer.max_steps=3", *QUIET])
    last = tmp_path / "runs/tiny/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]

    # a truncated last.ckpt (a copy cut short): one line naming it, not a traceback from the zip reader
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)
    capsys.readouterr()
    err = _fails(capsys, ["fit", "--config", CONFIG, "--trainer.max_steps=4", "--ckpt_path=last", *QUIET])
    assert err[-1] == (
        f"train.py: error: {last.resolve()}: not a PyTorch checkpoint (not a zip archive: truncated, or "
        "another format) (--ckpt_path last resolves to it); resume from another of the run's "
        "checkpoints: --ckpt_path FILE"
    ), err
