"""Image shards written by ``popalign generate``: format, writer (rename-on-complete) and reader.

One webdataset sample per image: ``<key>.png`` (or ``.jpg``), ``<key>.latent.npy`` (float16 final
latents, in the UNet's scaled space) and ``<key>.json`` (prompt, seed, sampler settings, model).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popalign.errors import UserError
from popalign.files import StagedTar

SHARD_RE = re.compile(r"images-r(\d+)-(\d{6})\.tar")
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")  # webdataset splits names at the first dot
SAMPLE_META = ("prompt_id", "kind", "prompt", "seed", "height", "width")


def encode_image(
    key: str, image: np.ndarray, latent: np.ndarray | None, meta: dict, image_format: str = "png"
) -> dict:
    """One image sample as tar files: ``{"__key__", "png"|"jpg", "latent.npy" (float16), "json"}``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG" if image_format == "png" else "JPEG", quality=95)
    sample = {"__key__": key, image_format: buf.getvalue(), "json": json.dumps(meta).encode("utf-8")}
    if latent is not None:
        arr = io.BytesIO()
        np.save(arr, np.asarray(latent, dtype=np.float16), allow_pickle=False)
        sample["latent.npy"] = arr.getvalue()
    return sample


class ImageShardWriter:
    """Writes whole prompts into ``DIR/images-r{rank}-{index:06d}.tar`` (temp name, then renamed).

    A shard is closed only between prompts, once it holds ``maxcount`` images or more; its prompt
    ids, with each prompt's text and image indices, are then appended to ``DIR/done-r{rank}.jsonl``.
    A new writer removes this rank's unfinished ``.tar.tmp`` (rank 0 with ``world_size`` also those
    of ranks >= ``world_size``, left by an earlier run on more devices) and numbers its shards after
    the existing ones.
    """

    def __init__(
        self, directory: str | Path, rank: int = 0, maxcount: int = 1000, world_size: int | None = None
    ) -> None:
        if maxcount < 1:
            raise UserError(f"--shard-size must be >= 1, got {maxcount}")
        self.directory, self.rank, self.maxcount = Path(directory), rank, maxcount
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("images-r*-*.tar.tmp"):
            m = re.fullmatch(r"images-r(\d+)-\d+\.tar\.tmp", stale.name)
            owner = int(m[1]) if m else -1
            if owner == rank or (rank == 0 and world_size is not None and owner >= world_size):
                stale.unlink(missing_ok=True)  # an interrupted run's unfinished shard
        used = [
            int(m[2])
            for p in self.directory.iterdir()
            if (m := SHARD_RE.fullmatch(p.name)) and int(m[1]) == rank
        ]
        self.index = max(used, default=-1) + 1
        self.paths: list[str] = []
        self._shard: StagedTar | None = None
        self._prompts: list[str] = []
        self._images: dict[str, list[int]] = {}
        self._texts: dict[str, str] = {}
        self._count = 0

    def __enter__(self) -> ImageShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close() if exc_type is None else self.abort()

    def _name(self) -> Path:
        return self.directory / f"images-r{self.rank}-{self.index:06d}.tar"

    def write_prompt(self, prompt_id: str, samples: Sequence[dict]) -> None:
        """Append all samples of one prompt; close the shard when it is full."""
        if self._shard is None:
            self._shard = StagedTar(self._name())
        for item in samples:
            self._shard.write(item)
            index = split_key(item["__key__"])[1]
            if index is not None:
                self._images.setdefault(prompt_id, []).append(index)
            text = _sample_prompt(item.get("json"))
            if text is not None:
                self._texts.setdefault(prompt_id, text)
        self._prompts.append(prompt_id)
        self._count += len(samples)
        if self._count >= self.maxcount:
            self._finish()

    def close(self) -> list[str]:
        """Finish the open shard; the paths of the shards this writer completed."""
        if self._shard is not None:
            self._finish()
        return list(self.paths)

    def abort(self) -> None:
        """Drop the unfinished shard: its prompts stay pending."""
        if self._shard is not None:
            shard, self._shard = self._shard, None
            shard.discard()

    def _finish(self) -> None:
        final = self._shard.commit()
        self._shard = None
        with open(self.directory / f"done-r{self.rank}.jsonl", "a") as f:
            # its size, so that a resume can tell a shard cut short since (full disk, bad copy)
            record = {"shard": final.name, "bytes": final.stat().st_size, "prompt_ids": self._prompts}
            record.update(images=self._images, prompts=self._texts)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.paths.append(str(final))
        self._prompts, self._images, self._texts, self._count = [], {}, {}, 0
        self.index += 1


