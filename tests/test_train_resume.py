"""A resumed run trains on the batches, in the epochs and at the learning rates an uninterrupted run
would: stopped mid-epoch, at an epoch's last batch, twice, or extended after it finished."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal

import pytest
from test_train_cli import CONFIG, QUIET, WARMUP, _logged

from popalign.cli import main
from popalign.module import PopAlignModule
from popalign.train_cli import cli_main


def _straight_and_resumed(monkeypatch, flags: list[str], total: int, stops: list[int], sigterm: str = ""):
    """(epoch, batch keys) of every training step of a run of ``total`` steps, and of the same run
    stopped after each of ``stops`` and resumed from ``last`` each time (6 tiny groups, 2 per batch).

    The stops are ``max_steps``, or with ``sigterm`` a SIGTERM sent to this process and its data
    workers, as a scheduler's preemption signals every process of a job: during step ``stop``
    (``"step"``), or once it ended, after the checkpoint callback's hook (``"late"``)."""
    assert main(["tiny", "--out", "runs/tiny", "--groups", "6"]) == 0
    trained: list[tuple[int, list[str]]] = []
    step, stopping, sent = PopAlignModule.training_step, [""], set()  # signals in the stopped runs only

    def preempt(at: int, when: str) -> None:
        if stopping[0] == when and at in stops and at not in sent:  # once per stop
            sent.add(at)
            for pid in [*(w.pid for w in multiprocessing.active_children()), os.getpid()]:
                os.kill(pid, signal.SIGTERM)

    def recording(self, batch, batch_idx):
        trained.append((self.trainer.current_epoch, list(batch["keys"])))
        preempt(self.trainer.global_step + 1, "step")
        return step(self, batch, batch_idx)

    def after_the_batch(self, outputs, batch, batch_idx):  # the module's hook runs after the callbacks'
        preempt(self.trainer.global_step, "late")

    monkeypatch.setattr(PopAlignModule, "training_step", recording)
    monkeypatch.setattr(PopAlignModule, "on_train_batch_end", after_the_batch, raising=False)
    fit = ["fit", "--config", CONFIG, *flags, *QUIET]
    cli_main([*fit, f"--trainer.max_steps={total}"])
    straight, trained[:] = list(trained), []
    shutil.rmtree("runs/tiny/checkpoints")
    stopping[0] = sigterm
    for i, stop in enumerate([*stops, total]):
        resume = ["--ckpt_path=last"] if i else []
        if not sigterm or stop == total:
            cli_main([*fit, f"--trainer.max_steps={stop}", *resume])
            continue
        handler = signal.getsignal(signal.SIGTERM)
        try:
            with pytest.raises(SystemExit) as stopped:
                cli_main([*fit, f"--trainer.max_steps={total}", *resume])
        finally:
            signal.signal(signal.SIGTERM, handler)
        assert stopped.value.code == 143
    return straight, trained


def test_a_run_resumed_mid_epoch_trains_on_the_batches_an_uninterrupted_run_would(
    tmp_path, monkeypatch, recwarn
):
    # configs/tiny.yaml: epochs of 5 batches, a checkpoint every 2 steps; two data workers, so each
    # worker's share of the trained batches is skipped on resume (it restarted the epoch: the
    # resumed run trained on batches 1-3 again, and Lightning warned the loader was not resumable)
    monkeypatch.chdir(tmp_path)
    straight, resumed = _straight_and_resumed(monkeypatch, ["--data.num_workers=2"], 7, [2])
    assert len(straight) == 7 and len({tuple(keys) for _, keys in straight[:5]}) > 1
    assert resumed == straight  # steps 1-2, then 3-5 (the rest of epoch 0) and 6-7 (epoch 1)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


@pytest.mark.parametrize(("workers", "stops"), [(2, [3]), (0, [5, 9])])
def test_a_finished_run_extended_from_its_final_checkpoint_trains_the_same_batches_and_rates(
    tmp_path, monkeypatch, workers, stops
):
    # max_steps off the checkpoint period (every 2 steps): last.ckpt was the step before the final one
    # (the extended run trained that step twice); saved at the end of fit instead, Lightning counts
    # the unfinished epoch as done and the extended run skipped the rest of its batches
    monkeypatch.chdir(tmp_path)
    flags = [f"--data.num_workers={workers}", *WARMUP]
    straight, resumed = _straight_and_resumed(monkeypatch, flags, 11, stops)
    assert resumed == straight
    lr = _logged(tmp_path / "runs/tiny/logs", "lr-AdamW")  # both runs' logs: one value per step
    assert [lr[s] for s in range(11)] == pytest.approx(
        [1e-4 * min(s + 1, 8) / 8 for s in range(11)], rel=1e-6
    )


