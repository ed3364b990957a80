"""Run the whole pipeline on the built-in synthetic world and measure how much of its bias PopAlign removes.

Trains (once; cached) a tiny SDXL-architecture base model on a deliberately biased world, then runs
the real stages: prompts -> generate -> label -> build -> train.py fit -> export -> evaluate, and writes
OUT/report.json (base vs aligned: neutral discrepancy, specific accuracy, occupation accuracy, FID)
with the evaluation report and plots under OUT/eval. --compare trains every objective over 3 seeds
(--compare-objectives and --compare-seeds choose fewer) and writes OUT/compare.md and OUT/compare.json.

Running the same command again resumes: finished stages are kept, an interrupted training resumes
from its last checkpoint, and finished --compare runs are reused. The images in OUT belong to the
sizes and --seed they were made with (recorded in OUT/demo_data.json): other values need another
--out (copy OUT/base into it to keep the cached base model).
"""

from __future__ import annotations

import argparse

from popalign.demo_compare import COMPARE_OBJECTIVES, COMPARE_SEEDS
from popalign.demo_settings import DemoSettings

HELP = "end-to-end demo on the synthetic world (CPU, minutes): base vs aligned report"
OBJECTIVES = {o.rsplit(".", 1)[-1]: o for o in COMPARE_OBJECTIVES}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    parser.add_argument("--out", default=d.out, help="output folder")
    parser.add_argument("--config", default=None, help="training config (default: configs/demo.yaml)")
    parser.add_argument("--train-steps", type=int, default=d.train_steps, help="optimizer steps")
    parser.add_argument(
        "--neutral-images", type=int, default=d.neutral_images, help="generated images per neutral prompt"
    )
    parser.add_argument(
        "--augmented-images",
        type=int,
        default=d.augmented_images,
        help="generated images per augmented prompt",
    )
    parser.add_argument(
        "--eval-images", type=int, default=d.eval_images, help="evaluation images per neutral prompt"
    )
    parser.add_argument(
        "--eval-specific-images",
        type=int,
        default=d.eval_specific_images,
        help="evaluation images per identity-specific (augmented) prompt",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of generation, populations and training (another seed needs another --out)",
    )
    parser.add_argument("--compare", action="store_true", help="train several objectives x seeds")
    parser.add_argument(
        "--compare-seeds",
        type=int,
        nargs="+",
        default=list(COMPARE_SEEDS),
        metavar="SEED",
        help="training seeds of --compare (default: 0 1 2)",
    )
    parser.add_argument(
        "--compare-objectives",
        nargs="+",
        choices=list(OBJECTIVES),
        default=list(OBJECTIVES),
        metavar="NAME",
        help=f"objectives of --compare, of {', '.join(OBJECTIVES)} (default: all)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from popalign.demo import run_demo
    from popalign.demo_compare import run_compare
    from popalign.demo_settings import check_settings
    from popalign.errors import UserError

    settings = DemoSettings(
        out=args.out,
        config=args.config,
        train_steps=args.train_steps,
        neutral_images=args.neutral_images,
        augmented_images=args.augmented_images,
        eval_images=args.eval_images,
        eval_specific_images=args.eval_specific_images,
        seed=args.seed,
        progress=not args.no_progress,
        threads=args.threads,
    )
    if not args.compare and (
        args.compare_seeds != list(COMPARE_SEEDS) or args.compare_objectives != list(OBJECTIVES)
    ):
        raise UserError("--compare-seeds and --compare-objectives need --compare")
    check_settings(settings)
    if args.compare:
        run_compare(
            settings, tuple(args.compare_seeds), tuple(OBJECTIVES[n] for n in args.compare_objectives)
        )
    else:
        run_demo(settings)
    return 0
