"""On a CUDA device: the step makes no host syncs, nor does `train.py fit` on steps that neither log
nor checkpoint; the profile reads its kernels; compiled blocks keep the numbers; `train.py fit`
starts under DDP, Lightning's FSDP and BlockFSDPStrategy on one GPU, and BlockFSDPStrategy's full
checkpoint resumes. Skipped without CUDA (as in CI); benchmarks/device_check.sh runs them on a GPU
machine."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import make_batch
from launch import finished_run, fit_tiny
from test_host_reads import LOG_EVERY, QUIET_STEPS, fit_watched

from popalign.models import speed
from popalign.models.flops import cuda_sync_warnings, host_sync_sites, profile_step, sync_sites
from popalign.module import PopAlignModule
from popalign.objectives import PopAlignLoss

# POPALIGN_TEST_DEVICE=cpu dry-runs this file's logic on a CPU (the sync count alone needs CUDA)
DEVICE = os.environ.get("POPALIGN_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _module(tiny_model: str, **kw) -> PopAlignModule:
    torch.manual_seed(0)
    return PopAlignModule(pretrained_model=tiny_model, objective=PopAlignLoss(beta=50.0), **kw).to(DEVICE)


def _moved_module(tiny_model: str, **kw) -> PopAlignModule:
    """A module whose policy is moved off its reference by the same seeded noise every time.

    With policy == reference, g = ref_err - policy_err = 0 and the loss is log 2 whatever the UNets
    compute; a speed switch that changed the UNet's numbers would go unseen."""
    module = _module(tiny_model, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return module


def _step(
    module: PopAlignModule, batch: dict, noise: torch.Tensor, t: torch.Tensor, bf16: bool = True
) -> torch.Tensor:
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        loss = module.compute_objective(batch, noise, t).loss
    loss.backward()
    return loss.detach()


def _gradient(module: PopAlignModule) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in module.policy.parameters() if p.grad is not None])


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_same_numbers(tiny_model: str, **switches) -> PopAlignModule:
    """Loss and policy gradient of a bf16-autocast step with ``switches`` match the plain module's.

    Tolerances come from bf16 rounding itself: the plain module's bf16 step against its own step
    without autocast gives the rounding error e of one bf16 step (relative to the whole gradient
    vector; for the loss, the absolute difference). Two bf16 computations of the same numbers that
    round in different places (fused kernels, another memory layout, recomputation) are each about
    e from the unrounded result, so at most about 2e apart; 3e leaves room. On a CPU e was 0.025 for
    the gradient and 2e-3 for the loss (beta = 50 amplifies the bf16 reference's rounding), while
    conv weights scaled by 1.5 move the gradient by 1.06 and the loss by 0.57."""
    exact, plain, fast = (
        _moved_module(tiny_model),
        _moved_module(tiny_model),
        _moved_module(tiny_model, **switches),
    )
    batch, noise, t = _cuda_inputs(plain)
    loss_exact = _step(exact, batch, noise, t, bf16=False)
    loss_plain, loss_fast = _step(plain, batch, noise, t), _step(fast, batch, noise, t)
    assert abs(loss_exact.item() - math.log(2)) > 0.05  # the policy really is off the reference
    rounding = _relative_error(_gradient(plain), _gradient(exact))
    assert 0 < rounding < 0.1  # bf16 rounded something, and only that
    error = _relative_error(_gradient(fast), _gradient(plain))
    assert error <= 3 * rounding, f"gradient relative error {error:.3g} > 3 x bf16 rounding {rounding:.3g}"
    loss_rounding = max(abs(loss_plain - loss_exact).item(), 2**-8 * loss_exact.item())
    assert abs(loss_fast - loss_plain).item() <= 3 * loss_rounding, (loss_fast, loss_plain, loss_exact)
    return fast


def _cuda_inputs(module: PopAlignModule):
    batch = {k: v.to(DEVICE) for k, v in make_batch(pairs=2, groups=2, seed=1).items()}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    noise, t = module.noise_and_timesteps(batch["latents"], generator=g)
    return batch, noise, t


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs are a CUDA notion")
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
    assert host_sync_sites(step) == []  # on failure: the file:line of each synchronizing call


