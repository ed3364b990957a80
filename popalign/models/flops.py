"""Counting what a training step costs: FLOPs, utilization against a peak, host syncs.

FLOPs are torch's own count (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions,
attention), so they follow the ops a step really dispatches. The utilization helper turns a FLOP count
per step and a step rate into MFU (with *model* FLOPs) or HFU (with the FLOPs actually computed,
recompute included).
"""

from __future__ import annotations

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
