"""Timing variants of the training step: speed features on or off, one result row each.

A variant is a :class:`StepConfig`, parsed from a ``+``-joined spec such as ``b8+ckpt+compile``
(tokens: benchmarks/README.md). :class:`StepTimer` builds the ``PopAlignModule`` for it (reusing the
previous one when only switchable features differ), applies the features from
``popalign.models.speed``, counts FLOPs, warms up and times the step of
``popalign.models.synthetic_step``, and returns a row of plain values for a table or JSON.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from popalign.errors import UserError
from popalign.models.flops import count_flops, host_sync_sites, profile_step, utilization
from popalign.models.speed import (
    CHECKPOINT_POLICIES,
    REPEATED_BLOCKS,
    compile_repeated_blocks,
    selective_checkpointing,
    to_channels_last,
)
from popalign.models.synthetic_step import make_batch, make_step, read_shapes

log = logging.getLogger(__name__)
COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)  # torch.compile's


@dataclass
class StepConfig:
    """One step variant, parsed from a spec like ``b8+ckpt+compile``."""

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
        """Parse ``spec``; raises ``UserError`` for an unknown token, checkpoint policy or compile mode,
        a LoRA rank below 1, or a batch that is not even >= 2, so a bad spec fails before any work."""
        cfg = cls(spec=spec)
        for token in spec.split("+"):
            key, _, value = token.partition("=")
            if key[:1] == "b" and key[1:].isdigit() and not value:
                cfg.batch = int(key[1:])
            elif key == "ckpt":
                cfg.checkpointing = value or "full"
                if cfg.checkpointing != "full" and cfg.checkpointing not in CHECKPOINT_POLICIES:
                    raise UserError(
                        f"--configs: {spec!r}: unknown checkpoint policy {value!r}; "
                        f"use ckpt, or ckpt= one of {', '.join(sorted(CHECKPOINT_POLICIES))}"
                    )
            elif key in ("compile", "compile_all"):
                cfg.compile, cfg.compile_all = value or "default", key == "compile_all"
                if cfg.compile not in COMPILE_MODES:
                    raise UserError(
                        f"--configs: {spec!r}: unknown compile mode {value!r}; choose one of {', '.join(COMPILE_MODES)}"
                    )
            elif key == "cl" and not value:
                cfg.channels_last = True
            elif key[:4] == "lora" and key[4:].isdigit() and not value:
                cfg.lora_rank = int(key[4:])
                if cfg.lora_rank < 1:
                    raise UserError(f"--configs: {spec!r}: the LoRA rank must be >= 1 (lora4, lora16, ...)")
            elif key == "original" and not value:
                cfg.original = True
            else:
                raise UserError(f"--configs: unknown token {token!r} in {spec!r} (see --help)")
        if cfg.batch < 2 or cfg.batch % 2:
            raise UserError(f"--configs: {spec!r}: the batch holds pairs, so it must be even and >= 2")
        return cfg


class StepTimer:
    """Times step variants of the model in ``folder``, one :meth:`row` per variant.

    Variants that share LoRA rank and compilation reuse one ``PopAlignModule`` (checkpointing and
    channels-last are switched off again between them); the optimizer is fresh for every row.

    Args:
        folder: a diffusers folder with ``unet/`` and ``scheduler/``.
        device: where the module, batch and VAE live.
        fused: fused AdamW (else torch's default implementation).
        precision: ``"bf16-mixed"`` (autocast forward) or ``"32"``.
        steps, warmup: timed steps and untimed steps before them (compilation happens in the latter).
        peak_tflops: the peak MFU and HFU are measured against.
        vae: the VAE of original-style variants (``None`` when there are none).
        profile: after the timed steps, profile one more (:func:`~popalign.models.flops.profile_step`)
            into the row's ``profile`` and ``busy``.
    """

    def __init__(
        self,
        folder: Path,
        device: torch.device,
        *,
        fused: bool,
        precision: str,
        steps: int,
        warmup: int,
        peak_tflops: float,
        vae=None,
        profile: bool = False,
    ) -> None:
        self.folder, self.device, self.fused, self.vae = folder, device, fused, vae
        self.precision, self.steps, self.warmup, self.peak_tflops = precision, steps, warmup, peak_tflops
        self.profile = profile
        self.shapes = read_shapes(folder)
        self.pair_flops: dict[int | None, int] = {}  # model FLOPs of one pair, per LoRA rank
        self.key: tuple | None = None
        self.module = None

    def row(self, cfg: StepConfig) -> dict:
        """:meth:`measure` ``cfg``; a failure becomes a row whose ``error`` says why (``"out of memory"`` or
        the exception), so one broken variant does not lose the others."""
        try:
            row = self.measure(cfg)
        except torch.OutOfMemoryError:
            row = {**asdict(cfg), "error": "out of memory"}
        except Exception as err:
            log.error("%s failed:\n%s", cfg.spec, traceback.format_exc())
            row = {**asdict(cfg), "error": f"{type(err).__name__}: {err}"}
        if row["error"]:  # outside `except`: its traceback no longer pins the step's tensors
            self.release()
        return row

    def measure(self, cfg: StepConfig) -> dict:
        """Build, count, warm up and time one variant; returns its result row (fields: benchmarks/README.md)."""
        t0 = time.perf_counter()
        module = self._module(cfg)
        optimizer = module.configure_optimizers()
        key = cfg.lora_rank
        if key not in self.pair_flops:  # model FLOPs: one pair, no recompute, no VAE; every op is per sample
            pair = make_step(module, optimizer, self._batch(2, False), None, self.precision)
            with torch.compiler.set_stance("force_eager"):  # count the eager ops, compiled or not
                self.pair_flops[key] = count_flops(pair)
        if cfg.checkpointing:
            selective_checkpointing(module.policy, cfg.checkpointing)
        if cfg.channels_last:
            to_channels_last(module)
        vae = self.vae if cfg.original else None
        step = make_step(module, optimizer, self._batch(cfg.batch, cfg.original), vae, self.precision)
        with torch.compiler.set_stance("force_eager"):
            counted = count_flops(step)  # what this step really computes: recompute and VAE included
        setup_s = self._since(t0)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(self.warmup):  # compilation happens here
            step()
        warmup_s = self._since(t0)
        syncs = host_sync_sites(step) if cuda else None
        self._sync()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            step()
        elapsed = self._since(t0)  # its sync is the only host sync of the timed loop
        profile = self._profile(step) if self.profile else None
        model = self.pair_flops[key] * cfg.batch // 2
        per_s = self.steps / elapsed
        return {
            **asdict(cfg),
            "samples_per_s": cfg.batch * per_s,
            "step_ms": 1000.0 / per_s,
            "model_tflop": model / 1e12,
            "tflop_per_sample": model / cfg.batch / 1e12,
            "counted_tflop": counted / 1e12,
            "mfu": utilization(model, per_s, self.peak_tflops),
            "hfu": utilization(counted, per_s, self.peak_tflops),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "setup_s": setup_s,
            "warmup_s": warmup_s,
            "host_syncs": None if syncs is None else len(syncs),
            "host_sync_sites": syncs,
            "busy": profile and profile["busy"],
            "profile": profile,
            "error": None,
        }

    def release(self) -> None:
        """Drop the cached module and compiled graphs and free their memory."""
        self.key = self.module = None
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _module(self, cfg: StepConfig):
        # reuse the last module while LoRA rank and compilation match, else build a new one
        from popalign.module import PopAlignModule  # lazy: it imports lightning

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

    def _profile(self, step) -> dict:
        # the profile is extra: its failure is recorded in it and leaves the row's timings standing
        try:
            return profile_step(step, self.device)
        except Exception as err:
            log.error("profiling failed:\n%s", traceback.format_exc())
            return {"busy": None, "error": f"{type(err).__name__}: {err}"}

    def _batch(self, n: int, images: bool) -> dict:
        return make_batch(n, self.shapes, self.device, images)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _since(self, t0: float) -> float:
        # seconds since t0, after the device has finished the work queued meanwhile
        self._sync()
        return time.perf_counter() - t0
