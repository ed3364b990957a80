"""How ``train.py fit`` stops: Ctrl-C and SIGTERM (a scheduler's preemption) each end it with one line,
and SIGTERM saves the step it interrupted. Resume equivalence after such stops: test_train_resume.py."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
from test_train_cli import CONFIG, QUIET

from popalign.cli import main
from popalign.module import PopAlignModule
from popalign.train_cli import cli_main


def _stopped_fit(capsys, args: list[str], signum: signal.Signals) -> tuple[int, list[str]]:
    """``train.py ARGS``, which a signal (sent or simulated by the test) stops: its exit status and
    stderr lines. The signal's handler is put back afterwards (Lightning leaves its own, or SIG_IGN)."""
    previous = signal.getsignal(signum)
    try:
        with pytest.raises(SystemExit) as stop:
            cli_main(["fit", "--config", CONFIG, *args, *QUIET])
    finally:
        signal.signal(signum, previous)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


STOPPED_BY_SIGTERM = "train.py: stopped by SIGTERM; resume from the last checkpoint with --ckpt_path last"


def _stopped_and_saved(path: Path, step: int) -> str:
    return (
        f"train.py: stopped by SIGTERM; saved {path.resolve()} at step {step}; resume with --ckpt_path last"
    )


def _tiny_here(tmp_path, monkeypatch, capsys, groups: int = 2) -> None:
    """Run from ``tmp_path``, with a tiny model and shards where configs/tiny.yaml looks (runs/tiny)."""
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", str(groups)]) == 0
    capsys.readouterr()


def _sigterm_as_step_3_starts(monkeypatch, failure: Exception | None = None) -> None:
    """This process sends itself SIGTERM as training step 3 starts (after the first checkpoint, every
    2 steps), and that step raises ``failure`` if given; Lightning's handler sets a flag and the loop
    stops after the step."""
    step = PopAlignModule.training_step

    def preempted(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            if failure is not None:
                raise failure
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PopAlignModule, "training_step", preempted)


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    # Lightning shuts down gracefully and calls sys.exit(1); the popalign stages exit 130 on Ctrl-C
    _tiny_here(tmp_path, monkeypatch, capsys)

    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(PopAlignModule, "training_step", interrupted)
    code, err = _stopped_fit(capsys, ["--trainer.max_steps=2"], signal.SIGINT)
    assert code == 130
    assert err[-1] == "train.py: interrupted; resume from the last checkpoint with --ckpt_path last", err


def test_sigterm_saves_the_step_exits_143_with_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    # a scheduler's preemption: Lightning stops fit with a SystemExit without a code, which exited 0
    # as if the run had finished (and made the demo go on to export a checkpoint not yet written);
    # the step the signal interrupted finishes and is saved (it was lost: last.ckpt stayed at step 2)
    _tiny_here(tmp_path, monkeypatch, capsys)
    step = PopAlignModule.training_step
    _sigterm_as_step_3_starts(monkeypatch)
    code, err = _stopped_fit(capsys, ["--trainer.max_steps=6"], signal.SIGTERM)
    last = tmp_path / "runs/tiny/checkpoints/last.ckpt"
    assert code == 143 and err[-1] == _stopped_and_saved(last, 3), err
    assert torch.load(last, weights_only=False)["global_step"] == 3
    monkeypatch.setattr(PopAlignModule, "training_step", step)
    cli = cli_main(["fit", "--config", CONFIG, "--trainer.max_steps=6", "--ckpt_path=last", *QUIET])
    assert cli.trainer.global_step == 6


