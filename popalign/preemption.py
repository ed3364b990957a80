"""SIGTERM: the run stops after a whole optimizer step, the same one on every rank, and saves it.

A scheduler's preemption signals every rank, each at its own moment of its step. Lightning (2.6)
answers with a ``broadcast`` run from inside its signal handler, which pairs with whatever collective
the other ranks are in at that moment; a two-process DDP run stopped that way hung, rank 0 in the
handler's broadcast and rank 1 in the barrier of a checkpoint save, until the collective timed out,
and saved nothing. In one process Lightning stops after the batch in progress, which under gradient
accumulation is most often in the middle of a window: a checkpoint there would not hold the
accumulated gradients, so the stop was not saved.

:class:`AgreedSigtermStop` replaces that handling. Its handler only notes the signal (and passes it on
to the ranks Lightning launched, as Lightning's does); the run stops only after a batch that stepped
the optimizer, so gradient accumulation finishes its window first.

- In one process it stops after the first such batch to end once the signal came, and
  :class:`~popalign.checkpointing.FinalStepCheckpoint` saves that step. A signal during validation
  or between epochs stops the run after the next step.
- With several ranks they vote, an all-reduce (max) of whether each has the signal, at the point
  where Lightning broadcast rank 0's flag: before each batch is fetched, when the batch before it
  stepped the optimizer (every rank accumulates alike, so all skip the same votes). When one has it,
  every rank stops there, between the same two batches, and the step just finished is saved (a
  collective under FSDP, now entered by every rank together). After an epoch's last batch they vote
  at its end instead, and that step is saved there; there is no vote before the next epoch's first
  batch (a checkpoint between epochs would resume one epoch ahead), so a signal in between stops the
  run after a step of the next epoch, and saves it.

Voting just before the fetch matters where the signal kills a data worker (popalign's loader lets
its workers outlive it once they run, :mod:`popalign.data.loader`): a dead worker's batches cannot be
fetched any more (torch hands them over through a file descriptor the worker held), so a run that
went on for one more batch after the signal would fail there instead of saving. The vote is read at
once, but on the host: it goes over a gloo group of its own, on CPU tensors, so it does not wait for
the GPU to finish the queued step, where Lightning's broadcast of a tensor on the device and its
``.item()`` at the same point did (one device synchronisation per step, in runs on NCCL).

Before training starts, or after it ends, a signal is Lightning's to handle.
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
    """Stops the run after a whole optimizer step, the same on every rank, once any rank received SIGTERM.

    ``signalled``: this process received SIGTERM. ``stopping``: the run stops after the step just
    finished (all ranks agreed; Lightning's ``trainer.received_sigterm`` is set from then on).
    """

    def __init__(self) -> None:
        self.signalled = False
        self.stopping = False
        self._trainer: Any = None
        self._flag: torch.Tensor | None = None  # this rank's vote, reduced in place to all ranks' max
        self._group: Any = None  # the ranks' gloo group for the vote; None in one process

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        ranks = trainer.world_size > 1
        if stage != "fit" or (ranks and not (dist.is_available() and dist.is_initialized())):
            return
        self._trainer = trainer
        self.signalled = self.stopping = False
        # Lightning reads the notifier when fit registers its handlers, after this hook
        trainer._signal_connector._sigterm_notifier_fn = self._note_signal
        if ranks:
            # a collective: every rank runs this hook at the same point of fit
            self._group = dist.new_group(backend="gloo")
            # Lightning calls the broadcast before fetching each batch, on every rank of such a run
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = self._vote_before_fetch

    def _note_signal(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            log.info(
                "rank %d: received SIGTERM; the run stops after this optimizer step",
                self._trainer.global_rank,
            )
            launcher = self._trainer.strategy.launcher
            if launcher is not None:  # the ranks it started as subprocesses
                launcher.kill(signum)
        self.signalled = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._group is not None:
            self._flag = torch.zeros(1, dtype=torch.int32)  # on the host, like its group

    def _vote_before_fetch(self) -> None:
        # not before an epoch's first batch: a stop there could not be saved (a checkpoint between
        # epochs would resume one epoch ahead), so a signal that came after the previous epoch's last
        # vote stops the run after a step of this epoch instead; nor in the middle of gradient
        # accumulation, which a checkpoint does not hold. Every rank skips the same votes.
        epoch_loop = self._trainer.fit_loop.epoch_loop
        if epoch_loop.batch_progress.current.ready == 0 or epoch_loop._should_accumulate():
            return
        if self._agreed():  # Lightning stops; FinalStepCheckpoint.on_exception saves the last step
            raise SIGTERMException

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        # decide now, before the checkpoint callbacks (which come after this one) look at the flag:
        # in one process after any batch that stepped the optimizer (Lightning stops at the batch's
        # end); with several ranks after an epoch's last batch (it always steps), as the next fetch
        # is the next epoch's, so that this step is saved and Lightning stops at the epoch's end
        epoch_loop = trainer.fit_loop.epoch_loop
        if self._trainer is None or epoch_loop._should_accumulate():
            return
        if self._group is None or epoch_loop.batch_progress.is_last_batch:
            self._agreed()

    def _agreed(self) -> bool:
        """Whether any rank has the signal (all ranks' vote); from then on Lightning's SIGTERM flag is set."""
        if not self.stopping:
            if self._group is None:
                stop = self.signalled
            else:
                self._flag.fill_(int(self.signalled))
                dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
                stop = bool(self._flag.item())  # the same on every rank; no device synchronisation
            if stop:
                self.stopping = True
                self._trainer._signal_connector.received_sigterm = True
        return self.stopping

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._trainer is None:
            return
        vars(trainer._signal_connector).pop("_sigterm_notifier_fn", None)
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)
        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._trainer = self._flag = self._group = None


def stop_agreed(trainer: Any) -> bool:
    """Whether the ranks of ``trainer``'s run agreed to stop after this batch (:class:`AgreedSigtermStop`)."""
    return any(isinstance(c, AgreedSigtermStop) and c.stopping for c in trainer.callbacks)


def sigterm_noted(trainer: Any) -> bool:
    """Whether this process of ``trainer``'s run received SIGTERM, whether or not the run stopped yet."""
    return trainer.received_sigterm or any(
        isinstance(c, AgreedSigtermStop) and c.signalled for c in trainer.callbacks
    )


def add_agreed_sigterm_stop(trainer: Any) -> None:
    """Put an :class:`AgreedSigtermStop` first among ``trainer``'s callbacks, so that it has set the
    SIGTERM flag before the checkpoint callbacks (always last) look at it."""
    if not any(isinstance(c, AgreedSigtermStop) for c in trainer.callbacks):
        trainer.callbacks.insert(0, AgreedSigtermStop())