def image_shards(directory: str | Path) -> list[Path]:
    """Complete image shards of ``directory``, sorted; ``UserError`` when there are none."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d}: images folder not found (run popalign generate first)")
    shards = sorted(p for p in d.iterdir() if SHARD_RE.fullmatch(p.name))
    if not shards:
        raise UserError(f"{d}: no images-r*-*.tar shards (run popalign generate first)")
    return shards


def split_key(key: str) -> tuple[str, int | None]:
    """``("p0003-a0001", 2)`` for the sample key (or tar member name) ``p0003-a0001-0002[.png]``."""
    stem = key.split(".", 1)[0]
    prompt_id, _, index = stem.rpartition("-")
    return (prompt_id, int(index)) if prompt_id and index.isdigit() else (stem, None)


def _sample_prompt(data: Any) -> str | None:
    """The ``prompt`` of a sample's json bytes, or None."""
    try:
        meta = json.loads(data.decode("utf-8")) if isinstance(data, bytes) else None
    except (UnicodeDecodeError, ValueError):
        return None
    text = meta.get("prompt") if isinstance(meta, dict) else None
    return text if isinstance(text, str) else None


@dataclass
class DonePrompt:
    """What a folder holds of one prompt: its images' indices, the prompt text they were sampled
    from (None when unknown) and the shard where that text was first seen."""

    indices: set[int]
    prompt: str | None
    shard: str


def _scan_shard(shard: Path) -> dict[str, tuple[list[int], str | None]]:
    """prompt_id -> (image indices, prompt text) read from a complete shard's member names and json."""
    found: dict[str, tuple[list[int], str | None]] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                prompt_id, index = split_key(member.name)
                indices, text = found.get(prompt_id, ([], None))
                if index is not None and member.name.endswith(".json") and text is None:
                    handle = tar.extractfile(member)
                    text = _sample_prompt(handle.read()) if handle is not None else None
                if index is not None and index not in indices:
                    indices.append(index)
                found[prompt_id] = (indices, text)
    except (tarfile.TarError, OSError) as err:
        raise UserError(
            f"{shard}: unreadable image shard ({err}); delete it to regenerate its prompts"
        ) from None
    return found


def _done_records(d: Path) -> dict[str, dict]:
    """shard name -> its done record (a line cut short by a crash is skipped)."""
    records: dict[str, dict] = {}
    for path in sorted(d.glob("done-r*.jsonl")):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: unreadable done record ({err})") from None
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(rec, dict) and (d / str(rec.get("shard"))).is_file():
                records[str(rec["shard"])] = rec
    return records


def prompt_records(directory: str | Path) -> dict[str, DonePrompt]:
    """prompt_id -> :class:`DonePrompt` for every prompt with images in a complete shard.

    Read from the done records; a shard without a record (a crash cut it off) or with an old one
    (no indices or prompt text) is read itself. ``UserError`` when a shard's size differs from the one
    its record holds (cut short since it was written). ``UserError`` when two shards hold the same prompt
    id sampled from different texts (the folder mixes two prompt tables).
    """
    d = Path(directory)
    if not d.is_dir():
        return {}
    records = _done_records(d)
    done: dict[str, DonePrompt] = {}
    for shard in sorted(p for p in d.iterdir() if SHARD_RE.fullmatch(p.name)):
        rec = records.get(shard.name, {})
        size = shard.stat().st_size
        if isinstance(rec.get("bytes"), int) and rec["bytes"] != size:  # older records: no size
            raise UserError(
                f"{shard}: truncated image shard ({size} bytes, its done record says {rec['bytes']}); "
                "delete it to regenerate its prompts"
            )
        if isinstance(rec.get("images"), dict) and isinstance(rec.get("prompts"), dict):
            found = {
                pid: (rec["images"].get(pid, []), rec["prompts"].get(pid))
                for pid in rec.get("prompt_ids", [])
            }
        else:
            found = _scan_shard(shard)
        for prompt_id, (indices, text) in found.items():
            entry = done.setdefault(prompt_id, DonePrompt(set(), text, shard.name))
            if entry.prompt is None:
                entry.prompt, entry.shard = text, shard.name
            elif text is not None and text != entry.prompt:
                raise UserError(
                    f"{shard}: prompt_id {prompt_id!r} holds images of {text!r}, but {entry.shard} "
                    f"holds images of {entry.prompt!r} (the folder mixes two prompt tables)"
                )
            entry.indices.update(int(i) for i in indices)
    return done


