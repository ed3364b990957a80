"""popalign.files: whole-file writes keep the previous file on failure; strict JSON of numpy/torch values."""

from __future__ import annotations

import json
import math
import os
import tarfile

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


def test_staged_tar_appears_only_when_committed(tmp_path):
    sample = {"__key__": "p0000-0001", "txt": b"hello", "json": b"{}"}
    shard = files.StagedTar(tmp_path / "a.tar")
    shard.write(sample)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar.tmp"]  # nothing that looks whole yet
    assert shard.commit() == tmp_path / "a.tar"
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == ["p0000-0001.json", "p0000-0001.txt"]
        assert tar.extractfile("p0000-0001.txt").read() == b"hello"
        assert all(m.mtime == 0 and not m.pax_headers for m in members)
    again = files.StagedTar(tmp_path / "b.tar")
    again.write(sample)
    again.commit()
    assert (tmp_path / "b.tar").read_bytes() == (tmp_path / "a.tar").read_bytes()  # same samples, same bytes

    dropped = files.StagedTar(tmp_path / "c.tar")
    dropped.write(sample)
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]


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


def test_sibling_removes_the_folders_of_killed_runs(tmp_path):
    # a run killed without a chance to clean up (SIGKILL, a power loss) left its hidden folder for good
    dead = 2**22 + 1  # above Linux's largest process id: never running
    live = os.getppid()
    abandoned = f".model.{dead}-0123abcd.partial"
    kept = [
        f".model.{live}-0123abcd.partial",  # a running process's
        f".model.{dead}-0123abcd.old",  # another tag
        f".models.{dead}-0123abcd.partial",  # another output
        f".model.{dead}-0123abcd.partial.x",
        f".model.{dead}-notours.partial",
    ]
    for name in [abandoned, *kept]:
        (tmp_path / name / "unet").mkdir(parents=True)
    (tmp_path / f".model.{dead}-4567abcd.partial").write_text("a file, not a folder")
    new = files.sibling(tmp_path / "model", "partial")
    assert not new.exists() and new.name.startswith(f".model.{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, f".model.{dead}-4567abcd.partial"])
