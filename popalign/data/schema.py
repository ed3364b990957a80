"""One population group: the unit stored in a shard, its checks, and its tar encoding.

A group is one webdataset sample (files ``<key>.<ext>`` next to each other in a tar). Arrays are
``.npy`` files written and read with ``allow_pickle=False``, metadata is JSON: nothing in a shard
can run code when read. See ``docs/shards.md`` for the table of files.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from popalign.errors import UserError

ARRAY_FILES = ("preferred", "dispreferred", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
# the identity-specific captions the preferred members were sampled from (for preservation_weight)
SOURCE_FILES = ("source_prompt_embeds", "source_pooled_prompt_embeds")
META_FILE = "json"
REQUIRED_FILES = tuple(f"{name}.npy" for name in ARRAY_FILES) + (META_FILE,)
# key grammar: webdataset splits a file name at its first dot, and tar names must stay short
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,79}")
NPY_MAGIC = b"\x93NUMPY"


class ShardError(UserError):
    """A shard or one of its samples is unusable; the message names the shard, the key and the problem.

    Built with one argument it is a plain message (so it survives a DataLoader worker re-raise).
    """

    def __init__(self, problem: str, url: str | None = None, key: str | None = None) -> None:
        self.problem, self.url, self.key = problem, url, key
        where = [part for part in (url, None if key is None else f"sample {key!r}") if part]
        super().__init__(": ".join([*where, problem]))


@dataclass
class PopulationGroup:
    """A neutral prompt's preferred and dispreferred populations, with its text conditioning.

    Attributes:
        key: unique sample key (letters, digits, ``_``, ``-``; no dots), e.g. ``p0003-g0002``.
        preferred: float16 ``[Kp, C, h, w]`` VAE latents, already multiplied by the scaling factor.
        dispreferred: float16 ``[Kd, C, h, w]``, same member shape as ``preferred``.
        prompt_embeds: float16 ``[L, D]`` embedding of the neutral caption (SDXL: 77 x 2048).
        pooled_prompt_embeds: float16 ``[Dp]`` (SDXL: 1280).
        time_ids: float32 ``[6]`` for every member or ``[Kp + Kd, 6]`` per member, preferred first.
        meta: ``prompt``, ``prompt_id``, ``axes``, ``preferred_labels``, ``dispreferred_labels``,
            ``preferred_sources``, ``dispreferred_sources``, optional ``seeds``, any extra keys; with
            source embeddings also ``sources`` (the S distinct captions they encode, in order).
        source_prompt_embeds: optional float16 ``[S, L, D]``: the embeddings of the identity-specific
            captions the preferred members were sampled from, one per distinct caption.
        source_pooled_prompt_embeds: optional float16 ``[S, Dp]``, present exactly when the above is.
    """

    key: str
    preferred: np.ndarray
    dispreferred: np.ndarray
    prompt_embeds: np.ndarray
    pooled_prompt_embeds: np.ndarray
    time_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    source_prompt_embeds: np.ndarray | None = None
    source_pooled_prompt_embeds: np.ndarray | None = None

    @property
    def has_sources(self) -> bool:
        """Whether the group carries its preferred members' own caption embeddings."""
        return self.source_prompt_embeds is not None

    def preferred_source_index(self) -> np.ndarray:
        """Row of ``source_prompt_embeds`` for each preferred member: int64 ``[Kp]``."""
        row = {caption: i for i, caption in enumerate(self.meta["sources"])}
        return np.array([row[s] for s in self.meta["preferred_sources"]], dtype=np.int64)

    @property
    def num_preferred(self) -> int:
        return int(self.preferred.shape[0])

    @property
    def num_dispreferred(self) -> int:
        return int(self.dispreferred.shape[0])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.preferred.shape[1:])

    def member_time_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """``time_ids`` of every member: ``([Kp, 6], [Kd, 6])`` float32."""
        kp, kd = self.num_preferred, self.num_dispreferred
        if self.time_ids.ndim == 1:
            return np.tile(self.time_ids, (kp, 1)), np.tile(self.time_ids, (kd, 1))
        return self.time_ids[:kp], self.time_ids[kp:]

    def validate(self, expected_latent_shape: tuple[int, ...] | None = None, min_members: int = 1) -> None:
        """Check dtypes, shapes, finiteness and metadata; raise :class:`ShardError` on the first problem.

        Args:
            expected_latent_shape: required ``(C, h, w)`` of every member; None accepts any.
            min_members: fewest members each population must have (e.g. pairs drawn per step).
        """
        problem = self._problem(expected_latent_shape, min_members)
        if problem is not None:
            raise ShardError(problem, key=self.key)

    def _problem(self, expected: tuple[int, ...] | None, min_members: int) -> str | None:
        if not isinstance(self.key, str) or not KEY_PATTERN.fullmatch(self.key):
            return f"key {self.key!r} must be 1-80 letters, digits, '_' or '-' (no dots)"
        arrays = {name: getattr(self, name) for name in ARRAY_FILES}
        for name, arr in arrays.items():
            want = np.float32 if name == "time_ids" else np.float16
            if not isinstance(arr, np.ndarray) or arr.dtype != want:
                got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                return f"{name} has dtype {got}, expected {np.dtype(want)}"
        for name in ("preferred", "dispreferred"):
            arr = arrays[name]
            if arr.ndim != 4:
                return f"{name} has shape {arr.shape}, expected [K, C, h, w]"
            if arr.shape[0] == 0:
                return f"{name} population is empty"
            if arr.shape[0] < min_members:
                return f"{name} has {arr.shape[0]} members, fewer than the {min_members} needed"
        if self.dispreferred.shape[1:] != self.preferred.shape[1:]:
            return f"member shapes differ: preferred {self.latent_shape}, dispreferred {self.dispreferred.shape[1:]}"
        if expected is not None and self.latent_shape != tuple(expected):
            return f"latents have member shape {list(self.latent_shape)}, expected {list(expected)}"
        if self.prompt_embeds.ndim != 2:
            return f"prompt_embeds has shape {self.prompt_embeds.shape}, expected [L, D]"
        if self.pooled_prompt_embeds.ndim != 1:
            return f"pooled_prompt_embeds has shape {self.pooled_prompt_embeds.shape}, expected [Dp]"
        members = self.num_preferred + self.num_dispreferred
        if self.time_ids.shape not in ((6,), (members, 6)):
            return f"time_ids has shape {self.time_ids.shape}, expected [6] or [{members}, 6]"
        for name, arr in arrays.items():
            if not np.isfinite(arr).all():
                return f"{name} contains NaN or inf"
        return _meta_problem(self.meta, self.num_preferred, self.num_dispreferred) or self._source_problem()

    def _source_problem(self) -> str | None:
        emb, pooled = self.source_prompt_embeds, self.source_pooled_prompt_embeds
        if emb is None and pooled is None:
            return None
        if emb is None or pooled is None:
            return "source_prompt_embeds and source_pooled_prompt_embeds come together; one is missing"
        for name, arr in zip(SOURCE_FILES, (emb, pooled)):
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float16:
                return f"{name} has dtype {getattr(arr, 'dtype', type(arr).__name__)}, expected float16"
            if not np.isfinite(arr).all():
                return f"{name} contains NaN or inf"
        emb_shape = list(self.prompt_embeds.shape)
        if emb.ndim != 3 or list(emb.shape[1:]) != emb_shape:  # either one may be the odd one
            return (
                f"source_prompt_embeds has shape {list(emb.shape)} and prompt_embeds {emb_shape}: they must "
                "agree ([S, L, D] and [L, D])"
            )
        n = emb.shape[0]
        if pooled.shape != (n, *self.pooled_prompt_embeds.shape):
            want = [n, *self.pooled_prompt_embeds.shape]
            return f"source_pooled_prompt_embeds has shape {pooled.shape}, expected {want}"
        sources = self.meta.get("sources")
        if not isinstance(sources, list) or len(sources) != n or len(set(sources)) != n:
            return f"metadata 'sources' must list the {n} distinct captions of source_prompt_embeds"
        unknown = sorted(set(self.meta["preferred_sources"]) - set(sources))
        if unknown:
            return f"metadata 'preferred_sources' names captions missing from 'sources': {unknown[:3]}"
        return None

    def to_sample(self) -> dict[str, Any]:
        """Encode as a webdataset sample: ``{"__key__": key, "<ext>": bytes, ...}``."""
        sample: dict[str, Any] = {"__key__": self.key}
        for name in ARRAY_FILES + (SOURCE_FILES if self.has_sources else ()):
            buf = io.BytesIO()
            np.save(buf, getattr(self, name), allow_pickle=False)
            sample[f"{name}.npy"] = buf.getvalue()
        try:
            sample[META_FILE] = json.dumps(self.meta, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as err:
            raise ShardError(f"metadata is not JSON-serialisable: {err}", key=self.key) from None
        return sample

    @classmethod
    def from_sample(cls, sample: dict[str, Any], url: str | None = None) -> PopulationGroup:
        """Decode a sample of raw bytes (as read from a tar); no pickle, no code execution.

        Raises :class:`ShardError` naming ``url`` and the key for a missing or undecodable file.
        Decoding does not validate; call :meth:`validate`.
        """
        key = sample.get("__key__")
        missing = [name for name in REQUIRED_FILES if name not in sample]
        if missing:
            raise ShardError(f"missing {', '.join(missing)}", url=url, key=key)
        arrays = {}
        for name in ARRAY_FILES + tuple(n for n in SOURCE_FILES if f"{n}.npy" in sample):
            try:
                arrays[name] = _load_npy(sample[f"{name}.npy"])
            except ValueError as err:
                raise ShardError(f"{name}.npy: {err}", url=url, key=key) from None
        try:
            meta = json.loads(bytes(sample[META_FILE]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ShardError(f"json: not valid JSON ({err})", url=url, key=key) from None
        return cls(key=key, meta=meta, **arrays)


def _load_npy(data: bytes) -> np.ndarray:
    """Read one ``.npy`` payload; refuses pickles, object arrays and other formats."""
    if not isinstance(data, bytes | bytearray | memoryview) or bytes(data[:6]) != NPY_MAGIC:
        raise ValueError("not a .npy array")
    try:
        arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # object arrays land here, never unpickled
        raise ValueError(f"unreadable .npy ({err})") from None
    if arr.dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return arr


def _meta_problem(meta: Any, kp: int, kd: int) -> str | None:
    if not isinstance(meta, dict):
        return "json metadata must be an object"
    if not isinstance(meta.get("prompt"), str):
        return "metadata 'prompt' (the neutral caption) is missing or not a string"
    if "prompt_id" not in meta:
        return "metadata 'prompt_id' is missing"
    axes = meta.get("axes")
    if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
        return "metadata 'axes' must be a list of axis names"
    for side, count in (("preferred", kp), ("dispreferred", kd)):
        labels, sources = meta.get(f"{side}_labels"), meta.get(f"{side}_sources")
        if not isinstance(labels, list) or len(labels) != count:
            return f"metadata '{side}_labels' must list one entry per member ({count})"
        for lab in labels:
            if (
                not isinstance(lab, dict)
                or set(lab) != set(axes)
                or not all(isinstance(v, str) for v in lab.values())
            ):
                return (
                    f"metadata '{side}_labels' entries must map each axis {axes} to a class name or 'unknown'"
                )
        if (
            not isinstance(sources, list)
            or len(sources) != count
            or not all(isinstance(s, str) for s in sources)
        ):
            return f"metadata '{side}_sources' must list one prompt string per member ({count})"
    seeds = meta.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or len(seeds) != kp + kd):
        return f"metadata 'seeds' must list one seed per member, preferred first ({kp + kd})"
    return None
