"""``popalign evaluate``: sample a model on evaluation prompts, label the images, report the metrics.

Three prompt sets: *neutral* prompts (the population should follow the target distribution:
discrepancy), *specific* prompts that name a class (the named class should appear: accuracy) and
*generic* prompts (image quality and text alignment: CLIP score). Images are sampled with
:func:`popalign.data.generate.sample` and the per-image seeds of ``generate``, labelled with a
:mod:`popalign.data.classifiers` plugin and summarised by :func:`popalign.evaluation.report.summarise`.
:func:`evaluate` runs it (and a baseline model on the same prompts and seeds) and writes the output
folder under a temporary name, renamed into place only when complete.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popalign.data.axes import BiasAxis, Intersection, load_axes
from popalign.errors import UserError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass
class EvalConfig:
    """Everything one evaluation needs; :func:`evaluate_model` and the CLI take the same fields.

    Prompt sets are files or shipped names (``occupations_eval``, ``specific_eval``, ``generic_eval``);
    ``specific="expand"`` uses the neutral prompts expanded over the axes (one prompt per joint class).
    ``images`` evaluates images already written by ``popalign generate`` (their prompt table decides
    neutral/augmented) instead of sampling; ``labels`` reuses a ``popalign label`` table for them.
    """

    model: str | None = None
    unet: str | None = None
    lora: str | None = None
    vae: str | None = None
    dtype: str = "float32"
    device: str | None = None
    neutral: str | None = "occupations_eval"
    template: str | None = None
    specific: str | None = None
    generic: str | None = None
    axes: list[str] = field(default_factory=lambda: ["gender", "race"])
    target: list[float] | None = None
    classifier: str = "clip"
    classifier_model: str | None = None
    adherence: str | None = None
    images_per_prompt: int = 8
    seed: int = 0
    steps: int = 30
    guidance_scale: float = 5.0
    height: int = 1024
    width: int = 1024
    batch_size: int = 4
    baseline: str | None = None
    images: str | None = None
    labels: str | None = None
    fid_reference: str | None = None
    fid_features: str = "inception"
    clip_model: str | None = None
    bootstrap: int = 1000
    out: str | None = None
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        """``UserError`` for settings no run can use (before anything is loaded)."""
        if (self.model is None) == (self.images is None):
            raise UserError(
                "give exactly one of --model (sample a model) and --images (evaluate stored images)"
            )
        for name in ("images_per_prompt", "steps", "height", "width", "batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.height % 8 or self.width % 8:
            raise UserError(f"--height and --width must be multiples of 8, got {self.height}x{self.width}")
        if self.fid_features not in ("inception", "pixel"):
            raise UserError(f"--fid-features must be inception or pixel, got {self.fid_features!r}")
        if self.images and (self.baseline or self.unet or self.lora):
            raise UserError("--baseline, --unet and --lora need a --model to sample; not with --images")
        if self.labels and not self.images:
            raise UserError("--labels labels stored --images; it needs --images")
        if self.unet and self.lora:
            raise UserError("give --unet (a full aligned UNet) or --lora (adapters), not both")


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
    """A :mod:`popalign.data.classifiers` plugin; ``model`` goes to its constructor (for ``clip`` it
    defaults to ``openai/clip-vit-large-patch14``)."""
    from popalign.data.classifiers import get_classifier

    model = model or (DEFAULT_CLIP if name == "clip" else None)
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
    """Sample ``images_per_prompt`` images of every prompt with ``generate``'s per-image seeds."""
    from popalign.data.generate import image_seed, sample

    jobs = [(p, i) for p in prompts for i in range(config.images_per_prompt)]
    for start in range(0, len(jobs), config.batch_size):
        chunk = jobs[start : start + config.batch_size]
        seeds = [image_seed(config.seed, p.prompt_id, i) for p, i in chunk]
        images, _ = sample(
            pipe, [p.prompt for p, _ in chunk], seeds, config.steps, config.guidance_scale,
            config.height, config.width,
        )  # fmt: skip
        yield Batch([p for p, _ in chunk], [f"{p.prompt_id}-{i:04d}" for p, i in chunk], seeds, images)


