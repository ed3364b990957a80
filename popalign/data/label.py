"""``popalign label``: attribute labels for every generated image, as a JSONL table.

One row per image: ``{"key", "prompt_id", "shard", "labels": {axis: class name or "unknown"},
"probabilities": {axis: [p_1, ..., p_C]}}`` (probabilities when the classifier gives them). Rows are
appended to ``OUT.partial`` as batches finish and the file is renamed to ``OUT`` at the end, so a
half-done table never looks complete. Each row also holds ``image_sha1`` (the image file's SHA-1)
and ``classifier`` (what labelled it): a re-run keeps the rows already in ``OUT`` or ``OUT.partial``
whose image is still the same, and labels only the images that lack one; rows of another
classifier or of other axes are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from popalign.data.axes import UNKNOWN, BiasAxis
from popalign.data.classifiers import AttributeClassifier
from popalign.data.images import ImageSample, iter_image_samples, recorded_image_count
from popalign.errors import UserError

LABEL_KEYS = ("key", "prompt_id", "labels")


def read_labels(path: str | Path, axes: Sequence[BiasAxis] = (), partial: bool = False) -> dict[str, dict]:
    """Label rows by key; ``UserError`` naming file and line for a bad row.

    Checks each row has ``key``, ``prompt_id`` and ``labels``; with ``axes``, that every axis is
    labelled with one of its classes or ``"unknown"``. ``partial=True`` reads a file being appended
    to: a last line cut short by a crash is dropped, and a later row of a key replaces an earlier one.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read labels ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 labels table ({err.reason} at byte {err.start})") from None
    rows: dict[str, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError:
            if partial and n == len(lines):
                break
            raise UserError(f"{where}: not valid JSON") from None
        missing = [k for k in LABEL_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
        if not isinstance(row["labels"], dict):
            raise UserError(f"{where}: 'labels' must map axis to class name")
        for axis in axes:
            value = row["labels"].get(axis.name)
            if value is None:
                raise UserError(f"{where}: no label for axis {axis.name!r}")
            if value != UNKNOWN and value not in axis.class_names:
                raise UserError(
                    f"{where}: {value!r} is not a class of axis {axis.name!r} ({', '.join(axis.class_names)})"
                )
        if row["key"] in rows and not partial:
            raise UserError(f"{where}: duplicate key {row['key']!r}")
        rows[row["key"]] = row
    return rows


def _check_output(name: str, out: dict, axes: Sequence[BiasAxis], n: int, probs: bool) -> None:
    # plugins are user code: say clearly what they returned wrong
    for axis in axes:
        arr = out.get(axis.name) if isinstance(out, dict) else None
        shape = (n, axis.num_classes) if probs else (n,)
        if not isinstance(arr, np.ndarray) or arr.shape != shape:
            got = getattr(arr, "shape", type(arr).__name__)
            what = "probabilities" if probs else "classify"
            raise UserError(
                f"classifier {name}: {what} must give axis {axis.name!r} an array of shape {shape}, got {got}"
            )
        if not probs and ((arr < -1) | (arr >= axis.num_classes)).any():
            raise UserError(
                f"classifier {name}: class indices for {axis.name!r} must be in [-1, {axis.num_classes})"
            )


def _resumable(path: Path, axes: Sequence[BiasAxis], classifier_id: str, partial: bool = False) -> dict:
    """The rows of an earlier run's ``path``; ``UserError`` when they are of other axes or another
    classifier (rows of older versions name no classifier and are kept)."""
    rows = read_labels(path, partial=partial)
    names = sorted(a.name for a in axes)
    for row in rows.values():
        if sorted(row["labels"]) != names:
            raise UserError(
                f"{path}: labels of axes {', '.join(sorted(row['labels']))}, not {', '.join(names)} "
                "(an earlier run with other --axes); use another --out or delete it"
            )
        if row.get("classifier", classifier_id) != classifier_id:
            raise UserError(
                f"{path}: labelled by {row['classifier']}, not {classifier_id}; "
                "use another --out or delete it to label with another classifier"
            )
    return read_labels(path, axes, partial=partial)  # now also checks each class


def _still_valid(row: dict, s: ImageSample) -> bool:
    """Whether an earlier row labels this very image (not another one under the same key)."""
    if row["prompt_id"] != s.prompt_id:
        return False
    if "image_sha1" in row:
        return row["image_sha1"] == s.digest
    return row.get("shard", Path(s.shard).name) == Path(s.shard).name  # an older row: best we can tell


def label_images(
    images: str | Path,
    classifier: AttributeClassifier,
    out: str | Path,
    batch_size: int = 64,
    progress: bool = True,
    classifier_id: str | None = None,
) -> dict:
    """Label every image in the shards of ``images`` not yet in ``out``; returns a report.

    ``classifier_id`` (default: the classifier's class name) is stored in each row; a re-run with
    another one is refused. Rows of images that changed (another image under the same key: the
    folder was regenerated) are labelled again and counted as ``relabelled``.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    for path in (out, partial):
        if path.is_dir():
            raise UserError(f"{path}: is a folder (--out takes the labels file to write)")
    axes = classifier.axes
    name = type(classifier).__name__
    classifier_id = classifier_id or name
    done = _resumable(out, axes, classifier_id) if out.is_file() else {}
    if partial.is_file():
        done.update(_resumable(partial, axes, classifier_id, partial=True))
    report = {
        "images": 0, "already_labelled": 0, "labelled": 0, "relabelled": 0,
        "unknown": {a.name: 0 for a in axes},
    }  # fmt: skip
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out.parent}: cannot create the folder ({err.strerror or err})") from None
    seen: set[str] = set()
    with open(partial, "w", encoding="utf-8") as f:
        for row in done.values():
            f.write(json.dumps(row) + "\n")
        batch: list[tuple[ImageSample, np.ndarray]] = []

        def flush() -> None:
            stack = np.stack([img for _, img in batch])
            try:
                labels, probs = classifier.predict(stack)
            except (TypeError, ValueError) as err:
                raise UserError(
                    f"{batch[0][0].where}: classifier {name} rejected the images ({err})"
                ) from None
            _check_output(name, labels, axes, len(batch), probs=False)
            if probs is not None:
                _check_output(name, probs, axes, len(batch), probs=True)
            for i, (s, _) in enumerate(batch):
                row = {"key": s.key, "prompt_id": s.prompt_id, "shard": Path(s.shard).name, "labels": {}}
                for axis in axes:
                    c = int(labels[axis.name][i])
                    row["labels"][axis.name] = UNKNOWN if c < 0 else axis.class_names[c]
                    report["unknown"][axis.name] += c < 0
                if probs is not None:
                    row["probabilities"] = {
                        a.name: [round(float(p), 5) for p in probs[a.name][i]] for a in axes
                    }
                row.update(image_sha1=s.digest, classifier=classifier_id)
                f.write(json.dumps(row) + "\n")  # after an earlier row of the key: replaces it
            f.flush()
            report["labelled"] += len(batch)
            batch.clear()

        # every image of the folder ticks the bar, those labelled before too: its total is the folder's
        with tqdm(total=recorded_image_count(images), unit="img", disable=not progress) as bar:
            for s in iter_image_samples(images):
                if s.key in seen:
                    raise UserError(f"{s.where}: key appears in more than one shard")
                seen.add(s.key)
                report["images"] += 1
                bar.update(1)
                if s.key in done:
                    if _still_valid(done[s.key], s):
                        report["already_labelled"] += 1
                        continue
                    report["relabelled"] += 1
                image = s.image()
                if batch and image.shape != batch[0][1].shape:
                    flush()  # one stacked array per batch: flush on a size change
                batch.append((s, image))
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
    stale = set(done) - seen
    if stale or report["relabelled"]:  # one row per image in the folder, the newest
        kept = [row for key, row in read_labels(partial, partial=True).items() if key not in stale]
        partial.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    report["dropped"] = len(stale)
    os.replace(partial, out)
    return report
