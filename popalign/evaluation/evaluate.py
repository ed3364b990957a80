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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from popalign import files
from popalign.data.axes import BiasAxis, Intersection
from popalign.data.images import image_shards
from popalign.errors import UserError
from popalign.evaluation.config import EvalConfig
from popalign.evaluation.inputs import (
    Batch,
    EvalPrompt,
    build_classifier,
    check_labels,
    fid_reference_batches,
    load_model,
    load_prompts,
    requested_matrix,
    resolve_axes,
    sampled_batches,
    split_prompts,
    stored_batches,
)


def settings_of(config: EvalConfig, axes: Sequence[BiasAxis], joint: Intersection) -> dict[str, Any]:
    """What produced the numbers, for ``metrics.json``."""
    s = {k: v for k, v in asdict(config).items() if k not in ("progress", "overwrite", "out")}
    s["axes"] = [a.name for a in axes]
    s["joint_classes"] = list(joint.class_names)
    s["joint_target"] = list(joint.target)
    s["image_seed"] = "blake2b(f'{seed}:{prompt_id}:{index}'), popalign.data.generate.image_seed"
    return s


def is_evaluation_output(folder: Path) -> bool:
    """Whether ``folder`` holds what ``evaluate`` writes: ``report.md`` and a ``metrics.json`` with
    ``metrics`` and ``settings`` (the only non-empty folders ``--overwrite`` replaces)."""
    import json

    if not (folder / "report.md").is_file():
        return False
    try:
        result = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(result, dict) and "metrics" in result and "settings" in result


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
        self._check_out()
        # opened (and checked) before anything is loaded: a bad file is the first error reported
        self.fid_reference = fid_reference_batches(config.fid_reference) if config.fid_reference else None
        self.axes, self.joint = resolve_axes(config)
        self.prompts: list[EvalPrompt] = []
        if config.images:
            image_shards(config.images)  # before the labeler, which may first ask the hub for weights
        else:
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
            from popalign.metrics.clip import ClipEncoder

            self.clip = ClipEncoder(config.clip_model).to(self.device)
        else:
            self.notes.append("CLIP score skipped: no --clip-model given")
        if self.fid_reference is not None:
            self._load_fid()

    def _check_out(self) -> None:
        """``--out`` may be absent, empty, or with ``--overwrite`` an earlier evaluation output; a
        folder of anything else is never replaced."""
        if self.out is not None:
            what = "an evaluation output (no report.md and metrics.json of popalign evaluate)"
            files.check_replaceable(self.out, self.config.overwrite, is_evaluation_output, what)

    def _load_fid(self) -> None:
        from popalign.metrics import FID, PixelStatsFeatures

        extractor = PixelStatsFeatures() if self.config.fid_features == "pixel" else None
        try:
            self.fid = FID(extractor, reset_real_features=False).to(self.device)
        except UserError as err:  # FID's advice is for Python callers; this is the command line's
            raise UserError(
                "--fid-features inception needs the torch-fidelity package and its Inception weights "
                f"(pip install torch-fidelity); or pass --fid-features pixel ({err.__cause__ or err})"
            ) from None
        self.fid_reference_images = 0
        for batch in self.fid_reference:
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
        total = sum(self.config.images_for(p.kind) for p in self.prompts)
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
        stage = files.stage_folder(self.out) if self.out else None  # killed runs' stage folders go
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)  # this process's own, from an earlier evaluation
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
                self._check_out()  # again: the folder may have changed while sampling
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
        from popalign.evaluation.report import render_report, write_jsonl
        from popalign.files import write_json

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
