"""Switchable speed features for the training step: regional compilation, channels-last memory
layout, fused AdamW detection and selective activation checkpointing.

Each feature is one function that changes a module in place (or answers a question) and leaves the
numbers the step computes unchanged up to floating-point rounding; ``tests/test_speed.py`` checks
that on the tiny UNet. Where a feature cannot run on the current machine the function is a no-op
and logs why, so a YAML switch never breaks a CPU run.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

# the blocks SDXL repeats: 70 BasicTransformerBlocks (1, 2, 10 per attention layer) and 17 resnets
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _cpu_compiler_missing(backend: str, model: nn.Module) -> bool:
    # inductor turns CPU graphs into C++; without a compiler it fails at the first call, not here
    return backend == "inductor" and _device_of(model).type == "cpu" and shutil.which("g++") is None


def compile_repeated_blocks(
    unet: nn.Module,
    mode: str | None = "default",
    dynamic: bool = False,
    blocks: Sequence[str] | None = None,
    backend: str = "inductor",
    recompile_limit: int = 64,
) -> int:
    """Regional compilation: ``torch.compile`` every repeated block of ``unet`` in place.

    Compiling blocks one by one instead of the whole UNet keeps compile time in minutes: blocks of
    one shape share one compiled graph. With ``blocks=None`` a model that declares diffusers'
    ``_repeated_blocks`` (SDXL's ``UNet2DConditionModel`` names ``BasicTransformerBlock``) is
    compiled by its own ``compile_repeated_blocks``, and any other model gets :data:`REPEATED_BLOCKS`.
    Naming ``blocks`` (e.g. ``REPEATED_BLOCKS``, to fuse the resnets' GroupNorm + SiLU as well)
    compiles exactly those classes.

    Args:
        unet: the model to compile in place (its outputs stay the same up to rounding).
        mode: ``torch.compile`` mode (``"default"``, ``"max-autotune-no-cudagraphs"``, ...).
        dynamic: compile for dynamic shapes (``False``: one graph per distinct block shape).
        blocks: class names of the modules to compile; ``None``: as described above.
        backend: ``torch.compile`` backend; ``"eager"`` runs the capture only (cheap, for tests).
        recompile_limit: raise dynamo's per-function recompile limit to at least this; SDXL's resnets
            come in ~14 shapes and would otherwise silently fall back to eager after 8.

    Returns:
        The number of compiled modules (0 when compilation is unavailable; the reason is logged).
    """
    if _cpu_compiler_missing(backend, unet):
        log.warning("compile_repeated_blocks: no C++ compiler (g++) for inductor on CPU; not compiling")
        return 0
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), recompile_limit))
            break
    kwargs = {"mode": mode, "dynamic": dynamic, "backend": backend}
    declared = getattr(unet, "_repeated_blocks", None)
    if blocks is None and declared and hasattr(unet, "compile_repeated_blocks"):
        unet.compile_repeated_blocks(**kwargs)
        return sum(type(m).__name__ in declared for m in unet.modules())
    names = tuple(blocks) if blocks is not None else REPEATED_BLOCKS
    count = 0
    for module in unet.modules():
        if type(module).__name__ in names:
            module.compile(**kwargs)
            count += 1
    if count == 0:
        log.warning("compile_repeated_blocks: %s has no %s; nothing compiled", type(unet).__name__, names)
    return count


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D weight of ``model`` in channels-last (NHWC) layout, in place; returns ``model``.

    Convolutions whose weight is channels-last produce channels-last outputs, which cuDNN runs
    without the NCHW<->NHWC transposes its tensor-core kernels otherwise need. Values are unchanged.
    Undo with ``model.to(memory_format=torch.contiguous_format)``.
    """
    return model.to(memory_format=torch.channels_last)


def fused_adamw_available(device: str | torch.device) -> bool:
    """Whether ``torch.optim.AdamW(..., fused=True)`` accepts float32 parameters on ``device``.

    The fused kernel updates all parameters in a few launches instead of a dozen elementwise ops per
    tensor; torch supports it on CUDA (and on CPU in recent releases). Answered by constructing one
    on a one-element parameter and stepping it (torch checks the device at the first step), so it
    follows whatever the installed torch supports.
    """
    try:
        param = nn.Parameter(torch.zeros(1, device=device))
        param.grad = torch.zeros_like(param)
        torch.optim.AdamW([param], fused=True).step()
    except (RuntimeError, ValueError) as err:
        log.info("fused AdamW unavailable on %s: %s", device, err)
        return False
    return True


def _ops(names: Sequence[str]) -> list:
    # look ops up by name: which SDPA kernels exist depends on the torch build
    return [getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)]


_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "convolution")
_ATTENTION = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)

CHECKPOINT_POLICIES = {
    # recompute only the cheap ops (norms, activations, elementwise); keep every matmul/conv/attention
    "save_matmuls": _MATMULS + _ATTENTION,
    # keep attention outputs (the costliest to recompute at 4096 tokens), recompute everything else
    "save_attention": _ATTENTION,
}


def selective_checkpointing(
    unet: nn.Module, policy: str | Sequence | Callable | None = "save_matmuls"
) -> None:
    """Activation checkpointing of ``unet``'s blocks that saves the outputs of chosen ops.

    diffusers checkpoints each resnet and transformer block (``enable_gradient_checkpointing``): its
    forward keeps only the block inputs and reruns the block in backward. Selective checkpointing
    (``torch.utils.checkpoint.create_selective_checkpoint_contexts``) additionally keeps the outputs
    of the ops named by ``policy``, so backward recomputes only the rest: memory between none and
    full checkpointing, recompute cost far below full checkpointing's extra forward.

    Args:
        unet: a diffusers model with gradient-checkpointing support.
        policy: ``None`` or ``"full"`` (plain checkpointing, everything recomputed), a name in
            :data:`CHECKPOINT_POLICIES`, a list of aten ops to save, or a policy function
            ``(ctx, op, *args, **kwargs) -> CheckpointPolicy`` as torch defines it.

    Undo with ``unet.disable_gradient_checkpointing()``; gradients are the same either way.
    """
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if policy is None or policy == "full":
        unet.enable_gradient_checkpointing()
        return
    if isinstance(policy, str):
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(
                f"unknown checkpoint policy {policy!r}; choose 'full' or one of {sorted(CHECKPOINT_POLICIES)}"
            )
        policy = _ops(CHECKPOINT_POLICIES[policy])
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)

    def checkpoint_block(block: Callable, *args):
        return checkpoint(block, *args, use_reentrant=False, context_fn=context_fn)

    unet.enable_gradient_checkpointing(checkpoint_block)
