"""Label every generated image on the given bias axes with an attribute classifier.

Writes a JSONL table, one row per image: key, prompt_id, shard, labels (axis -> class name, or
"unknown" when the classifier finds no person or no close class) and probabilities (axis -> one
probability per class, when the classifier gives them). Classifiers: 'clip' (zero-shot CLIP, for
photos; --classifier-model openai/clip-vit-large-patch14), 'world' (the synthetic world's exact
rule), or package.module:ClassName for your own popalign.data.classifiers.AttributeClassifier.
Re-running keeps the rows of images that are unchanged and labels only the others; a re-run with
another classifier, other options or other axes is refused (use another --out). See docs/pipeline.md.
"""

from __future__ import annotations

import argparse

HELP = "label generated images on bias axes (zero-shot CLIP, world rule, or a plugin)"
S = argparse.SUPPRESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        required=True,
        default=S,
        metavar="DIR",
        help="folder of image shards written by 'popalign generate'",
    )
    parser.add_argument(
        "--axes",
        required=True,
        default=S,
        nargs="+",
        action="extend",
        metavar="AXIS",
        help="axes to label, by shipped name (gender, race, age, couple) or YAML path",
    )
    parser.add_argument(
        "--out",
        required=True,
        default=S,
        metavar="JSONL",
        help="labels table to write (resumed when it exists)",
    )
    parser.add_argument("--classifier", default="clip", help="clip, world, or package.module:ClassName")
    parser.add_argument(
        "--classifier-model",
        default=S,
        metavar="MODEL",
        help="model for the classifier, passed as model= (clip: default openai/clip-vit-large-patch14, as evaluate)",
    )
    parser.add_argument(
        "--classifier-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra constructor argument, value parsed as YAML (repeatable), e.g. no_person_threshold=0.6",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per classifier call (clip also splits each call into its own batch_size option, 32)",
    )
    parser.add_argument(
        "--device",
        default=S,
        help="passed to the classifier as device= (clip: default cuda when available; world takes none)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import yaml

    from popalign.data.axes import load_axes
    from popalign.data.classifiers import get_classifier
    from popalign.data.images import image_shards
    from popalign.data.label import label_images
    from popalign.errors import UserError, first_line
    from popalign.models.loading import check_model_source

    options = {}
    for item in args.classifier_option:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--classifier-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(
                f"--classifier-option {item!r}: the value is not YAML ({first_line(err)})"
            ) from None
    if hasattr(args, "classifier_model"):  # a missing folder: said so, not looked up on the hub
        check_model_source(args.classifier_model, "--classifier-model")
    for flag, key in (("classifier_model", "model"), ("device", "device")):
        if hasattr(args, flag):  # optional flags are absent (SUPPRESS) unless given
            options[key] = getattr(args, flag)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    image_shards(args.images)  # fail on a wrong folder before loading a model
    classifier = get_classifier(args.classifier, load_axes(args.axes), **options)
    # what makes the labels: recorded in each row, so that a re-run cannot mix two classifiers
    same = {k: v for k, v in sorted(options.items()) if k not in ("device", "batch_size")}
    ident = args.classifier + (f"({', '.join(f'{k}={v}' for k, v in same.items())})" if same else "")
    report = label_images(
        args.images, classifier, args.out, batch_size=args.batch_size, progress=not args.no_progress,
        classifier_id=ident,
    )  # fmt: skip
    unknown = ", ".join(f"{k} {v}" for k, v in report["unknown"].items())
    again = f" ({report['relabelled']} of changed images)" if report["relabelled"] else ""
    print(
        f"{report['images']} images: {report['labelled']} labelled{again}, {report['already_labelled']} already "
        f"labelled; unknown among new: {unknown} -> {args.out}"
    )
    return 0
