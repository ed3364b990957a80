"""SIGTERM in a run of two gloo processes (`train.py fit`, DDP on CPU; also FSDP and DeepSpeed ZeRO-3):
every rank stops after the same step, that step is saved, and the run resumed from it ends where an
unstopped run ends."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from launch import deepspeed, fit_tiny
from safetensors.torch import load_file

STEPS = 7  # the tiny config's epochs are 5 batches: the stop, the resume and the end span two
ADAMW = {"optimizer": None}  # the config's AdamW: its moments must resume too


def _sigterm(step: int, rank: int, group: bool, epoch_end: bool = False) -> dict:
    return {
        "class_path": "cpu_strategies.SigtermAt",
        "init_args": {"step": step, "rank": rank, "group": group, "epoch_end": epoch_end},
    }


def _stopped_and_resumed(root, name: str, strategy, sigterm: dict, accumulate: int = 1):
    """A run stopped by ``sigterm``: (its process, the step in its last.ckpt); then the same run
    resumed with --ckpt_path last: its final policy."""
    ckpts = root / f"{name}_ckpts"
    more = {"checkpoints": ckpts, "save_last": True, "new_session": True, "accumulate": accumulate, **ADAMW}
    stopped = fit_tiny(root, name, strategy, "float32", STEPS, **more, callbacks=[sigterm])
    step = _saved_step(ckpts / "last.ckpt") if stopped.returncode else None
    resumed = fit_tiny(root, f"{name}_resumed", strategy, "float32", STEPS, **more, ckpt_path="last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return stopped, step, load_file(str(root / f"{name}_resumed.safetensors"))


def _saved_step(last: Path) -> int:
    """The step a checkpoint holds: a file, or a DeepSpeed folder (each rank's model states hold it)."""
    if last.is_dir():
        last = sorted((last / "checkpoint").glob("*model_states.pt"))[0]
    return torch.load(last, weights_only=True)["global_step"]


STRATEGIES = {
    "ddp": "ddp",
    "fsdp_blocks": {"class_path": "cpu_strategies.CPUBlockFSDPStrategy"},
    "zero3": deepspeed(3),
}


@pytest.fixture(scope="module")
def straight(tiny_run):
    """``straight(strategy, accumulate=1)``: the final policy of the same run under ``strategy``, not stopped."""
    finished: dict[tuple[str, int], dict] = {}

    def run(strategy: str, accumulate: int = 1) -> dict:
        if (strategy, accumulate) not in finished:
            name = f"straight_{strategy}_{accumulate}"
            proc = fit_tiny(
                tiny_run, name, STRATEGIES[strategy], "float32", STEPS, accumulate=accumulate, **ADAMW
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            finished[strategy, accumulate] = load_file(str(tiny_run / f"{name}.safetensors"))
        return finished[strategy, accumulate]

    return run


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        pytest.param("fsdp_blocks", marks=pytest.mark.slow),  # FSDP: a collective save
        pytest.param(  # every rank writes its partition of the weights and optimizer state
            "zero3",
            marks=[
                pytest.mark.slow,
                pytest.mark.deepspeed,
                pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
            ],
        ),
    ],
)
def test_sigterm_to_one_rank_stops_both_after_its_step_and_saves_it(tiny_run, straight, strategy):
    # the signal reaches rank 1 alone during step 3; rank 0 learns of it from the vote after step 3:
    # both stop after step 3 and save it (Lightning's handling hung: its handler's broadcast on one
    # rank met another collective on the other)
    name = f"one_rank_{strategy}"
    stopped, step, resumed = _stopped_and_resumed(tiny_run, name, STRATEGIES[strategy], _sigterm(2, 1, False))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    lines = stopped.stderr.strip().splitlines()
    saved = tiny_run / f"{name}_ckpts/last.ckpt"
    assert lines[-1] == f"train.py: stopped by SIGTERM; saved {saved} at step 3; resume with --ckpt_path last"
    assert sum(line.startswith("train.py: stopped by SIGTERM") for line in lines) == 1  # rank 0's
    assert step == 3
    assert _same(resumed, straight(strategy)), "the resumed run did not end where the unstopped run ends"


def test_sigterm_to_the_process_group_during_gradient_accumulation_stops_every_rank_after_the_window(
    tiny_run, straight
):
    # a scheduler's preemption: both ranks get the signal, each at its own point of its step. With 2
    # batches a step (epochs of 5 batches: 3 steps) it comes in the first batch of step 4: the ranks
    # skip the vote in the middle of the window (a checkpoint would not hold the accumulated
    # gradients; they stopped there, unsaved, back to step 3), train the second batch, agree and
    # save step 4. (Without accumulation: the tests above and below.)
    stopped, step, resumed = _stopped_and_resumed(
        tiny_run, "group", "ddp", _sigterm(3, 1, True), accumulate=2
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert step == 4
    assert stopped.stderr.strip().splitlines()[-1].endswith("at step 4; resume with --ckpt_path last")
    assert _same(resumed, straight("ddp", 2)), "the resumed run did not end where the unstopped run ends"


def test_sigterm_between_epochs_stops_after_the_next_epochs_first_step_and_saves_it(tiny_run, straight):
    # the signal comes after the vote on epoch 0's last step (5): the ranks agreed at epoch 1's first
    # fetch, where no save is made (a checkpoint between epochs would resume one epoch ahead), and the
    # run stopped with only the epoch's checkpoint; now they train epoch 1's first step and save it
    stopped, step, resumed = _stopped_and_resumed(
        tiny_run, "between_epochs", "ddp", _sigterm(5, 1, True, epoch_end=True)
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert step == 6
    assert stopped.stderr.strip().splitlines()[-1].endswith("at step 6; resume with --ckpt_path last")
    assert _same(resumed, straight("ddp")), "the resumed run did not end where the unstopped run ends"


def test_lightning_still_has_the_sigterm_handling_popalign_replaces():
    # AgreedSigtermStop replaces these two by name; under another name Lightning's would run again
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    assert callable(getattr(_SignalConnector, "_sigterm_notifier_fn", None))
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))
