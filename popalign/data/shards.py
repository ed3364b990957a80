"""Population shards on disk: the writer, shard lists, and the checked reading stream.

Reading never trusts a shard: every sample is decoded without pickle and validated; a bad one
(unreadable or truncated tar, missing file, wrong dtype or shape, NaN/inf, too few members) is
logged and skipped, and :class:`BadSampleCounter` aborts when too many are bad.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from popalign.data.schema import PopulationGroup, ShardError
from popalign.errors import UserError
from popalign.files import StagedTar

log = logging.getLogger(__name__)

# The bad fraction is judged only after this many samples (and at the end of the data), so one
# early bad sample in a large set does not abort the run.
BAD_FRACTION_GRACE = 100
_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")  # "<key>.<ext>", ext may hold dots
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


class PopulationShardWriter:
    """Write groups into size- and count-capped shards ``<prefix>-000000.tar``, ``-000001.tar``, ...

    Each shard is written as ``<name>.tar.tmp`` and renamed once complete, so a crashed writer
    never leaves a ``.tar`` that looks whole; leaving the context with an exception deletes the
    unfinished shard. Groups are validated before they are written.

    Args:
        directory: output folder (created if missing).
        prefix: shard file name prefix.
        maxcount: most groups per shard.
        maxsize: most bytes per shard file (a single larger group still gets a shard of its own).
        overwrite: replace existing ``<prefix>-NNNNNN.tar`` files instead of refusing to start.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        prefix: str = "shard",
        maxcount: int = 1000,
        maxsize: int = 1 << 30,
        overwrite: bool = False,
    ) -> None:
        if maxcount < 1 or maxsize < 1:
            raise UserError(f"shard writer: maxcount and maxsize must be >= 1, got {maxcount}, {maxsize}")
        self.directory, self.prefix = Path(directory), prefix
        self.maxcount, self.maxsize = maxcount, maxsize
        self.directory.mkdir(parents=True, exist_ok=True)
        own = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")  # not another prefix's "shard-val-..."
        existing = sorted(p for p in self.directory.iterdir() if own.fullmatch(p.name))
        if existing and not overwrite:
            raise UserError(
                f"{existing[0]}: shards with prefix {prefix!r} already exist (pass overwrite=True)"
            )
        for path in existing:
            path.unlink()
        self.paths: list[str] = []
        self._keys: set[str] = set()
        self._shard: StagedTar | None = None
        self._count = self._size = 0

    def __enter__(self) -> PopulationShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, group: PopulationGroup) -> None:
        """Validate ``group`` and append it to the current shard (starting a new one when full)."""
        group.validate()
        if group.key in self._keys:
            raise ShardError("duplicate key in this shard set", url=str(self.directory), key=group.key)
        sample = group.to_sample()
        # tar layout: a 512-byte header per file, data padded to 512
        size = sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")
        if self._shard is not None and (
            self._count >= self.maxcount or _closed_size(self._size + size) > self.maxsize
        ):
            self._finish_shard()
        if self._shard is None:
            self._shard = StagedTar(self.directory / f"{self.prefix}-{len(self.paths):06d}.tar")
        self._shard.write(sample)
        self._keys.add(group.key)
        self._count += 1
        self._size += size

    def close(self) -> list[str]:
        """Finish the open shard and return the paths of all shards written."""
        if self._shard is not None:
            self._finish_shard()
        return list(self.paths)

    def abort(self) -> None:
        """Drop the unfinished shard (complete shards stay)."""
        if self._shard is not None:
            shard, self._shard = self._shard, None
            shard.discard()

    def _finish_shard(self) -> None:
        self.paths.append(str(self._shard.commit()))
        self._shard = None
        self._count = self._size = 0