@pytest.mark.skipif(
    DEVICE != "cuda", reason="host syncs are a CUDA notion (on a CPU: tests/test_host_reads.py)"
)
def test_train_py_syncs_only_on_steps_that_log_or_checkpoint(tmp_path, monkeypatch):
    # the CPU test finds reads back; this also sees what only a GPU has (copies to and from the
    # device, the allocator): the loop, with bf16 autocast, fused AdamW, clipping, warm-up and an EMA
    gpu = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"]
    caught = fit_watched(tmp_path, monkeypatch, cuda_sync_warnings, gpu)
    syncs = {step: sync_sites(found) for step, found in caught.items()}
    assert {k: syncs[k] for k in QUIET_STEPS} == {k: [] for k in QUIET_STEPS}  # on failure: the sites
    assert syncs[LOG_EVERY]  # the watch sees this loop: a logging step reads its metrics back


@pytest.mark.skipif(
    DEVICE != "cuda", reason="kernel times are a CUDA notion (the CPU path: tests/test_benchmark.py)"
)
def test_profile_reads_the_kernels_of_a_step(tiny_model):
    module = _module(tiny_model)
    batch, noise, t = _cuda_inputs(module)
    _step(module, batch, noise, t)  # first call: lazy initialisation outside the profile
    profile = profile_step(lambda: _step(module, batch, noise, t), torch.device(DEVICE))
    assert profile["launches"] > 100 and 0 < profile["kernel_ms"]
    # one stream: kernels run one after another inside the step (the profiler's clocks may differ a little)
    assert 0 < profile["busy"] <= 1.05, profile
    assert profile["top"] and all(ms >= 0 and calls >= 1 for _, ms, calls in profile["top"])
    assert any("mm" in name or "conv" in name for name, _, _ in profile["top"]), profile["top"]


def test_compiled_blocks_keep_loss_and_gradients(tiny_model):
    compiled = _assert_same_numbers(tiny_model, compile_blocks="default")
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in compiled.policy.modules())


def test_channels_last_and_selective_checkpointing_keep_loss_and_gradients(tiny_model):
    fast = _assert_same_numbers(tiny_model, channels_last=True, gradient_checkpointing="save_attention")
    assert fast.policy.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert speed.fused_adamw_available(DEVICE)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "block_fsdp", "deepspeed", "deepspeed3"])
def test_train_py_starts_on_one_gpu(tiny_run, strategy):
    if DEVICE != "cuda" and strategy != "ddp":
        pytest.skip(
            "PyTorch's FSDP and Lightning's DeepSpeed refuse CPU devices: tests/test_strategies.py and "
            "tests/test_deepspeed.py run them CPU-wrapped"
        )
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    # the registered names
    names = {"block_fsdp": "fsdp_blocks", "deepspeed": "deepspeed_stage_2", "deepspeed3": "deepspeed_stage_3"}
    chosen = names.get(strategy, strategy)
    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    trainer = {"accelerator": accelerator, "devices": 1, "precision": "bf16-mixed"}
    # plain fsdp's one unit holds one dtype: a bfloat16 reference is refused (tests/test_strategies.py)
    reference = "float32" if strategy == "fsdp" else "bfloat16"
    proc = fit_tiny(tiny_run, f"gpu_{strategy}", chosen, reference, 3, **trainer)
    facts, _ = finished_run(proc, tiny_run, f"gpu_{strategy}")
    assert facts["global_step"] == 3 and facts["world_size"] == 1
    assert torch.isfinite(torch.tensor(facts["grad_norm"]))
    assert (facts["fsdp_units"] > 1) == (strategy == "block_fsdp")


def test_block_fsdp_full_checkpoint_resumes_on_one_gpu(tiny_run):
    # Lightning gathers full checkpoints with offload_to_cpu on GPUs (the CPU tests cannot: see
    # tests/cpu_strategies.py); the file leaves out the frozen reference and must resume
    if DEVICE != "cuda":
        pytest.skip("FSDP on a CPU process is tests/test_strategies.py's (a CPU-wrapped strategy)")
    strategy = {
        "class_path": "popalign.distributed.BlockFSDPStrategy",
        "init_args": {"state_dict_type": "full"},
    }
    trainer = {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "optimizer": None}
    ckpts = tiny_run / "gpu_full_ckpts"
    proc = fit_tiny(tiny_run, "gpu_full", strategy, "bfloat16", 2, checkpoints=ckpts, **trainer)
    first, _ = finished_run(proc, tiny_run, "gpu_full")
    (saved,) = ckpts.iterdir()
    assert saved.is_file() and first["adam_steps"] == [2]
    assert not any(k.startswith("reference.") for k in torch.load(saved, weights_only=True)["state_dict"])
    proc = fit_tiny(tiny_run, "gpu_full_resumed", strategy, "bfloat16", 4, ckpt_path=saved, **trainer)
    resumed, _ = finished_run(proc, tiny_run, "gpu_full_resumed")
    assert resumed["global_step"] == 4 and resumed["adam_steps"] == [4]
