"""Errors a user can act on: printed as one line by the CLI, with a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a flag, a config): the message names the file and the problem."""


def first_line(err: BaseException) -> str:
    """The line of an exception's message worth showing a user (torch's weights_only verdict first)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    hint = next((ln for ln in lines if "Unsupported global" in ln), None)
    return hint or (lines[0] if lines else type(err).__name__)
