"""Training-step throughput of PopAlign: samples/s, counted FLOPs, MFU and peak memory per configuration.

Times the project's own step -- ``PopAlignModule.compute_objective`` forward, backward, optimizer
step -- on a UNet with the stock SDXL base configuration and random weights (nothing is downloaded),
saved with ``save_pretrained`` and loaded back by ``PopAlignModule`` through the real loading path.
Without CUDA it falls back to the tiny SDXL-architecture model, so it runs anywhere:

    python benchmarks/step_throughput.py --out results.json                  # GPU, full SDXL UNet
    python benchmarks/step_throughput.py --tiny --steps 2 --out /tmp/b.json  # any machine

A configuration is a ``+``-joined spec, e.g. ``b8+ckpt+compile``: ``bN`` batch of N samples (N/2
pairs), ``ckpt`` / ``ckpt=POLICY`` gradient checkpointing (``popalign.models.speed``),
``compile[=MODE]`` regional compilation of the transformer blocks, ``compile_all[=MODE]`` of the
resnets too, ``cl`` channels-last, ``loraR`` LoRA of rank R instead of full fine-tuning,
``original`` the original code's style (VAE-encode fp32 images every step before the same step).
Column meanings: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from popalign.errors import UserError

log = logging.getLogger("step_throughput")

# fmt: off
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2,567,463,684 parameters)
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True, "norm_num_groups": 32,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + pooled 1280
    "flip_sin_to_cos": True, "freq_shift": 0,
}
# the SDXL VAE (83,653,863 parameters), for the original-style step only
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.13025,
}
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
}
GPU_CONFIGS = ("b2+original", "b4", "b8+ckpt", "b8", "b8+ckpt=save_attention", "b4+cl", "b8+lora16",
               "b4+compile", "b8+ckpt+compile", "b8+compile_all")
TINY_CONFIGS = ("b2+original", "b2", "b4", "b4+ckpt", "b4+ckpt=save_matmuls", "b4+cl", "b4+lora4")
# fmt: on


@dataclass
class StepConfig:
    """One benchmarked configuration, parsed from a spec like ``b8+ckpt+compile``."""

    spec: str
    batch: int = 2
    checkpointing: str | None = None
    compile: str | None = None
    compile_all: bool = False
    channels_last: bool = False
    lora_rank: int | None = None
    original: bool = False

    @classmethod
    def parse(cls, spec: str) -> StepConfig:
        cfg = cls(spec=spec)
        for token in spec.split("+"):
            key, _, value = token.partition("=")
            if key[:1] == "b" and key[1:].isdigit() and not value:
                cfg.batch = int(key[1:])
            elif key == "ckpt":
                cfg.checkpointing = value or "full"
            elif key in ("compile", "compile_all"):
                cfg.compile, cfg.compile_all = value or "default", key == "compile_all"
            elif key == "cl" and not value:
                cfg.channels_last = True
            elif key[:4] == "lora" and key[4:].isdigit() and not value:
                cfg.lora_rank = int(key[4:])
            elif key == "original" and not value:
                cfg.original = True
            else:
                raise UserError(f"--configs: unknown token {token!r} in {spec!r} (see --help)")
        if cfg.batch < 2 or cfg.batch % 2:
            raise UserError(f"--configs: {spec!r}: the batch holds pairs, so it must be even and >= 2")
        return cfg


@dataclass
class Shapes:
    latent: int
    text_dim: int
    pooled_dim: int
    image: int


def write_model(folder: Path, tiny: bool, device: torch.device) -> None:
    """Save a diffusers folder (``unet/``, ``scheduler/``; the whole pipeline when tiny) with random weights."""
    if tiny:
        from popalign.models.tiny import save_tiny_sdxl

        save_tiny_sdxl(folder)
        return
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    with torch.device(device):  # random init of 2.6 B weights: seconds on a GPU, minutes on a CPU
        unet = UNet2DConditionModel(**SDXL_UNET)
    # saved in bf16 to halve the write; load_unet reads it back as float32
    unet.to("cpu", torch.bfloat16).save_pretrained(folder / "unet", safe_serialization=True)
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(folder / "scheduler")


def read_shapes(folder: Path) -> Shapes:
    """Input sizes from a diffusers folder's UNet config (and VAE config: its downsampling, else 8)."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = folder / "vae" / "config.json"
    scale = 2 ** (len(json.loads(vae.read_text())["block_out_channels"]) - 1) if vae.exists() else 8
    pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    return Shapes(unet["sample_size"], unet["cross_attention_dim"], pooled, unet["sample_size"] * scale)


