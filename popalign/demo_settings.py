"""The demo's settings (``popalign demo``'s flags) and the checks that run before any stage: sizes,
the training config the demo fills in, and the record of what ``OUT``'s images were made with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from popalign import files
from popalign.errors import UserError


@dataclass
class DemoSettings:
    """Sizes of the demo run (defaults: the full demo; the slow test uses a reduced one)."""

    out: str = "runs/demo"
    config: str | None = None  # configs/demo.yaml of this checkout when None
    neutral_images: int = 64  # per neutral prompt: the dispreferred populations are drawn from these
    augmented_images: int = 12  # per augmented prompt: the preferred populations
    population_size: int = 8
    groups_per_prompt: int = 8
    train_steps: int = 1200
    eval_images: int = 100  # per neutral prompt, on held-out seeds
    eval_specific_images: int = 16  # per augmented (identity-specific) prompt
    steps: int | None = None  # sampling steps; None: the base model's recommended settings
    guidance_scale: float | None = None
    seed: int = 0
    eval_seed: int = 10_000  # disjoint from the generation seeds
    objective: str = "popalign.objectives.PopAlignLoss"
    progress: bool = True
    threads: int | None = None  # torch CPU threads; None: torch's default


# the settings the images, labels and shards depend on: recorded in OUT/demo_data.json
DATA_KEYS = (
    "seed", "neutral_images", "augmented_images", "population_size", "groups_per_prompt", "steps",
    "guidance_scale",
)  # fmt: skip
DATA_RECORD = "demo_data.json"
# the demo's flag for each setting, for messages
FLAGS = {
    "train_steps": "--train-steps",
    "neutral_images": "--neutral-images",
    "augmented_images": "--augmented-images",
    "eval_images": "--eval-images",
    "eval_specific_images": "--eval-specific-images",
    "threads": "--threads",
    "seed": "--seed",
}


def flag_of(name: str) -> str:
    return FLAGS.get(name, name)


def check_settings(s: DemoSettings) -> dict:
    """Check the settings and the output folder before any stage runs; returns the training config.

    Raises :class:`UserError` (one line naming the demo's flag) for a size below 1, an ``--out`` that
    is a file, a training config that cannot be used (see :func:`load_config`), or an ``--out`` whose
    images were made with other sizes or another seed (see :func:`check_data_record`).
    """
    sizes = ("train_steps", "neutral_images", "augmented_images", "eval_images", "eval_specific_images")
    optional = ("population_size", "groups_per_prompt", "threads")  # None: the config's or the default
    for name in (*sizes, *optional, "seed"):
        value, least = getattr(s, name), 0 if name == "seed" else 1  # numpy refuses a negative seed
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{flag_of(name)} must be an integer >= {least}, got {value!r}")
    if s.steps is not None and s.steps < 1:
        raise UserError(f"steps must be >= 1, got {s.steps}")
    if s.guidance_scale is not None and s.guidance_scale < 0:
        raise UserError(f"guidance_scale must be >= 0, got {s.guidance_scale}")
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    config = load_config(s.config)
    check_data_record(s)
    return config


def load_config(path: str | None) -> dict:
    """The training config (``configs/demo.yaml`` when ``path`` is None), checked for what the demo
    fills in: a ``trainer.logger`` with ``init_args`` (its ``save_dir``), a ``ModelCheckpoint`` with
    ``save_last: true`` (the demo exports ``last.ckpt``), ``model.init_args.objective`` and ``data``."""
    import yaml

    file = Path(path) if path is not None else find_config()
    where = f"--config {file}"
    if not file.is_file():
        raise UserError(f"{where}: no such file")
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{where}: not readable as YAML ({' '.join(str(err).split())})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: not a train.py config (a YAML mapping)")
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        raise UserError(f"{where}: no trainer section")
    logger = trainer.get("logger")
    if not isinstance(logger, dict) or not isinstance(logger.get("init_args"), dict):
        raise UserError(
            f"{where}: trainer.logger must be a logger with init_args (the demo sets its save_dir)"
        )
    checkpoints = [
        c
        for c in trainer.get("callbacks") or []
        if isinstance(c, dict) and str(c.get("class_path", "")).endswith("ModelCheckpoint")
    ]
    if not any((c.get("init_args") or {}).get("save_last") is True for c in checkpoints):
        raise UserError(
            f"{where}: trainer.callbacks needs a ModelCheckpoint with save_last: true (the demo exports last.ckpt)"
        )
    model = (config.get("model") or {}).get("init_args")
    if not isinstance(model, dict) or not isinstance(model.get("objective"), dict):
        raise UserError(f"{where}: no model.init_args.objective")
    if not isinstance(config.get("data"), dict):
        raise UserError(f"{where}: no data section")
    return config


def check_data_record(s: DemoSettings, write: bool = False) -> None:
    """The images, labels and shards in ``OUT`` must come from the same sizes and seed: those are
    recorded in ``OUT/demo_data.json``, and a run that asks for others is refused (one line naming the
    flags) instead of silently training on the old data. With ``write`` the record is (re)written
    when it matches or when ``OUT`` holds no data yet."""
    out = Path(s.out)
    record, want = out / DATA_RECORD, {k: getattr(s, k) for k in DATA_KEYS}
    data = [p for p in (out / "images", out / "labels.jsonl", out / "shards") if p.exists()]
    if data:
        keep = f"use another --out (copy {out / 'base'} into it to keep the cached base model)"
        try:
            have = json.loads(record.read_text())
        except FileNotFoundError:
            raise UserError(
                f"--out {out}: holds images from a demo that did not record its sizes; {keep}, "
                f"or delete {', '.join(str(p) for p in data)}"
            ) from None
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{record}: unreadable ({err}); delete it with the images, or {keep}") from None
        diff = [
            f"{flag_of(k)} {have.get(k)!r} (asked: {want[k]!r})" for k in DATA_KEYS if have.get(k) != want[k]
        ]
        if diff:
            raise UserError(f"--out {out}: its images were made with {', '.join(diff)}; {keep}")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(record, want)


def find_config(name: str = "demo.yaml") -> Path:
    """``configs/<name>`` of the working directory or of the checkout this package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "configs" / name
        if path.is_file():
            return path
    raise UserError(f"configs/{name}: not found in {Path.cwd()} or beside the package; pass --config")
