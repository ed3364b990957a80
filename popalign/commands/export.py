"""Export a training checkpoint as stock diffusers weights with a model card.

Full fine-tuning writes DIR/unet/ (or, with --pipeline, a complete pipeline folder that
StableDiffusionXLPipeline.from_pretrained(DIR) loads); LoRA writes adapter weights for
pipe.load_lora_weights(DIR) (or, with --merge, the adapters merged into a full UNet).
DIR/README.md is the model card. See docs/export.md.
"""

from __future__ import annotations

import argparse

# both spellings: the short ones, and the long ones `popalign generate` / `evaluate` take
DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
S = argparse.SUPPRESS  # optional flags are absent unless given: no "(default: None)" in --help

HELP = "export a checkpoint as a diffusers UNet / pipeline or LoRA weights, with a model card"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="Lightning checkpoint of a run, e.g. runs/sdxl_popalign/checkpoints/last.ckpt"
    )
    parser.add_argument(
        "--out",
        required=True,
        default=S,
        metavar="DIR",
        help="output folder (written whole, or not at all)",
    )
    parser.add_argument(
        "--base", default=S, help="base model (hub id or folder) replacing the one the checkpoint records"
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="write a complete pipeline folder (the base's other components beside the UNet)",
    )
    parser.add_argument("--merge", action="store_true", help="LoRA: merge the adapters into a full UNet")
    parser.add_argument(
        "--ema", action="store_true", help="export the run's EMA weights (the run needs ema_decay)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="dtype of the written weights: fp32 (= float32, lossless), bf16 (= bfloat16) or fp16 (= float16)",
    )
    parser.add_argument(
        "--config",
        default=S,
        help="the run's LightningCLI config.yaml (default: the config of the run that wrote the checkpoint, "
        "found beside it)",
    )
    parser.add_argument(
        "--data-summary", default=S, help="summary.json of `popalign build`, for the model card"
    )
    parser.add_argument(
        "--metrics", default=S, help="metrics.json (any nested dict of numbers), tabulated in the card"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it holds an earlier export (never other folders)",
    )
    parser.add_argument(
        "--push-to-hub", metavar="REPO", default=S, help="then upload the folder to this Hugging Face repo"
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")


def run(args: argparse.Namespace) -> int:
    from popalign.export import export_checkpoint

    opt = {k: getattr(args, k, None) for k in ("base", "config", "data_summary", "metrics", "push_to_hub")}
    out = export_checkpoint(
        args.checkpoint,
        args.out,
        base=opt["base"],
        pipeline=args.pipeline,
        merge=args.merge,
        ema=args.ema,
        dtype=args.dtype,
        config=opt["config"],
        data_summary=opt["data_summary"],
        metrics=opt["metrics"],
        overwrite=args.overwrite,
        push_to_hub=opt["push_to_hub"],
        private=args.private,
    )
    print(
        f"exported {args.checkpoint} -> {out}"
        + (f" (pushed to {opt['push_to_hub']})" if opt["push_to_hub"] else "")
    )
    return 0
