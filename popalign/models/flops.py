"""Counting what a training step costs: FLOPs, utilization against a peak, host syncs, a profile.

FLOPs are torch's own count (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions,
attention), so they follow the ops a step really dispatches. The utilization helper turns a FLOP count
per step and a step rate into MFU (with *model* FLOPs) or HFU (with the FLOPs actually computed,
recompute included).
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten
_TORCH = os.path.dirname(torch.__file__) + os.sep
# ops whose result the host needs before it can go on (a tensor's value, a data-dependent size)
_READS = frozenset(
    getattr(_aten, name)
    for name in (
        "_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique", "_unique2",
        "unique_dim", "unique_consecutive", "repeat_interleave",
    )
)  # fmt: skip
# indexing reads the size of a boolean mask's selection
_MASKABLE = frozenset((_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_))


def _reads_host(func, args: tuple, kwargs: dict) -> bool:
    packet = func.overloadpacket
    if packet is _aten.repeat_interleave:  # knows its size from an int of repeats or an output_size
        return func._overloadname != "self_int" and kwargs.get("output_size") is None
    if packet in _READS:
        return True
    if packet in _MASKABLE:
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


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


@contextmanager
def cuda_sync_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """While active, torch's CUDA sync debug mode reports each synchronizing call as a warning, caught
    into the list this yields (with any other warning: :func:`sync_sites` picks the syncs).

    CUDA only: synchronizes the device first, and restores the default debug mode afterwards.
    """
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def sync_sites(caught: list[warnings.WarningMessage]) -> list[str]:
    """The ``file:line`` of each synchronizing call among warnings :func:`cuda_sync_warnings` caught."""
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def host_sync_sites(fn: Callable[[], object]) -> list[str]:
    """Where one call of ``fn`` makes synchronizing CUDA calls: one ``file:line`` per call, the Python
    line that made it (empty when there is none). CUDA only (:func:`cuda_sync_warnings`)."""
    with cuda_sync_warnings() as caught:
        fn()
    return sync_sites(caught)


class HostReads(TorchDispatchMode):
    """While active (``with HostReads() as watched:``), record every op that hands a tensor's value
    to the host: ``.item()``, ``float(t)``, ``bool(t)`` (Python branching on a tensor), ``torch.equal``,
    and the ops whose output size depends on the values (``nonzero``, boolean-mask indexing and
    assignment, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``). On a
    GPU each of these waits for the device to finish the work queued before it; this finds them on
    any device, the CPU included, so a CPU test can keep them out of a training step. On a CPU every
    tensor is a host tensor, so reads of values that stay on the host on a GPU too count as well
    (torch's non-fused Adam keeps its step counts there and reads each one): there the count is an
    upper bound. What it cannot see there: copies (``.cpu()``, ``.tolist()``, ``.numpy()`` of a CPU
    tensor dispatch nothing) and the device-only syncs (the allocator, a copy from pageable host
    memory); :func:`host_sync_sites` sees those on CUDA.

    ``reads`` holds one ``(op, site)`` per read, in order: ``site`` is the ``file:line`` of the
    innermost Python frame outside torch itself. Only the thread that entered the mode is watched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's
        kwargs = kwargs or {}
        if _reads_host(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(_TORCH)]
            site = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.reads.append((str(func.overloadpacket.__name__), site))
        return func(*args, **kwargs)


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
