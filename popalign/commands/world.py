"""Build (or reuse) the synthetic world's deliberately biased base model.

Trains a tiny SDXL-architecture pipeline on the biased world dataset and saves it at --out with
save_pretrained: it loads with StableDiffusionXLPipeline.from_pretrained, like SDXL. The file
popalign_base.json in that folder holds the cache key, the recommended sampling settings, the build
timings and the size of every file; a second run with the same settings returns at once (a folder
with a missing or truncated file is rebuilt), --force rebuilds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "build or reuse the synthetic world's biased base model (a tiny SDXL pipeline)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (a diffusers pipeline)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and training")
    parser.add_argument("--device", default="cpu", help="torch device to train on")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--evaluate",
        type=int,
        default=0,
        metavar="N",
        help="afterwards sample N images per world prompt and print bias and faithfulness (0: skip)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from popalign.commands import parse_device, torch_threads
    from popalign.errors import UserError

    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.evaluate < 0:
        raise UserError(f"--evaluate must be >= 0, got {args.evaluate}")
    if args.seed < 0:  # numpy's generators take none
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    device = parse_device(args.device)
    with torch_threads(args.threads):
        return _build(args, device)


def _build(args: argparse.Namespace, device) -> int:
    from popalign.world.base import BaseTrainConfig, build_base_model, cache_problem, read_meta
    from popalign.world.base_eval import evaluate_base

    config = BaseTrainConfig(seed=args.seed)
    reused = not args.force and cache_problem(args.out, config=config) is None
    path = build_base_model(args.out, config=config, force=args.force, device=device, progress=not args.quiet)
    meta = read_meta(path) or {}
    built = f"{meta['timings']['total_s']:.0f} s"
    print(f"base model: {path}")
    print(
        f"  {f'up to date, reused (built earlier in {built})' if reused else f'built in {built}'}; "
        f"recommended sampling: {json.dumps(meta['sampling'])}"
    )
    if args.evaluate:
        result = evaluate_base(path, n_per_prompt=args.evaluate, seed=args.seed, device=device)
        print(json.dumps(result, indent=2))
    return 0