def test_a_save_that_fails_at_the_sigterm_stop_is_reported_and_the_previous_checkpoint_kept(
    tmp_path, monkeypatch, capsys, caplog
):
    from popalign.checkpointing import WholeFileCheckpointIO

    _tiny_here(tmp_path, monkeypatch, capsys)
    save = WholeFileCheckpointIO.save_checkpoint

    def disk_full_at_step_3(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] == 3:
            raise OSError(28, "No space left on device")
        return save(self, checkpoint, path, storage_options)

    _sigterm_as_step_3_starts(monkeypatch)
    monkeypatch.setattr(WholeFileCheckpointIO, "save_checkpoint", disk_full_at_step_3)
    with caplog.at_level(logging.WARNING, logger="popalign.checkpointing"):
        code, err = _stopped_fit(capsys, ["--trainer.max_steps=6"], signal.SIGTERM)
    assert code == 143 and err[-1] == STOPPED_BY_SIGTERM, err
    assert (
        "could not save step 3 as SIGTERM stopped the run: [Errno 28] No space left on device" in caplog.text
    )
    assert torch.load("runs/tiny/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


def test_a_step_that_fails_after_sigterm_says_why_it_was_not_saved(tmp_path, monkeypatch, capsys):
    # the stop's line said only "resume from the last checkpoint": the error that lost the step (a
    # data worker's death, a failing step) went unreported
    _tiny_here(tmp_path, monkeypatch, capsys)
    _sigterm_as_step_3_starts(monkeypatch, RuntimeError("a data worker died\nmore detail"))
    code, err = _stopped_fit(capsys, ["--trainer.max_steps=6"], signal.SIGTERM)
    assert code == 143 and err[-1] == (
        "train.py: stopped by SIGTERM; the step in progress failed (RuntimeError: a data worker died); "
        "resume from the last checkpoint with --ckpt_path last"
    ), err
    assert torch.load("runs/tiny/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


def test_sigterm_to_the_process_group_with_data_workers_exits_143_with_one_line(
    tmp_path, monkeypatch, capsys
):
    # a scheduler signals the whole process group: torch's DataLoader workers died of the same SIGTERM
    # (its worker handler exits quietly only on its parent's SIGTERM), and the DataLoader reported that
    # as a RuntimeError (a traceback, exit 1) wherever the run was; popalign's workers outlive it, so
    # the step finishes and is saved
    import subprocess
    import time

    _tiny_here(tmp_path, monkeypatch, capsys, groups=4)
    step = PopAlignModule.training_step
    signalled, survived = [], []

    def preempted(self, batch, batch_idx):
        if self.trainer.global_step == 2 and not signalled:
            workers = multiprocessing.active_children()
            signalled.extend(w.pid for w in workers)
            pids = [str(pid) for pid in (*signalled, os.getpid())]
            subprocess.run(["kill", "-s", "TERM", *pids], check=True)  # sent by another process
            time.sleep(2)  # a worker's death would reach this process while it is inside the step
            survived.extend(w.is_alive() for w in workers)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PopAlignModule, "training_step", preempted)
    code, err = _stopped_fit(capsys, ["--trainer.max_steps=6", "--data.num_workers=2"], signal.SIGTERM)
    assert len(signalled) == 2, "two data workers and this process get the signal"
    assert survived == [True, True]
    last = tmp_path / "runs/tiny/checkpoints/last.ckpt"
    assert code == 143 and err[-1] == _stopped_and_saved(last, 3), err
    assert not any("Traceback" in line for line in err), err
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert not multiprocessing.active_children()


def test_sigterm_in_the_middle_of_gradient_accumulation_finishes_the_window_and_saves_its_step(
    tmp_path, monkeypatch, capsys
):
    # 2 batches per optimizer step in epochs of 5 batches (the epoch's last batch steps alone), a
    # checkpoint every 2 steps: SIGTERM during batch 6 (step 3 done, the first half of step 4
    # accumulated). A checkpoint after batch 6 would not hold the accumulated gradients (it used to
    # stop there unsaved, back to step 2), so the run trains batch 7 too and saves step 4
    _tiny_here(tmp_path, monkeypatch, capsys)
    step, batches = PopAlignModule.training_step, []

    def preempted(self, batch, batch_idx):
        batches.append(batch_idx)
        if len(batches) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PopAlignModule, "training_step", preempted)
    args = ["--trainer.max_steps=6", "--trainer.accumulate_grad_batches=2"]
    code, err = _stopped_fit(capsys, args, signal.SIGTERM)
    last = Path("runs/tiny/checkpoints/last.ckpt")
    assert code == 143 and err[-1] == _stopped_and_saved(last, 4), err
    assert len(batches) == 7
    assert torch.load(last, weights_only=True)["global_step"] == 4
