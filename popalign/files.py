"""Small file helpers shared by the stages: whole-file and whole-folder writes that never leave a
half-written file or folder.

A reader (or a resumed run) sees either the previous file or the complete new one: the text goes to a
hidden temporary file beside ``path`` (named with the process id, so concurrent writers do not share
it) and is renamed over ``path`` in one step. Folders are built under :func:`sibling` names and put in
place with :func:`replace_folder`; those a killed run left (its process gone) are removed by the next.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from popalign.errors import UserError


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; the temporary file is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StagedTar:
    """A webdataset tar archive written as ``<path>.tmp`` and renamed to ``path`` only when complete.

    :meth:`commit` ends the archive, flushes it to disk and renames it; :meth:`discard` closes and
    removes the unfinished file. Members get a fixed time (0, an int: no pax header per member), so the
    same samples make the same bytes on every run.
    """

    def __init__(self, path: str | Path) -> None:
        from webdataset import TarWriter

        self.path = Path(path)
        self.temp = Path(f"{self.path}.tmp")
        self._file = open(self.temp, "wb")
        self._tar = TarWriter(self._file, encoder=False, mtime=0)  # closing it leaves the file open

    def write(self, sample: dict) -> None:
        """Append one sample (``{"__key__": ..., "<ext>": bytes, ...}``)."""
        self._tar.write(sample)

    def commit(self) -> Path:
        """End the archive, fsync it and rename it to :attr:`path`; returns that path."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp, self.path)
        return self.path

    def discard(self) -> None:
        """Close and delete the unfinished archive."""
        try:
            self._tar.close()  # else the tar stream flushes into a closed file when collected
        finally:
            self._file.close()
            self.temp.unlink(missing_ok=True)


def jsonable(value: Any) -> Any:
    """Strict-JSON form of ``value``, recursively: NaN and infinities -> ``None``, numpy and torch
    scalars -> Python numbers, tuples -> lists, mapping keys -> strings."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalar, 0-d array or tensor
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> None:
    """``jsonable(data)`` as indented JSON, written with :func:`write_text`."""
    write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def sibling(out: Path, tag: str) -> Path:
    """A hidden, unused name beside ``out`` (a plain name: mkdtemp's folders would be private, mode 700).

    The folders of the same ``out`` and ``tag`` that a killed run left are removed first (see
    :func:`remove_abandoned`)."""
    remove_abandoned(out.parent, rf"\.{re.escape(out.name)}\.(\d+)-[0-9a-f]{{8}}\.{re.escape(tag)}")
    return out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.{tag}")


def stage_folder(out: Path, pid: int | None = None, clean: bool = True) -> Path:
    """``.OUT.tmp-<pid>`` beside ``out`` (``pid``: this process's unless given), a folder to build
    ``out`` in and rename into place. With ``clean`` those that killed runs left are removed first
    (:func:`remove_abandoned`); only one process of a multi-node job should clean, since another
    node's processes do not run here."""
    if clean:
        remove_abandoned(out.parent, rf"\.{re.escape(out.name)}\.tmp-(\d+)")
    return out.with_name(f".{out.name}.tmp-{os.getpid() if pid is None else pid}")


def remove_abandoned(folder: Path, pattern: str) -> None:
    """Remove the work folders in ``folder`` left by runs killed without a chance to clean up (SIGKILL,
    a power loss): those whose whole name matches ``pattern``, a regular expression whose first group
    is the id of the process that made the folder, when that process is no longer running here."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = re.fullmatch(pattern, path.name)
        if match and path.is_dir() and not path.is_symlink() and not process_running(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)


def process_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # no process has such an id
        return False
    return True


def new_file_mode(folder: Path) -> int:
    """The mode a new file in ``folder`` gets (0666 less the umask), read off one made there and removed:
    reading the umask itself means setting it, process-wide."""
    probe = folder / f".mode-{secrets.token_hex(4)}"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``, removing what was there only once ``tmp`` is in place.

    Every file below ``tmp`` first gets the mode a new file gets there: safetensors writes its weights
    0600, which nobody else on a shared machine could read, while everything else gets the usual mode."""
    mode = new_file_mode(tmp)
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)
    if not out.exists():
        tmp.rename(out)
        return
    old = sibling(out, "old")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def check_replaceable(out: Path, overwrite: bool, ours: Callable[[Path], bool], what: str) -> None:
    """:class:`UserError` before any work unless ``out`` may be written: absent, an empty folder, or
    with ``overwrite`` a folder ``ours`` recognises as this command's output (described by ``what``).
    A file, or a folder of anything else, is refused with or without ``overwrite``: no advice that
    would fail."""
    check_no_file_above(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not ours(out):
        raise UserError(
            f"{out}: does not look like {what}; --overwrite replaces only those: choose another --out"
        )
    if not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite or choose another --out")


def check_no_file_above(out: Path) -> None:
    """:class:`UserError` before any work when ``out`` lies below a file (no folder can be made there)."""
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{out}: {parent} is a file, not a folder")


def check_out(out: Path, overwrite: bool) -> None:
    """:class:`UserError` before any work when ``out`` cannot be written: below a file, or taken."""
    check_no_file_above(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
