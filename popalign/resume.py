"""Resuming a PopAlign run from a checkpoint under the config given now.

``train.py fit --ckpt_path`` runs the config on the command line, not the one saved in the checkpoint
(popalign's CLI does not parse the checkpoint's arguments over it). So a resume checks what a run
cannot change, and fills in what checkpoints leave out:

- :func:`check_resumable`: another base model (fingerprint of its weights and architecture) or other
  LoRA settings (full <-> LoRA, rank, alpha, target modules) are refused in one line; other changed
  hyperparameters (learning rate, ``ema_decay``, ...) are logged and take effect.
- :func:`complete_state`: checkpoints hold trainable state only; the frozen weights (the reference
  copy, LoRA's base) come from the freshly loaded ``pretrained_model``. An EMA switched on since the
  checkpoint starts at its weights; one switched off is dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch

from popalign.ema import EMA
from popalign.errors import UserError
from popalign.models.loading import FINGERPRINT_KEY

log = logging.getLogger(__name__)

FIXED = ("lora_rank", "lora_alpha", "lora_target_modules")  # a resumed run cannot change these


def _plain(value: Any) -> Any:  # YAML gives lists where the signature says tuple
    return tuple(value) if isinstance(value, list) else value


def check_resumable(
    checkpoint: Mapping[str, Any], source: str, hparams: Mapping[str, Any], fingerprint: str, lora: bool
) -> None:
    """Refuse a checkpoint this run cannot continue; log the settings that changed since it was saved.

    Args:
        checkpoint: the loaded checkpoint (its ``hyper_parameters`` and base fingerprint are read).
        source: how errors name the checkpoint (its path).
        hparams: this run's hyperparameters.
        fingerprint: this run's base-model fingerprint.
        lora: whether this run trains LoRA adapters (then alpha and target modules are fixed too).
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
    if notes:
        log.warning("resuming %s with changed settings: %s", source, "; ".join(notes))


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
