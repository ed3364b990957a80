"""What an evaluation reads: prompt sets, models, sampled or stored images, FID references."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popalign.data.axes import BiasAxis, Intersection, load_axes
from popalign.errors import UserError, first_line
from popalign.evaluation.config import EvalConfig


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: ``kind`` neutral/specific/generic, the classes it names, and for a
    neutral prompt its index ``group`` (the row of the discrepancy count table)."""

    prompt_id: str
    kind: str
    prompt: str
    classes: dict[str, str] = field(default_factory=dict)
    group: int = -1


def joint_axis(axes: Sequence[BiasAxis], target: Sequence[float] | None) -> Intersection:
    """The axes' product with ``target`` (row-major joint classes) or the product of their targets."""
    joint = Intersection(axes)
    if target is None:
        return joint
    t = np.asarray(target, dtype=float)
    names = f"{joint.num_classes} joint classes: {', '.join(joint.class_names)}"
    if t.shape != (joint.num_classes,):
        raise UserError(f"--target has {t.size} values but the axes have {names}")
    if not np.isfinite(t).all() or (t < 0).any() or abs(t.sum() - 1) > 1e-6:
        raise UserError(f"--target must be non-negative and sum to 1, got {t.tolist()} (sum {t.sum():.6g})")
    return Intersection(axes, t.tolist())


def load_prompts(config: EvalConfig, axes: Sequence[BiasAxis]) -> tuple[list[EvalPrompt], list[str]]:
    """The neutral, specific and generic prompts of ``config`` -> ``(prompts, notes)``."""
    from popalign.data.prompts import (
        expand_prompts,
        read_lines,
        read_neutral_prompts,
        read_specific_prompts,
        resolve_prompt_file,
    )

    prompts: list[EvalPrompt] = []
    notes: list[str] = []
    if config.neutral:
        path = resolve_prompt_file(config.neutral)
        groups = 0
        for row in expand_prompts(read_neutral_prompts(path, config.template), axes):
            if row.kind == "neutral":
                prompts.append(EvalPrompt(row.prompt_id, "neutral", row.prompt, {}, groups))
                groups += 1
            elif config.specific == "expand":
                prompts.append(EvalPrompt(row.prompt_id, "specific", row.prompt, dict(row.classes)))
    if config.specific and config.specific != "expand":
        path = resolve_prompt_file(config.specific)
        names = {a.name for a in axes}
        for i, (text, classes) in enumerate(read_specific_prompts(path)):
            named = {k: v for k, v in classes.items() if k in names}
            for axis in axes:
                if axis.name in named and named[axis.name] not in axis.class_names:
                    raise UserError(f"{path}: {named[axis.name]!r} is not a class of axis {axis.name!r}")
            if named:
                prompts.append(EvalPrompt(f"s{i:04d}", "specific", text, named))
        kept = sum(p.kind == "specific" for p in prompts)
        if not kept:
            raise UserError(f"{path}: no prompt names a class of the evaluated axes ({', '.join(names)})")
        if kept < i + 1:
            notes.append(
                f"{path}: {i + 1 - kept} specific prompt(s) name none of the evaluated axes; skipped"
            )
    if config.generic:
        for i, text in enumerate(read_lines(resolve_prompt_file(config.generic))):
            prompts.append(EvalPrompt(f"g{i:04d}", "generic", text))
    if not prompts:
        raise UserError("no evaluation prompts: give --neutral, --specific or --generic")
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) < len(ids):
        raise UserError(f"prompt id {next(i for i in ids if ids.count(i) > 1)!r} is used twice")
    return prompts, notes


def split_prompts(prompts: Sequence[EvalPrompt], rank: int = 0, world_size: int = 1) -> list[EvalPrompt]:
    """This rank's share: every ``world_size``-th prompt from ``rank`` (metric states are summed)."""
    return list(prompts[rank::world_size])


