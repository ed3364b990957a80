"""Build a tiny SDXL-architecture pipeline and random population shards, for trying `train.py fit` on a CPU.

Writes OUT/model (a StableDiffusionXLPipeline folder, loadable with from_pretrained) and OUT/shards
(population shards of random latents captioned with real text embeddings of the tiny encoders).
Then: python train.py fit --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse

HELP = "build a tiny SDXL-architecture model and random population shards (CPU smoke runs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/tiny", help="output folder (model/ and shards/ inside)")
    parser.add_argument("--groups", type=int, default=8, help="population groups to write")
    parser.add_argument("--population-size", type=int, default=4, help="members per population (K)")
    parser.add_argument("--image-size", type=int, default=16, help="pixel size of the tiny model's images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from popalign.data.schema import PopulationGroup
    from popalign.data.shards import PopulationShardWriter
    from popalign.models.tiny import TinySDXLConfig, save_tiny_sdxl

    out = Path(args.out)
    config = TinySDXLConfig(image_size=args.image_size, seed=args.seed)
    model_dir = save_tiny_sdxl(out / "model", config)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    rng = np.random.default_rng(args.seed)
    k, s, size = args.population_size, config.latent_size, args.image_size
    prompts = ["a photo of a doctor", "a photo of a nurse", "a photo of a teacher", "a photo of a chef"]
    with PopulationShardWriter(out / "shards", maxcount=max(1, args.groups // 2), overwrite=True) as writer:
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
    print(f"wrote {model_dir} and {args.groups} groups to {out / 'shards'}")
    print("next: python train.py fit --config configs/tiny.yaml")
    return 0
