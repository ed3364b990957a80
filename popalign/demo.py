"""The end-to-end demo on the synthetic world: every stage through the real commands, on a CPU.

biased base model (cached) -> ``popalign prompts`` -> ``generate`` -> ``label`` (exact world rule) ->
``build`` -> ``train.py fit --config configs/demo.yaml`` -> ``export`` -> ``evaluate`` of the base and
the aligned model on held-out seeds -> ``report.json``.

The report's keys (numbers): ``base.*`` and ``aligned.*`` for ``neutral_discrepancy`` (mean over
neutral prompts of the per-prompt L2 distance between the *joint* shirt × tone class distribution and
the uniform target), ``specific_accuracy`` (augmented prompts yield every named class), ``occupation_accuracy``
(the occupation read back from the image is the prompt's), ``fid`` (pixel-statistics Fréchet distance
to rendered images of the *balanced* world), and ``seconds`` (wall time).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from popalign.errors import UserError

WORLD_DIR = Path(__file__).parent / "world"
WORLD_AXES = [str(WORLD_DIR / "axes" / "shirt.yaml"), str(WORLD_DIR / "axes" / "tone.yaml")]
OCCUPATIONS = str(WORLD_DIR / "occupations.txt")
TEMPLATE = "a photo of a {subject}"
REPORT_KEYS = ("neutral_discrepancy", "specific_accuracy", "occupation_accuracy", "fid")


@dataclass
class DemoSettings:
    """Sizes of the demo run (defaults: the full demo; the slow test uses a reduced one)."""

    out: str = "runs/demo"
    config: str | None = None  # configs/demo.yaml of this checkout when None
    neutral_images: int = 64  # per neutral prompt: the dispreferred populations are drawn from these
    augmented_images: int = 12  # per augmented prompt: the preferred populations
    population_size: int = 8
    groups_per_prompt: int = 8
    train_steps: int = 500
    eval_images: int = 100  # per neutral prompt, on held-out seeds
    eval_specific_images: int = 16  # per augmented (identity-specific) prompt
    steps: int | None = None  # sampling steps; None: the base model's recommended settings
    guidance_scale: float | None = None
    seed: int = 0
    eval_seed: int = 10_000  # disjoint from the generation seeds
    objective: str = "popalign.objectives.PopAlignLoss"
    progress: bool = True


def find_config(name: str = "demo.yaml") -> Path:
    """``configs/<name>`` of the working directory or of the checkout this package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "configs" / name
        if path.is_file():
            return path
    raise UserError(f"configs/{name}: not found in {Path.cwd()} or beside the package; pass --config")


class _Steps:
    """Numbered, timed stage banners (the demo's progress at the top level)."""

    def __init__(self, total: int) -> None:
        self.total, self.i, self.t0 = total, 0, time.time()

    def __call__(self, what: str) -> None:
        self.i += 1
        print(f"\n==> [{self.i}/{self.total}] {what}   (t = {time.time() - self.t0:.0f} s)", flush=True)


def _cli(args: list[str]) -> None:
    from popalign.cli import main

    code = main(args)
    if code:
        raise UserError(f"'popalign {' '.join(args[:1])}' failed with exit code {code}")


def base_and_shards(s: DemoSettings, stage: _Steps) -> tuple[Path, int, float, Path]:
    """The cached biased base, its recommended sampling settings, and the training shards made with it."""
    from popalign.world.base import build_base_model, read_meta

    stage("biased base model (trained once, then cached)")
    base = build_base_model(Path(s.out) / "base", progress=s.progress)
    sampling = (read_meta(base) or {}).get("sampling", {})
    steps = s.steps or int(sampling.get("num_inference_steps", 20))
    guidance = s.guidance_scale or float(sampling.get("guidance_scale", 2.0))
    return base, steps, guidance, make_shards(s, base, steps, guidance, stage)