def load_model(config: EvalConfig, model: str, unet: str | None = None, lora: str | None = None) -> Any:
    """``generate``'s pipeline loader plus checks that the parts fit together (one-line errors)."""
    import torch

    from popalign.data.generate import load_pipeline

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    part = lora or unet or model
    try:
        pipe = load_pipeline(model, config.vae, unet, lora, config.dtype, device=device)
    except RuntimeError as err:  # e.g. LoRA tensors whose shapes belong to another base
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{part}: does not fit the base model {model} ({first})") from None
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


def settings_of(config: EvalConfig, axes: Sequence[BiasAxis], joint: Intersection) -> dict[str, Any]:
    """What produced the numbers, for ``metrics.json``."""
    s = {k: v for k, v in asdict(config).items() if k not in ("progress", "overwrite", "out")}
    s["axes"] = [a.name for a in axes]
    s["joint_classes"] = list(joint.class_names)
    s["joint_target"] = list(joint.target)
    s["image_seed"] = "blake2b(f'{seed}:{prompt_id}:{index}'), popalign.data.generate.image_seed"
    return s


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


class Collected:
    """Per-image results of one model: labels, adherence, CLIP scores; FID is fed on the way."""

    def __init__(self, num_axes: int, grid: int = 32) -> None:
        self.rows: list[EvalPrompt] = []
        self.keys: list[str] = []
        self.seeds: list[int] = []
        self.labels = np.zeros((0, num_axes), dtype=np.int64)
        self.adherence: list[float] = []
        self.clip: list[float] = []
        self.grid: list[np.ndarray] = []  # the first image of each prompt, for the sample grid
        self._grid_size = grid

    def add(
        self, batch: Batch, labels: np.ndarray, adherence: np.ndarray | None, clip: np.ndarray | None
    ) -> None:
        for row, image in zip(batch.rows, batch.images):
            if len(self.grid) < self._grid_size and (
                not self.rows or row.prompt_id != self.rows[-1].prompt_id
            ):
                self.grid.append(image)
            self.rows.append(row)
        self.keys += batch.keys
        self.seeds += batch.seeds
        self.labels = np.concatenate([self.labels, labels])
        self.adherence += [] if adherence is None else [float(v) for v in adherence]
        self.clip += [] if clip is None else [float(v) for v in clip]

    def label_rows(self, axes: Sequence[BiasAxis], image_dir: str | None) -> list[dict[str, Any]]:
        """The rows of ``labels.jsonl``."""
        out = []
        for i, (row, key) in enumerate(zip(self.rows, self.keys)):
            names = {a.name: ("unknown" if c < 0 else a.class_names[c]) for a, c in zip(axes, self.labels[i])}
            item = {"key": key, "prompt_id": row.prompt_id, "kind": row.kind, "prompt": row.prompt,
                    "seed": self.seeds[i], "requested": row.classes, "labels": names}  # fmt: skip
            if image_dir:
                item["image"] = f"{image_dir}/{key}.png"
            if self.adherence:
                item["adherence"] = self.adherence[i]
            if self.clip:
                item["clip_score"] = self.clip[i]
            out.append(item)
        return out


def fid_reference_batches(path: str, batch_size: int = 64) -> Iterator[np.ndarray]:
    """uint8 ``[n, H, W, 3]`` batches of the FID reference: a ``.npy`` array or ``generate`` shards."""
    p = Path(path)
    if p.is_dir():
        from popalign.data.images import iter_image_samples

        chunk: list[np.ndarray] = []
        for s in iter_image_samples(p):
            chunk.append(s.image())
            if len(chunk) == batch_size:
                yield np.stack(chunk)
                chunk = []
        if chunk:
            yield np.stack(chunk)
        return
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{p}: cannot read the FID reference ({str(err).splitlines()[0]})") from None
    if (
        not isinstance(arr, np.ndarray)
        or arr.dtype != np.uint8
        or arr.ndim != 4
        or arr.shape[-1] != 3
        or len(arr) < 2
    ):
        got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise UserError(f"{p}: the FID reference must be uint8 images [N >= 2, H, W, 3], got {got}")
    for start in range(0, len(arr), batch_size):
        yield np.array(arr[start : start + batch_size])  # a writable copy of the memory-mapped slice


