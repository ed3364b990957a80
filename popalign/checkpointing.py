"""How ``train.py`` writes and finds checkpoints: fixed folders, whole files, a ``last.ckpt`` that is the
final step, and a ``--ckpt_path`` checked before anything starts.

:func:`prepare_checkpointing` applies all of it to a freshly built trainer; each piece says why:

- :func:`fixed_checkpoint_dirs`: ``--ckpt_path last`` must find the folder again after a restart;
- :class:`FinalStepCheckpoint`: Lightning writes ``last.ckpt`` at the end of training only if the run saved
  nothing before, so a run of 150 steps that saves every 100 ended with ``last.ckpt`` at step 100;
- :class:`WholeFileCheckpointIO`: Lightning's own writer serialises the whole checkpoint into memory,
  writes it to a temporary file in ``$TMPDIR`` and moves it into place, which is a copy when the
  checkpoint folder is on another filesystem (a cluster's shared disk): a job stopped during that copy
  left a truncated ``last.ckpt`` that ``--ckpt_path last`` then picked, and a full SDXL checkpoint (the
  trainable UNet and AdamW's two moments, about 31 GB in fp32) needed that much free memory and
  ``$TMPDIR`` space on top.
"""

from __future__ import annotations

import glob
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from popalign.distributed import StagedDeepSpeedStrategy, StagedFSDPStrategy
from popalign.errors import UserError
from popalign.preemption import sigterm_noted, stop_agreed

log = logging.getLogger(__name__)

#: ``--ckpt_path`` values Lightning resolves itself
CKPT_NAMES = ("last", "best", "hpc", "registry")


