"""Counting what a training step costs: FLOPs, utilization against a peak, host syncs, a profile.

FLOPs are torch's own count (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions,
attention), so they follow the ops a step really dispatches. The utilization helper turns a FLOP count
per step and a step rate into MFU (with *model* FLOPs) or HFU (with the FLOPs actually computed,
recompute included).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as torch's ``FlopCounterMode`` counts them (matmuls, convs, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def utilization(flops_per_step: float, steps_per_s: float, peak_tflops: float) -> float:
    """Fraction of the peak reached: ``flops_per_step x steps_per_s / (peak_tflops x 1e12)``.

    With model FLOPs this is MFU, with the FLOPs the step really computes it is HFU.
    """
    return flops_per_step * steps_per_s / (peak_tflops * 1e12)


def host_sync_sites(fn: Callable[[], object]) -> list[str]:
    """Where one call of ``fn`` makes synchronizing CUDA calls (torch's sync debug mode, as warnings):
    one ``file:line`` per call, the Python line that made it (empty when there is none).

    CUDA only: synchronizes the device first, and restores the default debug mode afterwards.
    """
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def profile_step(fn: Callable[[], object], device: torch.device, top: int = 15) -> dict:
    """One call of ``fn`` under ``torch.profiler``: is the step waiting for the device or for the host?

    Returns ``wall_ms`` (the call, device work included), ``kernel_ms`` (the sum of the device's kernel
    durations; ``None`` off CUDA), ``busy`` = ``kernel_ms / wall_ms`` (near 1: the device is the
    bottleneck; well below: it sits idle while the host issues work, which CUDA graphs or fewer,
    fused kernels remove), ``launches`` (kernels run) and ``top``: the ops with the most self time
    (device time on CUDA, host time elsewhere) as ``[name, ms, calls]``. The profiler's own overhead
    makes ``wall_ms`` somewhat longer than an unprofiled step.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall_ms = 1000 * (time.perf_counter() - t0)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000 if cuda else None
    ops = [k for k in prof.key_averages() if k.device_type == DeviceType.CPU]
    self_us = (lambda k: k.self_device_time_total) if cuda else (lambda k: k.self_cpu_time_total)
    ranked = sorted(ops, key=self_us, reverse=True)[:top]
    return {
        "wall_ms": wall_ms,
        "kernel_ms": kernel_ms,
        "busy": None if kernel_ms is None else kernel_ms / wall_ms,
        "launches": len(kernels) if cuda else None,
        "top": [[k.key, self_us(k) / 1000, k.count] for k in ranked],
    }
