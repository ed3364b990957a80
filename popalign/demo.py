"""The end-to-end demo on the synthetic world: every stage through the real commands, on a CPU.

biased base model (cached) -> ``popalign prompts`` -> ``generate`` -> ``label`` (exact world rule) ->
``build`` -> ``train.py fit --config configs/demo.yaml`` -> ``export`` -> ``evaluate`` of the base and
the aligned model on held-out seeds -> ``report.json``.

The report's keys (numbers): ``base.*`` and ``aligned.*`` for ``neutral_discrepancy`` (mean over
neutral prompts of the per-prompt L2 distance between the *joint* shirt × tone class distribution and
the uniform target), ``specific_accuracy`` (augmented prompts yield every named class), ``occupation_accuracy``
(the occupation read back from the image is the prompt's), ``fid`` (pixel-statistics Fréchet distance
to rendered images of the *balanced* world), and ``seconds`` (wall time).

``popalign demo --compare`` (every objective x seeds on the same base and shards) reuses these stages;
it lives in :mod:`popalign.demo_compare`.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from popalign import files
from popalign.demo_settings import DemoSettings, check_data_record, check_settings, load_config
from popalign.errors import UserError
from popalign.signals import Terminated, lightning_interrupt, sigterm_deferred

T = TypeVar("T")

WORLD_DIR = Path(__file__).parent / "world"
WORLD_AXES = [str(WORLD_DIR / "axes" / "shirt.yaml"), str(WORLD_DIR / "axes" / "tone.yaml")]
OCCUPATIONS = str(WORLD_DIR / "occupations.txt")
TEMPLATE = "a photo of a {subject}"
REPORT_KEYS = ("neutral_discrepancy", "specific_accuracy", "occupation_accuracy", "fid")


class Stages:
    """Numbered, timed stage banners (the demo's progress at the top level)."""

    def __init__(self, total: int) -> None:
        self.total, self.i, self.t0 = total, 0, time.time()

    def __call__(self, what: str) -> None:
        self.i += 1
        print(f"\n==> [{self.i}/{self.total}] {what}   (t = {time.time() - self.t0:.0f} s)", flush=True)


def _cli(args: list[str]) -> None:
    """Run ``popalign ARGS`` in this process. Its :class:`UserError` is re-raised naming the stage and
    Ctrl-C propagates as ``KeyboardInterrupt``, so the demo prints one line for either."""
    from popalign.cli import build_parser

    ns = build_parser().parse_args(args)
    try:
        code = int(ns._run(ns) or 0)
    except UserError as err:
        raise UserError(f"{args[0]}: {err}") from None
    if code:
        raise UserError(f"'popalign {args[0]}' failed with exit code {code}")


def base_and_shards(s: DemoSettings, stage: Stages) -> tuple[Path, int, float, Path]:
    """The cached biased base, its recommended sampling settings, and the training shards made with it."""
    from popalign.world.base import build_base_model, read_meta

    stage("biased base model (trained once, then cached)")
    base = build_base_model(Path(s.out) / "base", progress=s.progress)
    sampling = (read_meta(base) or {}).get("sampling", {})
    steps = s.steps or int(sampling.get("num_inference_steps", 20))
    guidance = s.guidance_scale or float(sampling.get("guidance_scale", 2.0))
    return base, steps, guidance, make_shards(s, base, steps, guidance, stage)


def make_shards(s: DemoSettings, base: Path, steps: int, guidance: float, stage: Stages) -> Path:
    """``prompts``, ``generate``, ``label`` and ``build`` into ``OUT``; the sizes are recorded first."""
    out = Path(s.out)
    check_data_record(s, write=True)
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

    The run's own copy of the config (paths, seed, steps and objective filled in; a schedule's
    ``total_steps`` set to the run's steps) is written to
    ``run/config.yaml`` first, so the run can be repeated by hand with ``train.py fit --config``.
    When ``run/config.yaml`` already holds the same config, made for shards of the same build
    fingerprint (recorded in its first line), a finished training is not repeated and an
    interrupted one resumes from ``run/checkpoints/last.ckpt`` (saved every ``every_n_train_steps``);
    otherwise old checkpoints are deleted and training starts at step 0.
    """
    import yaml

    config = load_config(s.config)
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
    schedule = (model.get("lr_scheduler") or {}).get("init_args")
    if isinstance(schedule, dict) and "total_steps" in schedule:  # a decay spans the run it is part of
        schedule["total_steps"] = s.train_steps
        if "warmup_steps" in schedule:
            schedule["warmup_steps"] = min(schedule["warmup_steps"], s.train_steps - 1)
    config["data"]["train_shards"] = str(shards)
    # the shards' build fingerprint makes the cache key too: shards drawn anew mean training anew
    built = f"# trained on shards built from inputs {build_inputs(shards)} (popalign build's fingerprint)\n"
    text = built + yaml.safe_dump(config, sort_keys=False)
    # trained.json marks a finished training of run/config.yaml; it goes before the config changes
    path, last, done = run / "config.yaml", run / "checkpoints" / "last.ckpt", run / "trained.json"
    same = path.is_file() and path.read_text() == text
    if same and last.is_file() and done.is_file():
        print(f"{run}: already trained with this config; exporting {last}", flush=True)
    else:
        done.unlink(missing_ok=True)
        if same and last.is_file():
            print(f"{run}: resuming the interrupted training from {last}", flush=True)
            _fit(["fit", "--config", str(path), "--ckpt_path", str(last)])
        else:
            run.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            for stale in (run / "checkpoints").glob("*.ckpt"):
                stale.unlink()  # a re-run must export its own checkpoint, not the previous run's
            _fit(["fit", "--config", str(path)])
        files.write_json(done, {"finished": True})
    ema = ["--ema"] if model.get("ema_decay") is not None else []  # the averaged weights, when kept
    _cli(["export", str(last), "--out", str(run / "aligned"), "--overwrite", *ema])
    return run / "aligned"


def build_inputs(shards: Path) -> str:
    """The fingerprint of what ``build`` made ``shards`` from (``summary.json``'s ``inputs``)."""
    return str(read_json_object(shards / "summary.json").get("inputs", "unknown"))


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ``{}`` when it is missing, unreadable or not an object (a cache
    entry or record that cannot vouch for anything)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fit(args: list[str]) -> None:
    """``train.py ARGS`` in this process. Lightning answers Ctrl-C with ``sys.exit(1)`` (and ignores
    SIGINT from then on), and so a :class:`Terminated` raised before its own handler is in place.
    SIGTERM once it is lets the step finish and saves it (``sigterm_deferred``), then ends fit with a
    ``SystemExit`` without a code (see ``sigterm_stop``). Here these become a
    ``KeyboardInterrupt`` or :class:`Terminated` again, with SIGINT's handler put back, and a user
    error of the config a :class:`UserError`, so the demo reports either in one line (and does not go
    on to export)."""
    from popalign.train_cli import _build, _user_error_in, received_sigterm, sigterm_stop

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)
    try:
        with sigterm_deferred(received_sigterm):
            _build(args, True)
    except SystemExit as err:
        if sigterm_stop(err) or (lightning_interrupt(err) and isinstance(err.__context__, Terminated)):
            raise Terminated from None
        if lightning_interrupt(err):
            raise KeyboardInterrupt from None
        if err.code:
            raise UserError(f"train.py {' '.join(args)}: exited with status {err.code}") from None
    except Exception as err:  # noqa: BLE001 - re-raised unless SIGTERM or a UserError is behind it
        if sigterm_stop(err):
            raise Terminated from None
        user_error = _user_error_in(err)
        if user_error is None:
            raise
        raise UserError(f"train: {user_error}") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


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


def prepare_out(s: DemoSettings, stale: list[Path]) -> None:
    """Check everything up front and remove the outputs this run replaces (an interrupted run must not
    leave the previous results looking current)."""
    check_settings(s)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def in_threads(run: Callable[..., T]) -> Callable[..., T]:
    """Decorate ``run(s, ...)`` to run with ``s.threads`` torch CPU threads (checked first), giving the
    caller back its own thread count afterwards."""

    @functools.wraps(run)
    def wrapper(s: DemoSettings, *args: Any, **kwargs: Any) -> T:
        from popalign.commands import torch_threads

        check_settings(s)
        with torch_threads(s.threads):
            return run(s, *args, **kwargs)

    return wrapper


@in_threads
def run_demo(s: DemoSettings) -> dict:
    """The demo: base model, shards, training, export and the evaluation of base and aligned model;
    writes ``OUT/report.json`` (returned) beside ``OUT/eval``. Every setting is checked first."""
    t0 = time.time()
    out = Path(s.out)
    prepare_out(s, [out / "report.json", out / "eval"])
    stage = Stages(7)
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
    files.write_json(out / "report.json", report)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print("\n| metric | base | aligned |\n|---|---|---|")
    for key in REPORT_KEYS:
        print(f"| {key} | {report['base'][key]:.3f} | {report['aligned'][key]:.3f} |")
    print(
        f"\nwall time {report['seconds']:.0f} s; report {report['paths']['report_md']}; plots in {report['paths']['eval']}"
    )
