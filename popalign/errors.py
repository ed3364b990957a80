"""Errors a user can act on: printed as one line by the CLI, with a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a flag, a config): the message names the file and the problem."""
