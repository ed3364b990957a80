"""On a CUDA device: the step makes no host syncs, compiled blocks keep the numbers, and `train.py fit`
starts under DDP, Lightning's FSDP and BlockFSDPStrategy on one GPU. Skipped without CUDA (as in CI);
benchmarks/device_check.sh runs them on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from launch import finished_run, fit_tiny

from popalign.models import speed
from popalign.models.flops import count_host_syncs
from popalign.module import PopAlignModule
from popalign.objectives import PopAlignLoss

DEVICE = "cuda"  # a dry run of this file's logic on a CPU sets this to "cpu" (the sync count needs CUDA)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _module(tiny_model: str, **kw) -> PopAlignModule:
    torch.manual_seed(0)
    return PopAlignModule(pretrained_model=tiny_model, objective=PopAlignLoss(beta=50.0), **kw).to(DEVICE)


def _step(module: PopAlignModule, batch: dict, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = module.compute_objective(batch, noise, t).loss
    loss.backward()
    return loss.detach()


def _cuda_inputs(module: PopAlignModule):
    batch = {k: v.to(DEVICE) for k, v in make_batch(pairs=2, groups=2, seed=1).items()}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    noise, t = module.noise_and_timesteps(batch["latents"], generator=g)
    return batch, noise, t


def test_training_step_makes_no_host_syncs(tiny_model):
    # forward, backward, the gradient guard and a fused AdamW step, as a training step runs them
    module = _module(tiny_model)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5, fused=True)
    batch, noise, t = _cuda_inputs(module)

    def step():
        _step(module, batch, noise, t)
        _, proceed = module.guard_gradients(optimizer)
        assert proceed  # a fused optimizer skips on the device, never on the host
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first call: lazy initialisation (optimizer state, kernels) may sync
    assert count_host_syncs(step) == 0


def test_compiled_blocks_keep_loss_and_gradients(tiny_model):
    eager = _module(tiny_model)
    compiled = _module(tiny_model, compile_blocks="default")
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in compiled.policy.modules())
    batch, noise, t = _cuda_inputs(eager)
    losses = [_step(m, batch, noise, t) for m in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)
    for (name, a), b in zip(eager.policy.named_parameters(), compiled.policy.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=5e-2, rtol=5e-2, msg=name)


def test_channels_last_and_selective_checkpointing_keep_loss(tiny_model):
    plain = _module(tiny_model)
    fast = _module(tiny_model, channels_last=True, gradient_checkpointing="save_attention")
    assert fast.policy.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    batch, noise, t = _cuda_inputs(plain)
    losses = [_step(m, batch, noise, t) for m in (plain, fast)]
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)
    assert speed.fused_adamw_available(DEVICE)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "block_fsdp"])
def test_train_py_starts_on_one_gpu(tiny_run, strategy):
    chosen = "fsdp_blocks" if strategy == "block_fsdp" else strategy  # the registered name
    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    trainer = {"accelerator": accelerator, "devices": 1, "precision": "bf16-mixed"}
    proc = fit_tiny(tiny_run, f"gpu_{strategy}", chosen, "bfloat16", 3, **trainer)
    facts, _ = finished_run(proc, tiny_run, f"gpu_{strategy}")
    assert facts["global_step"] == 3 and facts["world_size"] == 1
    assert torch.isfinite(torch.tensor(facts["grad_norm"]))
    assert (facts["fsdp_units"] > 1) == (strategy == "block_fsdp")
