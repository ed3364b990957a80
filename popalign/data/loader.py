"""The training DataLoader: epochs the trainer names, passes resumed where a checkpoint left them,
and data workers that outlive a scheduler's SIGTERM (or, where one dies of it, its death reported at
a later batch rather than inside the step). :class:`popalign.data.PopulationDataModule` builds it over a
:class:`popalign.data.datamodule.PopulationStream`."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing.sharedctypes
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from popalign.data.datamodule import PopulationStream

log = logging.getLogger(__name__)
WORKER_KEY = "worker"  # each batch's maker, from the stream to the loader


class EpochLoader(DataLoader):
    """A DataLoader that tells its stream the epoch before each pass (the trainer's, if known) and
    continues a pass where a checkpoint left it.

    Lightning keeps :meth:`state_dict` in checkpoints and hands it to :meth:`load_state_dict` on
    resume: the epoch, how many of the batches trained on (``trained_fn``: the trainer's count this
    epoch; the loader runs ahead of training by Lightning's prefetch) each worker made, and whether
    that was the whole pass. The resumed pass of that epoch skips those, so training continues with
    the batches an uninterrupted run would have trained on, not with the epoch's first ones again.
    A checkpoint taken at an epoch's last batch resumes before Lightning has moved to the next
    epoch, yet Lightning trains the pass it asks for then as the next epoch: that pass is the next
    epoch's, whole (an empty remainder would leave Lightning's next epoch without batches).

    Its workers outlive a SIGTERM that reaches them while this process runs (a scheduler's, sent to
    every process of the job), so the step in progress can finish and be saved
    (:func:`_outlive_foreign_sigterm`), unless ``worker_init_fn`` is given. Where a worker dies of one
    all the same, its death fails a later batch, not the step in progress
    (:func:`_defer_sigterm_deaths`).
    """

    def __init__(
        self,
        dataset: PopulationStream,
        epoch_fn: Callable[[], int | None],
        trained_fn: Callable[[], int | None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._outlives_sigterm = bool(kwargs.get("num_workers")) and "worker_init_fn" not in kwargs
        if self._outlives_sigterm:
            kwargs["worker_init_fn"] = functools.partial(_outlive_foreign_sigterm, _leaving_flag())
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn, self._trained_fn, self._passes = epoch_fn, trained_fn, 0
        self._epoch, self._skipped, self._made_by = 0, [0] * self._workers, []  # this pass
        self._ended = False  # this pass ran to its end
        self._trained_before = 0  # what trained_fn counted before this pass began (see _resume_point)
        self._resume: dict | None = None

    @property
    def _workers(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._epoch_fn()
        self._epoch = self._passes if epoch is None else epoch
        self._passes += 1
        self._trained_before = 0
        self._skipped, first = self._resume_point()
        self._made_by, self._ended = [], False
        self.dataset.set_epoch(self._epoch, self._skipped, first)
        with _sigterm_blocked(self._outlives_sigterm):
            batches = super().__iter__()
        if self.num_workers:
            _defer_sigterm_deaths()  # after torch has set its own SIGCHLD handler
        return self._untagged(batches)

    def _untagged(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            self._made_by.append(batch.pop(WORKER_KEY))
            yield batch
        self._ended = True

    def state_dict(self) -> dict[str, Any]:
        trained = self._trained_fn() if self._trained_fn is not None else None
        if trained is not None:
            trained -= self._trained_before
        made = len(self._made_by) if trained is None else max(0, trained - sum(self._skipped))
        counts = np.bincount(self._made_by[:made], minlength=self._workers) + self._skipped
        # the worker whose batch comes next (known when the loader ran ahead), else the round's turn
        following = self._made_by[made] if made < len(self._made_by) else int(counts.sum()) % self._workers
        length = self.dataset.batches_per_epoch
        whole = counts.sum() >= length if length is not None else self._ended and made == len(self._made_by)
        return {
            "epoch": self._epoch,
            "trained_per_worker": counts.tolist(),
            "next_worker": following,
            "complete": bool(whole),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def _resume_point(self) -> tuple[list[int], int]:
        # (batches each worker skips, the worker that starts) for this pass
        state, self._resume = self._resume, None
        if not state or state.get("epoch") != self._epoch:
            return [0] * self._workers, 0
        counts, n = [int(c) for c in state["trained_per_worker"]], self._workers
        length = self.dataset.batches_per_epoch
        if state.get("complete", length is not None and sum(counts) >= length):
            self._epoch += 1  # Lightning trains this pass as the next epoch
            if length is None and self._trained_fn is not None:
                # not knowing the epoch's length, Lightning counts this epoch's batches on from the
                # finished one's (a sized epoch's count it starts again from 0)
                self._trained_before = self._trained_fn() or 0
            return [0] * n, 0
        if len(counts) == n:
            return counts, int(state["next_worker"]) % n
        total = sum(counts)  # num_workers changed: batches went round-robin over the workers
        log.warning(
            "resumed with %d data workers instead of %d: the epoch continues after about %d batches",
            n, len(counts), total,
        )  # fmt: skip
        return [total // n + int(w < total % n) for w in range(n)], total % n


@contextlib.contextmanager
def _sigterm_blocked(block: bool) -> Iterator[None]:
    """SIGTERM held off from the workers started inside the block, when ``block``, until
    :func:`_outlive_foreign_sigterm` has their handler in place; a SIGTERM for this process meanwhile
    waits, and is handled when the block ends.

    A forked worker inherits the blocked signal. A spawned one does not (the start resets the mask),
    nor does the server that ``forkserver`` workers are forked from, and that server's death of the
    signal ends its workers too (torch's watchdog follows the parent). An *ignored* signal does stay
    ignored across ``exec``, so on Linux, in the main thread, SIGTERM is also set to ``SIG_IGN`` for the
    block: those processes start ignoring it (the server for good: it ends with this process). Linux
    keeps a blocked signal pending even while it is ignored, so one that arrives meanwhile still reaches
    this process's handler, put back before the unblock; one already pending would be dropped by the
    ``SIG_IGN``, so then the block only blocks.
    """
    if not block or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    handler = None
    if (
        sys.platform.startswith("linux")
        and threading.current_thread() is threading.main_thread()
        and signal.SIGTERM not in signal.sigpending()
    ):
        handler = signal.getsignal(signal.SIGTERM)  # None: set outside Python, cannot be put back
        if handler is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


_LEAVING: dict[int, Any] = {}  # pid -> the flag its workers read: set when that process exits


def _leaving_flag() -> Any:
    """This process's flag in shared memory, set by an ``atexit`` hook: it runs before
    ``multiprocessing``'s, which then terminates the remaining (daemonic) workers with SIGTERM."""
    flag = _LEAVING.get(os.getpid())
    if flag is None:
        flag = _LEAVING[os.getpid()] = multiprocessing.sharedctypes.RawValue("b", 0)
        atexit.register(_set_leaving, os.getpid())
    return flag


def _set_leaving(pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the hook
        _LEAVING[pid].value = 1


def _outlive_foreign_sigterm(leaving: Any, worker_id: int) -> None:
    """``worker_init_fn`` that lets a data worker outlive a SIGTERM sent while its owner (the training
    process) is still running.

    A scheduler's preemption signals every process of a job. torch's workers die of a SIGTERM their
    parent did not send; the batch being fetched then fails, before the ranks could agree to stop and
    save (:mod:`popalign.preemption`). Here a handler ignores SIGTERM until ``leaving`` is set (the
    owner's exit, :func:`_leaving_flag`), and then ends the worker at once, as torch's handler does for
    its parent's. The worker otherwise ends with its loader, or with its owner's death (torch's
    watchdog). A loader that shuts down a worker still busy after torch's grace of 5 s finds its SIGTERM
    ignored; that worker ends at its next batch, or with the owner.
    """

    def on_sigterm(signum: int, frame: Any) -> None:
        if leaving.value:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _defer_sigterm_deaths() -> None:
    """Make a data worker's death by SIGTERM fail a later batch instead of the step in progress.

    A scheduler's preemption signals every process of a job. torch's workers die of a SIGTERM their
    parent did not send, and torch's SIGCHLD handler raises that death in the main process wherever it
    is, in the middle of a training step, where Lightning would otherwise finish the step, save it and
    stop (:class:`popalign.checkpointing.FinalStepCheckpoint`). This wraps that handler, once per
    process: an error for a worker that SIGTERM killed is dropped (checked with ``waitid``, which
    leaves the worker to be reaped as before), and any other error is raised as it was. The loader
    still reports the dead worker once the batches made before its death are used up ("exited
    unexpectedly"), so a SIGTERM that reached only the workers fails training a few steps later.
    torch stops its check at the first dead worker registered: while a SIGTERM-killed worker stays
    registered (its loader not shut down; Lightning leaves it so when SIGTERM stops fit), another
    worker's failure in the same process is likewise reported only when its own loader next waits.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        return
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler) or getattr(torch_handler, "defers_sigterm_deaths", False):
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            torch_handler(signum, frame)
        except RuntimeError as err:
            if not _killed_by_sigterm(err):
                raise

    handler.defers_sigterm_deaths = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, handler)


def _killed_by_sigterm(err: RuntimeError) -> bool:
    # torch: "DataLoader worker (pid N) is killed by signal: Terminated." (found with waitid WNOWAIT)
    found = re.search(r"DataLoader worker \(pid (\d+)\) is killed by signal", str(err))
    if found is None:
        return False
    try:
        info = os.waitid(os.P_PID, int(found.group(1)), os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return info is not None and info.si_code == os.CLD_KILLED and info.si_status == signal.SIGTERM
