"""SIGTERM stops a ``popalign`` stage the way Ctrl-C does.

A scheduler's preemption, ``kill``, ``timeout`` and ``docker stop`` send SIGTERM, on which Python ends
at once: no ``finally`` runs and a stage's temporary files stay. Inside :func:`sigterm_interrupts`
SIGTERM raises :class:`Terminated` instead, a ``KeyboardInterrupt``, so every cleanup that runs on
Ctrl-C runs on SIGTERM too.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (inside :func:`sigterm_interrupts`)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated`; the previous handler is put back after it.

    Lightning adds its own handler during ``fit`` and calls this one after it, so SIGTERM then ends
    fit like Ctrl-C: with ``sys.exit(1)`` while :class:`Terminated` is being handled. An ignored
    SIGTERM stays ignored (as Python leaves an ignored SIGINT), and outside the main thread, where
    Python cannot set handlers, SIGTERM keeps its handler."""
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # None: a handler set outside Python, which Python cannot put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def sigterm_deferred(deferred: Callable[[], bool]) -> Iterator[None]:
    """Inside :func:`sigterm_interrupts`, a block where SIGTERM raises :class:`Terminated` only while
    ``deferred()`` is false.

    Lightning's handler during ``fit`` sets its trainer's flag and then calls the handler it found; with
    ``deferred`` reading that flag, the step in progress finishes and is saved before fit stops, as
    under ``train.py`` (:class:`popalign.checkpointing.FinalStepCheckpoint`), while a SIGTERM before or
    after fit still raises at once. Elsewhere (SIGTERM ignored, not the main thread) it changes nothing."""
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread or signal.getsignal(signal.SIGTERM) is not _raise_terminated:
        yield
        return

    def unless_deferred(signum: int, frame: FrameType | None) -> None:
        if not deferred():
            raise Terminated

    signal.signal(signal.SIGTERM, unless_deferred)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _raise_terminated)


def lightning_interrupt(stop: SystemExit) -> bool:
    """Whether ``stop`` is Lightning's answer to Ctrl-C (or :class:`Terminated`) in fit or predict: it calls
    ``sys.exit(1)`` after its graceful shutdown, inside its ``except KeyboardInterrupt`` clause (and
    ignores SIGINT from then on)."""
    return stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt)
