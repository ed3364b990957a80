"""Reading device values back on the host (each one a host sync on a GPU), found on a CPU: what
:class:`~popalign.models.flops.HostReads` catches, and that `train.py fit` reads nothing back on
the steps that neither log nor checkpoint."""

from __future__ import annotations

import inspect
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
    with HostReads(where=lambda: "here") as reads:
        fn()
    assert reads.reads == [("here", op, f"{__file__}:{line}")]


@pytest.mark.parametrize("name", QUIET)
def test_host_reads_leaves_ops_of_known_size_alone(name):
    with HostReads() as reads:
        QUIET[name]()
    assert reads.reads == []


class _StepInProgress(Callback):
    """The optimizer step (1-based) the current training batch makes; None between epochs."""

    step: int | None = None

    def on_train_batch_start(self, trainer, *_) -> None:  # noqa: ANN001 - Lightning's signature
        self.step = trainer.global_step + 1

    def on_train_epoch_end(self, trainer, *_) -> None:  # noqa: ANN001 - Lightning's signature
        self.step = None


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_training_reads_back_only_on_steps_that_log_or_checkpoint(tmp_path, monkeypatch, capsys, bar):
    # Lightning reads every prog_bar metric back on every batch; the module logs its loss for the
    # logger only and train.py's bars read it on logging steps, so a step that neither logs nor
    # checkpoints leaves the device alone (fused AdamW, as in the SDXL configs: it skips a NaN step
    # on the device; other optimizers read the guard's flag every step, by design). The EMA read its
    # on-device weight back every step (torch's foreach lerp takes the weight as a number)
    if bar == "rich":
        pytest.importorskip("rich")
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    log_every, steps = 4, 8
    checkpoint_every = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"][0]["init_args"]
    checkpoint_every = checkpoint_every["every_n_train_steps"]
    args = [
        "--config",
        str(CONFIG),
        f"--trainer.max_steps={steps}",
        f"--trainer.log_every_n_steps={log_every}",
    ]
    # what the SDXL configs switch on around the step, and an EMA
    args += ["--model.init_args.optimizer.init_args.fused=true", "--trainer.gradient_clip_val=1.0", *WARMUP]
    args += ["--model.init_args.ema_decay=0.99"]
    if bar == "tqdm":
        args += ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    cli = cli_main(args, run=False)
    marker = _StepInProgress()
    cli.trainer.callbacks.append(marker)
    capsys.readouterr()
    with HostReads(where=lambda: marker.step) as watched:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    shown = capsys.readouterr().out
    assert cli.trainer.global_step == steps

    quiet = [k for k in range(1, steps + 1) if k % log_every and k % checkpoint_every]
    assert quiet == [1, 3, 5, 7]
    assert [r for r in watched.reads if r[0] in quiet] == []
    # the watch does see this loop: logging steps read the metrics back, the bar's loss among them
    bar_reads = {step for step, _, site in watched.reads if site.split(":")[0].endswith("progress_bars.py")}
    assert bar_reads == {4, 8}
    assert ("train/loss: " if bar == "rich" else "train/loss=") in shown, shown
