"""Expand neutral prompts over bias axes into a prompt table (JSONL).

Each neutral prompt gets one augmented prompt per joint class of the listed axes (they are always
crossed: --axes gender race gives 2 x 6 = 12 augmented prompts per neutral prompt). To align axes
separately, run this command once per axis. Formats: docs/prompts.md.
"""

from __future__ import annotations

import argparse

HELP = "expand neutral prompts over bias axes (gender, race, ...) into a prompt table"
# same as popalign.data.prompts.DEFAULT_TEMPLATE; spelled out so that --help imports nothing
DEFAULT_TEMPLATE = "a photo of a {subject}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="(required) neutral prompts: a .csv with a 'prompt' column whose text marks the identity slot with "
        "{identity} (or an axis's own slot, e.g. {couple}; optional 'prompt_id' column), or a .txt of subjects, one per line, '#' comments; "
        "a bare name picks a shipped set (occupations_train, occupations_eval, couples)",
    )
    parser.add_argument(
        "--axes",
        nargs="+",
        action="extend",
        default=argparse.SUPPRESS,
        metavar="AXIS",
        help="bias axes to cross, by shipped name (see --list-axes) or YAML path (repeatable)",
    )
    parser.add_argument(
        "--axes-file",
        action="extend",
        nargs="+",
        default=argparse.SUPPRESS,
        metavar="YAML",
        help="further axis YAML files, crossed after --axes (repeatable)",
    )
    parser.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help="for a .txt of subjects: the prompt around each subject; {subject} becomes "
        "'{identity} {subject}' unless the template places {identity} itself (a .csv carries its "
        "own slots and takes no template)",
    )
    parser.add_argument(
        "--out", metavar="JSONL", default=argparse.SUPPRESS, help="(required) where to write the prompt table"
    )
    parser.add_argument(
        "--keep-articles",
        action="store_true",
        help="leave 'a'/'an' before a slot as written (by default it agrees with the next word: "
        "'an engineer', 'a female engineer')",
    )
    parser.add_argument("--list-axes", action="store_true", help="print the shipped axes and exit")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from popalign.data.axes import Intersection, load_axes, shipped_axes
    from popalign.data.prompts import (
        EVAL_ONLY,
        PROMPTS_DIR,
        expand_prompts,
        read_neutral_prompts,
        resolve_prompt_file,
        write_prompt_table,
    )
    from popalign.errors import UserError

    if args.list_axes:
        for axis in load_axes(shipped_axes()):
            target = ", ".join(f"{c}={p:.3g}" for c, p in zip(axis.class_names, axis.target))
            print(
                f"{axis.name:8s} {axis.num_classes} classes  target: {target}  slot: {{{axis.placeholder}}}"
            )
        return 0
    # flags default to SUPPRESS so --help shows no empty defaults
    prompts, out = getattr(args, "prompts", None), getattr(args, "out", None)
    axis_items = [*getattr(args, "axes", []), *getattr(args, "axes_file", [])]
    for flag, value in (("--prompts", prompts), ("--out", out)):
        if not value:
            raise UserError(f"{flag} is required (or --list-axes)")
    if not axis_items:
        raise UserError("no axes: pass --axes (e.g. --axes gender race) or --axes-file")
    axes = load_axes(axis_items)
    path = resolve_prompt_file(prompts)
    if Path(out).resolve() == path.resolve():
        raise UserError(f"{out}: is the --prompts file itself; write the table to another --out")
    if path.resolve().parent == PROMPTS_DIR and path.stem in EVAL_ONLY:
        raise UserError(
            f"{path}: an evaluation set for popalign evaluate (full prompts), not neutral prompts with "
            "an identity slot; use occupations_train, occupations_eval or couples"
        )
    # the default template is harmless with a CSV; any other one would be silently unused
    is_csv = path.suffix.lower() == ".csv"
    template = None if is_csv and args.template == DEFAULT_TEMPLATE else args.template
    neutral = read_neutral_prompts(path, template, fix_articles=not args.keep_articles)
    joint = Intersection(axes)
    rows = expand_prompts(neutral, joint, fix_articles=not args.keep_articles)
    write_prompt_table(rows, out)
    example = next(r for r in rows if r.kind == "augmented")
    print(
        f"{len(neutral)} neutral prompts x {joint.num_classes} augmented each "
        f"(axes: {' x '.join(f'{a.name}[{a.num_classes}]' for a in axes)}) = {len(rows)} rows -> {out}"
    )
    print(f"e.g. {example.neutral!r} -> {example.prompt!r}")
    return 0
