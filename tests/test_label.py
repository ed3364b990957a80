"""The label stage: a plugin classifier labels the generated images, and an interrupted run resumes."""

from __future__ import annotations

import json

import pytest
from conftest import N_IMAGES, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_label_writes_rows_and_resumes(generated, labels, oracle, tmp_path, capsys):
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 6 * N_IMAGES
    by_key = {r["key"]: r for r in rows}
    assert by_key["p0000-a0001-0000"]["labels"] == {"gender": "female"}
    assert by_key["p0000-a0000-0000"]["labels"] == {"gender": "unknown"}
    assert by_key["p0000-0002"] == {
        "key": "p0000-0002",
        "prompt_id": "p0000",
        "shard": "images-r0-000000.tar",
        "labels": {"gender": "male"},
    }
    # an interrupted run left 5 rows and half a line in OUT.partial: only the other 19 are labelled
    out = tmp_path / "labels.jsonl"
    lines = labels.read_text().splitlines(keepends=True)
    (tmp_path / "labels.jsonl.partial").write_text("".join(lines[:5]) + lines[5][:20])
    code, stdout, _ = run_cli(
        ["label", "--images", generated, "--axes", "gender", *oracle, "--out", out, "--no-progress"], capsys
    )
    assert code == 0 and "19 labelled, 5 already labelled" in stdout
    assert sorted(out.read_text().splitlines()) == sorted(labels.read_text().splitlines())
    assert not (tmp_path / "labels.jsonl.partial").exists()
    code, stdout, _ = run_cli(
        ["label", "--images", generated, "--axes", "gender", *oracle, "--out", out, "--no-progress"], capsys
    )
    assert code == 0 and "0 labelled, 24 already labelled" in stdout