@pytest.mark.parametrize(
    ("length", "workers", "stop"),
    [("5", 2, 10), ("null", 0, 6)],  # epochs of 5 batches; one pass of 3 batches (6 groups, 2 per batch)
)
def test_a_run_resumed_from_an_epochs_last_batch_trains_the_next_epoch(
    tmp_path, monkeypatch, length, workers, stop
):
    # a checkpoint at the last batch of epoch 1 (step `stop`): the resumed run skipped epoch 2's
    # batches (its loader state continued epoch 1's empty remainder, which Lightning trained as epoch 2)
    monkeypatch.chdir(tmp_path)
    flags = [f"--data.num_workers={workers}", f"--data.batches_per_epoch={length}"]
    straight, resumed = _straight_and_resumed(monkeypatch, flags, stop + 4, [stop])
    assert [epoch for epoch, _ in straight[stop - 1 : stop + 1]] == [1, 2]  # `stop` ends epoch 1
    assert resumed == straight


@pytest.mark.parametrize(("workers", "boundary"), [(0, 6), (2, 4)])  # passes of 3 and of 4 batches
def test_a_second_resume_after_a_one_pass_epoch_boundary_trains_the_same_batches(
    tmp_path, monkeypatch, workers, boundary
):
    # one pass over the shards per epoch: stopped at an epoch's end, resumed 2 steps into the next
    # epoch, resumed again. Lightning counts that epoch's batches on from the finished one's there,
    # so the second checkpoint recorded a batch only prefetched as trained, and the second resume
    # skipped it
    monkeypatch.chdir(tmp_path)
    flags = [f"--data.num_workers={workers}", "--data.batches_per_epoch=null"]
    straight, resumed = _straight_and_resumed(monkeypatch, flags, 12, [boundary, boundary + 2])
    assert resumed == straight


@pytest.mark.parametrize(
    ("workers", "stops", "when"),
    # off the checkpoint period (every 2 steps); 5 ends epoch 0: a late signal there stops the run
    # after step 6 (a checkpoint between epochs would resume one epoch ahead), which is saved
    [
        (0, [3], "step"),
        (2, [5], "step"),
        (2, [3, 7], "step"),
        (0, [3], "late"),
        (2, [3, 7], "late"),
        (0, [5], "late"),
    ],
)
def test_a_run_stopped_by_sigterm_resumes_after_the_interrupted_step(
    tmp_path, monkeypatch, workers, stops, when
):
    # a preemption saved nothing: the resumed run went back to the last periodic checkpoint and trained
    # the steps since it again; with data workers their deaths failed the step in progress
    monkeypatch.chdir(tmp_path)
    flags = [f"--data.num_workers={workers}", *WARMUP]
    straight, resumed = _straight_and_resumed(monkeypatch, flags, 9, stops, sigterm=when)
    assert resumed == straight
    lr = _logged(tmp_path / "runs/tiny/logs", "lr-AdamW")
    assert [lr[s] for s in range(9)] == pytest.approx([1e-4 * min(s + 1, 8) / 8 for s in range(9)], rel=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sigterm_during_gradient_accumulation_resumes_after_the_window(tmp_path, monkeypatch, workers):
    # 2 batches a step, epochs of 5 batches (3 steps: the last batch steps alone): the signal comes in
    # the first batch of step 4 (epoch 1); the run trains the second too and saves step 4, and the
    # resumed run goes on with epoch 1's third batch. A stop after the first batch was not saved:
    # the run went back to step 2 and trained steps 3 and 4 again.
    monkeypatch.chdir(tmp_path)
    flags = [f"--data.num_workers={workers}", "--trainer.accumulate_grad_batches=2", *WARMUP]
    straight, resumed = _straight_and_resumed(monkeypatch, flags, 6, [4], sigterm="step")
    assert resumed == straight and len(straight) == 10
