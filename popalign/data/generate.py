"""``popalign generate``: sample images *and their final latents* from an SDXL pipeline.

Every image keeps the latent the pipeline produced before decoding (in the UNet's scaled space,
exactly what training consumes), so ``build`` never has to VAE-encode. Output: webdataset tar
shards ``DIR/images-r{rank}-{index:06d}.tar`` (format, writer and reader below); a shard holds whole
prompts and is renamed into place when complete, then its prompt ids are appended to
``DIR/done-r{rank}.jsonl`` with their texts and image indices, so a re-run skips them (and samples
only the missing images of a prompt when more per prompt are asked). Per-image seeds are a hash of
(seed, prompt_id, index): an image does not depend on batch size, device count or order.
Several devices: a Lightning ``Trainer.predict`` splits the prompts over ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from popalign import files
from popalign.data.images import KEY_RE, DonePrompt, ImageShardWriter, encode_image, prompt_records
from popalign.data.pipeline import load_pipeline, sample
from popalign.data.prompts import PromptRow
from popalign.errors import UserError
from popalign.models.loading import check_model_source


def image_seed(seed: int, prompt_id: str, index: int) -> int:
    """The seed of image ``index`` of ``prompt_id``: 63 bits of ``blake2b("seed:prompt_id:index")``."""
    digest = hashlib.blake2b(f"{seed}:{prompt_id}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class GenerateSettings:
    """What is sampled; recorded in ``DIR/generate.json`` so a resumed run cannot mix settings."""

    model: str
    images_per_prompt: int = 4
    seed: int = 0
    steps: int = 30
    guidance_scale: float = 5.0
    height: int = 1024
    width: int = 1024
    dtype: str = "float32"
    vae: str | None = None
    unet: str | None = None
    lora: str | None = None
    image_format: str = "png"
    vae_dtype: str | None = None  # as given (None: the default for ``dtype``, see load_pipeline)

    def check(self) -> None:
        """``UserError`` for values no pipeline can use."""
        for name in ("images_per_prompt", "steps", "height", "width"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.height % 8 or self.width % 8:
            raise UserError(f"--height and --width must be multiples of 8, got {self.height}x{self.width}")
        if self.image_format not in ("png", "jpg"):
            raise UserError(f"--image-format must be png or jpg, got {self.image_format!r}")
        if not math.isfinite(self.guidance_scale):  # nan: every image undefined, and invalid JSON records
            raise UserError(f"--guidance-scale must be a finite number, got {self.guidance_scale}")
        for flag in ("vae", "unet", "lora"):  # a missing folder is an error here, not a hub lookup
            if getattr(self, flag):
                check_model_source(getattr(self, flag), f"--{flag}")


LOCAL_PATHS = ("model", "vae", "unet", "lora")  # a hub id, or a folder however it is spelled


def _local(source: Any) -> Any:
    """A local folder as its absolute path (``./m``, ``m/`` and ``/abs/m`` are one folder); else as is."""
    return (
        str(Path(source).resolve())
        if isinstance(source, str) and source and Path(source).exists()
        else source
    )


def check_settings(out: Path, settings: GenerateSettings) -> dict:
    """The sampler settings to record in ``out/generate.json``; ``UserError`` when an earlier run
    recorded different ones."""
    path = out / "generate.json"
    # an image depends on everything but the count per prompt: runs may differ in that alone
    # (e.g. more images for neutral prompts, sampled with --kinds neutral)
    new = {k: v for k, v in asdict(settings).items() if k != "images_per_prompt"}
    new.update({k: _local(new[k]) for k in LOCAL_PATHS})
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: unreadable ({err})") from None
        if not isinstance(old, dict):
            raise UserError(f"{path}: unreadable (not a JSON object)")
        old.update({k: _local(old.get(k)) for k in LOCAL_PATHS})
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise UserError(
                f"{path}: {out} was generated with {k}={old.get(k)!r}, not {new[k]!r}; "
                "use the same settings to resume or another --out"
            )
    return new


def record_settings(out: Path, settings: GenerateSettings) -> None:
    """Write ``out/generate.json``, or check that an earlier run used the same sampler settings."""
    new = check_settings(out, settings)
    if (out / "generate.json").is_file():
        return
    files.write_json(out / "generate.json", new)


class PromptSampler:
    """Samples every image of a list of prompt rows and hands each finished prompt to a writer.

    Batches run *across* prompts (``batch_size`` images per pipeline call, whatever the prompt), so
    prompts with few images per prompt still fill the batch; a prompt is written as soon as its last
    image is sampled, so shards keep holding whole prompts.
    """

    def __init__(self, pipe: Any, settings: GenerateSettings, writer: ImageShardWriter, batch_size: int = 4):
        self.pipe, self.settings, self.writer = pipe, settings, writer
        self.batch_size = max(1, batch_size)

    def _meta(self, row: PromptRow, index: int, seed: int) -> dict:
        s = self.settings
        return {
            **{
                k: getattr(row, k)
                for k in ("prompt_id", "neutral_id", "kind", "prompt", "neutral", "classes")
            },
            "index": index,
            "seed": seed,
            **{k: getattr(s, k) for k in ("guidance_scale", "steps", "height", "width", "model")},
        }

    def __call__(self, todo: Sequence[tuple[PromptRow, Sequence[int]]], progress: Any = None) -> int:
        """Sample image ``i`` of ``row`` for every ``(row, indices)`` and ``i`` in ``indices``
        (sorted); returns the number of images."""
        s = self.settings
        jobs = [(row, i, image_seed(s.seed, row.prompt_id, i)) for row, indices in todo for i in indices]
        last = {row.prompt_id: max(indices) for row, indices in todo if indices}
        pending: list[dict] = []
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            images, latents = sample(
                self.pipe, [row.prompt for row, _, _ in chunk], [seed for _, _, seed in chunk],
                s.steps, s.guidance_scale, s.height, s.width,
            )  # fmt: skip
            for (row, i, seed), image, latent in zip(chunk, images, latents):
                key = f"{row.prompt_id}-{i:04d}"
                pending.append(encode_image(key, image, latent, self._meta(row, i, seed), s.image_format))
                if i == last[row.prompt_id]:  # the prompt's last image: write it whole
                    self.writer.write_prompt(row.prompt_id, pending)
                    pending = []
            if progress is not None:
                progress.update(len(chunk))
        return len(jobs)


# ---------------------------------------------------------------- the run
def _local_device(accelerator: str) -> str:
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _missing(
    rows: Sequence[PromptRow], done: dict[str, DonePrompt], n: int, out: Path, table: Any
) -> list[tuple[PromptRow, list[int]]]:
    """(row, indices of its images still missing among 0..n-1) for every row that lacks some;
    ``UserError`` when ``out`` holds a prompt id sampled from another text than the table's."""
    todo = []
    for row in rows:
        entry = done.get(row.prompt_id)
        if entry is not None and entry.prompt is not None and entry.prompt != row.prompt:
            raise UserError(
                f"{out / entry.shard}: prompt_id {row.prompt_id!r} was generated from {entry.prompt!r}, "
                f"but {table or 'the prompt table'} says {row.prompt!r}; use another --out for another prompt table"
            )
        missing = [i for i in range(n) if entry is None or i not in entry.indices]
        if missing:
            todo.append((row, missing))
    return todo


