"""Run the whole pipeline on the built-in synthetic world and measure how much of its bias PopAlign removes.

Trains (once; cached) a tiny SDXL-architecture base model on a deliberately biased world, then runs
the real stages: prompts -> generate -> label -> build -> train.py fit -> export -> evaluate, and writes
OUT/report.json (base vs aligned: neutral discrepancy, specific accuracy, occupation accuracy, FID)
with the evaluation report and plots under OUT/eval. --compare trains every objective over 3 seeds
and writes OUT/compare.md.
"""

from __future__ import annotations

import argparse

HELP = "end-to-end demo on the synthetic world (CPU, minutes): base vs aligned report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--config", default=None, help="training config; unset: configs/demo.yaml")
    parser.add_argument(
        "--train-steps", type=int, default=None, help="optimizer steps (default: the demo's 500)"
    )
    parser.add_argument("--neutral-images", type=int, default=64, help="generated images per neutral prompt")
    parser.add_argument(
        "--augmented-images", type=int, default=12, help="generated images per augmented prompt"
    )
    parser.add_argument("--eval-images", type=int, default=100, help="evaluation images per neutral prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of generation, populations and training")
    parser.add_argument("--compare", action="store_true", help="train all four objectives x 3 seeds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from popalign.demo import DemoSettings, run_compare, run_demo

    settings = DemoSettings(
        out=args.out,
        config=args.config,
        train_steps=args.train_steps or DemoSettings.train_steps,
        neutral_images=args.neutral_images,
        augmented_images=args.augmented_images,
        eval_images=args.eval_images,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.compare:
        run_compare(settings)
    else:
        run_demo(settings)
    return 0
