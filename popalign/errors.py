"""Errors a user can act on: printed as one line by the CLI, with a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a flag, a config): the message names the file and the problem."""


def first_line(err: BaseException) -> str:
    """The line of an exception's message worth showing a user (torch's weights_only verdict first)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    hint = next((ln for ln in lines if "Unsupported global" in ln), None)
    return hint or (lines[0] if lines else type(err).__name__)


def load_reason(err: BaseException) -> str:
    """Why a ``from_pretrained`` failed, in one line: :func:`first_line`, except where a hub id could not
    be fetched and no copy is cached (no network, ``HF_HUB_OFFLINE``), which diffusers reports as a file
    the repository "does not appear to have"; then that, with the innermost cause (the network's
    error)."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    chain, cause = [], err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not any(isinstance(c, LocalEntryNotFoundError) for c in chain):
        return first_line(err)
    return (
        f"not in the local cache, and the hub could not be reached: {first_line(chain[-1]).rstrip('.')}; "
        "pass a local folder, or run once where the hub is reachable to cache it"
    )