def generate(
    rows: Sequence[PromptRow],
    settings: GenerateSettings,
    out: str | Path,
    *,
    batch_size: int = 4,
    shard_size: int = 1000,
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    vae_dtype: str | None = None,
    use_trainer: bool | None = None,
    progress: bool = True,
    pipe: Any = None,
    table: str | Path | None = None,
) -> dict:
    """Sample images ``0 .. settings.images_per_prompt - 1`` of every row that lacks some; returns
    a report.

    A prompt already in ``out`` keeps its images; only its missing indices are sampled (so a larger
    ``images_per_prompt`` tops prompts up). ``UserError`` when ``out`` holds images of a prompt id
    sampled from another prompt text (another prompt table; ``table`` names it in the message).
    ``use_trainer`` (default: when ``devices`` or ``num_nodes`` > 1) runs a Lightning
    ``Trainer.predict`` whose distributed sampler splits the rows over ranks; each rank writes its
    own shards. Otherwise a plain loop on one device. ``pipe`` skips loading (tests, notebooks).
    ``out/generate.json`` is written only once the pipeline has loaded. ``vae_dtype``, when given,
    replaces ``settings.vae_dtype``.
    """
    from tqdm.auto import tqdm

    if vae_dtype is not None:
        settings = replace(settings, vae_dtype=vae_dtype)
    settings.check()
    _check_sizes(batch_size=batch_size, shard_size=shard_size, devices=devices, num_nodes=num_nodes)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a folder (--out takes the folder for the image shards)")
    bad = next((r.prompt_id for r in rows if not KEY_RE.fullmatch(r.prompt_id)), None)
    if bad is not None:
        raise UserError(f"prompt_id {bad!r}: use letters, digits, '_' and '-' only (it becomes a tar key)")
    check_settings(out, settings)
    todo = _missing(rows, prompt_records(out), settings.images_per_prompt, out, table)
    report = {"prompts": len(rows), "already_done": len(rows) - len(todo), "images": 0, "seconds": 0.0}
    report["topped_up"] = sum(len(indices) < settings.images_per_prompt for _, indices in todo)
    if not todo:
        return report
    distributed = use_trainer if use_trainer is not None else (devices > 1 or num_nodes > 1)
    if pipe is None:
        pipe = load_pipeline(
            settings.model, settings.vae, settings.unet, settings.lora, settings.dtype, settings.vae_dtype,
            device=None if distributed else _local_device(accelerator),
        )  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out}: cannot create the output folder ({err.strerror or err})") from None
    record_settings(out, settings)  # only now: a model that does not load leaves no record
    start = time.perf_counter()
    if distributed:
        report["images"] = _predict(
            pipe, todo, settings, out, batch_size, shard_size, devices, num_nodes, accelerator, progress
        )
    else:
        total = sum(len(indices) for _, indices in todo)
        with (
            ImageShardWriter(out, 0, shard_size, world_size=1) as writer,
            tqdm(total=total, unit="img", disable=not progress) as bar,
        ):
            report["images"] = PromptSampler(pipe, settings, writer, batch_size)(todo, bar)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _predict(
    pipe, rows, settings, out, batch_size, shard_size, devices, num_nodes, accelerator, progress
) -> int:
    import lightning as L
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    class Generation(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # registered so that Lightning moves the pipeline's models to this rank's device
            self.parts = nn.ModuleDict({k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)})
            self.images = 0

        def on_predict_start(self) -> None:
            self.writer = ImageShardWriter(out, self.global_rank, shard_size, self.trainer.world_size)
            self.bar = tqdm(unit="img", disable=not progress or self.global_rank != 0)
            self.sampler = PromptSampler(pipe, settings, self.writer, batch_size)

        def transfer_batch_to_device(self, batch: list, device: Any, dataloader_idx: int) -> list:
            return batch  # prompt rows are text: nothing to move

        def predict_step(self, batch: list, batch_idx: int) -> int:  # (row, indices) pairs
            n = self.sampler(batch, self.bar)
            self.images += n
            return n

        def on_predict_end(self) -> None:
            self.writer.close()
            self.bar.close()

    module = Generation()
    # enough prompts per predict step to fill a sampling batch
    per_step = max(1, batch_size // settings.images_per_prompt)
    loader = torch.utils.data.DataLoader(list(rows), batch_size=per_step, collate_fn=list)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    try:
        trainer.predict(module, loader, return_predictions=False)
    finally:
        if hasattr(module, "writer"):
            module.writer.abort()  # no-op after a clean close
    return module.images
