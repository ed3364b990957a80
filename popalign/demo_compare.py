"""``popalign demo --compare``: the miniature of the paper's table on the synthetic world.

Every objective x training seed from the same cached base model and the same shards (the demo's
stages in :mod:`popalign.demo`), evaluated on the same held-out seeds; the base model is evaluated
once. Writes ``OUT/compare.md`` (mean ± sd per objective) and ``OUT/compare.json``. Each finished run
keeps its summary under a key of everything its numbers depend on (settings, training config, the
shards' build fingerprint), so the same command after an interrupt skips the runs already done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path

from popalign import demo, files
from popalign.demo import REPORT_KEYS
from popalign.demo_settings import DATA_KEYS, FLAGS, DemoSettings, flag_of, load_config
from popalign.errors import UserError

COMPARE_OBJECTIVES = (
    "popalign.objectives.PopAlignLoss",
    "popalign.objectives.PopulationBTLoss",
    "popalign.objectives.DiffusionDPOLoss",
    "popalign.objectives.SFTLoss",
)
COMPARE_SEEDS = (0, 1, 2)


def compare_command(s: DemoSettings, seeds=COMPARE_SEEDS, objectives=COMPARE_OBJECTIVES) -> str:
    """The ``popalign demo --compare`` command line that reproduces a comparison (flags at their
    defaults left out; settings without a flag are appended as ``(DemoSettings: {...})``)."""
    default = DemoSettings()
    parts = ["popalign demo --compare", f"--out {s.out}"]
    if s.config is not None:
        parts.append(f"--config {s.config}")
    for name in ("train_steps", "neutral_images", "augmented_images", "eval_images", "eval_specific_images"):
        if getattr(s, name) != getattr(default, name):
            parts.append(f"{flag_of(name)} {getattr(s, name)}")
    if s.seed != default.seed:
        parts.append(f"--seed {s.seed}")
    if tuple(seeds) != COMPARE_SEEDS:
        parts.append("--compare-seeds " + " ".join(str(x) for x in seeds))
    if tuple(objectives) != COMPARE_OBJECTIVES:
        parts.append("--compare-objectives " + " ".join(o.rsplit(".", 1)[-1] for o in objectives))
    other = [f.name for f in fields(DemoSettings) if f.name not in (*FLAGS, "out", "config", "progress")]
    extra = {k: getattr(s, k) for k in other if getattr(s, k) != getattr(default, k) and k != "objective"}
    return " ".join(parts) + (f" (DemoSettings: {extra})" if extra else "")


def _result_settings(s: DemoSettings) -> dict:
    # the settings a run's numbers depend on (not the progress bars or the thread count)
    return {k: v for k, v in asdict(s).items() if k not in ("progress", "threads")}


def _cached(path: Path, key: str, compute) -> dict[str, float]:
    """``compute()`` (a summary row), or the one saved at ``path`` by an earlier run with the same key."""
    saved = demo.read_json_object(path)
    if saved.get("key") == key and isinstance(saved.get("summary"), dict):
        print(f"{path.parent}: done by an earlier run with the same settings; reusing its result", flush=True)
        return saved["summary"]
    path.unlink(missing_ok=True)
    row = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, {"key": key, "summary": row})
    return row


@demo.in_threads
def run_compare(
    s: DemoSettings, seeds: tuple[int, ...] = COMPARE_SEEDS, objectives: tuple[str, ...] = COMPARE_OBJECTIVES
) -> Path:
    """The miniature of the paper's table: every objective x seeds from the same base and shards.

    Writes ``OUT/compare.md`` and ``OUT/compare.json`` (command, settings, per-run summaries), removing
    the previous ones first. Each finished run keeps its summary in ``OUT/compare/<run>/result.json``
    under a key of every setting it depends on, so running the same command again after an interrupt
    skips the finished runs."""
    import numpy as np

    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--compare-seeds must be distinct seeds >= 0, got {list(seeds)}")
    if not objectives or len(set(objectives)) != len(objectives):
        raise UserError(f"--compare-objectives must be distinct objectives, got {list(objectives)}")
    out = Path(s.out)
    demo.prepare_out(s, [out / "compare.md", out / "compare.json"])
    stage = demo.Stages(6 + len(objectives) * len(seeds))
    base, steps, guidance, shards = demo.base_and_shards(s, stage)
    # what an evaluation depends on besides the run's settings and training config
    evaluation = json.dumps(
        {k: getattr(s, k) for k in ("eval_images", "eval_specific_images", "eval_seed")}
        | {"steps": steps, "guidance_scale": guidance, "data": {k: getattr(s, k) for k in DATA_KEYS}},
        sort_keys=True,
    )
    config = load_config(s.config)  # part of every run's key, with the shards' build fingerprint
    built = demo.build_inputs(shards)
    stage("evaluate the base model")
    key = hashlib.sha256(f"base {evaluation}".encode()).hexdigest()
    rows = {
        "base": [
            _cached(
                out / "compare" / "base" / "result.json",
                key,
                lambda: demo.summary(
                    demo.evaluate_pair(s, base, None, out / "compare" / "base", steps, guidance)["metrics"]
                ),
            )
        ]
    }
    for objective in objectives:
        name = objective.rsplit(".", 1)[-1]
        for seed in seeds:
            stage(f"{name}, seed {seed}: train, export, evaluate")
            run = out / "compare" / f"{name}-s{seed}"
            settings = DemoSettings(**(asdict(s) | {"objective": objective}))
            key = hashlib.sha256(
                json.dumps(
                    [_result_settings(settings), seed, evaluation, config, built], sort_keys=True
                ).encode()
            ).hexdigest()

            def one(settings=settings, run=run, seed=seed) -> dict[str, float]:
                aligned = demo.train_and_export(settings, base, shards, run, seed)
                # the base was evaluated once above, on the same seeds
                return demo.summary(
                    demo.evaluate_pair(settings, base, aligned, run / "eval", steps, guidance, False)[
                        "metrics"
                    ]
                )

            rows.setdefault(name, []).append(_cached(run / "result.json", key, one))
    command = compare_command(s, seeds, objectives)
    lines = [
        f"Objectives from the same biased base and shards, {len(seeds)} seeds (mean ± sd); "
        f"{s.train_steps} steps each. Command: `{command}`.",
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
    files.write_json(
        out / "compare.json",
        {
            "command": command,
            "settings": asdict(s) | {"steps": steps, "guidance_scale": guidance, "seeds": list(seeds)},
            "rows": rows,
        },
    )
    path = out / "compare.md"
    files.write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
