"""The model card written beside an exported model: base, axes, objective, data and evaluation tables."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from popalign.errors import UserError, first_line

_SDXL_BASE = re.compile(r"stable-diffusion-xl-(base|refiner)-1\.0")
_SDXL_LICENSE_URL = "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md"
_DATA_SKIP = {"class_path", "inputs", "up_to_date", "shard_bytes"}  # hashes and sizes: nothing for a reader
_TRAINER_KEYS = (
    "max_steps",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "devices",
    "num_nodes",
)


@dataclass
class CardFacts:
    """What the model card states, gathered from the checkpoint, the run's config and the given files."""

    name: str  # the card's title
    base: str
    kind: str  # "full", "lora" (adapter weights) or "merged" (LoRA merged into the UNet)
    pipeline: bool = False
    ema: bool = False
    dtype: str = "float32"
    hparams: dict = field(default_factory=dict)
    step: int | None = None
    fingerprint: str | None = None
    config: dict | None = None
    config_note: str | None = None  # why no run config describes the run (shown instead of its settings)
    data_summary: dict | None = None
    data_hparams: dict | None = None  # the DataModule's init args saved in the checkpoint
    metrics: dict | None = None
    where: str = ""  # the repo id or folder the usage snippet loads from (default: name)


def find_run_config(ckpt_path: Path, checkpoint: dict | None = None) -> tuple[Path | None, str | None]:
    """LightningCLI's ``config.yaml`` of the run that wrote the checkpoint -> ``(path, None)``, or
    ``(None, note)`` saying why none is used.

    A ``config.yaml`` beside the checkpoint or one folder up (Lightning's default ``<log_dir>/checkpoints/``)
    is the run's. Otherwise the logger's ``<name>/version_<n>/config.yaml`` folders beside the checkpoint
    folder (the shipped configs' layout, shared by every run there) are candidates, kept only when that run
    could have written ``checkpoint`` (see :func:`_could_have_written`). When the kept ones disagree on
    what the card shows, none is used: a guess could describe another run.
    """
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml", None
    logged = sorted(ckpt_path.parent.parent.glob("*/version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    if not logged:
        return None, None
    fits = [p for p in logged if checkpoint is None or _could_have_written(p, ckpt_path, checkpoint)]
    if not fits:
        return None, f"none of the run configs beside it ({_names(logged)}) matches the checkpoint"
    if len({json.dumps(_card_view(read_mapping(p)), sort_keys=True, default=str) for p in fits}) > 1:
        return None, f"{len(fits)} run configs could have written the checkpoint ({_names(fits)})"
    return fits[-1], None


def _names(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def _same(a: Any, b: Any) -> bool:
    """Equal as a config value: numbers by value, sequences elementwise, anything else as text."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b or str(a) == str(b)


def _could_have_written(config_path: Path, ckpt_path: Path, checkpoint: dict) -> bool:
    """Whether the run of ``config_path`` can have saved ``checkpoint``: its config was written before the
    checkpoint, its model and data arguments are the checkpoint's hyper-parameters, and its max_steps
    reaches the checkpoint's step."""
    if config_path.stat().st_mtime > ckpt_path.stat().st_mtime:
        return False
    config = read_mapping(config_path)
    for section, saved in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        given, recorded = _init_args(config.get(section)), checkpoint.get(saved) or {}
        if any(k in given and not _same(v, given[k]) for k, v in recorded.items()):
            return False
    max_steps, step = (config.get("trainer") or {}).get("max_steps"), checkpoint.get("global_step")
    return not (isinstance(max_steps, int) and 0 < max_steps < (step or 0))


def _card_view(config: dict) -> dict:
    """The parts of a run config the model card shows (two configs that agree here give the same card)."""
    trainer = config.get("trainer") or {}
    return {
        "model": _init_args(config.get("model")),
        "data": _init_args(config.get("data")),
        "trainer": {k: trainer.get(k) for k in _TRAINER_KEYS},
        "seed": config.get("seed_everything"),
    }


def read_mapping(path: str | Path) -> dict:
    """A ``.json`` (else YAML) file whose top level is a mapping; :class:`UserError` naming the file otherwise."""
    path = Path(path)
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except FileNotFoundError as err:
        raise UserError(f"{path}: not found") from err
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"{path}: not valid {kind} ({first_line(err)})") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of nested mappings (and of lists holding mappings) as ``("a / b", value)`` rows, in order."""
    if isinstance(tree, dict):
        items = list(tree.items())
    elif isinstance(tree, list) and any(isinstance(v, dict | list) for v in tree):
        items = list(enumerate(tree))
    else:
        return [(prefix, tree)]
    return [row for k, v in items for row in flatten(v, f"{prefix} / {k}" if prefix else str(k))]


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "–"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _compact(tree: Any) -> Any:
    """Long lists (shard names, skipped prompts) become counts, so the data table stays readable."""
    if isinstance(tree, dict):
        return {k: _compact(v) for k, v in tree.items()}
    if isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        return f"{len(tree)} entries"
    return f"{len(tree)} items" if isinstance(tree, list) and len(tree) > 12 else tree


def markdown_table(rows: list[tuple[Any, ...]], header: tuple[str, ...] = ("metric", "value")) -> str:
    """Markdown table of ``rows`` under ``header``; floats to 4 significant digits, ``|`` escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def evaluation_table(metrics: dict) -> str:
    """The card's evaluation table. ``popalign evaluate``'s ``metrics.json`` gives its report.md rows:
    one per scalar metric, with baseline and delta columns when it holds a baseline (intervals,
    per-prompt rows, settings and notes stay in that file). Any other JSON gives every leaf as a row."""
    if not isinstance(metrics.get("metrics"), dict):
        rows = flatten(metrics)
        return markdown_table(rows) if rows else "No values reported."
    from popalign.evaluation.report import deltas
    from popalign.evaluation.report import flatten as dotted

    def scalars(tree: Any) -> dict[str, Any]:
        number = (int, float)
        return {
            k: v
            for k, v in dotted(tree).items()
            if v is None or (isinstance(v, number) and not isinstance(v, bool))
        }

    model = scalars(metrics["metrics"])
    if not isinstance(metrics.get("baseline"), dict):
        return markdown_table(list(model.items()), ("metric", "model"))
    base, delta = scalars(metrics["baseline"]), deltas(metrics["metrics"], metrics["baseline"])
    rows = [(key, value, base.get(key), delta.get(key)) for key, value in model.items()]
    return markdown_table(rows, ("metric", "model", "baseline", "delta"))


def _init_args(spec: Any) -> dict:
    return (spec.get("init_args", spec) or {}) if isinstance(spec, dict) else {}


def _hyper_rows(f: CardFacts) -> list[tuple[str, Any]]:
    config = f.config or {}
    model, rows = _init_args(config.get("model")), []
    for part in ("objective", "optimizer", "lr_scheduler"):
        spec = model.get(part)
        if isinstance(spec, dict):
            rows += [(part, spec.get("class_path", ""))] + flatten(spec.get("init_args") or {}, part)
        elif spec is not None:
            rows.append((part, spec))
    if "objective" not in model:
        why = f"not known: {f.config_note}" if f.config_note else "not recorded in the checkpoint"
        rows.append(("objective", f"{why} (pass --config with the run's config.yaml)"))
    rows += [(k, v) for k, v in f.hparams.items() if k != "pretrained_model" and not k.startswith("_")]
    trainer = config.get("trainer") or {}
    rows += [(f"trainer / {k}", trainer[k]) for k in _TRAINER_KEYS if k in trainer]
    if "seed_everything" in config:
        rows.append(("seed", config["seed_everything"]))
    if f.step is not None:
        rows.append(("optimizer steps", f.step))
    return rows


def _axes(f: CardFacts) -> str | None:
    for source in (f.data_summary or {}, _init_args((f.config or {}).get("data"))):
        for key in ("axes", "bias_axes"):
            value = source.get(key)
            if isinstance(value, dict):
                return ", ".join(map(str, value))
            if isinstance(value, list):
                return ", ".join(str(a.get("name", a)) if isinstance(a, dict) else str(a) for a in value)
            if value:
                return str(value)
    return None


def _usage(f: CardFacts) -> str:
    where = f.where or f.name
    fp16 = "dtype=torch.float16"
    if f.kind == "lora":
        body = [f'pipe = StableDiffusionXLPipeline.from_pretrained("{f.base}", {fp16}).to("cuda")']
        body.append(f'pipe.load_lora_weights("{where}")')
    elif f.pipeline:
        body = [f'pipe = StableDiffusionXLPipeline.from_pretrained("{where}", {fp16}).to("cuda")']
    else:
        body = [f'unet = UNet2DConditionModel.from_pretrained("{where}", subfolder="unet", {fp16})']
        body.append(
            f'pipe = StableDiffusionXLPipeline.from_pretrained("{f.base}", unet=unet, {fp16}).to("cuda")'
        )
    head = (
        "import torch\nfrom diffusers import StableDiffusionXLPipeline, UNet2DConditionModel\n\n"
        "# diffusers older than 0.40 name the dtype argument torch_dtype\n"
    )
    return "```python\n" + head + "\n".join(body) + '\nimage = pipe("a photo of a doctor").images[0]\n```'


_CARD = """---
{front}
---

# {name}

`{base}` fine-tuned with PopAlign (Li, Singh & Grover 2024, https://arxiv.org/abs/2406.19668) so that
identity-neutral prompts produce populations of images whose {axes_or_attributes} follow a target
distribution, while identity-specific prompts keep working.

## Use

{usage}

## Base model and weights

- base model: `{base}`{fingerprint}
- weights: {weights}

## Bias axes

{axes_line} Attributes are *perceived* ones, as read by the classifier that labelled the training populations.

## Objective and hyper-parameters

{hyper}

## Training data

{data}
{evaluation}
## License

{license}
"""


def render_model_card(f: CardFacts) -> str:
    """``README.md`` of an export: hub front matter, usage, base, bias axes, objective and hyper-parameters,
    data summary, evaluation table (when metrics are given) and the base model's license."""
    sdxl = _SDXL_BASE.search(f.base) is not None
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", f.base) is not None and not os.path.exists(f.base)
    front: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": "text-to-image"}
    front |= ({"base_model": f.base} if hub_id else {}) | ({"license": "openrail++"} if sdxl else {})
    tags = ["text-to-image", "popalign", "fairness"]
    front["tags"] = tags + ["stable-diffusion-xl"] * ("xl" in f.base.lower()) + ["lora"] * (f.kind == "lora")
    rank = f.hparams.get("lora_rank")
    lora = f"LoRA (rank {rank}, alpha {f.hparams.get('lora_alpha') or rank})"
    weights = {
        "full": "the fine-tuned UNet",
        "lora": f"{lora} adapters",
        "merged": f"{lora} merged into the UNet",
    }
    axes = _axes(f)
    data = f.data_summary or _init_args((f.config or {}).get("data")) or f.data_hparams or {}
    data_rows = flatten(_compact({k: v for k, v in data.items() if k not in _DATA_SKIP}))
    evaluation = ""
    if f.metrics is not None:
        evaluation = "\n## Evaluation\n\n" + evaluation_table(f.metrics) + "\n"
    license_line = (
        f"The base model's license applies: CreativeML Open RAIL++-M ({_SDXL_LICENSE_URL})."
        if sdxl
        else f"Derived from `{f.base}`: see the base model's card for its license."
    )
    return _CARD.format(
        front=yaml.safe_dump(front, sort_keys=False).strip(),
        name=f.name,
        base=f.base,
        axes_or_attributes=axes or "identity attributes",
        usage=_usage(f),
        fingerprint=f" (UNet fingerprint `{f.fingerprint}`)" if f.fingerprint else "",
        weights=weights[f.kind] + (", exponential moving average" if f.ema else "") + f", {f.dtype}",
        axes_line=f"Aligned over: {axes}." if axes else "Not recorded (pass --data-summary).",
        hyper=markdown_table(_hyper_rows(f), ("setting", "value")),
        data=markdown_table(data_rows, ("field", "value")) if data_rows else "Not recorded.",
        evaluation=evaluation,
        license=license_line,
    )