def _closed_size(content: int) -> int:
    """File size of a tar holding ``content`` bytes of headers and data, once closed."""
    return -(-(content + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE  # end blocks, record padding


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from a spec: brace pattern, directory (its ``*.tar``, sorted), glob, comma list, URL.

    Parts are separated by commas outside braces; ``pipe:``/``http(s):`` and other URLs pass through.
    Local files must exist. Raises :class:`UserError` naming the spec and the problem.
    """
    import braceexpand

    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    urls: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]+:", part):  # a URL scheme webdataset opens
            urls.extend(braceexpand.braceexpand(part))
            continue
        path = os.path.expanduser(part)
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            if not found:
                raise UserError(f"{path}: directory holds no *.tar shards")
            urls.extend(found)
        elif any(ch in path for ch in "*?["):
            found = sorted(glob.glob(path))
            if not found:
                raise UserError(f"{path}: pattern matches no shard")
            urls.extend(found)
        else:
            for url in braceexpand.braceexpand(path):
                if not os.path.isfile(url):
                    raise UserError(f"{url}: shard not found (from {spec!r})")
                urls.append(url)
    if not urls:
        raise UserError(f"no shards given: {spec!r}")
    return urls


def split_by_node(urls: Iterable[str], rank: int, world_size: int) -> Iterator[str]:
    """Every ``world_size``-th shard starting at ``rank`` (the rank is captured in the main process,
    since DataLoader workers may not see the process group)."""
    for i, url in enumerate(urls):
        if i % world_size == rank:
            yield url


class BadSampleCounter:
    """Counts good and bad samples and aborts when bad / seen > ``max_bad_fraction``.

    The fraction is judged once at least ``grace`` samples were seen and again at the end of the
    data; ``max_bad_fraction=0`` fails on the first bad sample. Each reading process (rank and
    DataLoader worker) counts on its own.
    """

    LOGGED = 10  # bad samples given a line each; the rest are counted (and named in the abort)

    def __init__(self, max_bad_fraction: float = 0.01, grace: int = BAD_FRACTION_GRACE) -> None:
        self.max_bad_fraction, self.grace = max_bad_fraction, grace
        self.seen = self.bad = 0
        self.last: ShardError | None = None
        self.distinct: set[tuple[str | None, str | None]] = set()  # resampled passes reread samples

    def good(self) -> None:
        self.seen += 1
        self._check(final=False)

    def record_bad(self, error: ShardError) -> None:
        self.seen += 1
        self.bad += 1
        self.last = error
        where = (error.url, error.key)
        if where not in self.distinct:  # one line per sample, not per reading of it
            self.distinct.add(where)
            if len(self.distinct) <= self.LOGGED:
                log.warning("skipping bad sample (%d of %d bad so far): %s", self.bad, self.seen, error)
            if len(self.distinct) == self.LOGGED:
                log.warning("further bad samples are counted without a line each")
        self._check(final=False)

    def finish(self) -> None:
        self._check(final=True)

    def _check(self, final: bool) -> None:
        if self.bad == 0 or self.last is None:
            return
        judged = final or self.seen >= self.grace or self.max_bad_fraction == 0
        if judged and self.bad / self.seen > self.max_bad_fraction:
            again = f" ({len(self.distinct)} distinct, read again)" if len(self.distinct) < self.bad else ""
            raise ShardError(
                f"{self.bad} of {self.seen} samples bad{again}, above max_bad_fraction={self.max_bad_fraction}; "
                f"last problem: {self.last.problem}",
                url=self.last.url,
                key=self.last.key,
            )


def read_groups(
    urls: Iterable[str],
    counter: BadSampleCounter,
    latent_shape: tuple[int, ...] | None = None,
    min_members: int = 1,
) -> Iterator[PopulationGroup]:
    """Decode and validate every sample of ``urls``; bad ones go to ``counter`` and are skipped.

    Conditioning shapes ([L, D], [Dp]) and, when ``latent_shape`` is None, the latent shape are
    fixed by the first good sample, so every batch can be stacked.
    """
    expected = tuple(latent_shape) if latent_shape is not None else None
    cond: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    for url in urls:
        for sample in iter_tar_samples(url):
            key = sample.get("__key__")
            _refuse_image_sample(sample, url)
            try:
                if "__error__" in sample:
                    raise ShardError(sample["__error__"], url=url, key=key)
                group = PopulationGroup.from_sample(sample, url)
                group.validate(expected, min_members)
                shapes = (group.prompt_embeds.shape, group.pooled_prompt_embeds.shape)
                if cond is not None and shapes != cond:
                    raise ShardError(f"conditioning shapes {shapes} differ from earlier samples' {cond}")
            except ShardError as err:
                counter.record_bad(ShardError(err.problem, url=url, key=key))
                continue
            expected, cond = expected or group.latent_shape, cond or shapes
            counter.good()
            yield group
    counter.finish()


def _refuse_image_sample(sample: dict[str, Any], url: str) -> None:
    # `popalign generate`'s image shards (one image, its latent and json per sample) given for
    # training: every sample would be skipped as bad, a warning each; one line says what happened
    if ("png" in sample or "jpg" in sample) and "preferred.npy" not in sample:
        raise ShardError(
            "an image shard of popalign generate, not population shards; train on the --out of "
            "popalign build (which groups the images into populations)",
            url=url,
        )


class _TailReader:
    """Passes reads through, remembering the first and last bytes (to spot a cut-off tar)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.head, self.tail = raw, b"", b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = (self.tail + data[-1024:])[-1024:]
        return data


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", "<ext>": bytes}`` of one tar shard, in file order.

    Problems become samples carrying ``"__error__"``: a duplicate key or file within a sample, or a
    shard that cannot be opened, read, or ends without tar's end-of-archive blocks (truncated).
    Reading stops at the first read error.
    """
    from webdataset.gopen import gopen

    try:
        raw = gopen(url, "rb")
    except Exception as err:  # any opener failure (missing file, bad scheme) is this shard's problem
        yield {"__key__": None, "__url__": url, "__error__": f"cannot open shard ({err})"}
        return
    state: dict[str, Any] = {"current": None}
    error: Exception | None = None
    try:
        yield from _tar_samples(_TailReader(raw), url, state)
    except Exception as err:  # tarfile, gzip, pipe exit status: all mean this shard is damaged
        error = err
    finally:
        try:
            raw.close()  # a pipe reports its exit status here
        except Exception as err:
            error = error or err
    current = state["current"]
    if error is not None:
        bad_key = current["__key__"] if current is not None else None
        yield {"__key__": bad_key, "__url__": url, "__error__": f"shard unreadable: {error}"}
    elif current is not None:
        yield current


def _tar_samples(reader: _TailReader, url: str, state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every finished sample; the last one is left in ``state`` until the shard proves whole."""
    keys: set[str] = set()
    with tarfile.open(fileobj=reader, mode="r|*") as tar:
        for info in tar:
            tar.members = []  # stream mode would keep every header in memory
            match = _NAME.match(info.name) if info.isreg() else None
            if match is None or match.group(2).startswith("_"):
                continue
            key, ext = match.group(1), match.group(2).lower()
            current = state["current"]
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = state["current"] = {"__key__": key, "__url__": url}
                if key in keys:
                    current["__error__"] = "key appears twice in the shard"
                keys.add(key)
            if ext in current:
                current["__error__"] = f"file {info.name} appears twice"
            current[ext] = tar.extractfile(info).read()
        while reader.read(1 << 20):  # drain, so the end-of-archive padding can be checked
            pass
    if not reader.head.startswith(_COMPRESSED_MAGIC) and reader.tail.strip(b"\0"):
        raise tarfile.ReadError("no end-of-archive blocks: the shard is truncated")
