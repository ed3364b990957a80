"""Subcommands of the ``popalign`` console script; see :mod:`popalign.cli` for the contract."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``: leave the count as it is) and restore the
    previous count after it, so a command run in-process (:func:`popalign.cli.main`, a test, a
    notebook) does not change its caller's thread count."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
