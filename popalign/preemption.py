"""SIGTERM in a run of several processes: every rank stops after the same step, and that step is saved.

A scheduler's preemption signals every rank, each at its own moment of its step. Lightning (2.6)
answers with a ``broadcast`` run from inside its signal handler, which pairs with whatever collective
the other ranks are in at that moment; a two-process DDP run stopped that way hung, rank 0 in the
handler's broadcast and rank 1 in the barrier of a checkpoint save, until the collective timed out,
and saved nothing.

:class:`AgreedSigtermStop` replaces that handling in runs of more than one process (in one process it
does nothing, and Lightning's own handling stops the run). Its handler only notes the signal, and
passes it on to the ranks Lightning launched, as Lightning's does. Then the ranks vote, an
all-reduce (max) of whether each has the signal, at the point where Lightning broadcast rank 0's flag:
before each batch is fetched. When one has it, every rank stops there, between the same two batches,
and :class:`~popalign.checkpointing.FinalStepCheckpoint` saves the step just finished (a collective
under FSDP, now entered by every rank together). After an epoch's last batch they vote at its end
instead, and that step is saved there, as in a single-process run; there is no vote before the next
epoch's first batch, so a signal in between stops the run after that batch's step, and saves it.

Voting just before the fetch matters where the signal kills a data worker (popalign's loader lets
its workers outlive it once they run, :mod:`popalign.data.loader`): a dead worker's batches cannot be
fetched any more (torch hands them over through a file descriptor the worker held), so a run that
went on for one more batch after the signal would fail there instead of saving. The vote is read at
once, but on the host: it goes over a gloo group of its own, on CPU tensors, so it does not wait for
the GPU to finish the queued step, where Lightning's broadcast of a tensor on the device and its
``.item()`` at the same point did (one device synchronisation per step, in runs on NCCL).

A signal during validation lets the validation finish; before training starts, or after it ends,
Lightning's handling is unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class AgreedSigtermStop(Callback):
    """Stops every rank of a multi-process run after the same step once any of them received SIGTERM.

    ``signalled``: this process received SIGTERM. ``stopping``: all ranks agreed to stop after the
    step just finished (Lightning's ``trainer.received_sigterm`` is set from then on).
    """

    def __init__(self) -> None:
        self.signalled = False
        self.stopping = False
        self._trainer: Any = None
        self._flag: torch.Tensor | None = None  # this rank's vote, reduced in place to all ranks' max
        self._group: Any = None  # the ranks' gloo group for the vote

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return
        self._trainer = trainer
        self.signalled = self.stopping = False
        # a collective: every rank runs this hook at the same point of fit
        self._group = dist.new_group(backend="gloo")
        # Lightning reads the notifier when fit registers its handlers, after this hook; it calls the
        # broadcast before fetching each batch, on every rank of a multi-process run
        trainer._signal_connector._sigterm_notifier_fn = self._note_signal
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = self._vote_before_fetch

    def _note_signal(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            log.info("rank %d: received SIGTERM; all ranks stop after this step", self._trainer.global_rank)
            launcher = self._trainer.strategy.launcher
            if launcher is not None:  # the ranks it started as subprocesses
                launcher.kill(signum)
        self.signalled = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._trainer is not None:
            self._flag = torch.zeros(1, dtype=torch.int32)  # on the host, like its group

    def _vote_before_fetch(self) -> None:
        # not before an epoch's first batch: a stop there could not be saved (a checkpoint between
        # epochs would resume one epoch ahead), so a signal that came after the previous epoch's last
        # vote stops the run after this epoch's first step instead; every rank skips the same vote
        if self._trainer.fit_loop.epoch_loop.batch_progress.current.ready == 0:
            return
        if self._agreed():  # Lightning stops; FinalStepCheckpoint.on_exception saves the last step
            raise SIGTERMException

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        # the next fetch is the next epoch's: vote now, so that this step is saved (by the checkpoint
        # callbacks, which come after this one) and Lightning stops at the epoch's end
        if self._trainer is not None and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._agreed()

    def _agreed(self) -> bool:
        """All ranks' vote: whether any has the signal; from then on Lightning's SIGTERM flag is set."""
        if not self.stopping:
            self._flag.fill_(int(self.signalled))
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
            if self._flag.item():  # the same on every rank; no device synchronisation
                self.stopping = True
                self._trainer._signal_connector.received_sigterm = True
        return self.stopping

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._trainer is None:
            return
        vars(trainer._signal_connector).pop("_sigterm_notifier_fn", None)
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)
        if dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._trainer = self._flag = self._group = None


def stop_agreed(trainer: Any) -> bool:
    """Whether the ranks of ``trainer``'s run agreed to stop after this batch (:class:`AgreedSigtermStop`)."""
    return any(isinstance(c, AgreedSigtermStop) and c.stopping for c in trainer.callbacks)


def add_agreed_sigterm_stop(trainer: Any) -> None:
    """Put an :class:`AgreedSigtermStop` first among ``trainer``'s callbacks, so that it has set the
    SIGTERM flag before the checkpoint callbacks (always last) look at it."""
    if not any(isinstance(c, AgreedSigtermStop) for c in trainer.callbacks):
        trainer.callbacks.insert(0, AgreedSigtermStop())
