"""The training DataLoader: epochs the trainer names, passes resumed where a checkpoint left them,
and data workers that outlive a scheduler's SIGTERM. :class:`popalign.data.PopulationDataModule`
builds it over a :class:`popalign.data.datamodule.PopulationStream`."""

from __future__ import annotations

import logging
import os
import signal
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

    Its workers outlive a SIGTERM their parent did not send (:func:`_outlive_foreign_sigterm`)
    unless ``worker_init_fn`` is given.
    """

    def __init__(
        self,
        dataset: PopulationStream,
        epoch_fn: Callable[[], int | None],
        trained_fn: Callable[[], int | None] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("num_workers"):
            kwargs.setdefault("worker_init_fn", _outlive_foreign_sigterm)
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
        return self._untagged(super().__iter__())

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


def _outlive_foreign_sigterm(worker_id: int) -> None:
    """Let a data worker outlive a SIGTERM that its parent did not send.

    A scheduler's preemption signals every process of a job, and torch's workers die of a SIGTERM from
    anyone but their parent: the DataLoader then failed the step in progress, where training would
    otherwise finish the step, save it and stop (:class:`popalign.checkpointing.FinalStepCheckpoint`).
    Here SIGTERM is blocked and one thread takes it with ``sigwaitinfo``, which names the sender: the
    parent's (a loader shutting down, the interpreter's exit) ends the worker at once, as torch's own
    handler does; others are ignored, and the worker ends with its loader or its parent (torch's
    watchdog). Commands the worker starts (a ``pipe:`` shard's) inherit the blocked SIGTERM; they end
    at their next write once the worker has closed their pipe. Where ``sigwaitinfo`` is missing
    (macOS) torch's behaviour stays.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()

    def take_sigterm() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=take_sigterm, name="popalign-sigterm", daemon=True).start()
