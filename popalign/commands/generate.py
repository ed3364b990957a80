"""Sample images and their final latents from an SDXL pipeline for every row of a prompt table.

Writes webdataset shards OUT/images-r{rank}-{index:06d}.tar: per image a png/jpg, latent.npy (the
pipeline's final latents in the UNet's scaled space, float16) and json (prompt, classes, seed,
settings). Finished prompts are recorded in OUT/done-r{rank}.jsonl: re-running the command skips
them, so an interrupted run resumes, and a larger --images-per-prompt samples only the missing
images. An OUT holding images of another prompt table (same ids, other prompts) is refused. With --devices N > 1, Lightning splits the prompts over N
devices (and --num-nodes machines); each rank writes its own shards. See docs/pipeline.md.
"""

from __future__ import annotations

import argparse

HELP = "sample images + latents for a prompt table (resumable; multi-GPU with --devices)"
S = argparse.SUPPRESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        default=S,
        help="pipeline: hub id (stabilityai/stable-diffusion-xl-base-1.0) or local diffusers folder",
    )
    parser.add_argument(
        "--prompts",
        required=True,
        default=S,
        metavar="JSONL",
        help="prompt table written by 'popalign prompts'",
    )
    parser.add_argument(
        "--out", required=True, default=S, metavar="DIR", help="output folder for the image shards"
    )
    parser.add_argument(
        "--vae",
        default=S,
        help="replace the pipeline's VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix",
    )
    parser.add_argument(
        "--unet",
        default=S,
        metavar="DIR",
        help="replace the UNet: a diffusers UNet folder or a 'popalign export' folder holding unet/ (sample an aligned model)",
    )
    parser.add_argument(
        "--lora",
        default=S,
        metavar="DIR",
        help="LoRA weights loaded with pipe.load_lora_weights (an aligned LoRA export)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=("neutral", "augmented"),
        default=["neutral", "augmented"],
        help="which prompt rows to sample",
    )
    parser.add_argument(
        "--images-per-prompt", type=int, default=4, metavar="N", help="images sampled per prompt"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; image i of prompt P uses a hash of (seed, P, i), recorded in its json",
    )
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (multiple of 8)")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (multiple of 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="dtype of the pipeline"
    )
    parser.add_argument(
        "--vae-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=S,
        help="dtype the VAE decodes in (default: float32 for --dtype float16, as the stock SDXL VAE overflows in fp16; else --dtype)",
    )
    parser.add_argument(
        "--image-format", choices=("png", "jpg"), default="png", help="image encoding in the shards"
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        metavar="N",
        help="images per shard (a shard holds whole prompts, so it may hold a few more)",
    )
    parser.add_argument(
        "--devices", type=int, default=1, help="devices per machine; > 1 runs a Lightning Trainer.predict"
    )
    parser.add_argument(
        "--num-nodes", type=int, default=1, help="machines (with torchrun/SLURM, as for training)"
    )
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, gpu, cpu, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from popalign.data.generate import GenerateSettings, generate
    from popalign.data.prompts import read_prompt_table
    from popalign.errors import UserError

    def opt(name: str) -> str | None:  # optional flags are absent (SUPPRESS) unless given
        return getattr(args, name, None)

    rows = [r for r in read_prompt_table(args.prompts) if r.kind in args.kinds]
    if not rows:
        raise UserError(f"{args.prompts}: no rows of kind {' or '.join(args.kinds)}")
    settings = GenerateSettings(
        model=args.model, images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, height=args.height, width=args.width, dtype=args.dtype,
        vae=opt("vae"), unet=opt("unet"), lora=opt("lora"), image_format=args.image_format,
    )  # fmt: skip
    report = generate(
        rows, settings, args.out, batch_size=args.batch_size, shard_size=args.shard_size, devices=args.devices,
        num_nodes=args.num_nodes, accelerator=args.accelerator, vae_dtype=opt("vae_dtype"), progress=not args.no_progress,
        table=args.prompts,
    )  # fmt: skip
    rate = report["images"] / report["seconds"] if report["seconds"] else 0.0
    topped = f" ({report['topped_up']} topped up to {args.images_per_prompt})" if report["topped_up"] else ""
    print(
        f"{report['prompts']} prompts: {report['already_done']} already done, {report['images']} images "
        f"generated{topped} in {report['seconds']:.1f} s ({rate:.2f} images/s) -> {args.out}"
    )
    return 0
