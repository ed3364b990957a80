"""Evaluate a model's fairness and quality: sample neutral, identity-specific and generic prompts,
label the images with an attribute classifier, and write metrics.json, report.md, labels.jsonl,
the images and plots to --out (under a temporary name, renamed when complete).

Metrics: neutral-prompt discrepancy to the target distribution (per prompt, pooled, per axis) with
bootstrap intervals and the unknown rate; specific-prompt accuracy; prompt adherence (--adherence);
FID (--fid-reference); CLIP score (--clip-model). --baseline samples a second model on the same
prompts and seeds for a before/after comparison. Keys and formats: docs/evaluation.md.
"""

from __future__ import annotations

import argparse

HELP = "evaluate a model: discrepancy, specific accuracy, FID, CLIP score, plots and a report"


S = (
    argparse.SUPPRESS
)  # optional flags are absent unless given (EvalConfig's default applies): no "(default: None)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=S, help="hub id or local diffusers folder of the pipeline to sample"
    )
    model.add_argument(
        "--unet", default=S, help="folder with an aligned UNet (popalign export) replacing --model's"
    )
    model.add_argument(
        "--lora", default=S, help="folder with LoRA weights (popalign export of a LoRA run) for --model"
    )
    model.add_argument(
        "--vae", default=S, help="a separate AutoencoderKL folder/id (e.g. madebyollin/sdxl-vae-fp16-fix)"
    )
    model.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype the pipeline samples in (with float16 the VAE decodes in float32)",
    )
    model.add_argument("--device", default=S, help="where to sample (default: cuda when available, else cpu)")
    model.add_argument(
        "--baseline", metavar="MODEL", default=S, help="also sample this model on the same prompts and seeds"
    )
    model.add_argument(
        "--images",
        metavar="DIR",
        default=S,
        help="instead of sampling: evaluate the image shards popalign generate wrote",
    )
    model.add_argument(
        "--labels", metavar="JSONL", default=S, help="with --images: reuse this popalign label table"
    )

    prompts = parser.add_argument_group("prompts and labels")
    prompts.add_argument(
        "--neutral",
        default="occupations_eval",
        metavar="FILE",
        help="neutral prompts: a .txt of subjects or a .csv with {identity} slots (as popalign prompts reads); "
        "a bare name picks a shipped set; 'none' to skip",
    )
    prompts.add_argument(
        "--template",
        default=S,
        help="template around each subject of a .txt (default: 'a photo of a {subject}')",
    )
    prompts.add_argument(
        "--specific",
        metavar="FILE|expand",
        default=S,
        help="identity-specific prompts: a .csv with a 'prompt' column and one column per axis "
        "(e.g. specific_eval), or 'expand' for the neutral prompts expanded over the axes",
    )
    prompts.add_argument(
        "--generic", metavar="FILE", default=S, help="generic prompts, one per line (e.g. generic_eval)"
    )
    prompts.add_argument(
        "--axes", nargs="+", default=["gender", "race"], help="bias axes: shipped names or YAML paths"
    )
    prompts.add_argument(
        "--target",
        nargs="+",
        metavar="P",
        type=float,
        default=S,
        help="joint target distribution over the axes' joint classes (row-major) "
        "(default: the product of the axes' targets)",
    )
    prompts.add_argument("--classifier", default="clip", help="clip, world, or package.module:ClassName")
    prompts.add_argument(
        "--classifier-model",
        metavar="PATH",
        default=S,
        help="classifier weights (default for clip: openai/clip-vit-large-patch14)",
    )
    prompts.add_argument(
        "--adherence", default=S, help="prompt-adherence rule: world, or package.module:ClassName"
    )

    sampling = parser.add_argument_group("sampling (the cost: prompts x images x steps)")
    sampling.add_argument(
        "--images-per-prompt", type=int, default=8, help="images sampled per neutral and generic prompt"
    )
    sampling.add_argument(
        "--specific-images-per-prompt", type=int, default=S,
        help="images per identity-specific prompt (default: --images-per-prompt)",
    )  # fmt: skip
    sampling.add_argument("--seed", type=int, default=0, help="per-image seeds derive from it as in generate")
    sampling.add_argument("--steps", type=int, default=30, help="denoising steps per image")
    sampling.add_argument(
        "--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale (1 = off)"
    )
    sampling.add_argument("--height", type=int, default=1024, help="image height in pixels (multiple of 8)")
    sampling.add_argument("--width", type=int, default=1024, help="image width in pixels (multiple of 8)")
    sampling.add_argument("--batch-size", type=int, default=4, help="images sampled (and labelled) at once")

    quality = parser.add_argument_group("quality and output")
    quality.add_argument(
        "--fid-reference",
        metavar="PATH",
        default=S,
        help="real images for FID: a .npy uint8 [N,H,W,3] array or a folder of generate's image shards",
    )
    quality.add_argument(
        "--fid-features",
        default="inception",
        choices=["inception", "pixel"],
        help="inception (standard; needs torch-fidelity) or pixel (weight-free, for small synthetic images)",
    )
    quality.add_argument(
        "--clip-model", default=S, help="CLIP folder/id for CLIP score (skipped with a note when absent)"
    )
    quality.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    quality.add_argument("--out", required=True, default=S, metavar="DIR", help="output folder")
    quality.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out that holds an earlier evaluation"
    )
    quality.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from popalign.commands import parse_device
    from popalign.evaluation.config import EvalConfig
    from popalign.evaluation.evaluate import evaluate

    fields = {
        k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "no_progress")
    }
    if fields.get("neutral") == "none":
        fields["neutral"] = None
    if fields.get("device") is not None:
        parse_device(fields["device"])  # a typo or a missing GPU: one line before any model loads
    config = EvalConfig(**fields, progress=not args.no_progress)
    result = evaluate(config)
    m = result["metrics"]
    for key in (
        "neutral.discrepancy",
        "neutral.discrepancy_pooled",
        "specific.accuracy",
        "adherence.accuracy",
        "fid",
        "clip_score",
    ):
        if m.get(key) is not None:
            base = result.get("baseline", {}).get(key)
            print(f"{key}: {m[key]:.4f}" + (f" (baseline {base:.4f})" if isinstance(base, float) else ""))
    print(f"wrote {args.out}/report.md")
    return 0