def requested_matrix(rows: Sequence[EvalPrompt], axes: Sequence[BiasAxis]) -> np.ndarray:
    """The class each prompt names per axis, int ``[N, A]`` (-1 = not named)."""
    out = np.full((len(rows), len(axes)), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        for a, axis in enumerate(axes):
            if axis.name in row.classes:
                out[i, a] = axis.index(row.classes[axis.name])
    return out


def build_classifier(name: str, axes: Sequence[BiasAxis], model: str | None = None) -> Any:
    """A :mod:`popalign.data.classifiers` plugin; ``model`` goes to its constructor (``clip``'s
    default is ``DEFAULT_CLIP``, openai/clip-vit-large-patch14)."""
    from popalign.data.classifiers import get_classifier

    return get_classifier(name, axes, **({"model": model} if model else {}))


def check_labels(out: Any, axes: Sequence[BiasAxis], n: int, source: str) -> np.ndarray:
    """A classifier's ``{axis: int [n]}`` as int ``[n, A]``; ``UserError`` for anything else."""
    cols = []
    for axis in axes:
        arr = np.asarray(out.get(axis.name)) if isinstance(out, dict) and axis.name in out else None
        if arr is None or arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
            got = "nothing" if arr is None else f"{arr.dtype} {arr.shape}"
            raise UserError(
                f"classifier {source}: axis {axis.name!r} needs int labels of shape ({n},), got {got}"
            )
        if ((arr < -1) | (arr >= axis.num_classes)).any():
            bad = sorted({int(v) for v in arr if not -1 <= v < axis.num_classes})
            raise UserError(
                f"classifier {source}: unknown class label(s) {bad} for axis {axis.name!r} "
                f"({axis.num_classes} classes, -1 = unknown)"
            )
        cols.append(arr.astype(np.int64))
    return np.stack(cols, axis=1)


@dataclass
class Batch:
    """A batch of images with their prompts, keys and seeds; ``labels`` when already known."""

    rows: list[EvalPrompt]
    keys: list[str]
    seeds: list[int]
    images: np.ndarray
    labels: np.ndarray | None = None


def sampled_batches(pipe: Any, prompts: Sequence[EvalPrompt], config: EvalConfig) -> Iterator[Batch]:
    """Sample ``config.images_for(kind)`` images of every prompt with ``generate``'s per-image seeds."""
    from popalign.data.generate import image_seed
    from popalign.data.pipeline import sample

    jobs = [(p, i) for p in prompts for i in range(config.images_for(p.kind))]
    for start in range(0, len(jobs), config.batch_size):
        chunk = jobs[start : start + config.batch_size]
        seeds = [image_seed(config.seed, p.prompt_id, i) for p, i in chunk]
        images, _ = sample(
            pipe, [p.prompt for p, _ in chunk], seeds, config.steps, config.guidance_scale,
            config.height, config.width,
        )  # fmt: skip
        yield Batch([p for p, _ in chunk], [f"{p.prompt_id}-{i:04d}" for p, i in chunk], seeds, images)


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)


class _FailedAdapterFilter(logging.Filter):
    """Drops diffusers' log of a failed adapter load (every size mismatch); the error is reported once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was unsuccessful with the following error" not in record.getMessage()


@contextmanager
def _quiet_adapter_errors() -> Iterator[None]:
    logger, quiet = logging.getLogger("diffusers.loaders.peft"), _FailedAdapterFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _mismatch(err: BaseException) -> str:
    """The first weight whose shape differs, from a ``load_state_dict`` error (else its first line)."""
    found = _SIZE_MISMATCH.search(str(err))
    if found is None:
        return first_line(err)
    name, theirs, ours = found.groups()
    name = re.sub(r"[.]default_\d+", "", name)  # peft's adapter name is not part of the weight's
    return f"{name} is [{theirs}] in it, [{ours}] in the base's UNet"


def _not_local(error: UserError, sources: Sequence[str | None]) -> UserError:
    """``error`` restated for a source that is no local folder and failed as a hub id."""
    for source in filter(None, sources):
        if str(error).startswith(f"{source}: ") and not os.path.exists(os.path.expanduser(source)):
            return UserError(f"{source}: no such local folder; as a hub id: {str(error)[len(source) + 2 :]}")
    return error


def load_model(config: EvalConfig, model: str, unet: str | None = None, lora: str | None = None) -> Any:
    """``generate``'s pipeline loader plus checks that the parts fit together (one-line errors)."""
    import torch

    from popalign.data.pipeline import load_pipeline

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    part = lora or unet or model
    try:
        with _quiet_adapter_errors():
            pipe = load_pipeline(model, config.vae, unet, lora, config.dtype, device=device)
    except UserError as err:
        raise _not_local(err, [unet, lora, config.vae, model]) from None
    except RuntimeError as err:  # e.g. LoRA tensors whose shapes belong to another base
        raise UserError(f"{part}: does not fit the base model {model}: {_mismatch(err)}") from None
    if lora and not getattr(pipe.unet, "peft_config", None):
        raise UserError(f"{lora}: no LoRA weights in it fit the UNet of {model}")
    u, t1, t2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    checks = [
        ("cross_attention_dim", u.cross_attention_dim, t1.hidden_size + t2.hidden_size),
        ("in_channels", u.in_channels, pipe.vae.config.latent_channels),
    ]
    if u.get("projection_class_embeddings_input_dim"):
        want = 6 * u.addition_time_embed_dim + t2.projection_dim
        checks.append(
            ("projection_class_embeddings_input_dim", u.projection_class_embeddings_input_dim, want)
        )
    for name, got, want in checks:
        if got != want:
            raise UserError(f"{part}: the UNet's {name} is {got}, but {model}'s other components need {want}")
    return pipe


