"""PopAlignModule: the frozen reference, the step, LoRA, checkpoints, non-finite steps, DDP gradients."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from popalign.errors import UserError
from popalign.models.loading import load_unet
from popalign.module import PopAlignModule
from popalign.objectives import PopAlignLoss, SFTLoss


def _module(tiny_model, **kw) -> PopAlignModule:
    kw.setdefault("objective", PopAlignLoss(beta=10.0))
    kw.setdefault("reference_dtype", "float32")
    return PopAlignModule(pretrained_model=tiny_model, **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_reference_is_frozen_and_stays_in_eval(tiny_model):
    m = _module(tiny_model, reference_dtype="bfloat16")
    assert m.reference is not None
    assert all(not p.requires_grad for p in m.reference.parameters())
    assert next(m.reference.parameters()).dtype == torch.bfloat16
    m.train()
    assert m.policy.training and not m.reference.training
    opt = m.configure_optimizers()
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in m.policy.parameters()}
    assert not in_opt & {id(p) for p in m.reference.parameters()}


def test_objective_without_reference_holds_no_copy(tiny_model):
    m = _module(tiny_model, objective=SFTLoss())
    assert m.reference is None


def test_pairs_share_noise_and_timestep(tiny_model, batch_factory):
    m = _module(tiny_model)
    batch = batch_factory(pairs=3)
    noise, t = m.noise_and_timesteps(batch["latents"])
    assert torch.equal(noise[:3], noise[3:]) and torch.equal(t[:3], t[3:])
    assert not torch.equal(noise[0], noise[1])
    with pytest.raises(ValueError, match="even number"):
        m.noise_and_timesteps(batch["latents"][:5])


def test_training_noise_is_drawn_per_rank_and_batch_from_the_run_seed(tiny_model, batch_factory, monkeypatch):
    # every rank is seeded alike (seed_everything), so the global generator gave every rank the same
    # noise and timesteps in each step, and a resumed run drew other noise than the run it continued
    m = _module(tiny_model)
    latents = batch_factory(pairs=3)["latents"]

    def drawn(seed: int, rank: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        m._trainer = SimpleNamespace(global_rank=rank, fit_loop=SimpleNamespace(total_batch_idx=batch))
        torch.manual_seed(rank * 100 + batch)  # the global generator's state must not matter
        return m.noise_and_timesteps(latents, m._training_generator(latents.device))

    first = drawn(0, 0, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, drawn(0, 0, 5), strict=True))
    for other in (drawn(0, 1, 5), drawn(0, 0, 6), drawn(1, 0, 5)):  # another rank, batch, run seed
        assert not torch.equal(first[0], other[0])
    m._trainer = None
    assert m._training_generator(latents.device) is None  # outside a trainer: the global generator


def test_step_gradients_reach_policy_only(tiny_model, batch_factory):
    m = _module(tiny_model)
    loss = m.training_step(batch_factory(pairs=2), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.policy.parameters())
    assert all(p.grad is None for p in m.reference.parameters())


def test_policy_equals_reference_at_start(tiny_model, batch_factory):
    # identical weights -> identical errors -> g = 0 for every sample, loss = log 2 exactly
    m = _module(tiny_model)
    batch = batch_factory(pairs=2)
    noise, t = m.noise_and_timesteps(batch["latents"])
    out = m.compute_objective(batch, noise, t)
    assert torch.allclose(out.loss, torch.log(torch.tensor(2.0)), atol=1e-5)


def test_v_prediction_target(tiny_model, batch_factory):
    # v = sqrt(a) * eps - sqrt(1 - a) * x0 (diffusers' get_velocity): the module's target must match it
    m = _module(tiny_model, prediction_type="v_prediction")
    batch = batch_factory(pairs=1)
    x0 = batch["latents"].float()
    noise, t = m.noise_and_timesteps(batch["latents"])
    expected = m.noise_scheduler.get_velocity(x0, noise, t)
    captured = {}

    def fake_unet(model, x, tt, b, dtype=None):
        captured["x_t"] = x
        return torch.zeros_like(x)

    m._unet = fake_unet
    m.objective = SFTLoss()
    out = m.compute_objective(batch, noise, t)
    # with a zero prediction the SFT loss is mean(target^2) over the preferred row
    assert torch.allclose(out.loss, expected[0].pow(2).mean(), atol=1e-6)
    assert torch.allclose(captured["x_t"], m.noise_scheduler.add_noise(x0, noise, t), atol=1e-6)


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_model, batch_factory):
    m = _module(tiny_model, lora_rank=4)
    assert m.reference is None
    trainable = [n for n, p in m.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():  # make the adapters matter
        for n, p in m.policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    base = load_unet(tiny_model)
    batch = batch_factory(pairs=1)
    noise, t = m.noise_and_timesteps(batch["latents"])
    x = batch["latents"].float() + noise
    ref = m._reference_prediction(x, t, batch)
    expected = m._unet(base, x, t, batch, torch.float32)
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not torch.allclose(m._unet(m.policy, x, t, batch, torch.float32), expected, atol=1e-3)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, make, n: int = 64, nan_at: set[int] = frozenset()):
        self.make, self.n, self.nan_at = make, n, nan_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        b = self.make(pairs=2, seed=i)
        if i in self.nan_at:
            b["latents"][0, 0, 0, 0] = float("nan")
        return b


def _fit(
    module,
    make,
    tmp_path,
    steps,
    ckpt_path=None,
    nan_at=frozenset(),
    plugins=None,
    callbacks=(),
    **trainer_kw,
):
    trainer = L.Trainer(
        **trainer_kw,
        accelerator="cpu",
        plugins=plugins,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
            *callbacks,
        ],
    )
    loader = DataLoader(_Batches(make, nan_at=nan_at), batch_size=None, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_checkpoint_holds_trainable_state_and_resume_keeps_original_reference(
    tiny_model, batch_factory, tmp_path
):
    m = _module(tiny_model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    _fit(m, batch_factory, tmp_path, steps=3)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])
    assert any(k.startswith("policy.") for k in ckpt["state_dict"])
    assert ckpt["global_step"] == 3

    trained_policy = copy.deepcopy(m.policy)
    resumed = _module(tiny_model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = _fit(
        resumed, batch_factory, tmp_path / "resume", steps=5, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert trainer.global_step == 5  # continued from 3, not restarted
    # the reference is still the pretrained UNet, not the trained policy it was saved beside
    assert _same_weights(resumed.reference, load_unet(tiny_model))
    assert not _same_weights(resumed.reference, trained_policy)
    # the optimizer state came back (Adam's step count continues)
    state = trainer.optimizers[0].state
    assert max(int(s["step"]) for s in state.values()) == 5


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_nonfinite_step_is_skipped_and_counted(tiny_model, batch_factory, tmp_path, fused):
    # fused AdamW skips through its found_inf flag on the device; plain AdamW after a host check
    m = _module(tiny_model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, fused=fused))
    before = copy.deepcopy(m.policy)
    trainer = _fit(m, batch_factory, tmp_path, steps=1, nan_at={0})
    assert int(m.nonfinite_steps) == 1
    assert _same_weights(m.policy, before)  # NaN never reached the weights
    assert all(torch.isfinite(p).all() for p in m.policy.parameters())
    # the skipped step did not count as an Adam step (no state at all when gradients were dropped)
    assert all(int(s["step"]) == 0 for s in trainer.optimizers[0].state.values())
    # which path skipped: only the fused optimizer was handed the flag
    assert float(getattr(trainer.optimizers[0], "found_inf", -1)) == (1.0 if fused else -1)

    # a finite step after a skipped one does train
    trainer = _fit(m, batch_factory, tmp_path / "next", steps=2, nan_at={0})
    assert int(m.nonfinite_steps) == 2 and not _same_weights(m.policy, before)
    assert float(getattr(trainer.optimizers[0], "found_inf", -1)) == (0.0 if fused else -1)

    m2 = _module(tiny_model, max_nonfinite_steps=1, optimizer=lambda p: torch.optim.AdamW(p, fused=fused))
    with pytest.raises(RuntimeError, match="NaN/inf"):
        _fit(m2, batch_factory, tmp_path / "abort", steps=4, nan_at={0, 1, 2})


def test_clipping_reuses_the_guards_norm_and_matches_torch(tiny_model, batch_factory):
    m = _module(tiny_model, objective=SFTLoss())
    batch = batch_factory(pairs=2)
    noise, t = m.noise_and_timesteps(batch["latents"])
    m.compute_objective(batch, noise, t).loss.backward()
    params = m.trainable_parameters()
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for twin, p in zip(shadow, params):
        twin.grad = p.grad.clone()
    total = torch.nn.utils.clip_grad_norm_(shadow, max_norm=1e-3)  # torch clips the twins' gradients
    expected = [twin.grad for twin in shadow]
    assert total > 1e-3  # so clipping really scales the gradients down
    optimizer = torch.optim.SGD(params, lr=0.1)
    norm, proceed = m.guard_gradients(optimizer)
    assert proceed
    torch.testing.assert_close(norm, total)
    m.configure_gradient_clipping(optimizer, 1e-3, "norm")
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert m._step_grad_norm is None  # taken: a later step cannot clip with a stale norm


def test_fp16_loss_scaling_skips_overflows_itself(tiny_model, batch_factory, tmp_path):
    # with a GradScaler the guard stands aside: overflowing steps are the scaler's routine, they must
    # lower its scale (not be dropped before it sees them) and must not count towards the abort limit
    m = _module(tiny_model, max_nonfinite_steps=1, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    before = copy.deepcopy(m.policy)
    # Lightning turns the string "16-mixed" into bf16 on a CPU; the plugin itself keeps fp16 + scaler
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = _fit(m, batch_factory, tmp_path, steps=3, nan_at={0, 1}, plugins=[fp16])
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_scale() == 65536.0 / 4  # halved once per overflowing step
    assert int(m.nonfinite_steps) == 0
    assert not _same_weights(m.policy, before)  # the third, finite step trained
    assert all(torch.isfinite(p).all() for p in m.policy.parameters())


def test_ema_tracks_policy(tiny_model, batch_factory, tmp_path):
    m = _module(tiny_model, ema_decay=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    start = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    _fit(m, batch_factory, tmp_path, steps=2)
    name, avg = next((n, v) for n, v in m.ema.state_by_name().items() if "conv_in.weight" in n)
    now = dict(m.policy.named_parameters())[name].detach()
    assert not torch.equal(avg, start[name]) and not torch.equal(avg, now)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert any(k.startswith("ema.shadow.") for k in ckpt["state_dict"])


class _StepSnapshots(L.Callback):
    """The policy's weights after every optimizer step (applied or skipped)."""

    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step > len(self.after):
            self.after.append({n: p.detach().clone() for n, p in module.policy.named_parameters()})


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_ema_moves_once_per_applied_optimizer_step(tiny_model, batch_factory, tmp_path, fused):
    # 3 optimizer steps of 2 accumulated batches each; the first has NaN gradients and is skipped.
    # One update per applied step: avg = lerp(lerp(start, w2, 1 - d), w3, 1 - d). An update per
    # batch (6 of them) or one on the skipped step gives something else.
    d = 0.5
    m = _module(tiny_model, ema_decay=d, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, fused=fused))
    start = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    snaps = _StepSnapshots()
    _fit(m, batch_factory, tmp_path, steps=3, nan_at={0}, accumulate_grad_batches=2, callbacks=[snaps])
    assert int(m.nonfinite_steps) == 1 and len(snaps.after) == 3
    w2, w3 = snaps.after[1], snaps.after[2]
    assert not torch.equal(w2["conv_in.weight"], w3["conv_in.weight"])  # both applied steps trained
    for name, avg in m.ema.state_by_name().items():
        expected = d * (d * start[name] + (1 - d) * w2[name]) + (1 - d) * w3[name]
        torch.testing.assert_close(avg, expected, rtol=0, atol=1e-6)


