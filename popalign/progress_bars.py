"""``train.py``'s progress bars: Lightning's rich and tqdm bars, showing the training loss without a
host sync every step.

Lightning turns each metric logged with ``prog_bar=True`` into a Python number on every batch, and on
a GPU reading a number waits for the step's kernels to finish. So :class:`~popalign.module.PopAlignModule`
logs ``train/loss`` for the logger only, and these bars read it themselves on logging steps (every
``trainer.log_every_n_steps`` optimizer steps), where the logger reads it anyway. In between the
bar keeps the last value it read.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

LOSS = "train/loss"


class _LossOnLoggingSteps:
    """Adds ``train/loss`` to the bar's items, read at most once per logging step."""

    def get_metrics(self, trainer, pl_module) -> dict:  # noqa: ANN001 - Lightning's signature
        items = super().get_metrics(trainer, pl_module)
        step, every = trainer.global_step, trainer.log_every_n_steps  # every 0: Lightning never logs
        shown = getattr(self, "_loss_shown", None)  # (step, value)
        due = step > 0 and every > 0 and step % every == 0
        if due and (shown is None or shown[0] != step):
            loss = trainer.callback_metrics.get(LOSS)
            if loss is not None:
                shown = self._loss_shown = (step, float(loss))
        if shown is not None:
            items[LOSS] = shown[1]
        return items


class TidyRichProgressBar(_LossOnLoggingSteps, RichProgressBar):
    """Lightning's rich progress bar with the loss read on logging steps and two display fixes.

    - a run limited by ``max_steps`` has ``max_epochs = -1``, which the stock bar prints as
      ``Epoch 0/-2``; this one says ``Epoch 0`` (runs limited by epochs keep ``Epoch 0/4``);
    - the logger's version is shown as ``v_num: 0``, not as the metric ``v_num: 0.000``."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            text = text.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
        return text

    def get_metrics(self, trainer, pl_module) -> dict:  # noqa: ANN001 - Lightning's signature
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items:
            items["v_num"] = str(items["v_num"])
        return items


class LoggingStepTQDMProgressBar(_LossOnLoggingSteps, TQDMProgressBar):
    """Lightning's tqdm progress bar (its default without ``rich``) with the loss read on logging steps."""


_TIDY = {RichProgressBar: TidyRichProgressBar, TQDMProgressBar: LoggingStepTQDMProgressBar}


def tidy_progress_bars(callbacks: list) -> None:
    """Make Lightning's own progress bars (configured, or its default) the classes above, keeping their
    settings: the subclasses add no constructor arguments. A bar of the user's own class is left alone."""
    for callback in callbacks:
        tidy = _TIDY.get(type(callback))
        if tidy is not None:
            callback.__class__ = tidy