def resolve_axes(config: EvalConfig) -> tuple[list[BiasAxis], Intersection]:
    """The evaluated axes and their joint axis (with ``config.target`` when given)."""
    axes = load_axes(config.axes)
    if not axes:
        raise UserError("--axes: give at least one bias axis")
    return axes, joint_axis(axes, config.target)


def stored_batches(config: EvalConfig, axes: Sequence[BiasAxis]) -> Iterator[Batch]:
    """Batches of the images ``popalign generate`` wrote to ``config.images`` (augmented prompts
    count as specific), with the labels of ``config.labels`` when given."""
    from popalign.data.images import iter_image_samples

    stored = None
    if config.labels:
        from popalign.data.label import read_labels

        stored = read_labels(config.labels, axes)
    groups: dict[str, int] = {}
    seen: set[str] = set()
    pending: list[Any] = []

    def flush() -> Batch:
        rows, labels = [], []
        for s in pending:
            meta = s.meta
            kind = {"neutral": "neutral", "augmented": "specific"}.get(meta["kind"], "generic")
            group = (
                groups.setdefault(meta.get("neutral_id", meta["prompt_id"]), len(groups))
                if kind == "neutral"
                else -1
            )
            classes = meta.get("classes") or {}
            for axis in axes:
                if axis.name in classes and classes[axis.name] not in axis.class_names:
                    raise UserError(f"{s.where}: {classes[axis.name]!r} is not a class of axis {axis.name!r}")
            rows.append(EvalPrompt(meta["prompt_id"], kind, meta["prompt"], dict(classes), group))
            if stored is not None:
                if s.key not in stored:
                    raise UserError(
                        f"{config.labels}: no label for image {s.key!r} of {s.shard}; labels do not match the images"
                    )
                names = stored[s.key]["labels"]
                labels.append([-1 if names[a.name] == "unknown" else a.index(names[a.name]) for a in axes])
        images = [s.image() for s in pending]
        if len({im.shape for im in images}) > 1:
            raise UserError(
                f"{config.images}: images of different sizes {sorted({im.shape for im in images})}"
            )
        keys, seeds = [s.key for s in pending], [int(s.meta["seed"]) for s in pending]
        lab = np.array(labels, dtype=np.int64).reshape(len(rows), len(axes)) if stored is not None else None
        return Batch(rows, keys, seeds, np.stack(images), lab)

    for sample_ in iter_image_samples(config.images):
        seen.add(sample_.key)
        pending.append(sample_)
        if len(pending) == config.batch_size:
            yield flush()
            pending = []
    if pending:
        yield flush()
    if stored is not None and set(stored) - seen:
        extra = sorted(set(stored) - seen)
        raise UserError(
            f"{config.labels}: {len(extra)} label row(s) for images not in {config.images} (e.g. {extra[0]!r})"
        )


def fid_reference_batches(path: str, batch_size: int = 64) -> Iterator[np.ndarray]:
    """uint8 ``[n, H, W, 3]`` batches of the FID reference: a ``.npy`` array or ``generate`` shards.

    The reference is opened and checked when this is called (a ``UserError`` naming the file), not
    when the first batch is drawn, so a bad reference is reported before anything is loaded."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: --fid-reference not found (no such file or folder)")
    if p.is_dir():
        from popalign.data.images import image_shards

        return _shard_batches(p, image_shards(p), batch_size)
    return _array_batches(_reference_array(p), batch_size)


def _reference_array(p: Path) -> np.ndarray:
    """The memory-mapped ``.npy`` FID reference, checked to be uint8 ``[N >= 2, H, W, 3]``."""
    magic = np.lib.format.MAGIC_PREFIX
    try:
        with open(p, "rb") as f:
            is_npy = f.read(len(magic)) == magic
        arr = np.load(p, mmap_mode="r", allow_pickle=False) if is_npy else None
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{p}: cannot read the FID reference ({first_line(err)})") from None
    if arr is None:  # np.load would try it as a pickle and say so
        raise UserError(
            f"{p}: not a .npy array; --fid-reference takes a .npy uint8 array [N, H, W, 3] "
            "or a folder of popalign generate's image shards"
        )
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) < 2:
        raise UserError(
            f"{p}: the FID reference must be uint8 images [N >= 2, H, W, 3], got {arr.dtype} {arr.shape}"
        )
    return arr


def _array_batches(arr: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(arr), batch_size):
        yield np.array(arr[start : start + batch_size])  # a writable copy of the memory-mapped slice


def _shard_batches(folder: Path, shards: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    from popalign.data.images import iter_image_samples

    chunk: list[np.ndarray] = []
    for s in iter_image_samples(folder, shards):
        chunk.append(s.image())
        if len(chunk) == batch_size:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)