def recorded_image_count(directory: str | Path) -> int | None:
    """How many images the complete shards of ``directory`` hold, by their done records alone (no shard
    is read); None when a shard has no record that counts its images (a crash cut it off)."""
    d = Path(directory)
    if not d.is_dir():
        return None
    records, total = _done_records(d), 0
    for shard in d.iterdir():
        if SHARD_RE.fullmatch(shard.name):
            images = records.get(shard.name, {}).get("images")
            if not isinstance(images, dict):
                return None
            total += sum(len(indices) for indices in images.values())
    return total


def completed_prompts(directory: str | Path) -> set[str]:
    """Prompt ids whose images are in a complete shard (from the done records, and from any shard
    renamed into place whose record a crash prevented)."""
    return set(prompt_records(directory))


@dataclass
class ImageSample:
    """One generated image as stored: key, shard, metadata and the raw files (decoded on demand)."""

    key: str
    shard: str
    meta: dict
    files: dict

    @property
    def prompt_id(self) -> str:
        return self.meta["prompt_id"]

    @property
    def where(self) -> str:
        return f"{self.shard}: sample {self.key!r}"

    @property
    def digest(self) -> str:
        """SHA-1 of the stored image file: tells this image from another one under the same key."""
        import hashlib

        data = next((self.files[e] for e in ("png", "jpg", "jpeg") if e in self.files), b"")
        return hashlib.sha1(data).hexdigest()

    def _open(self) -> Any:
        from PIL import Image, UnidentifiedImageError

        data = next((self.files[e] for e in ("png", "jpg", "jpeg") if e in self.files), None)
        try:
            return Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{self.where}: unreadable image ({err})") from None

    def image(self) -> np.ndarray:
        """The image, uint8 ``[H, W, 3]``."""
        try:
            return np.asarray(self._open().convert("RGB"), dtype=np.uint8)
        except OSError as err:
            raise UserError(f"{self.where}: unreadable image ({err})") from None

    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` from the image header (no decoding)."""
        w, h = self._open().size
        return h, w

    def latent(self) -> np.ndarray | None:
        """The saved final latent (float16 ``[4, h, w]``), or None when the sample has none."""
        if "latent.npy" not in self.files:
            return None
        try:
            arr = np.load(io.BytesIO(self.files["latent.npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"{self.where}: unreadable latent.npy ({err})") from None
        if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.floating):
            raise UserError(
                f"{self.where}: latent.npy has shape {arr.shape} and dtype {arr.dtype}, expected float [4, h, w]"
            )
        return arr.astype(np.float16)


def iter_image_samples(directory: str | Path, shards: Iterable[Path] | None = None) -> Iterator[ImageSample]:
    """Every sample of the image shards in ``directory``, checked; ``UserError`` names shard and key."""
    from popalign.data.shards import iter_tar_samples

    for shard in shards if shards is not None else image_shards(directory):
        for raw in iter_tar_samples(str(shard)):
            key = raw.get("__key__")
            where = f"{shard}: sample {key!r}" if key else str(shard)
            if "__error__" in raw:
                raise UserError(f"{where}: {raw['__error__']} (unreadable or truncated image shard)")
            if not any(e in raw for e in ("png", "jpg", "jpeg")) or "json" not in raw:
                raise UserError(f"{where}: needs an image (png/jpg) and json")
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as err:
                raise UserError(f"{where}: json is not valid ({err})") from None
            missing = [k for k in SAMPLE_META if not isinstance(meta, dict) or k not in meta]
            if missing:
                raise UserError(f"{where}: json lacks {', '.join(missing)}")
            files = {k: v for k, v in raw.items() if not k.startswith("__")}
            yield ImageSample(key=key, shard=str(shard), meta=meta, files=files)
