"""Resuming a PopAlign run from a checkpoint under the config given now.

``train.py fit --ckpt_path`` runs the config on the command line, not the one saved in the checkpoint
(popalign's CLI does not parse the checkpoint's arguments over it). So a resume checks what a run
cannot change, and fills in what checkpoints leave out:

- :func:`check_resumable`: another base model (fingerprint of its weights and architecture) or other
  LoRA settings (full <-> LoRA, rank, alpha, target modules) are refused in one line; other changed
  hyperparameters (``ema_decay``, the objective's, ...) are logged and take effect.
  :func:`check_before_fit` runs the same refusal on the checkpoint file before the run starts, so
  a refused resume leaves no run folder behind.
- :func:`apply_optimizer_settings`: a resume restores the checkpoint's optimizer state, hyperparameters
  included; the config's learning rate, weight decay, betas, eps and momentum are put back where they
  differ (a new learning rate rescales the schedule at its current step) and logged.
- :func:`complete_state`: checkpoints hold trainable state only; the frozen weights (the reference
  copy, LoRA's base) come from the freshly loaded ``pretrained_model``. An EMA switched on since the
  checkpoint starts at its weights; one switched off is dropped.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from popalign.checkpointing import check_checkpoint_file
from popalign.ema import EMA
from popalign.errors import UserError
from popalign.models.loading import FINGERPRINT_KEY

log = logging.getLogger(__name__)

FIXED = ("lora_rank", "lora_alpha", "lora_target_modules")  # a resumed run cannot change these
OPTIMIZER_SETTINGS = ("lr", "weight_decay", "betas", "eps", "momentum")


def _plain(value: Any) -> Any:  # YAML gives lists where the signature says tuple
    return tuple(value) if isinstance(value, list) else value


def check_resumable(
    checkpoint: Mapping[str, Any],
    source: str,
    hparams: Mapping[str, Any],
    fingerprint: str,
    lora: bool,
    log_changes: bool = True,
) -> None:
    """Refuse a checkpoint this run cannot continue; log the settings that changed since it was saved.

    Args:
        checkpoint: the loaded checkpoint (its ``hyper_parameters`` and base fingerprint are read).
        source: how errors name the checkpoint (its path).
        hparams: this run's hyperparameters.
        fingerprint: this run's base-model fingerprint.
        lora: whether this run trains LoRA adapters (then alpha and target modules are fixed too).
        log_changes: log the changed settings (off for the early check before the run starts, so that
            the resume itself logs them once).
    """
    saved = checkpoint.get("hyper_parameters") or {}
    was_base = checkpoint.get(FINGERPRINT_KEY)
    if was_base is not None and was_base != fingerprint:
        raise UserError(
            f"{source}: trained from another base model than {hparams.get('pretrained_model')} "
            "(weights or architecture differ); resume with the run's own base"
        )
    changed = {
        k: (saved[k], hparams[k]) for k in saved if k in hparams and _plain(saved[k]) != _plain(hparams[k])
    }
    for key in FIXED:
        if key in changed and (key == "lora_rank" or lora):
            was, now = changed[key]
            value = json.dumps(list(was) if isinstance(was, (list, tuple)) else was)  # YAML: null, lists
            value = f"'{value}'" if isinstance(was, (list, tuple)) else value  # shell-quoted
            raise UserError(
                f"{source}: trained with {key}={was!r}, this run has {now!r}; a run from this checkpoint "
                f"cannot change it (pass --model.init_args.{key} {value})"
            )
    notes = [f"{k}: {was!r} -> {now!r}" for k, (was, now) in changed.items() if k not in FIXED]
    if notes and log_changes:
        log.warning("resuming %s with changed settings: %s", source, "; ".join(notes))


def last_checkpoint(folders: list[str]) -> Path | None:
    """The file ``--ckpt_path last`` resumes, as Lightning picks it: the newest ``last.ckpt`` or
    ``last-vN.ckpt`` in the ``ModelCheckpoint`` folders (None when there is none)."""
    found = [
        p
        for folder in folders
        if Path(folder).is_dir()
        for p in Path(folder).iterdir()
        if p.suffix == ".ckpt" and re.match(r"last(-v\d+)?$", p.stem)
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def check_before_fit(
    ckpt_path: str, folders: list[str], hparams: Mapping[str, Any], fingerprint: str, lora: bool
) -> None:
    """:func:`check_resumable` on a local checkpoint file before the run starts (no logger folder, no
    strategy set-up yet), read through a memory map with ``weights_only``: the resume repeats it.

    ``ckpt_path`` is ``--ckpt_path`` (``last`` is looked up in ``folders``, and refused in one line when
    it is not a whole checkpoint file); sharded checkpoint folders, remote paths and files that
    ``weights_only`` cannot read are left to the check at load time.
    """
    path = last_checkpoint(folders) if ckpt_path == "last" else Path(ckpt_path)
    if path is None or not path.is_file():
        return
    if ckpt_path == "last":  # a path given is checked as the command line is parsed
        check_checkpoint_file(path, ckpt_path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError):  # other objects in it: Lightning loads it its way
        return
    check_resumable(checkpoint, str(path), hparams, fingerprint, lora, log_changes=False)


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's :data:`OPTIMIZER_SETTINGS` as the config made them: read before a scheduler
    or a checkpoint changes them."""
    return [{k: _number(g[k]) for k in OPTIMIZER_SETTINGS if k in g} for g in optimizer.param_groups]