def make_shards(s: DemoSettings, base: Path, steps: int, guidance: float, stage: _Steps) -> Path:
    out = Path(s.out)
    quiet = [] if s.progress else ["--no-progress"]
    stage("prompts: world occupations x shirt x tone")
    _cli(
        [
            "prompts",
            "--prompts",
            OCCUPATIONS,
            "--template",
            TEMPLATE,
            "--axes",
            *WORLD_AXES,
            "--out",
            str(out / "prompts.jsonl"),
        ]
    )
    sampling = ["--steps", str(steps), "--guidance-scale", str(guidance), "--height", "32", "--width", "32"]
    sampling += ["--seed", str(s.seed), "--batch-size", "64", "--accelerator", "cpu", *quiet]
    stage("generate: neutral and augmented prompts with the biased base model")
    common = [
        "generate",
        "--model",
        str(base),
        "--prompts",
        str(out / "prompts.jsonl"),
        "--out",
        str(out / "images"),
    ]
    _cli([*common, "--kinds", "neutral", "--images-per-prompt", str(s.neutral_images), *sampling])
    _cli([*common, "--kinds", "augmented", "--images-per-prompt", str(s.augmented_images), *sampling])
    stage("label: the world's exact classifier")
    _cli(
        [
            "label",
            "--images",
            str(out / "images"),
            "--axes",
            *WORLD_AXES,
            "--classifier",
            "world",
            "--out",
            str(out / "labels.jsonl"),
            *quiet,
        ]
    )
    stage("build: balanced preferred vs. neutral dispreferred populations")
    _cli(
        [
            "build",
            "--images",
            str(out / "images"),
            "--labels",
            str(out / "labels.jsonl"),
            "--prompts",
            str(out / "prompts.jsonl"),
        ]
        + ["--model", str(base), "--axes", *WORLD_AXES, "--population-size", str(s.population_size)]
        + [
            "--groups-per-prompt",
            str(s.groups_per_prompt),
            "--seed",
            str(s.seed),
            "--out",
            str(out / "shards"),
        ]
    )
    return out / "shards"


def train_and_export(s: DemoSettings, base: Path, shards: Path, run: Path, seed: int) -> Path:
    """``train.py fit`` with the demo config, then ``popalign export`` of the last checkpoint -> UNet folder
    (its EMA weights when the config sets ``ema_decay``).

    The run's own copy of the config (paths, seed, steps and objective filled in) is written to
    ``run/config.yaml`` first, so the run can be repeated by hand with ``train.py fit --config``.
    """
    import yaml

    from popalign.train_cli import cli_main

    config = yaml.safe_load(Path(s.config or find_config()).read_text())
    config["seed_everything"] = seed
    trainer = config["trainer"]
    trainer["max_steps"] = s.train_steps
    trainer["enable_progress_bar"] = s.progress
    trainer["logger"]["init_args"]["save_dir"] = str(run)
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(run / "checkpoints")
    model = config["model"]["init_args"]
    model["pretrained_model"] = str(base)
    if model["objective"]["class_path"] != s.objective:
        beta = model["objective"].get("init_args", {}).get("beta")
        model["objective"] = {
            "class_path": s.objective,
            "init_args": {} if s.objective.endswith("SFTLoss") else {"beta": beta},
        }
    config["data"]["train_shards"] = str(shards)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for stale in (run / "checkpoints").glob("*.ckpt"):
        stale.unlink()  # a re-run must export its own checkpoint, not the previous run's
    cli_main(["fit", "--config", str(run / "config.yaml")])
    ema = ["--ema"] if model.get("ema_decay") is not None else []  # the averaged weights, when kept
    _cli(
        ["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(run / "aligned"), "--overwrite", *ema]
    )
    return run / "aligned"


def fid_reference(path: Path, n: int, seed: int) -> Path:
    """Rendered images of the *balanced* world (neutral prompts uniform over classes) as a .npy."""
    import numpy as np

    from popalign.world import WorldSpec
    from popalign.world.render import sample_dataset

    images, *_ = sample_dataset(WorldSpec(), n, np.random.default_rng(seed), biased=False, n_augmented=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, images, allow_pickle=False)
    return path


def evaluate_pair(
    s: DemoSettings,
    base: Path,
    aligned: Path | None,
    out: Path,
    steps: int,
    guidance: float,
    with_baseline: bool = True,
) -> dict[str, dict]:
    """Evaluate the aligned UNet (or, without one, the base) on the base pipeline; with
    ``with_baseline`` the base is evaluated too, on the same prompts and seeds."""
    from popalign.evaluation.config import EvalConfig
    from popalign.evaluation.evaluate import evaluate

    ref = fid_reference(Path(s.out) / "fid_reference.npy", s.eval_images, s.eval_seed + 1)
    config = EvalConfig(
        model=str(base),
        unet=str(aligned / "unet") if aligned is not None else None,
        baseline=str(base) if aligned is not None and with_baseline else None,
        neutral=OCCUPATIONS,
        template=TEMPLATE,
        specific="expand",
        axes=list(WORLD_AXES),
        classifier="world",
        adherence="world",
        images_per_prompt=s.eval_images,
        specific_images_per_prompt=s.eval_specific_images,
        seed=s.eval_seed,
        steps=steps,
        guidance_scale=guidance,
        height=32,
        width=32,
        batch_size=100,
        fid_reference=str(ref),
        fid_features="pixel",
        out=str(out),
        overwrite=True,
        progress=s.progress,
    )
    return evaluate(config)


def summary(metrics: dict[str, Any]) -> dict[str, float]:
    keys = {
        "neutral_discrepancy": "neutral.discrepancy",
        "specific_accuracy": "specific.accuracy",
        "occupation_accuracy": "adherence.accuracy",
        "fid": "fid",
    }
    missing = [v for v in keys.values() if v not in metrics]
    if missing:
        raise RuntimeError(f"evaluation did not report {missing}")
    return {k: float(metrics[v]) for k, v in keys.items()}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def run_demo(s: DemoSettings) -> dict:
    t0 = time.time()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # never leave a stale report looking current
    stage = _Steps(7)
    base, steps, guidance, shards = base_and_shards(s, stage)
    stage(f"train: {s.objective.rsplit('.', 1)[-1]} for {s.train_steps} steps, then export")
    aligned = train_and_export(s, base, shards, out / "train", s.seed)
    stage("evaluate: base and aligned model on held-out seeds")
    result = evaluate_pair(s, base, aligned, out / "eval", steps, guidance)
    report = {
        "base": summary(result["baseline"]),
        "aligned": summary(result["metrics"]),
        "settings": asdict(s) | {"steps": steps, "guidance_scale": guidance},
        "paths": {"eval": str(out / "eval"), "report_md": str(out / "eval" / "report.md")},
    }
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out / "report.json", report)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print("\n| metric | base | aligned |\n|---|---|---|")
    for key in REPORT_KEYS:
        print(f"| {key} | {report['base'][key]:.3f} | {report['aligned'][key]:.3f} |")
    print(
        f"\nwall time {report['seconds']:.0f} s; report {report['paths']['report_md']}; plots in {report['paths']['eval']}"
    )


