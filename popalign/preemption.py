"""SIGTERM in a run of several processes: every rank stops after the same step, and that step is saved.

A scheduler's preemption signals every rank, each at its own moment of its step. Lightning (2.6)
answers with a ``broadcast`` run from inside its signal handler, which pairs with whatever collective
the other ranks are in at that moment; a two-process DDP run stopped that way hung, rank 0 in the
handler's broadcast and rank 1 in the barrier of a checkpoint save, until the collective timed out,
and saved nothing. Its loop also broadcasts rank 0's flag before every batch and reads it on the host
(``.item()``): one synchronisation with the device per step.

:class:`AgreedSigtermStop` replaces both in runs of more than one process (in one process it does
nothing, and Lightning's own handling stops the run):

- its handler only notes the signal, and passes it on to the ranks Lightning launched, as Lightning's does;
- after each batch every rank starts an all-reduce (max) of whether it has the signal, without
  waiting for it, and reads the result after the next batch, when it has long finished: on CUDA from
  pinned host memory, once an event recorded after the copy has passed, so the host waits at most for
  the batch before the one it just queued, never for the device to drain;
- when that result says some rank had the signal, every rank sets Lightning's SIGTERM flag at the same
  batch: :class:`~popalign.checkpointing.FinalStepCheckpoint` saves that step (a collective under
  FSDP, now entered by every rank together) and Lightning stops after it, as in a single-process run.

So the run stops one or two steps after the first rank got the signal. The batch after the signal is
still fetched: a rank whose DataLoader workers the signal killed uses the batches they had made.
A signal during validation lets the validation finish; before training starts, or after it ends,
Lightning's handling is unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class AgreedSigtermStop(Callback):
    """Stops every rank of a multi-process run after the same step once any of them received SIGTERM.

    ``signalled``: this process received SIGTERM. ``stopping``: all ranks agreed to stop after the
    current batch (Lightning's ``trainer.received_sigterm`` is set from then on).
    """

    def __init__(self) -> None:
        self.signalled = False
        self.stopping = False
        self._trainer: Any = None
        self._flag: torch.Tensor | None = None  # this rank's vote, reduced in place to all ranks' max
        self._host: torch.Tensor | None = None  # the reduced vote on the host (pinned), for CUDA
        self._pending: Any = None  # the vote in flight: a CUDA event or the collective's work

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return
        self._trainer = trainer
        self.signalled = self.stopping = False
        self._pending = None
        # Lightning reads the notifier when fit registers its handlers, after this hook
        trainer._signal_connector._sigterm_notifier_fn = self._note_signal
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = _no_broadcast

    def _note_signal(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            log.info(
                "rank %d: received SIGTERM; all ranks stop after the next step", self._trainer.global_rank
            )
            launcher = self._trainer.strategy.launcher
            if launcher is not None:  # the ranks it started as subprocesses
                launcher.kill(signum)
        self.signalled = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._trainer is None:
            return
        device = trainer.strategy.root_device
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        if self._flag.is_cuda:
            self._host = torch.zeros(1, dtype=torch.int32, pin_memory=True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        if self._trainer is None or self.stopping:
            return
        if self._pending is not None and self._agreed():
            self.stopping = True
            trainer._signal_connector.received_sigterm = True
            return
        self._vote()

    def _vote(self) -> None:
        flag = self._flag
        flag.fill_(int(self.signalled))
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if flag.is_cuda:
            work.wait()  # the device copy below follows the reduction; the host goes on
            self._host.copy_(flag, non_blocking=True)
            self._pending = torch.cuda.Event()
            self._pending.record()
        else:
            self._pending = work

    def _agreed(self) -> bool:
        """Whether any rank had SIGTERM when it voted after the previous batch (all ranks read the same)."""
        pending, self._pending = self._pending, None
        if isinstance(pending, torch.cuda.Event):
            pending.synchronize()
            return bool(self._host.item())
        pending.wait()
        return bool(self._flag.item())

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # every rank voted after the same batches: finish the last vote before the group goes away
        if self._pending is not None:
            self._agreed()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._trainer is None:
            return
        vars(trainer._signal_connector).pop("_sigterm_notifier_fn", None)
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)
        self._trainer = self._pending = None


def _no_broadcast() -> None:
    """Lightning's per-batch broadcast of rank 0's SIGTERM flag, not needed: the flag is set on every
    rank at the same batch (:class:`AgreedSigtermStop`)."""


def stop_agreed(trainer: Any) -> bool:
    """Whether the ranks of ``trainer``'s run agreed to stop after this batch (:class:`AgreedSigtermStop`)."""
    return any(isinstance(c, AgreedSigtermStop) and c.stopping for c in trainer.callbacks)


def add_agreed_sigterm_stop(trainer: Any) -> None:
    """Put an :class:`AgreedSigtermStop` first among ``trainer``'s callbacks, so that it has set the
    SIGTERM flag before the checkpoint callbacks (always last) look at it."""
    if not any(isinstance(c, AgreedSigtermStop) for c in trainer.callbacks):
        trainer.callbacks.insert(0, AgreedSigtermStop())