def _number(value: Any) -> Any:  # lr may be a tensor (capturable optimizers)
    return tuple(map(_number, value)) if isinstance(value, (list, tuple)) else float(value)


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]], schedulers: list, source: str
) -> None:
    """After a resume restored the checkpoint's optimizer state, give each param group the
    ``configured`` settings where they differ, and log the changes.

    A new learning rate moves the schedule's base (``initial_lr``, the schedulers' ``base_lrs``) and
    scales the current rate by new/old, so the schedule continues at its step towards the new peak
    (``lr(s) = lr_base · factor(s)`` for every multiplicative schedule, LambdaLR's included).
    """
    notes = []
    for i, (group, want) in enumerate(zip(optimizer.param_groups, configured)):
        for key, value in want.items():
            was = _number(group.get("initial_lr", group[key]) if key == "lr" else group[key])
            if was == value:
                continue
            notes.append(f"{key}: {was!r} -> {value!r}")
            if key != "lr":
                group[key] = value
                continue
            group["lr"] = _number(group["lr"]) * value / was if was else value  # from 0: no ratio to keep
            if "initial_lr" in group:
                group["initial_lr"] = value
            for scheduler in schedulers:
                if getattr(scheduler, "optimizer", None) is optimizer:
                    scheduler.base_lrs[i] = value
                    scheduler._last_lr = [_number(g["lr"]) for g in optimizer.param_groups]
    if notes:
        log.warning(
            "resuming %s with changed optimizer settings: %s", source, "; ".join(dict.fromkeys(notes))
        )


def complete_state(
    state: dict[str, torch.Tensor], current: Mapping[str, torch.Tensor], frozen: set[str], ema: EMA | None
) -> None:
    """Fill a checkpoint's ``state`` in place so that it loads into this run's module.

    ``current`` is the module's own state (frozen weights just loaded from the base model); ``frozen``
    the keys checkpoints leave out. The EMA shadows (``ema.shadow.<i>``) are added from the
    checkpoint's policy weights (float32) when this run keeps an average the checkpoint lacks, and
    removed when this run keeps none.
    """
    for key in frozen - set(state):
        state[key] = current[key]  # the freshly loaded pretrained weights, never the policy's
    saved_ema = {k for k in state if k.startswith("ema.")}
    if ema is None and saved_ema:
        log.warning("resuming without ema_decay: the checkpoint's moving average is dropped")
        for key in saved_ema:
            del state[key]
    elif ema is not None and not saved_ema:
        log.warning("resuming with ema_decay %s: the average starts at the checkpoint's weights", ema.decay)
        for i, name in enumerate(ema.names):
            state[f"ema.shadow.{i}"] = state.get(f"policy.{name}", current[f"policy.{name}"]).float()
