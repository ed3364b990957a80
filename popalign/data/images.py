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
    ids are then appended to ``DIR/done-r{rank}.jsonl``. A new writer removes this rank's unfinished
    ``.tar.tmp`` and numbers its shards after the existing ones.
    """

    def __init__(self, directory: str | Path, rank: int = 0, maxcount: int = 1000) -> None:
        self.directory, self.rank, self.maxcount = Path(directory), rank, max(1, maxcount)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"images-r{rank}-*.tar.tmp"):
            stale.unlink()  # an interrupted run's unfinished shard
        used = [
            int(m[2])
            for p in self.directory.iterdir()
            if (m := SHARD_RE.fullmatch(p.name)) and int(m[1]) == rank
        ]
        self.index = max(used, default=-1) + 1
        self.paths: list[str] = []
        self._file: Any = None
        self._tar: Any = None
        self._prompts: list[str] = []
        self._count = 0

    def __enter__(self) -> ImageShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close() if exc_type is None else self.abort()

    def _name(self) -> Path:
        return self.directory / f"images-r{self.rank}-{self.index:06d}.tar"

    def write_prompt(self, prompt_id: str, samples: Sequence[dict]) -> None:
        """Append all samples of one prompt; close the shard when it is full."""
        if self._tar is None:
            from webdataset import TarWriter

            self._file = open(f"{self._name()}.tmp", "wb")
            self._tar = TarWriter(self._file, encoder=False, mtime=0.0)
        for item in samples:
            self._tar.write(item)
        self._prompts.append(prompt_id)
        self._count += len(samples)
        if self._count >= self.maxcount:
            self._finish()

    def close(self) -> list[str]:
        """Finish the open shard; the paths of the shards this writer completed."""
        if self._tar is not None:
            self._finish()
        return list(self.paths)

    def abort(self) -> None:
        """Drop the unfinished shard: its prompts stay pending."""
        if self._tar is not None:
            self._file.close()
            Path(f"{self._name()}.tmp").unlink(missing_ok=True)
            self._file = self._tar = None

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._name()
        os.replace(f"{final}.tmp", final)
        with open(self.directory / f"done-r{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"shard": final.name, "prompt_ids": self._prompts}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.paths.append(str(final))
        self._file = self._tar = None
        self._prompts, self._count = [], 0
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


def completed_prompts(directory: str | Path) -> set[str]:
    """Prompt ids whose images are in a complete shard (from the done records, and from any shard
    renamed into place whose record a crash prevented)."""
    d = Path(directory)
    if not d.is_dir():
        return set()
    done: set[str] = set()
    recorded: set[str] = set()
    for path in sorted(d.glob("done-r*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(rec, dict) and (d / str(rec.get("shard"))).is_file():
                recorded.add(rec["shard"])
                done.update(rec.get("prompt_ids", []))
    for shard in (p for p in d.iterdir() if SHARD_RE.fullmatch(p.name) and p.name not in recorded):
        try:
            with tarfile.open(shard) as tar:
                done.update(n.split(".", 1)[0].rsplit("-", 1)[0] for n in tar.getnames())
        except (tarfile.TarError, OSError) as err:
            raise UserError(
                f"{shard}: unreadable image shard ({err}); delete it to regenerate its prompts"
            ) from None
    return done


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