COMPARE_OBJECTIVES = (
    "popalign.objectives.PopAlignLoss",
    "popalign.objectives.PopulationBTLoss",
    "popalign.objectives.DiffusionDPOLoss",
    "popalign.objectives.SFTLoss",
)


def run_compare(s: DemoSettings, seeds: tuple[int, ...] = (0, 1, 2)) -> Path:
    """The miniature of the paper's table: every objective x seeds from the same base and shards."""
    import numpy as np

    out = Path(s.out)
    stage = _Steps(6 + len(COMPARE_OBJECTIVES) * len(seeds))
    base, steps, guidance, shards = base_and_shards(s, stage)
    stage("evaluate the base model")
    rows = {
        "base": [summary(evaluate_pair(s, base, None, out / "compare" / "base", steps, guidance)["metrics"])]
    }
    for objective in COMPARE_OBJECTIVES:
        name = objective.rsplit(".", 1)[-1]
        for seed in seeds:
            stage(f"{name}, seed {seed}: train, export, evaluate")
            run = out / "compare" / f"{name}-s{seed}"
            settings = DemoSettings(**(asdict(s) | {"objective": objective}))
            aligned = train_and_export(settings, base, shards, run, seed)
            # the base was evaluated once above, on the same seeds
            metrics = evaluate_pair(settings, base, aligned, run / "eval", steps, guidance, False)["metrics"]
            rows.setdefault(name, []).append(summary(metrics))
    lines = [
        f"Objectives from the same biased base and shards, {len(seeds)} seeds (mean ± sd); "
        f"{s.train_steps} steps each. Command: `popalign demo --compare --out {s.out}`.",
        "",
        "| objective | " + " | ".join(REPORT_KEYS) + " |",
        "|---" * (len(REPORT_KEYS) + 1) + "|",
    ]
    for name, runs in rows.items():
        cells = []
        for key in REPORT_KEYS:
            values = np.array([r[key] for r in runs])
            cells.append(
                f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    write_json(out / "compare.json", rows)
    print("\n".join(lines))
    return path