def _chw(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


class Evaluator:
    """One evaluation run: everything is loaded and checked up front, then each model is sampled,
    labelled and summarised, and the output folder is written and renamed into place."""

    def __init__(self, config: EvalConfig) -> None:
        import torch

        config.check()
        self.config, self.notes = config, []
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.out = Path(config.out) if config.out else None
        if self.out and self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder")
        if self.out and self.out.exists() and any(self.out.iterdir()) and not config.overwrite:
            raise UserError(f"{self.out}: already exists; pass --overwrite or choose another --out")
        self.axes, self.joint = resolve_axes(config)
        self.prompts: list[EvalPrompt] = []
        if not config.images:
            self.prompts, self.notes = load_prompts(config, self.axes)
        self.classifier = (
            None if config.labels else build_classifier(config.classifier, self.axes, config.classifier_model)
        )
        self.adherence = None
        if config.adherence:
            from popalign.evaluation.adherence import get_adherence

            self.adherence = get_adherence(config.adherence)
        self.clip = self.fid = None
        if config.clip_model:
            from popalign.metrics.quality import ClipEncoder

            self.clip = ClipEncoder(config.clip_model).to(self.device)
        else:
            self.notes.append("CLIP score skipped: no --clip-model given")
        if config.fid_reference:
            self._load_fid()

    def _load_fid(self) -> None:
        from popalign.metrics import FID, PixelStatsFeatures

        extractor = PixelStatsFeatures() if self.config.fid_features == "pixel" else None
        self.fid = FID(extractor, reset_real_features=False).to(self.device)
        self.fid_reference_images = 0
        for batch in fid_reference_batches(self.config.fid_reference):
            self.fid.update(_chw(batch).to(self.device), real=True)
            self.fid_reference_images += len(batch)
        if self.fid_reference_images < 2:
            raise UserError(f"{self.config.fid_reference}: the FID reference needs at least 2 images")

    def _label(self, batch: Batch) -> np.ndarray:
        if batch.labels is not None:
            return batch.labels
        try:
            out = self.classifier.classify(batch.images)
        except (TypeError, ValueError) as err:
            raise UserError(f"classifier {self.config.classifier} rejected the images ({err})") from None
        return check_labels(out, self.axes, len(batch.images), self.config.classifier)

    def _collect(self, batches: Iterator[Batch], image_dir: Path | None, total: int | None) -> Collected:
        from tqdm.auto import tqdm

        from popalign.evaluation.plots import save_png

        col = Collected(len(self.axes))
        if self.fid is not None:
            self.fid.reset()  # forgets the generated images only (reset_real_features=False)
        if image_dir is not None:
            image_dir.mkdir(parents=True)
        with tqdm(total=total, unit="img", disable=not self.config.progress) as bar:
            for batch in batches:
                labels = self._label(batch)
                adherence = clip = None
                if self.adherence is not None:
                    adherence = np.asarray(self.adherence.score(batch.images, batch.rows), dtype=float)
                    if adherence.shape != (len(batch.images),):
                        raise UserError(
                            f"adherence {self.config.adherence}: score must return shape ({len(batch.images)},)"
                        )
                if self.clip is not None:
                    cos = self.clip.cosine(_chw(batch.images).to(self.device), [r.prompt for r in batch.rows])
                    clip = (100 * cos.clamp(min=0)).cpu().numpy()
                if self.fid is not None:
                    self.fid.update(_chw(batch.images).to(self.device), real=False)
                if image_dir is not None:
                    for key, image in zip(batch.keys, batch.images):
                        save_png(image, image_dir / f"{key}.png", min_side=0)
                col.add(batch, labels, adherence, clip)
                bar.update(len(batch.images))
        if not col.rows:
            raise UserError(f"{self.config.images or 'prompts'}: no images to evaluate")
        return col

    def _summary(self, col: Collected) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from popalign.evaluation.report import summarise

        c = self.config
        metrics, per_prompt = summarise(
            [a.name for a in self.axes], [a.num_classes for a in self.axes], self.joint.target,
            [r.kind for r in col.rows], np.array([r.group for r in col.rows]), col.labels,
            requested_matrix(col.rows, self.axes),
            np.array(col.adherence) if self.adherence is not None else None,
            np.array(col.clip) if self.clip is not None else None,
            num_resamples=c.bootstrap, seed=c.seed,
        )  # fmt: skip
        by_group = {r.group: r for r in col.rows if r.kind == "neutral"}
        for item in per_prompt:
            item.update(prompt_id=by_group[item["group"]].prompt_id, prompt=by_group[item["group"]].prompt)
        if self.fid is not None:
            try:
                metrics["fid"] = float(self.fid.compute())
            except ValueError as err:
                self.notes.append(f"FID skipped: {err}")
            metrics["fid.num_reference_images"] = self.fid_reference_images
        return metrics, per_prompt

    def _model(self, model: str, unet: str | None, lora: str | None, image_dir: Path | None) -> Collected:
        import gc

        import torch

        pipe = load_model(self.config, model, unet, lora)
        total = len(self.prompts) * self.config.images_per_prompt
        try:
            return self._collect(
                sampled_batches(pipe, split_prompts(self.prompts), self.config), image_dir, total
            )
        finally:
            del pipe
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def run(self) -> dict[str, Any]:
        """Evaluate (and write the output folder); returns the content of ``metrics.json``."""
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        libs = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
        if not self.config.progress:  # also silence the libraries' weight-loading bars
            for lib in libs:
                lib.disable_progress_bar()
        try:
            return self._run()
        finally:
            for lib in libs:
                lib.enable_progress_bar()

    def _run(self) -> dict[str, Any]:
        import os
        import shutil

        c = self.config
        stage = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}" if self.out else None
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
        try:
            if c.images:
                col = self._collect(stored_batches(c, self.axes), stage / "images" if stage else None, None)
            else:
                col = self._model(c.model, c.unet, c.lora, stage / "images" if stage else None)
            metrics, per_prompt = self._summary(col)
            result: dict[str, Any] = {"metrics": metrics, "per_prompt": per_prompt}
            cols = {"": col}
            if c.baseline:
                base = self._model(c.baseline, None, None, stage / "baseline" / "images" if stage else None)
                result["baseline"], result["baseline_per_prompt"] = self._summary(base)
                from popalign.evaluation.report import deltas

                result["delta"] = deltas(metrics, result["baseline"])
                cols["baseline"] = base
            result["settings"] = settings_of(c, self.axes, self.joint)
            result["notes"] = self.notes
            if stage is not None:
                self._write(stage, result, cols)
                if self.out.exists():
                    shutil.rmtree(self.out)
                os.replace(stage, self.out)
        except BaseException:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            raise
        return result

    def _write(self, stage: Path, result: dict[str, Any], cols: dict[str, Collected]) -> None:
        from popalign.evaluation.plots import write_plots
        from popalign.evaluation.report import render_report, write_json, write_jsonl

        for name, col in cols.items():
            folder = stage / name if name else stage
            write_jsonl(folder / "labels.jsonl", col.label_rows(self.axes, "images"))
        plots = write_plots(
            stage / "plots", result, list(self.joint.class_names), list(self.joint.target),
            cols[""].grid, cols["baseline"].grid if "baseline" in cols else None,
        )  # fmt: skip
        write_json(stage / "metrics.json", result)
        report = render_report(
            result["metrics"], result["settings"], result.get("baseline"), self.notes, plots
        )
        (stage / "report.md").write_text(report, encoding="utf-8")


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run an evaluation (writing ``config.out`` when set) -> the content of ``metrics.json``:
    ``{"metrics", "per_prompt", "baseline"?, "baseline_per_prompt"?, "delta"?, "settings", "notes"}``."""
    return Evaluator(config).run()


def evaluate_model(config: EvalConfig) -> dict[str, Any]:
    """Evaluate ``config.model`` (or stored ``config.images``) -> the flat metrics dict; keys in
    ``docs/evaluation.md`` (``neutral.discrepancy``, ``specific.accuracy``, ...). Writes
    ``config.out`` when set."""
    return evaluate(config)["metrics"]
