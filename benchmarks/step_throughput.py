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
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from popalign.errors import UserError
from popalign.models.sdxl_arch import save_random_sdxl
from popalign.models.speed import fused_adamw_available
from popalign.models.step_timing import StepConfig, StepTimer
from popalign.models.synthetic_step import build_vae
from popalign.models.tiny import save_tiny_sdxl

log = logging.getLogger("step_throughput")

# fmt: off
GPU_CONFIGS = ("b2+original", "b4", "b8+ckpt", "b8", "b8+ckpt=save_attention", "b4+cl", "b8+lora16",
               "b4+compile", "b8+ckpt+compile", "b8+compile_all")
TINY_CONFIGS = ("b2+original", "b2", "b4", "b4+ckpt", "b4+ckpt=save_matmuls", "b4+cl", "b4+lora4")
# fmt: on


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when a configuration failed for another reason than memory."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = choose_device(args)
    configs = [StepConfig.parse(s) for s in (args.configs or (TINY_CONFIGS if args.tiny else GPU_CONFIGS))]
    torch.manual_seed(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = args.model or write_model(Path(tmp) / "model", args.tiny, device)
        vae = build_vae(folder, device) if any(c.original for c in configs) else None
        fused = not args.no_fused and fused_adamw_available(device)
        meta = {**environment(args, argv, device, folder), "fused_adamw": fused}
        timer = StepTimer(folder, device, fused=fused, precision=args.precision, steps=args.steps,
                          warmup=args.warmup, peak_tflops=args.peak_tflops, vae=vae,
                          profile=args.profile)  # fmt: skip
        for cfg in configs:
            row = timer.row(cfg)
            rows.append(row)
            log.info("%s: %s", cfg.spec, row.get("error") or f"{row['samples_per_s']:.3g} samples/s")
            add_ratios(rows)
            if args.out:  # after every row, so an interrupted run keeps what it measured
                args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        timer.release()
    print(format_table(rows))
    bad = [r for r in rows if r.get("error") and r["error"] != "out of memory"]
    return 1 if bad else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring); raises ``UserError`` for impossible values."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help="specs to time (default: a GPU or tiny list)")
    p.add_argument("--tiny", action="store_true", help="the tiny model (automatic without CUDA)")
    p.add_argument("--model", type=Path, default=None,
                   help="time this local diffusers folder (unet/, scheduler/) instead of writing one")  # fmt: skip
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--steps", type=int, default=10, help="timed steps per configuration (default: %(default)s)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps first, where compilation happens (default: %(default)s)",
    )
    p.add_argument("--precision", choices=("bf16-mixed", "32"), default=None,
                   help="autocast of the forward (default: bf16-mixed on CUDA, 32 on CPU)")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak for MFU; default 989 = H100 SXM dense bf16 spec (H200: same)")  # fmt: skip
    p.add_argument("--no-fused", action="store_true", help="plain (foreach) AdamW instead of fused")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step per configuration: device busy %% and the costliest ops (JSON)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the model is saved (default: a temp dir)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after every row)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.model is not None and not (args.model / "unet" / "config.json").is_file():
        raise UserError(f"--model {args.model}: no unet/config.json; expected a local diffusers folder")
    return args


def choose_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, pick the device, and fill in the device-dependent defaults of ``args``:
    the tiny model without CUDA (unless ``--model``), bf16-mixed precision on CUDA, else float32.
    Raises ``UserError`` for a device torch does not know or CUDA asked for where there is none."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise UserError(f"--device {args.device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device!r}: CUDA is not available on this machine")
    if device.type != "cuda" and not args.tiny and args.model is None:
        log.warning("no CUDA device: falling back to the tiny model (--tiny)")
        args.tiny = True
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    return device


def write_model(folder: Path, tiny: bool, device: torch.device) -> Path:
    """Save a diffusers folder with random weights (the whole tiny pipeline, or SDXL's ``unet/`` and
    ``scheduler/``) and log how long it took; returns ``folder``."""
    t0 = time.perf_counter()
    if tiny:
        save_tiny_sdxl(folder)
    else:
        save_random_sdxl(folder, device)
    log.info("model written to %s in %.1f s", folder, time.perf_counter() - t0)
    return folder


def environment(args: argparse.Namespace, argv: list[str], device: torch.device, folder: Path) -> dict:
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


def add_ratios(rows: list[dict]) -> None:
    """Set ``vs_original`` (samples/s over the first successful original-style row's) on every good row."""
    base = next((r for r in rows if r.get("original") and not r.get("error")), None)
    for r in rows:
        if base is not None and not r.get("error"):
            r["vs_original"] = r["samples_per_s"] / base["samples_per_s"]


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
    ("busy %", "busy", "{:.3g}"),
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
        return fmt.format(100 * value if key in ("mfu", "hfu", "busy") else value)

    table = [[h for h, _, _ in COLUMNS]] + [[cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in table]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
