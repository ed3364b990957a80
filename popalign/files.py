"""Small file helpers shared by the stages: whole-file writes that never leave a half-written file.

A reader (or a resumed run) sees either the previous file or the complete new one: the text goes to a
hidden temporary file beside ``path`` (named with the process id, so concurrent writers do not share
it) and is renamed over ``path`` in one step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