def build_vae(folder: Path, device: torch.device):
    """The fp32 VAE the original-style step encodes with: the folder's ``vae/``, else SDXL's config."""
    from diffusers import AutoencoderKL

    if (folder / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    else:
        with torch.device(device):
            vae = AutoencoderKL(**SDXL_VAE)
    return vae.to(device, torch.float32).requires_grad_(False).eval()


def make_batch(n: int, shapes: Shapes, device: torch.device, images: bool, seed: int = 0) -> dict:
    """Random tensors in the DataModule's layout and dtypes: rows i and i + n/2 are a pair of one group."""
    g = torch.Generator().manual_seed(seed)
    p, s = n // 2, float(shapes.image)
    batch = {
        "latents": torch.randn(n, 4, shapes.latent, shapes.latent, generator=g).half(),
        "prompt_embeds": torch.randn(n, 77, shapes.text_dim, generator=g).half(),
        "pooled_prompt_embeds": torch.randn(n, shapes.pooled_dim, generator=g).half(),
        "time_ids": torch.tensor([s, s, 0.0, 0.0, s, s]).expand(n, 6).clone(),
        "preferred": torch.arange(n) < p,
        "group": torch.arange(p).repeat(2),
    }
    if images:
        batch["images"] = torch.rand(n, 3, shapes.image, shapes.image, generator=g) * 2 - 1
    return {k: v.to(device) for k, v in batch.items()}


def make_step(module, optimizer, batch: dict, vae, precision: str):
    """One training step, as Lightning runs it: forward under autocast, backward, optimizer step."""
    device_type = batch["latents"].device.type
    autocast = partial(torch.autocast, device_type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        b = batch
        if vae is not None:  # original code: no stored latents, encode the images every step
            with torch.no_grad():
                latents = vae.encode(batch["images"]).latent_dist.sample() * vae.config.scaling_factor
            b = {**batch, "latents": latents.half()}
        with autocast():
            noise, t = module.noise_and_timesteps(b["latents"])
            loss = module.compute_objective(b, noise, t).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` as torch's FlopCounterMode counts them (matmuls, convs, attention)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def count_host_syncs(step) -> int:
    """How many synchronizing CUDA calls one ``step`` makes (torch's sync debug mode, as warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Modules:
    """Builds ``PopAlignModule``s, reusing the last one while its construction and compilation match."""

    def __init__(self, folder: Path, device: torch.device, fused: bool) -> None:
        self.folder, self.device, self.fused = folder, device, fused
        self.key: tuple | None = None
        self.module = None

    def get(self, cfg: StepConfig):
        from popalign.models.speed import REPEATED_BLOCKS, compile_repeated_blocks
        from popalign.module import PopAlignModule

        key = (cfg.lora_rank, cfg.compile, cfg.compile_all)
        if key == self.key:  # undo the switchable features of the previous row
            self.module.policy.disable_gradient_checkpointing()
            self.module.to(memory_format=torch.contiguous_format)
            return self.module
        self.release()
        opt = partial(torch.optim.AdamW, lr=1e-6, weight_decay=1e-2, fused=self.fused)
        module = PopAlignModule(str(self.folder), lora_rank=cfg.lora_rank, optimizer=opt).to(self.device)
        if cfg.compile:
            blocks = REPEATED_BLOCKS if cfg.compile_all else None
            for unet in (module.policy, module.reference):
                if unet is not None:
                    compile_repeated_blocks(unet, mode=cfg.compile, blocks=blocks)
        self.key, self.module = key, module.train()
        return module

    def release(self) -> None:
        self.key = self.module = None
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def run_config(cfg: StepConfig, modules: Modules, shapes: Shapes, vae, args, pair_flops: dict) -> dict:
    """Build, count, warm up and time one configuration; returns its result row."""
    from popalign.models.speed import selective_checkpointing, to_channels_last

    device = modules.device
    t0 = time.perf_counter()
    module = modules.get(cfg)
    optimizer = module.configure_optimizers()
    vae = vae if cfg.original else None
    key = cfg.lora_rank
    if key not in pair_flops:  # model FLOPs: one pair, no recompute, no VAE; every op is per sample
        pair = make_step(module, optimizer, make_batch(2, shapes, device, False), None, args.precision)
        with torch.compiler.set_stance("force_eager"):  # count the eager ops, compiled or not
            pair_flops[key] = count_flops(pair)
    if cfg.checkpointing:
        selective_checkpointing(module.policy, cfg.checkpointing)
    if cfg.channels_last:
        to_channels_last(module)
    step = make_step(
        module, optimizer, make_batch(cfg.batch, shapes, device, cfg.original), vae, args.precision
    )
    with torch.compiler.set_stance("force_eager"):
        counted = count_flops(step)  # what this step really computes: recompute and VAE included
    _sync(device)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compilation happens here
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    syncs = count_host_syncs(step) if device.type == "cuda" else None
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)  # the only host sync of the timed loop
    elapsed = time.perf_counter() - t0
    model = pair_flops[key] * cfg.batch // 2
    per_s, peak = args.steps / elapsed, args.peak_tflops * 1e12
    return {
        **asdict(cfg),
        "samples_per_s": cfg.batch * per_s,
        "step_ms": 1000.0 / per_s,
        "model_tflop": model / 1e12,
        "tflop_per_sample": model / cfg.batch / 1e12,
        "counted_tflop": counted / 1e12,
        "mfu": model * per_s / peak,
        "hfu": counted * per_s / peak,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "host_syncs": syncs,
        "error": None,
    }


COLUMNS = (  # header, row key, format
    ("config", "spec", "{}"),
    ("samples/s", "samples_per_s", "{:.3g}"),
    ("step ms", "step_ms", "{:.4g}"),
    ("TFLOP/sample", "tflop_per_sample", "{:.4g}"),
    ("MFU %", "mfu", "{:.3g}"),
    ("HFU %", "hfu", "{:.3g}"),
    ("peak GiB", "peak_mem_gib", "{:.1f}"),
    ("setup s", "setup_s", "{:.1f}"),
    ("warm-up s", "warmup_s", "{:.1f}"),
    ("syncs", "host_syncs", "{}"),
    ("x original", "vs_original", "{:.2f}"),
)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (MFU/HFU in percent; '-' where a value does not apply)."""

    def cell(row: dict, key: str, fmt: str) -> str:
        if row.get("error") and key != "spec":
            return "error" if key == "samples_per_s" else "-"
        value = row.get(key)
        if value is None:
            return "-"
        return fmt.format(100 * value if key in ("mfu", "hfu") else value)

    table = [[h for h, _, _ in COLUMNS]] + [[cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in table]  # fmt: skip
    return "\n".join(lines)


def environment(args, argv: list[str], device: torch.device, folder: Path) -> dict:
    """What a result row needs beside it to be read: machine, versions, model, settings."""
    import diffusers
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # count parameters without allocating them
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/step_throughput.py", *argv]),
        "device": name,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model": str(args.model or ("tiny" if args.tiny else "sdxl-base-1.0 unet config, random weights")),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "precision": args.precision,
        "peak_tflops": args.peak_tflops,
        "steps": args.steps,
        "warmup": args.warmup,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help="specs to time (default: a GPU or tiny list)")
    p.add_argument("--tiny", action="store_true", help="the tiny model (automatic without CUDA)")
    p.add_argument("--model", type=Path, default=None,
                   help="time this local diffusers folder (unet/, scheduler/) instead of writing one")  # fmt: skip
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--precision", choices=("bf16-mixed", "32"), default=None,
                   help="autocast of the forward (default: bf16-mixed on CUDA, 32 on CPU)")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak for MFU; default 989 = H100 SXM dense bf16 spec (H200: same)")  # fmt: skip
    p.add_argument("--no-fused", action="store_true", help="plain (foreach) AdamW instead of fused")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the model is saved (default: a temp dir)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after every row)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    if args.model is not None and not (args.model / "unet" / "config.json").is_file():
        raise UserError(f"--model {args.model}: no unet/config.json; expected a local diffusers folder")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when a configuration failed for another reason than memory."""
    from popalign.models.speed import fused_adamw_available

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny and args.model is None:
        log.warning("no CUDA device: falling back to the tiny model (--tiny)")
        args.tiny = True
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    configs = [StepConfig.parse(s) for s in (args.configs or (TINY_CONFIGS if args.tiny else GPU_CONFIGS))]
    torch.manual_seed(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = args.model or Path(tmp) / "model"
        if args.model is None:
            t0 = time.perf_counter()
            write_model(folder, args.tiny, device)
            log.info("model written to %s in %.1f s", folder, time.perf_counter() - t0)
        shapes = read_shapes(folder)
        vae = build_vae(folder, device) if any(c.original for c in configs) else None
        fused = not args.no_fused and fused_adamw_available(device)
        meta = {**environment(args, argv, device, folder), "fused_adamw": fused}
        modules, pair_flops = Modules(folder, device, fused), {}
        for cfg in configs:
            try:
                row = run_config(cfg, modules, shapes, vae, args, pair_flops)
            except torch.OutOfMemoryError:
                row = {**asdict(cfg), "error": "out of memory"}
            except Exception as err:  # one broken configuration must not lose the others
                log.error("%s failed:\n%s", cfg.spec, traceback.format_exc())
                row = {**asdict(cfg), "error": f"{type(err).__name__}: {err}"}
            if row["error"]:  # outside `except`: its traceback no longer pins the step's tensors
                modules.release()
            rows.append(row)
            log.info("%s: %s", cfg.spec, row.get("error") or f"{row['samples_per_s']:.3g} samples/s")
            _add_ratios(rows)
            if args.out:
                args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        modules.release()
    print(format_table(rows))
    bad = [r for r in rows if r.get("error") and r["error"] != "out of memory"]
    return 1 if bad else 0


def _add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r.get("original") and not r.get("error")), None)
    for r in rows:
        if base is not None and not r.get("error"):
            r["vs_original"] = r["samples_per_s"] / base["samples_per_s"]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
