"""Sharded training of the SDXL UNet: an FSDP strategy that knows the UNet's blocks.

Lightning's plain ``strategy: fsdp`` wraps the whole LightningModule as *one* FSDP unit, so every
forward gathers all 2.6 B policy parameters (and the reference's) at once and sharding saves memory
only between steps. :class:`BlockFSDPStrategy` makes each repeated block (SDXL's 70 transformer
blocks and 17 resnets, in the policy and in the frozen reference) and each UNet a unit of its own:
a block's weights are gathered just before it runs (the next one prefetched) and freed after, so a
rank keeps ``1/world`` of the weights, gradients and optimizer state between uses. (That is the
design; the memory it saves on SDXL has not been measured here, see benchmarks/device_check.sh.)

Choose it by name, ``--trainer.strategy fsdp_blocks`` (registered when the training CLI starts), or
in the trainer section of a config::

    trainer:
      strategy:
        class_path: popalign.distributed.BlockFSDPStrategy
        init_args:
          sharding_strategy: FULL_SHARD     # or SHARD_GRAD_OP (see docs/scaling.md)

Every other argument is Lightning's ``FSDPStrategy`` (``state_dict_type``, ``cpu_offload``, ...).
Gradient checkpointing stays the module's switch (``model.gradient_checkpointing``), not the strategy's.

Also here: checkpoint folders staged and put in place whole (:func:`save_staged`, for FSDP's sharded
saves and every DeepSpeed save), and the set-up checks of what a strategy cannot run (one FSDP unit
of mixed dtypes, whole weights that are in pieces, an optimizer DeepSpeed's offload refuses).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from popalign import files
from popalign.errors import UserError
from popalign.models.speed import REPEATED_BLOCKS

#: the UNet class itself: wrapping it keeps the policy's and the reference's leftovers (embeddings,
#: conv_in/out, norms) in separate units, so no unit mixes float32 and bfloat16 weights
UNET_CLASSES = ("UNet2DConditionModel",)

#: what FSDP adds to the names of the modules it wraps (never part of checkpoint keys)
FSDP_PREFIX = "_fsdp_wrapped_module."


def save_staged(strategy: Any, write: Callable[[Path], None], filepath: Any) -> None:
    """Write a checkpoint folder with every rank of ``strategy`` (``write(folder)``) into a hidden
    ``.NAME.tmp-<pid>`` folder beside ``filepath``, and have rank 0 put it in place once all have
    written (:func:`popalign.files.replace_folder`): a save stopped halfway leaves the previous
    checkpoint folder, not a partial one that ``--ckpt_path last`` would pick. Staging folders of
    killed runs go first (:func:`popalign.files.remove_abandoned`)."""
    path = Path(strategy.broadcast(str(filepath)))
    pid = strategy.broadcast(os.getpid())  # rank 0's: the staging folder is one for all ranks
    staging = files.stage_folder(path, pid, clean=strategy.global_rank == 0)
    try:
        write(staging)
        strategy.barrier("popalign: checkpoint folder written")
        if strategy.global_rank == 0:
            files.replace_folder(staging, path)
    except BaseException:
        if strategy.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    strategy.barrier("popalign: checkpoint folder in place")


class StagedFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, with a sharded checkpoint folder put in place only once every rank wrote it.

    Lightning's own writes the shards into the target folder itself: a save stopped halfway left a
    folder of old and new shards that ``--ckpt_path last`` would load without a word.
    It also refuses, in one line, to resume a checkpoint of an optimizer that keeps no state (SGD
    without momentum): Lightning's and torch's FSDP loaders fail on it deep inside.
    :func:`popalign.checkpointing.prepare_checkpointing` gives ``strategy: fsdp`` this class;
    :class:`BlockFSDPStrategy` is one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """``state_dict_type: full``: Lightning's (rank 0 writes one file through the trainer's writer,
        :class:`popalign.checkpointing.WholeFileCheckpointIO` under ``train.py``: whole or absent).

        ``sharded``: every rank writes its shard into a staging folder put in place once all have
        written (:func:`save_staged`)."""
        if self._state_dict_type != "sharded":
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        save_staged(
            self, partial(super().save_checkpoint, checkpoint, storage_options=storage_options), filepath
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's, after :func:`stateless_optimizers` found none when fitting (where the optimizer
        state is loaded)."""
        from lightning.pytorch.trainer.states import TrainerFn

        path = Path(self.broadcast(checkpoint_path))
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and stateless_optimizers(path):
            raise UserError(
                f"{path}: its optimizer state is empty (an optimizer that keeps none, like SGD without "
                "momentum), and FSDP cannot resume such a checkpoint (Lightning's and torch's loaders fail "
                "on it); train with an optimizer that keeps state (the configs' AdamW, or SGD with momentum)"
            )
        return super().load_checkpoint(path, weights_only)


class StagedDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed, with each checkpoint folder put in place only once every rank wrote it
    (:func:`save_staged`). DeepSpeed writes every rank's partition, then the ``latest`` tag, into the
    target itself: a save stopped halfway left new model states beside old optimizer partitions, in
    a folder ``--ckpt_path last`` would load. :func:`popalign.checkpointing.prepare_checkpointing`
    gives Lightning's DeepSpeed strategies this class."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        save_staged(
            self, partial(super().save_checkpoint, checkpoint, storage_options=storage_options), filepath
        )


class BlockFSDPStrategy(StagedFSDPStrategy):
    """Lightning's FSDP with one FSDP unit per repeated UNet block and per UNet.

    Args:
        wrap_blocks: class names of the modules that become FSDP units (default: SDXL's
            ``BasicTransformerBlock`` and ``ResnetBlock2D``), in addition to the UNets themselves.
        **kwargs: passed to :class:`lightning.pytorch.strategies.FSDPStrategy`; an explicit
            ``auto_wrap_policy`` replaces the block policy.
    """

    def __init__(self, wrap_blocks: Sequence[str] = REPEATED_BLOCKS, **kwargs: Any) -> None:
        self.wrap_blocks = tuple(wrap_blocks) + UNET_CLASSES
        if kwargs.get("auto_wrap_policy") is None:
            kwargs["auto_wrap_policy"] = block_wrap_policy(self.wrap_blocks)
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if self.root_device.type == "cpu" and not wrapped:
            raise UserError(
                f"{STRATEGY_NAME} (FSDP) shards across GPUs and PyTorch's FSDP refuses CPU devices; "
                "use --trainer.accelerator gpu, or --trainer.strategy ddp on CPUs"
            )
        return super()._setup_model(model)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume from a checkpoint folder (``state_dict_type: sharded``) or file (``full``).

        A full checkpoint file leaves out the frozen weights (the module's ``frozen_keys``), and
        Lightning's FSDP loads it into the sharded model strictly, before the module's
        ``on_load_checkpoint`` could fill them in. So its keys are checked here first (every other
        weight present, nothing unknown; one line naming what is not) and it is loaded non-strictly:
        the frozen weights keep the values just loaded from the base model.
        """
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        frozen = getattr(module, "frozen_keys", None)
        if not path.is_file() or frozen is None:
            return super().load_checkpoint(path, weights_only)
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=True).get("state_dict", {})
        check_checkpoint_keys(path, set(saved), checkpoint_keys(module), frozen())
        strict = module.strict_loading
        module.strict_loading = False
        try:
            return super().load_checkpoint(path, weights_only)
        finally:
            module.strict_loading = strict


def stateless_optimizers(path: Path) -> list[int]:
    """The optimizers (by index) whose state is empty in a checkpoint file or sharded folder (none
    found where there is neither: Lightning says what is wrong with the path)."""
    if (path / ".metadata").is_file():  # torch.distributed.checkpoint's index of a sharded folder
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(path).read_metadata().state_dict_metadata
        names = {k.split(".", 1)[0] for k in keys if k.startswith("optimizer_")}
        stateless = {n for n in names if not any(k.startswith(f"{n}.state.") for k in keys)}
        return sorted(int(n.removeprefix("optimizer_")) for n in stateless)
    if not path.is_file():
        return []
    states = torch.load(path, mmap=True, map_location="cpu", weights_only=True).get("optimizer_states") or []
    return [i for i, state in enumerate(states) if not state.get("state")]


def checkpoint_keys(module: nn.Module) -> set[str]:
    """The keys of ``module``'s full state dict (parameters and persistent buffers), FSDP wrapping
    removed from the names, read from the names alone: no weights are gathered."""
    keys = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        keys |= {dot + n for n, _ in sub.named_parameters(recurse=False)}
        keys |= {
            dot + n for n, _ in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set
        }
    return {k.replace(FSDP_PREFIX, "") for k in keys if "_flat_param" not in k}


def check_checkpoint_keys(path: Path, saved: Iterable[str], expected: set[str], frozen: set[str]) -> None:
    """Refuse a checkpoint that misses a weight other than the frozen ones, or holds unknown ones."""
    saved = set(saved)
    missing, unknown = sorted(expected - frozen - saved), sorted(saved - expected)
    for what, keys in (("lacks", missing), ("holds unknown weights", unknown)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise UserError(f"{path}: {what} {', '.join(keys[:3])}{more} (a checkpoint of another model?)")


STRATEGY_NAME = "fsdp_blocks"


def register_strategy() -> None:
    """Make ``strategy: fsdp_blocks`` mean :class:`BlockFSDPStrategy` (default arguments)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(
            STRATEGY_NAME, BlockFSDPStrategy, description="FSDP with one unit per UNet block (popalign)"
        )


def block_wrap_policy(class_names: Sequence[str]):
    """An FSDP auto-wrap policy that makes every module whose class name is in ``class_names`` a unit."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    names = frozenset(class_names)

    def is_unit(module: nn.Module) -> bool:
        return type(module).__name__ in names

    return CustomPolicy(is_unit)


def check_one_unit_dtypes(trainer: Any, module: nn.Module) -> None:
    """Refuse, with what to do instead, a plain FSDP strategy that would flatten mixed dtypes.

    Lightning's ``fsdp`` without an ``auto_wrap_policy`` makes the whole module one FSDP unit, and
    one unit flattens its weights into one tensor of one dtype. Under a mixed precision the float32
    policy and the bfloat16 reference (the SDXL configs' ``reference_dtype``) keep their dtypes, so
    FSDP would stop with a bare ``ValueError`` while wrapping. (``32-true`` and the other ``-true``
    precisions cast the whole module to one dtype first, reference included.)
    """
    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy) or strategy.kwargs.get("auto_wrap_policy") is not None:
        return
    if "true" in str(trainer.precision):
        return
    dtypes = sorted(
        {str(p.dtype).removeprefix("torch.") for p in module.parameters() if p.is_floating_point()}
    )
    if len(dtypes) > 1:
        raise UserError(
            f"strategy {type(strategy).__name__} without an auto_wrap_policy wraps the whole module as one "
            f"FSDP unit, and one unit holds one dtype; these weights are {' and '.join(dtypes)} (the frozen "
            f"reference is kept in reference_dtype). Use --trainer.strategy {STRATEGY_NAME} (a unit per UNet "
            "block, each of one dtype), or --model.init_args.reference_dtype float32"
        )


def zero_stage_3(trainer: Any) -> bool:
    """Whether ``trainer`` runs DeepSpeed ZeRO-3 (weights partitioned, in any number of processes)."""
    return isinstance(trainer.strategy, DeepSpeedStrategy) and bool(trainer.strategy.zero_stage_3)


def shards_parameters(trainer: Any) -> bool:
    """Whether ``trainer`` splits the weights across processes: FSDP or DeepSpeed ZeRO-3 over > 1
    process (ZeRO-1 and 2 split the gradients and optimizer state, and every rank holds whole weights).

    Features that need every rank to use whole weights on its own outside the step (sampling the
    policy for validation) check this at set-up and refuse with a clear message.
    """
    return trainer.world_size > 1 and (isinstance(trainer.strategy, FSDPStrategy) or zero_stage_3(trainer))


def partitions_weights(trainer: Any) -> bool:
    """Whether the weights are pieces between forwards: :func:`shards_parameters`, or DeepSpeed ZeRO-3
    in any number of processes (its parameters are empty placeholders outside the gathers of a forward).

    The EMA copy, which reads every weight after each optimizer step, checks this.
    """
    return zero_stage_3(trainer) or shards_parameters(trainer)


def check_offloaded_optimizer(strategy: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse in one line the optimizer DeepSpeed's optimizer offload would refuse with a traceback.

    Offloading (``offload_optimizer`` to ``cpu`` or ``nvme``, as in Lightning's
    ``deepspeed_stage_2_offload``) steps the optimizer on the CPU, and DeepSpeed takes only its own CPU
    optimizers there unless its config sets ``zero_force_ds_cpu_optimizer: false``.
    """
    if not isinstance(strategy, DeepSpeedStrategy):
        return
    device = ((strategy.config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    if device not in ("cpu", "nvme") or strategy.config.get("zero_force_ds_cpu_optimizer") is False:
        return
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.lion import DeepSpeedCPULion

    if not isinstance(optimizer, (DeepSpeedCPUAdam, DeepSpeedCPULion)):
        raise UserError(
            f"DeepSpeed's optimizer offload (to {device}) steps the optimizer on the CPU and takes only its "
            f"own CPU optimizers, not {type(optimizer).__name__}: set --model.init_args.optimizer "
            "deepspeed.ops.adam.DeepSpeedCPUAdam (AdamW on the CPU; the config's lr and weight_decay carry "
            "over), or zero_force_ds_cpu_optimizer: false in the DeepSpeed config to keep this one"
        )
