"""popalign.files: whole-file writes keep the previous file on failure; strict JSON of numpy/torch values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from popalign import files


def test_write_text_replaces_the_whole_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    files.write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "a.json"
    files.write_json(path, {"x": 1})
    with pytest.raises(TypeError):
        files.write_json(path, {"x": object()})  # not serialisable: fails before the rename
    assert json.loads(path.read_text()) == {"x": 1}
    folder = tmp_path / "b.json"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        files.write_text(folder, "text")  # the rename over a folder fails: the temporary file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_jsonable_makes_strict_json():
    data = {
        "nan": math.nan,
        "inf": -math.inf,
        "np": np.float32(0.5),
        "int": np.int64(3),
        "tensor": torch.tensor(2.0),
        "arr0": np.array(1.5),
        "seq": (1, np.float64(math.nan)),
        1: "key",
    }
    out = files.jsonable(data)
    assert out == {
        "nan": None,
        "inf": None,
        "np": 0.5,
        "int": 3,
        "tensor": 2.0,
        "arr0": 1.5,
        "seq": [1, None],
        "1": "key",
    }
    assert type(out["int"]) is int and type(out["np"]) is float
    json.dumps(out, allow_nan=False)  # raises if anything non-strict is left