def test_precision_casts_keep_noise_schedule_and_ema_in_float32(tiny_model, batch_factory):
    # bf16-true (module.to(bf16)) and FSDP's bf16 MixedPrecision cast float buffers; in bf16
    # 1 - alpha_bar rounds to 0 at t = 0, so x_t would carry no noise, and EMA updates would round away
    m = _module(tiny_model, ema_decay=0.99, reference_dtype="bfloat16")
    schedule = m.alphas_cumprod.clone()
    m.to(torch.bfloat16)
    assert m.alphas_cumprod.dtype == torch.float32 and torch.equal(m.alphas_cumprod, schedule)
    assert 1 - m.alphas_cumprod[0] > 0
    assert all(b.dtype == torch.float32 for b in m.ema.shadow.buffers())
    m.to(torch.float32)
    batch = batch_factory(pairs=1)
    noise, _ = m.noise_and_timesteps(batch["latents"])
    out = m.compute_objective(batch, noise, torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("checkpointing", [True, "save_matmuls"])
def test_speed_switches_keep_the_numbers(tiny_model, batch_factory, checkpointing):
    plain = _module(tiny_model)
    fast = _module(tiny_model, gradient_checkpointing=checkpointing, channels_last=True)
    assert fast.policy.is_gradient_checkpointing
    batch = batch_factory(pairs=2)
    noise, t = plain.noise_and_timesteps(batch["latents"])
    a, b = plain.compute_objective(batch, noise, t), fast.compute_objective(batch, noise, t)
    a.loss.backward()
    b.loss.backward()
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
    ga = torch.cat([p.grad.flatten() for p in plain.policy.parameters()])
    gb = torch.cat([p.grad.flatten() for p in fast.policy.parameters()])
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- identity-prompt preservation
def test_preservation_term_matches_its_formula(tiny_model, batch_factory):
    m = _module(tiny_model, preservation_weight=3.0)
    batch = batch_factory(pairs=2, sources=True)
    noise, t = m.noise_and_timesteps(batch["latents"])
    start = m.compute_objective(batch, noise, t)
    # policy == reference: the term is exactly zero and the loss is the objective's log 2
    assert start.metrics["preservation"] == 0
    assert torch.allclose(start.loss, torch.log(torch.tensor(2.0)), atol=1e-5)

    with torch.no_grad():
        for p in m.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = m.compute_objective(batch, noise, t)
    without = _module(tiny_model)
    without.policy.load_state_dict(m.policy.state_dict())
    objective_only = without.compute_objective(batch, noise, t).loss

    # by hand: the preferred rows' noisy latents, conditioned on their own captions
    x0 = batch["latents"][:2].float()
    a = m.alphas_cumprod[t[:2]].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise[:2]
    own = {
        "prompt_embeds": batch["source_prompt_embeds"],
        "pooled_prompt_embeds": batch["source_pooled_prompt_embeds"],
        "time_ids": batch["time_ids"][:2],
    }
    with torch.no_grad():
        keep = (
            (
                m._unet(m.policy, x_t, t[:2], own, torch.float32)
                - m._unet(m.reference, x_t, t[:2], own, torch.float32)
            )
            .pow(2)
            .mean()
        )
    assert keep > 0
    assert torch.allclose(out.metrics["preservation"], keep, rtol=1e-4)
    assert torch.allclose(out.loss, objective_only + 3.0 * keep, rtol=1e-4)
    out.loss.backward()
    assert all(p.grad is None for p in m.reference.parameters())


def test_preservation_term_trains_under_bf16_autocast(tiny_model, batch_factory):
    # bf16-mixed runs the step under autocast, where cat of the shards' float16 embeddings raised
    m = _module(tiny_model, preservation_weight=3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.training_step(batch_factory(pairs=2, sources=True), 0)
    loss.backward()
    assert torch.isfinite(loss) and m.policy.conv_in.weight.grad is not None


def test_preservation_needs_source_captions_and_a_reference(tiny_model, batch_factory):
    m = _module(tiny_model, preservation_weight=1.0)
    with pytest.raises(UserError, match="no-source-embeds"):
        m.training_step(batch_factory(pairs=1), 0)
    # SFT needs no reference for itself, but the preservation term compares against one
    assert _module(tiny_model, objective=SFTLoss(), preservation_weight=1.0).reference is not None
    with pytest.raises(UserError, match="preservation_weight must be >= 0"):
        _module(tiny_model, preservation_weight=-1.0)


def test_a_batch_the_unet_cannot_take_is_one_clear_error(tiny_model, batch_factory):
    # shards built for another model: a matmul error deep in the UNet would not say which input
    m = _module(tiny_model)
    for key, widen in (("prompt_embeds", -1), ("latents", 1), ("pooled_prompt_embeds", -1)):
        batch = batch_factory(pairs=1)
        shape = list(batch[key].shape)
        shape[widen] += 4
        batch[key] = torch.zeros(shape, dtype=batch[key].dtype)
        with pytest.raises(UserError, match=rf"do not fit {tiny_model}: .*{key.split('_')[0]}"):
            m.training_step(batch, 0)
    m.training_step(batch_factory(pairs=1), 0)  # a fitting batch passes


def test_resume_starts_or_drops_the_ema_and_refuses_other_adapters(tiny_model, tmp_path):
    trained = _module(tiny_model)
    with torch.no_grad():
        for p in trained.policy.parameters():
            p.add_(0.01)
    ckpt = {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}
    trained.on_save_checkpoint(ckpt)

    # ema_decay switched on at resume: the average starts at the checkpoint's weights
    resumed = _module(tiny_model, ema_decay=0.9)
    resumed.on_load_checkpoint(ckpt)
    weights = dict(trained.policy.named_parameters())
    for i, name in enumerate(resumed.ema.names):  # before loading: the entries must not alias the policy
        assert torch.equal(ckpt["state_dict"][f"ema.shadow.{i}"], weights[name].detach())
    resumed.load_state_dict(ckpt["state_dict"])
    for name, avg in resumed.ema.state_by_name().items():
        assert torch.equal(avg, weights[name].detach())
    # and switched off again: the saved average is dropped instead of failing the strict load
    with_ema = {"state_dict": resumed.state_dict(), "hyper_parameters": dict(resumed.hparams)}
    resumed.on_save_checkpoint(with_ema)
    plain = _module(tiny_model)
    plain.on_load_checkpoint(with_ema)
    plain.load_state_dict(with_ema["state_dict"])

    lora = _module(tiny_model, lora_rank=4, lora_alpha=8.0)
    saved = {"state_dict": lora.state_dict(), "hyper_parameters": {**lora.hparams, "lora_alpha": 4.0}}
    with pytest.raises(UserError, match="trained with lora_alpha=4.0, this run has 8.0"):
        _module(tiny_model, lora_rank=4, lora_alpha=8.0).on_load_checkpoint(saved)
