"""Speed features leave the tiny UNet's outputs and gradients unchanged (popalign.models.speed)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import TINY_D, TINY_DP, TINY_IMAGE, TINY_LATENT
from torch.utils.flop_counter import FlopCounterMode

from popalign.models import speed
from popalign.models.loading import load_unet

# tiny ops: a second OpenMP thread only adds spin-waiting, badly so on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def unet(tiny_model):
    torch.manual_seed(0)
    return load_unet(tiny_model)


def _inputs(n: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, TINY_LATENT, TINY_LATENT, generator=g)
    t = torch.tensor([10, 700])[:n]
    cond = {
        "encoder_hidden_states": torch.randn(n, 77, TINY_D, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(n, TINY_DP, generator=g),
            "time_ids": torch.tensor([float(TINY_IMAGE)] * 2 + [0.0] * 2 + [float(TINY_IMAGE)] * 2).expand(
                n, 6
            ),
        },
    }
    return x, t, cond


def _forward(unet, inputs) -> torch.Tensor:
    x, t, cond = inputs
    return unet(x, t, **cond).sample


def _grads(unet, inputs) -> dict[str, torch.Tensor]:
    unet.zero_grad(set_to_none=True)
    _forward(unet, inputs).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def test_channels_last_keeps_outputs_and_changes_layout(unet):
    inputs = _inputs()
    with torch.no_grad():
        before = _forward(unet, inputs)
        assert speed.to_channels_last(unet) is unet
        after = _forward(unet, inputs)
    w = unet.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_fused_adamw_available_and_same_update():
    assert speed.fused_adamw_available("meta") is False  # no fused kernel for meta tensors
    available = speed.fused_adamw_available("cpu")
    assert isinstance(available, bool)
    if not available:
        pytest.skip("this torch build has no fused AdamW on CPU")
    torch.manual_seed(0)
    init, grad = torch.randn(5, 3), torch.randn(5, 3)
    results = []
    for fused in (False, True):
        p = torch.nn.Parameter(init.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=1e-2, fused=fused)
        for _ in range(3):
            p.grad = grad.clone()
            opt.step()
        results.append(p.detach())
    assert not torch.equal(results[0], init)  # the steps did move the weights
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "save_matmuls", "save_attention", "ops_list", "function"])
def test_selective_checkpointing_keeps_gradients(unet, policy):
    from torch.utils.checkpoint import CheckpointPolicy

    inputs = _inputs()
    reference = _grads(unet, inputs)
    if policy == "ops_list":
        policy = [torch.ops.aten.convolution.default]
    elif policy == "function":

        def policy(ctx, op, *args, **kwargs):
            return (
                CheckpointPolicy.MUST_SAVE
                if op is torch.ops.aten.mm.default
                else CheckpointPolicy.PREFER_RECOMPUTE
            )

    speed.selective_checkpointing(unet, policy)
    blocks = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
    assert blocks and all(m.gradient_checkpointing for m in blocks)
    calls = []
    # a pre-hook: the rerun in backward stops early, once it has rebuilt what backward needs
    hook = unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed = _grads(unet, inputs)
    hook.remove()
    assert len(calls) == 2  # forward, then the rerun in backward: checkpointing is really on
    _assert_same_grads(checkpointed, reference)


def _step_flops(unet, inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        _forward(unet, inputs).pow(2).mean().backward()
    return counter.get_total_flops()


def test_save_matmuls_recomputes_no_matmul_flops(unet):
    inputs = _inputs()
    plain = _step_flops(unet, inputs)
    speed.selective_checkpointing(unet, "full")
    full = _step_flops(unet, inputs)
    speed.selective_checkpointing(unet, "save_matmuls")
    selective = _step_flops(unet, inputs)
    unet.disable_gradient_checkpointing()
    assert plain > 0
    assert full > plain  # full checkpointing reruns every block's matmuls and convolutions
    assert selective == plain  # their outputs are saved, so backward reruns none of them


def test_selective_checkpointing_rejects_unknown_policy(unet):
    with pytest.raises(ValueError, match="unknown checkpoint policy 'fastest'"):
        speed.selective_checkpointing(unet, "fastest")


def _count_blocks(unet) -> tuple[int, int]:
    names = [type(m).__name__ for m in unet.modules()]
    return names.count("ResnetBlock2D"), names.count("BasicTransformerBlock")


def _compiled(unet) -> list[str]:
    return [type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def test_compile_repeated_blocks_eager_backend_keeps_outputs(unet):
    # tiny UNet, layers_per_block=1: resnets 1 (down) + 1 (cross-attn down) + 2 (mid) + 2 + 2 (up
    # blocks hold layers_per_block + 1) = 8; transformer blocks 1 (down) + 1 (mid) + 2 (up) = 4
    assert _count_blocks(unet) == (8, 4)
    inputs = _inputs()
    with torch.no_grad():
        before = _forward(unet, inputs)
    torch._dynamo.reset()
    assert speed.compile_repeated_blocks(unet, blocks=speed.REPEATED_BLOCKS, backend="eager") == 12
    assert sorted(_compiled(unet)) == ["BasicTransformerBlock"] * 4 + ["ResnetBlock2D"] * 8
    with torch.no_grad():
        after = _forward(unet, inputs)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_compile_repeated_blocks_default_blocks(unet):
    # diffusers' UNet2DConditionModel declares _repeated_blocks = ["BasicTransformerBlock"]: its own
    # regional compilation is used and compiles the 4 transformer blocks only
    assert list(unet._repeated_blocks) == ["BasicTransformerBlock"]
    torch._dynamo.reset()
    assert speed.compile_repeated_blocks(unet, backend="eager") == 4
    assert _compiled(unet) == ["BasicTransformerBlock"] * 4


def test_compile_repeated_blocks_without_declaration_compiles_both_kinds(unet):
    unet._repeated_blocks = None  # as a model that declares nothing
    torch._dynamo.reset()
    assert speed.compile_repeated_blocks(unet, backend="eager") == 12
    assert sorted(set(_compiled(unet))) == ["BasicTransformerBlock", "ResnetBlock2D"]


def test_compile_without_cpu_compiler_is_a_logged_noop(unet, monkeypatch, caplog):
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="popalign.models.speed"):
        assert speed.compile_repeated_blocks(unet) == 0
    assert "no C++ compiler" in caplog.text
    assert _compiled(unet) == []


@pytest.mark.slow
def test_compile_repeated_blocks_inductor_keeps_outputs_and_gradients(unet):
    inputs = _inputs()
    with torch.no_grad():
        before = _forward(unet, inputs)
    reference = _grads(unet, inputs)
    torch._dynamo.reset()
    assert speed.compile_repeated_blocks(unet, blocks=speed.REPEATED_BLOCKS) == 12
    with torch.no_grad():
        torch.testing.assert_close(_forward(unet, inputs), before, atol=1e-4, rtol=1e-4)
    _assert_same_grads(_grads(unet, inputs), reference, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "save_matmuls"])
def test_compiled_blocks_under_checkpointing_keep_gradients(unet, policy):
    # the SDXL configs run both: every checkpointed block is a compiled one, rerun in backward
    inputs = _inputs()
    reference = _grads(unet, inputs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them
    assert speed.compile_repeated_blocks(unet, blocks=speed.REPEATED_BLOCKS) == 12
    speed.selective_checkpointing(unet, policy)
    assert all(m.gradient_checkpointing for m in unet.modules() if hasattr(m, "gradient_checkpointing"))
    _assert_same_grads(_grads(unet, inputs), reference, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled code ran, not eager


@pytest.mark.slow
def test_compiled_lora_module_keeps_loss_and_gradients(tiny_model):
    # the LoRA config compiles its blocks too: adapters on (policy) and off (reference) in one step
    from conftest import make_batch

    from popalign.module import PopAlignModule
    from popalign.objectives import PopAlignLoss

    def step(**switches):
        torch.manual_seed(0)
        # beta 50, not 5000: the test compares compiled with eager rounding, which beta multiplies
        module = PopAlignModule(tiny_model, lora_rank=4, objective=PopAlignLoss(beta=50.0), **switches)
        with torch.no_grad():  # B starts at zero: move it so the policy differs from its reference
            for name, p in module.policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        batch = make_batch(pairs=2, seed=3)
        noise, t = module.noise_and_timesteps(batch["latents"], generator=torch.Generator().manual_seed(1))
        loss = module.compute_objective(batch, noise, t).loss
        loss.backward()
        grads = {n: p.grad for n, p in module.policy.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss, grads = step()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_loss, compiled_grads = step(compile_blocks="default")
    assert abs(loss.item() - math.log(2)) > 1e-3  # the adapters moved the policy off the reference
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    _assert_same_grads(compiled_grads, grads, atol=1e-4)
    assert any("lora_A" in n for n in grads)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled code ran
