"""Subcommands of the ``popalign`` console script; see :mod:`popalign.cli` for the contract."""

from __future__ import annotations

from typing import Any


def parse_device(value: str, flag: str = "--device") -> Any:
    """``torch.device(value)``, or a one-line :class:`~popalign.errors.UserError` naming ``flag``: an
    unknown device string, or CUDA asked for on a machine without it."""
    import torch

    from popalign.errors import UserError, first_line

    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise UserError(f"{flag} {value!r}: {first_line(err)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {value!r}: CUDA is not available on this machine")
    return device