class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the state training ended with.

    Lightning saves ``last`` at the end of fit only when the process saved no checkpoint at all; this
    one saves it whenever the final step was not saved already (``max_steps`` not a multiple of
    ``every_n_train_steps``), with Lightning's own rules for when not to save (``fast_dev_run``,
    sanity checking, not fitting).

    A run that reaches ``max_steps`` is saved after its last batch, where the periodic checkpoints are
    taken, not at the end of fit: by then Lightning counts the unfinished epoch as done, and a run
    extended from that checkpoint would skip the rest of the epoch's batches. Runs that end with an
    epoch (``max_epochs``) are saved at the end of fit. With ``save_last: link`` it is Lightning's.

    A run that SIGTERM stops (a scheduler's preemption) is saved too: the optimizer step in progress
    finishes (under gradient accumulation, the rest of its window, as a checkpoint does not hold
    accumulated gradients), the run stops after it (:class:`~popalign.preemption.AgreedSigtermStop`)
    and ``last`` is written at that step's end, so the resumed run goes on from the step the signal
    interrupted, not from the last periodic checkpoint. With several ranks, the signal reaches each at
    its own step: they save the step they agreed to stop after, all together, as the save is a
    collective under FSDP. Where the ranks agree between batches (every stop but one after an epoch's
    last batch), or the signal's killing of the data workers fails the next fetch first, the last
    step is saved when fit stops (:meth:`on_exception`), unless that batch was its epoch's last.
    """

    #: (path, step) of the ``last`` checkpoint written because SIGTERM stopped the run; None otherwise
    saved_at_stop: tuple[str, int] | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)
        elif trainer.received_sigterm and _stops_after_this_step(trainer):
            self._save_at_stop(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # SIGTERM that came after this hook ran for the last batch: the signal also killed the data
        # workers and the next batch's fetch failed before the run could stop (or, without
        # AgreedSigtermStop, Lightning stopped at its own check after the batch). The last step is
        # whole and unsaved.
        if sigterm_noted(trainer) and _between_batches_mid_epoch(trainer):
            self._save_at_stop(trainer)
        super().on_exception(trainer, pl_module, exception)

    def _save_at_stop(self, trainer: Any) -> None:
        # the run stops either way: a save that fails (a full disk) is reported, and the previous
        # last.ckpt stays whole (WholeFileCheckpointIO) for the resume
        try:
            self._save_final(trainer)
        except Exception as err:  # noqa: BLE001 - reported; the SIGTERM stop goes on
            log.warning("could not save step %d as SIGTERM stopped the run: %s", trainer.global_step, err)
            return
        if self.last_model_path and self._last_global_step_saved == trainer.global_step:
            self.saved_at_stop = (self.last_model_path, int(trainer.global_step))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._save_final(trainer)

    def _save_final(self, trainer: Any) -> None:
        # save_last: link keeps Lightning's meaning (a link to the newest top-k checkpoint)
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _stops_after_this_step(trainer: Any) -> bool:
    """Whether a run that received SIGTERM stops after this batch with a whole step's state, on every
    rank: Lightning stops a single-process run after the batch in which its flag is set (by
    :class:`~popalign.preemption.AgreedSigtermStop` after a batch that stepped; by Lightning itself,
    at the signal, in a trainer without it), and a run of several after the batch its ranks agreed
    on; and this batch stepped the optimizer (no accumulation pending)."""
    return (
        trainer.world_size == 1 or stop_agreed(trainer)
    ) and not trainer.fit_loop.epoch_loop._should_accumulate()


def _between_batches_mid_epoch(trainer: Any) -> bool:
    """Whether a run stopped while training between two batches of an epoch, after one that stepped
    the optimizer: no batch in flight (as many ready as completed), not the epoch's last (a checkpoint
    there would resume one epoch ahead), not validating; with several ranks, only where they agreed
    to stop (:func:`_stops_after_this_step`), as a save is a collective they must all enter."""
    if not trainer.training or trainer.validating or trainer.sanity_checking:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    done = progress.current.completed
    return (
        0 < done == progress.current.ready and not progress.is_last_batch and _stops_after_this_step(trainer)
    )


class WholeFileCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint straight into ``.NAME.tmp-<pid>`` beside its target, flushes it to disk
    and renames it into place (``os.replace``, atomic on one filesystem): a checkpoint file is complete
    or absent. Remote paths (``s3://`` and the like) are left to Lightning's writer.

    A temporary left by a process that was killed (its name carries another pid) is removed once the
    same checkpoint has been written whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        for stale in path.parent.glob(f"{glob.escape('.' + path.name)}.tmp-*"):
            if stale.is_file():  # a sharded save's staging folder is fsdp_blocks' to remove
                stale.unlink(missing_ok=True)


def prepare_checkpointing(trainer: Any) -> None:
    """Give a built trainer popalign's checkpointing: :func:`fixed_checkpoint_dirs`, Lightning's plain
    ``ModelCheckpoint`` made a :class:`FinalStepCheckpoint` and its plain ``FSDPStrategy`` and
    ``DeepSpeedStrategy`` a :class:`popalign.distributed.StagedFSDPStrategy` and
    :class:`~popalign.distributed.StagedDeepSpeedStrategy` (subclasses are left alone), and Lightning's
    default writer replaced by :class:`WholeFileCheckpointIO` (a writer the config chose is kept)."""
    fixed_checkpoint_dirs(trainer.checkpoint_callbacks, trainer.logger)
    for callback in trainer.checkpoint_callbacks:
        if type(callback) is ModelCheckpoint:  # the subclass adds behaviour, no state
            callback.__class__ = FinalStepCheckpoint
    if type(trainer.strategy) is FSDPStrategy:  # likewise
        trainer.strategy.__class__ = StagedFSDPStrategy
    if type(trainer.strategy) is DeepSpeedStrategy:
        trainer.strategy.__class__ = StagedDeepSpeedStrategy
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = WholeFileCheckpointIO()


def fixed_checkpoint_dirs(callbacks: list, logger: Logger | None) -> None:
    """Give every ``ModelCheckpoint`` without ``dirpath`` the folder ``<save_dir>/<name>/checkpoints``.

    Lightning's default is the logger's ``version_N/checkpoints``; a restarted run gets a new version,
    so ``--ckpt_path last`` would find nothing there and start from scratch with only a warning.
    """
    if logger is None or logger.save_dir is None:
        return
    folder = Path(logger.save_dir) / str(logger.name or "") / "checkpoints"
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(folder)


def refuse_earlier_checkpoints(callbacks: list) -> None:
    """:class:`UserError` when a ``ModelCheckpoint``'s folder already holds checkpoints (``*.ckpt``)."""
    for callback in callbacks:
        folder = (
            Path(callback.dirpath) if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
        )
        found = folder.glob("*.ckpt") if folder and folder.is_dir() else []
        earlier = sorted((p.name for p in found), key=lambda name: (not name.startswith("last"), name))
        if earlier:
            shown = ", ".join(earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
            raise UserError(
                f"{folder}: holds the checkpoints of an earlier run ({shown}); continue it with --ckpt_path "
                "last, or move them away to start afresh (or give this run another folder: the "
                "ModelCheckpoint's dirpath in the config)"
            )


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A local ``--ckpt_path`` must be a checkpoint file (a zip archive) or a sharded checkpoint folder.
    The names Lightning resolves (``last``, ...) are checked once resolved (:func:`check_checkpoint_file`)."""
    if (
        not ckpt_path
        or str(ckpt_path) in CKPT_NAMES
        or str(ckpt_path).startswith("registry:")
        or "://" in str(ckpt_path)
    ):
        return
    path = Path(ckpt_path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found (--ckpt_path)")
    check_checkpoint_file(path)


def check_checkpoint_file(path: Path, given: str | None = None) -> None:
    """:class:`UserError` when the file ``path`` is not a zip archive, as every PyTorch checkpoint is;
    ``given`` names the ``--ckpt_path`` value that resolved to it (``last``), with what to do."""
    if not path.is_file() or zipfile.is_zipfile(path):
        return
    why = f"{path}: not a PyTorch checkpoint (not a zip archive: truncated, or another format)"
    if given:
        why += f" (--ckpt_path {given} resolves to it); resume from another of the run's checkpoints: --ckpt_path FILE"
    raise UserError(why)
