"""Reading device values back on the host (each one a host sync on a GPU), found on a CPU: what
:class:`~popalign.models.flops.HostReads` catches, and that `train.py fit` reads nothing back on
the steps that neither log nor checkpoint."""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from test_train_cli import WARMUP

from popalign.cli import main
from popalign.models.flops import HostReads
from popalign.train_cli import cli_main

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"

x = torch.arange(-3.0, 3.0)
mask = x > 0
READS = {  # each reads back once, as the op named
    "item": (lambda: x.sum().item(), "_local_scalar_dense"),
    "branch on a tensor": (lambda: 1 if (x > 0).any() else 0, "_local_scalar_dense"),
    "equal": (lambda: torch.equal(x, x), "equal"),
    "nonzero": (lambda: mask.nonzero(), "nonzero"),
    "mask index": (lambda: x[mask], "index"),
    "mask assignment": (lambda: x.clone().__setitem__(mask, 0.0), "index_put_"),
    "masked_select": (lambda: x.masked_select(mask), "masked_select"),
    "unique": (lambda: torch.unique(mask), "_unique2"),
    "repeat_interleave by a tensor": (lambda: x.repeat_interleave(torch.ones(6, dtype=torch.long)), "repeat_interleave"),
}  # fmt: skip
QUIET = {  # sizes known without the values
    "arithmetic": lambda: (x * 2).exp().sum(),
    "index by positions": lambda: x[torch.tensor([0, 2])],
    "where": lambda: torch.where(mask, x, 0.0),
    "masked mean": lambda: (x * mask).sum() / mask.sum(),
    "repeat_interleave by an int": lambda: x.repeat_interleave(2),
    "repeat_interleave sized": lambda: x.repeat_interleave(torch.ones(6, dtype=torch.long), output_size=6),
}


@pytest.mark.parametrize("name", READS)
def test_host_reads_names_the_op_and_the_line(name):
    fn, op = READS[name]
    line = inspect.getsourcelines(fn)[1]
    with HostReads() as reads:
        fn()
    assert reads.reads == [(op, f"{__file__}:{line}")]


@pytest.mark.parametrize("name", QUIET)
def test_host_reads_leaves_ops_of_known_size_alone(name):
    with HostReads() as reads:
        QUIET[name]()
    assert reads.reads == []


class _StepStarts(Callback):
    """Where each training batch starts in a growing list of ``events``: ``(step, len(events))``, with
    ``step`` the optimizer step (1-based) the batch makes, and ``None`` as an epoch ends."""

    def __init__(self, events: list) -> None:
        self.events, self.starts = events, []

    def on_train_batch_start(self, trainer, *_) -> None:  # noqa: ANN001 - Lightning's signature
        self.starts.append((trainer.global_step + 1, len(self.events)))

    def on_train_epoch_end(self, trainer, *_) -> None:  # noqa: ANN001 - Lightning's signature
        self.starts.append((None, len(self.events)))

    def by_step(self) -> dict[int | None, list]:
        """The events during each step's batches (``None``: before the first, between epochs)."""
        found: dict[int | None, list] = {}
        bounds = [(None, 0), *self.starts, (None, len(self.events))]
        for (step, lo), (_, hi) in zip(bounds, bounds[1:]):
            found.setdefault(step, []).extend(self.events[lo:hi])
        return found


LOG_EVERY, STEPS = 4, 8
CHECKPOINT_EVERY = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"][0]["init_args"]
CHECKPOINT_EVERY = CHECKPOINT_EVERY["every_n_train_steps"]  # the tiny config's ModelCheckpoint
QUIET_STEPS = [k for k in range(1, STEPS + 1) if k % LOG_EVERY and k % CHECKPOINT_EVERY]  # no log, no save


def fit_watched(tmp_path, monkeypatch, watch, more: list[str] = ()) -> dict[int | None, list]:
    """``train.py fit`` of configs/tiny.yaml (a tiny model and shards built in ``tmp_path``) for
    ``STEPS`` steps, logging every ``LOG_EVERY``, with what the SDXL configs switch on around the step
    (fused AdamW, clipping, a warm-up schedule) and an EMA, inside ``watch()``, a context manager whose
    value is a list of events it appends to; ``more``: further arguments. Returns the events by step
    (:meth:`_StepStarts.by_step`)."""
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    args = [
        "--config",
        str(CONFIG),
        f"--trainer.max_steps={STEPS}",
        f"--trainer.log_every_n_steps={LOG_EVERY}",
    ]
    args += ["--model.init_args.optimizer.init_args.fused=true", "--trainer.gradient_clip_val=1.0", *WARMUP]
    cli = cli_main([*args, "--model.init_args.ema_decay=0.99", *more], run=False)
    with watch() as events:
        starts = _StepStarts(events)
        cli.trainer.callbacks.append(starts)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == STEPS
    return starts.by_step()


@contextmanager
def _host_reads():
    with HostReads() as watched:
        yield watched.reads


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_training_reads_back_only_on_steps_that_log_or_checkpoint(tmp_path, monkeypatch, capsys, bar):
    # Lightning reads every prog_bar metric back on every batch; the module logs its loss for the
    # logger only and train.py's bars read it on logging steps, so a step that neither logs nor
    # checkpoints leaves the device alone (fused AdamW, as in the SDXL configs: it skips a NaN step
    # on the device; other optimizers read the guard's flag every step, by design). The EMA read its
    # on-device weight back every step (torch's foreach lerp takes the weight as a number)
    if bar == "rich":
        pytest.importorskip("rich")
    tqdm = ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"] if bar == "tqdm" else []
    reads = fit_watched(tmp_path, monkeypatch, _host_reads, tqdm)
    shown = capsys.readouterr().out

    assert QUIET_STEPS == [1, 3, 5, 7]
    assert {k: reads[k] for k in QUIET_STEPS} == {k: [] for k in QUIET_STEPS}
    # the watch does see this loop: logging steps read the metrics back, the bar's loss among them
    bar_reads = {k for k, found in reads.items() for _, site in found if "progress_bars.py:" in site}
    assert bar_reads == {LOG_EVERY, STEPS}
    assert ("train/loss: " if bar == "rich" else "train/loss=") in shown, shown


SDXL_OBJECTIVES = {  # each SDXL config's objective (an objective two configs share is run once)
    yaml.safe_dump(yaml.safe_load(p.read_text())["model"]["init_args"]["objective"]): p.name
    for p in sorted(CONFIG.parent.glob("sdxl_*.yaml"))
}


@pytest.mark.parametrize("objective", list(SDXL_OBJECTIVES), ids=list(SDXL_OBJECTIVES.values()))
def test_the_sdxl_configs_objectives_read_nothing_back_on_quiet_steps(tmp_path, monkeypatch, objective):
    # the DPO baseline's DiffusionDPOLoss checked its groups on the host in every step (check_groups);
    # popalign's DataModule pairs rows i and i + P within one group, which leaves it nothing to find
    as_json = yaml.safe_load(objective)
    reads = fit_watched(
        tmp_path, monkeypatch, _host_reads, [f"--model.init_args.objective={json.dumps(as_json)}"]
    )
    assert {k: reads[k] for k in QUIET_STEPS} == {k: [] for k in QUIET_STEPS}
