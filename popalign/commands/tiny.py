"""Build a tiny SDXL-architecture pipeline and random population shards, for trying `train.py fit` on a CPU.

Writes OUT/model (a StableDiffusionXLPipeline folder, loadable with from_pretrained) and OUT/shards
(population shards of random latents captioned with real text embeddings of the tiny encoders). Both
are built in hidden folders beside them and replace the previous ones only once complete; other
files in OUT (a training run's checkpoints and logs) are left alone.
Then: python train.py fit --config configs/tiny.yaml (for an OUT other than runs/tiny, add
--model.init_args.pretrained_model OUT/model --data.train_shards OUT/shards).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "build a tiny SDXL-architecture model and random population shards (CPU smoke runs)"

# configs/tiny.yaml reads the model and shards from here (model.init_args.pretrained_model, data.train_shards)
CONFIG_OUT = "runs/tiny"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=CONFIG_OUT, help="output folder (model/ and shards/ inside)")
    parser.add_argument("--groups", type=int, default=8, help="population groups to write")
    parser.add_argument("--population-size", type=int, default=4, help="members per population (K)")
    parser.add_argument(
        "--image-size", type=int, default=16, help="pixel size of the tiny model's images (multiple of 8)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def check_arguments(args: argparse.Namespace) -> None:
    """:class:`UserError` for flags ``run`` cannot use, before anything is written."""
    from popalign.errors import UserError
    from popalign.files import check_no_file_above

    for name in ("groups", "population_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 8 or args.image_size % 8:
        raise UserError(f"--image-size must be a positive multiple of 8, got {args.image_size}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.out)
    check_no_file_above(out)
    for path in (out, out / "model", out / "shards"):
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: is a file, not a folder")


def next_command(out: str) -> str:
    """The training command for the model and shards in ``out``: configs/tiny.yaml as it is for its
    own folder, with the two paths overridden for any other."""
    import shlex

    command = "python train.py fit --config configs/tiny.yaml"
    if Path(out).resolve() == Path(CONFIG_OUT).resolve():
        return command
    model, shards = (shlex.quote(str(Path(out) / name)) for name in ("model", "shards"))
    return f"{command} --model.init_args.pretrained_model {model} --data.train_shards {shards}"


def run(args: argparse.Namespace) -> int:
    import shutil

    from popalign.files import replace_folder, sibling

    check_arguments(args)
    out = Path(args.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, shard_dir = out / "model", out / "shards"
    # built beside the old ones, which a failure leaves as they were
    model_tmp, shard_tmp = sibling(model_dir, "partial"), sibling(shard_dir, "partial")
    try:
        _write(args, model_tmp, shard_tmp)
        replace_folder(model_tmp, model_dir)
        replace_folder(shard_tmp, shard_dir)
    except BaseException:
        for tmp in (model_tmp, shard_tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    print(f"wrote {model_dir} and {args.groups} groups to {shard_dir}")
    print(f"next: {next_command(args.out)}")
    return 0


def _write(args: argparse.Namespace, model_dir: Path, shard_dir: Path) -> None:
    """The tiny pipeline to ``model_dir`` and ``args.groups`` random population groups to ``shard_dir``."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from popalign.data.schema import PopulationGroup
    from popalign.data.shards import PopulationShardWriter
    from popalign.models.tiny import TinySDXLConfig, save_tiny_sdxl

    config = TinySDXLConfig(image_size=args.image_size, seed=args.seed)
    save_tiny_sdxl(model_dir, config)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    rng = np.random.default_rng(args.seed)
    k, s, size = args.population_size, config.latent_size, args.image_size
    prompts = ["a photo of a doctor", "a photo of a nurse", "a photo of a teacher", "a photo of a chef"]
    with PopulationShardWriter(shard_dir, maxcount=max(1, args.groups // 2)) as writer:
        for i in range(args.groups):
            prompt = prompts[i % len(prompts)]
            with torch.no_grad():
                embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
            writer.write(
                PopulationGroup(
                    key=f"tiny-g{i:04d}",
                    # preferred members shifted, so the objective has something to prefer
                    preferred=(rng.standard_normal((k, 4, s, s)) + 0.5).astype(np.float16),
                    dispreferred=rng.standard_normal((k, 4, s, s)).astype(np.float16),
                    prompt_embeds=embeds[0].numpy().astype(np.float16),
                    pooled_prompt_embeds=pooled[0].numpy().astype(np.float16),
                    time_ids=np.array([size, size, 0, 0, size, size], dtype=np.float32),
                    meta={
                        "prompt": prompt,
                        "prompt_id": f"p{i % len(prompts):04d}",
                        "axes": [],
                        "preferred_labels": [{}] * k,
                        "dispreferred_labels": [{}] * k,
                        "preferred_sources": [prompt] * k,
                        "dispreferred_sources": [prompt] * k,
                    },
                )
            )
