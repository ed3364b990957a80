"""Build training shards of population groups from labelled images.

For every neutral prompt, each group pairs a preferred population (K images of its augmented
prompts whose labels agree with the prompt, balanced to the axes' joint target distribution) with a
dispreferred population (K images of the neutral prompt), both captioned with the neutral prompt
and encoded with the model's two text encoders. Writes OUT/shard-NNNNNN.tar (docs/shards.md) and
OUT/summary.json, replacing the previous shards only once the new ones are complete (a run that
builds nothing leaves OUT as it was). Re-running with unchanged inputs does nothing while the shards
keep their recorded sizes. See docs/pipeline.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "build population shards (preferred vs dispreferred groups) for training"
S = argparse.SUPPRESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        required=True,
        default=S,
        metavar="DIR",
        help="image shards written by 'popalign generate'",
    )
    parser.add_argument(
        "--labels",
        required=True,
        default=S,
        metavar="JSONL",
        help="labels written by 'popalign label' for those images",
    )
    parser.add_argument(
        "--prompts",
        required=True,
        default=S,
        metavar="JSONL",
        help="the prompt table the images were generated from",
    )
    parser.add_argument(
        "--model",
        required=True,
        default=S,
        help="the pipeline the images came from (hub id or folder): its text encoders encode the captions",
    )
    parser.add_argument(
        "--out",
        required=True,
        default=S,
        metavar="DIR",
        help="output folder for shard-*.tar and summary.json",
    )
    parser.add_argument(
        "--axes",
        nargs="+",
        action="extend",
        default=S,
        metavar="AXIS",
        help="axes to balance, by shipped name or YAML path (default: the axes named in the prompt table)",
    )
    parser.add_argument(
        "--population-size",
        type=int,
        default=16,
        metavar="K",
        help="members in each preferred and each dispreferred population",
    )
    parser.add_argument(
        "--groups-per-prompt", type=int, default=4, metavar="G", help="groups drawn per neutral prompt"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    parser.add_argument("--shard-size", type=int, default=100, metavar="N", help="groups per shard")
    parser.add_argument(
        "--no-source-embeds",
        dest="source_embeds",
        action="store_false",
        default=S,  # the help would otherwise say "(default: True)" of a flag that turns it off
        help="do not store the preferred members' own (identity-specific) caption embeddings; "
        "smaller shards, but training cannot use preservation_weight",
    )
    parser.add_argument(
        "--vae", default=S, help="VAE for images without saved latents (default: the model's)"
    )
    parser.add_argument("--device", default="cpu", help="device for the text encoders and VAE")


def run(args: argparse.Namespace) -> int:
    from popalign import files
    from popalign.commands import parse_device
    from popalign.data.axes import load_axes
    from popalign.data.build import BuildSettings, build_populations, format_summary
    from popalign.errors import UserError

    device = parse_device(args.device)
    files.check_no_file_above(Path(args.out))

    settings = BuildSettings(
        args.population_size,
        args.groups_per_prompt,
        args.seed,
        args.shard_size,
        getattr(args, "source_embeds", True),
    )
    axes = load_axes(args.axes) if hasattr(args, "axes") else None  # absent (SUPPRESS) unless given
    summary = build_populations(
        args.images, args.labels, args.prompts, args.model, args.out, axes=axes, settings=settings,
        vae=getattr(args, "vae", None), device=str(device),
    )  # fmt: skip
    print(format_summary(summary))
    if summary["groups_written"] == 0:
        raise UserError(
            f"{args.out}: no group could be built (see the skipped prompts above); left unchanged"
        )
    return 0
