"""The label stage: a plugin classifier labels the generated images, and an interrupted run resumes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import N_IMAGES, run_cli

from popalign.data.images import iter_image_samples

pytestmark = pytest.mark.usefixtures("one_thread")


def test_label_writes_rows_and_resumes(generated, labels, oracle, tmp_path, capsys):
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 6 * N_IMAGES
    by_key = {r["key"]: r for r in rows}
    assert by_key["p0000-a0001-0000"]["labels"] == {"gender": "female"}
    assert by_key["p0000-a0000-0000"]["labels"] == {"gender": "unknown"}
    images = {s.key: s for s in iter_image_samples(generated)}
    assert by_key["p0000-0002"] == {
        "key": "p0000-0002",
        "prompt_id": "p0000",
        "shard": "images-r0-000000.tar",
        "labels": {"gender": "male"},
        "image_sha1": hashlib.sha1(images["p0000-0002"].files["png"]).hexdigest(),
        "classifier": f"oracle_plugin:Oracle(truth={oracle[-1].split('=', 1)[1]})",
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


def swap_images(shard: Path, a: str, b: str) -> None:
    """Rewrite an image shard with the images of keys ``a`` and ``b`` swapped (same keys, other images)."""
    from webdataset import TarWriter

    from popalign.data.shards import iter_tar_samples

    samples = [dict(s) for s in iter_tar_samples(str(shard))]
    by_key = {s["__key__"]: s for s in samples}
    by_key[a]["png"], by_key[b]["png"] = by_key[b]["png"], by_key[a]["png"]
    with open(shard, "wb") as f, TarWriter(f, encoder=False, mtime=0.0) as tar:
        for s in samples:
            tar.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})


def test_label_relabels_images_that_changed_under_the_same_key(
    generated, labels, oracle, table, tiny_model, tmp_path, capsys
):
    images, out = tmp_path / "images", tmp_path / "labels.jsonl"
    shutil.copytree(generated, images)
    swap_images(images / "images-r0-000000.tar", "p0000-0000", "p0000-a0000-0000")
    # build notices that the labels are of other images
    build = ["build", "--images", images, "--prompts", table, "--model", tiny_model, "--out", tmp_path / "s"]
    code, _, err = run_cli([*build, "--labels", labels, "--population-size", 2], capsys)
    assert code == 2 and "label of 'p0000-0000' is of another image" in err and len(err.splitlines()) == 1
    # label keeps the 22 rows of unchanged images and labels the two others again
    shutil.copy(labels, out)
    argv = ["label", "--images", images, "--axes", "gender", *oracle, "--out", out, "--no-progress"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0 and "2 labelled (2 of changed images), 22 already labelled" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len({r["key"] for r in rows}) == 6 * N_IMAGES
    by_key = {r["key"]: r for r in rows}
    assert by_key["p0000-0000"]["labels"] == {"gender": "unknown"}  # the image of p0000-a0000-0000
    assert by_key["p0000-a0000-0000"]["labels"] == {"gender": "male"}
    assert run_cli(argv, capsys)[1].startswith("24 images: 0 labelled, 24 already labelled")


def test_label_refuses_a_table_of_other_axes_or_another_classifier(
    generated, labels, oracle, tmp_path, capsys
):
    out = tmp_path / "labels.jsonl"
    shutil.copy(labels, out)
    base = ["label", "--images", generated, "--out", out, "--no-progress"]

    def fails(argv, *needles):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert all(n in err for n in needles), err

    fails([*base, "--axes", "gender", "race", *oracle], str(out), "labels of axes gender, not gender, race")
    other = tmp_path / "truth.json"
    other.write_text("{}")
    fails(
        [*base, "--axes", "gender", *oracle[:-1], f"truth={other}"],
        str(out),
        "labelled by oracle_plugin:Oracle",
    )
    fails([*base, "--axes", "gender", *oracle, "--batch-size", 0], "--batch-size must be >= 1")
    # clip without --classifier-model is evaluate's default CLIP, not cached in this offline test run
    fails(
        [*base, "--axes", "gender"],
        "openai/clip-vit-large-patch14: cannot load a CLIP model (not in the local cache, and the hub could not",
    )
    assert out.read_bytes() == labels.read_bytes() and not list(tmp_path.glob("*.partial"))
    # an --out that is a folder fails at once, not after labelling every image
    (tmp_path / "od").mkdir()
    fails([*base[:3], "--out", tmp_path / "od", "--axes", "gender", *oracle], "od: is a folder")
    assert not (tmp_path / "od.partial").exists()
    out.write_bytes(b"\xff\xfe not utf-8")
    fails([*base, "--axes", "gender", *oracle], str(out), "not a UTF-8 labels table")
