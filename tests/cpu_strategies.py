"""Pieces the multi-process strategy tests load into `train.py fit` (via PYTHONPATH) on CPU processes."""

from __future__ import annotations

import json
import os
import signal
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp
from safetensors.torch import save_file

from popalign.distributed import FSDP_PREFIX, BlockFSDPStrategy, StagedDeepSpeedStrategy, StagedFSDPStrategy


class _WrapOnCPU:
    """FSDP on gloo CPU processes: Lightning hands FSDP ``device_id=None`` on CPU, which FSDP refuses
    without an accelerator; this wraps the module itself with ``device_id=cpu`` and the strategy's
    arguments, then lets Lightning finish."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            model,
            device_id=torch.device("cpu"),
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            **self.kwargs,
        )
        return super()._setup_model(model)


def _full_state_dict_context(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    """Lightning's full-state-dict context without ``offload_to_cpu``: on CPU processes the gathered
    weights already live on the CPU, and FSDP's offload then hands back tensors whose storage it frees
    (the process dies with SIGSEGV). Everything else (rank-0-only gathering, the optimizer state) is
    Lightning's."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


lightning_fsdp._get_full_state_dict_context = _full_state_dict_context


class CPUBlockFSDPStrategy(_WrapOnCPU, BlockFSDPStrategy):
    """:class:`BlockFSDPStrategy` on CPU processes."""


class CPUFSDPStrategy(_WrapOnCPU, StagedFSDPStrategy):
    """Lightning's plain FSDP (one unit for the whole module) on CPU processes, as ``train.py`` runs
    ``strategy: fsdp`` (:func:`popalign.checkpointing.prepare_checkpointing`)."""


class CPUDeepSpeedStrategy(StagedDeepSpeedStrategy):
    """:class:`StagedDeepSpeedStrategy` (what ``train.py`` makes of Lightning's DeepSpeed) on gloo CPU
    processes (DeepSpeed's CPU accelerator): Lightning refuses any accelerator but CUDA and checks
    CUDA device indices, and DeepSpeed's engine wants a device index, which ``cpu`` lacks; the rest
    (ZeRO, its clipping, its checkpoints) is DeepSpeed's."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()  # DeepSpeedStrategy's, less its CUDA device-index check
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)


class DumpPolicy(L.Callback):
    """At the end of fit, rank 0 writes the whole policy weights (``OUT.safetensors``), the frozen
    reference's when there is one (``OUT.reference.safetensors``) and a few facts about the run."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = trainer.strategy.model
        if isinstance(model, FullyShardedDataParallel):
            gather = FullyShardedDataParallel.summon_full_params(model, writeback=False)
        elif isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
            from deepspeed.runtime.zero import GatheredParameters

            gather = GatheredParameters(list(pl_module.parameters()))  # ZeRO-3 keeps empty placeholders
        else:
            gather = nullcontext()
        with gather:  # a collective: every rank enters
            if not trainer.is_global_zero:
                return
            state = {
                name.replace(FSDP_PREFIX, ""): p.detach().float().clone()
                for name, p in pl_module.policy.named_parameters()
            }
            reference = pl_module.reference
            if reference is not None:
                frozen = {
                    n.replace(FSDP_PREFIX, ""): p.detach().float().clone()
                    for n, p in reference.named_parameters()
                }
                save_file(frozen, str(self.out.with_suffix(".reference.safetensors")))
        save_file(state, str(self.out.with_suffix(".safetensors")))
        facts = {
            "global_step": trainer.global_step,
            "fsdp_units": sum(isinstance(m, FullyShardedDataParallel) for m in model.modules()),
            "grad_norm": float(trainer.callback_metrics["train/grad_norm"]),
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "world_size": trainer.world_size,
            "adam_steps": sorted(
                {int(s["step"]) for opt in trainer.optimizers for s in opt.state.values() if "step" in s}
            ),
        }
        self.out.with_suffix(".json").write_text(json.dumps(facts))


class SigtermAt(L.Callback):
    """Sends SIGTERM as training step ``step + 1`` starts on rank ``rank`` (or, ``epoch_end``, as the
    epoch that ends with step ``step`` ends there, after its last batch): to that process alone, or to
    its whole process group (every rank and DataLoader worker, as a scheduler's preemption does)."""

    def __init__(self, step: int, rank: int, group: bool = False, epoch_end: bool = False) -> None:
        self.step, self.rank, self.group, self.epoch_end = step, rank, group, epoch_end

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if not self.epoch_end:
            self._send(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, *args) -> None:
        if self.epoch_end:
            self._send(trainer)

    def _send(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if self.group:
                os.killpg(os.getpgid(0), signal.SIGTERM)
            else:
                os.kill(os.getpid(), signal.SIGTERM)


class CutDeepSpeedSave(L.Callback):
    """Every rank's DeepSpeed save of ``last.ckpt`` stops after the model states, before the optimizer
    partitions and the ``latest`` tag: a save cut short (a SIGKILL, a full disk)."""

    def on_train_start(self, trainer: L.Trainer, *args) -> None:
        engine = trainer.strategy.deepspeed_engine
        write_partitions = engine._save_zero_checkpoint

        def cut(save_dir: str, tag: str) -> None:
            if "last.ckpt" in Path(save_dir).name:  # the folder, or popalign's staging folder for it
                raise RuntimeError(f"save of {save_dir} cut short")
            write_partitions(save_dir, tag)

        engine._save_zero_checkpoint = cut
