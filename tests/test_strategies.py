"""`train.py fit` under DDP and under BlockFSDPStrategy, two gloo processes on CPU.

Both strategies average the same per-rank gradients and run the same optimizer on them, so after
the same steps from the same seed the policies must agree; FSDP must also report the same gradient
norm (a collective over the shards) and must not hang when a rank's shard holds only frozen weights.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch import ROOT, TIMEOUT_S, assert_trains_like, assert_trains_lora_like, finished_run, fit_tiny
from safetensors.torch import load_file

FSDP = {"class_path": "cpu_strategies.CPUBlockFSDPStrategy"}


def _units(root: Path) -> int:
    # one unit per transformer block and resnet and per UNet, in policy and reference, plus the root
    weights = load_file(str(root / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    blocks = sum(k.endswith("conv1.weight") for k in weights) + sum(
        k.endswith("attn1.to_q.weight") for k in weights
    )
    return 2 * (blocks + 1) + 1


def test_block_fsdp_trains_like_ddp(tiny_run):
    # a float32 reference: Lightning's FSDP computes every unit in the trainer precision's dtype, so a
    # bfloat16 reference would run in float32 there and in bfloat16 under DDP (a real, small difference)
    # and gradient clipping (norm ~700 clipped to 1), which Lightning refuses under FSDP: the module
    # clips by the norm over all shards, so both runs take the same clipped SGD steps
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}
    ddp_facts, ddp = finished_run(
        fit_tiny(tiny_run, "ddp", "ddp", "float32", clip=1.0, optimizer=sgd), tiny_run, "ddp"
    )
    fsdp_proc = fit_tiny(tiny_run, "fsdp", FSDP, "float32", clip=1.0, optimizer=sgd)
    fsdp_facts, fsdp = finished_run(fsdp_proc, tiny_run, "fsdp")

    assert ddp_facts["global_step"] == fsdp_facts["global_step"] == 3
    assert ddp_facts["world_size"] == fsdp_facts["world_size"] == 2
    assert ddp_facts["fsdp_units"] == 0 and fsdp_facts["fsdp_units"] == _units(tiny_run)

    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    assert_trains_like(fsdp, ddp, initial, "FSDP")
    assert fsdp_facts["grad_norm"] == pytest.approx(ddp_facts["grad_norm"], rel=1e-5)


def test_plain_fsdp_does_not_hang_when_a_rank_holds_only_frozen_weights(tiny_run):
    # one unit for the whole module: its flat parameter is the policy then the equally large float32
    # reference, so rank 1's half is frozen weights only and that rank has no gradient at all; the
    # guard must still join every collective (it used to return early and leave rank 0 waiting)
    strategy = {"class_path": "cpu_strategies.CPUFSDPStrategy"}
    facts, _ = finished_run(fit_tiny(tiny_run, "plain_fsdp", strategy, "float32"), tiny_run, "plain_fsdp")
    assert facts["global_step"] == 3 and facts["fsdp_units"] == 1
    assert math.isfinite(facts["grad_norm"]) and facts["grad_norm"] > 0


def test_plain_fsdp_refuses_mixed_dtypes_with_what_to_do_instead(tiny_run):
    # under bf16-mixed Lightning keeps the float32 policy and the bfloat16 reference as they are, and
    # plain FSDP's one unit would flatten both into one tensor: FSDP used to stop with a bare
    # "Must flatten tensors with uniform dtype" ValueError while wrapping (tests/test_gpu.py's plain
    # fsdp run, which has this configuration, failed on an H200 on 2026-11-30)
    strategy = {"class_path": "cpu_strategies.CPUFSDPStrategy"}
    proc = fit_tiny(tiny_run, "plain_mixed", strategy, "bfloat16", devices=1, precision="bf16-mixed")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "one FSDP unit" in proc.stderr and "bfloat16 and float32" in proc.stderr
    assert "--trainer.strategy fsdp_blocks" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_block_fsdp_with_bfloat16_reference_trains(tiny_run):
    # the SDXL configs' default: float32 policy units and bfloat16 reference units side by side
    facts, policy = finished_run(fit_tiny(tiny_run, "fsdp_bf16", FSDP, "bfloat16"), tiny_run, "fsdp_bf16")
    assert facts["global_step"] == 3 and facts["fsdp_units"] == _units(tiny_run)
    assert math.isfinite(facts["grad_norm"]) and facts["grad_norm"] > 0
    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    assert max((policy[k] - initial[k].float()).abs().max().item() for k in policy) > 1e-3


@pytest.mark.slow
def test_block_fsdp_trains_lora_like_ddp(tiny_run):
    # units mixing frozen base weights and trainable adapters; the reference is the adapters switched off
    ddp_facts, ddp = finished_run(
        fit_tiny(tiny_run, "lora_ddp", "ddp", "float32", lora_rank=4), tiny_run, "lora_ddp"
    )
    fsdp_proc = fit_tiny(tiny_run, "lora_fsdp", FSDP, "float32", lora_rank=4)
    fsdp_facts, fsdp = finished_run(fsdp_proc, tiny_run, "lora_fsdp")
    assert_trains_lora_like(fsdp, ddp, "FSDP")
    assert fsdp_facts["grad_norm"] == pytest.approx(ddp_facts["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_block_fsdp_sharded_checkpoint_resumes(tiny_run):
    # a run stops after 2 steps and a second one resumes it to 4, optimizer included
    strategy = {**FSDP, "init_args": {"state_dict_type": "sharded"}}
    ckpts = tiny_run / "sharded_ckpts"
    first, policy = finished_run(
        fit_tiny(tiny_run, "first", strategy, "bfloat16", 2, optimizer=None, checkpoints=ckpts),
        tiny_run,
        "first",
    )
    (saved,) = ckpts.iterdir()
    assert saved.is_dir() and first["adam_steps"] == [2]
    proc = fit_tiny(
        tiny_run, "resumed", strategy, "bfloat16", 4, optimizer=None, checkpoints=ckpts, ckpt_path=saved
    )
    resumed, _ = finished_run(proc, tiny_run, "resumed")
    assert resumed["global_step"] == 4 and resumed["adam_steps"] == [4]
    # docs/scaling.md: consolidate the folder into one file, which `popalign export` takes
    cmd = [sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint", str(saved)]
    assert subprocess.run(cmd, capture_output=True, timeout=TIMEOUT_S).returncode == 0
    exported = _export(Path(f"{saved}.consolidated"), tiny_run / "sharded_export")
    assert exported.keys() == policy.keys()
    assert all(torch.equal(exported[k].float(), policy[k]) for k in policy)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_block_fsdp_full_checkpoint_resumes(tiny_run, lora):
    # the default state_dict_type: one file gathered on rank 0 without the frozen weights, which
    # Lightning loads before the module could fill them in (it failed: "Missing key(s)")
    strategy = {**FSDP, "init_args": {"state_dict_type": "full"}}
    name, ckpts = f"full_{lora}", tiny_run / f"full_ckpts_{lora}"
    more = {"optimizer": None, "checkpoints": ckpts} | ({"lora_rank": lora} if lora else {})
    first, trained = finished_run(fit_tiny(tiny_run, name, strategy, "float32", 2, **more), tiny_run, name)
    (saved,) = ckpts.iterdir()
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert saved.is_file() and first["adam_steps"] == [2]
    if not lora:  # the file is what `popalign export` takes, as a DDP checkpoint is
        exported = _export(saved, tiny_run / f"{name}_export")
        assert exported.keys() == trained.keys()
        assert all(torch.equal(exported[k].float(), trained[k]) for k in trained)
    frozen = "base_layer" if lora else "reference."
    assert not any(frozen in k for k in state) and any(k.startswith("policy.") for k in state)
    proc = fit_tiny(tiny_run, f"{name}_resumed", strategy, "float32", 4, **more, ckpt_path=saved)
    resumed, policy = finished_run(proc, tiny_run, f"{name}_resumed")
    assert resumed["global_step"] == 4 and resumed["adam_steps"] == [4]
    # the frozen weights are the base model's after the resume, not left uninitialised or zeroed
    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    if lora:
        frozen = {k: policy[k] for k in policy if "lora_" not in k}
    else:
        frozen = load_file(str(tiny_run / f"{name}_resumed.reference.safetensors"))
    assert len(frozen) == len(initial)
    assert all(torch.equal(v, initial[k.replace(".base_layer", "")].float()) for k, v in frozen.items())


@pytest.mark.slow
def test_block_fsdp_refuses_to_resume_an_optimizer_that_keeps_no_state(tiny_run):
    # plain SGD keeps no state: Lightning's FSDP loader stopped each rank with an IndexError traceback
    # (a sharded folder: torch's ValueError); now one line naming the file and what to do
    strategy = {**FSDP, "init_args": {"state_dict_type": "full"}}
    ckpts = tiny_run / "sgd_ckpts"
    finished_run(fit_tiny(tiny_run, "sgd", strategy, "float32", 2, checkpoints=ckpts), tiny_run, "sgd")
    (saved,) = ckpts.iterdir()
    proc = fit_tiny(tiny_run, "sgd_resumed", strategy, "float32", 4, checkpoints=ckpts, ckpt_path=saved)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"train.py: error: {saved}: its optimizer state is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_keys_are_the_state_dict_keys(tiny_model, tmp_path):
    from popalign.distributed import check_checkpoint_keys, checkpoint_keys
    from popalign.errors import UserError
    from popalign.module import PopAlignModule

    module = PopAlignModule(pretrained_model=tiny_model, reference_dtype="float32")
    keys, frozen = checkpoint_keys(module), module.frozen_keys()
    assert keys == set(module.state_dict())
    assert frozen and frozen < keys and all(k.startswith("reference.") for k in frozen)
    path = tmp_path / "last.ckpt"
    check_checkpoint_keys(path, keys - frozen, keys, frozen)  # what the module saves: accepted
    policy = sorted(k for k in keys if k.startswith("policy."))
    with pytest.raises(UserError, match=f"last.ckpt: lacks {policy[0]} \\(a checkpoint of another model"):
        check_checkpoint_keys(path, keys - frozen - {policy[0]}, keys, frozen)
    with pytest.raises(UserError, match="last.ckpt: holds unknown weights policy.extra.weight"):
        check_checkpoint_keys(path, keys | {"policy.extra.weight"}, keys, frozen)


def _export(ckpt: Path, out: Path) -> dict:
    from popalign.cli import main

    assert main(["export", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    return load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))


def _sharded_trainer(world_size: int):
    from popalign.distributed import BlockFSDPStrategy

    return SimpleNamespace(world_size=world_size, strategy=BlockFSDPStrategy())


def test_ema_is_refused_when_parameters_are_sharded(tiny_model):
    from popalign.errors import UserError
    from popalign.module import PopAlignModule

    module = PopAlignModule(pretrained_model=tiny_model, ema_decay=0.9, reference_dtype="float32")
    module._trainer = _sharded_trainer(1)
    module.setup("fit")  # one process holds whole weights: allowed
    module._trainer = _sharded_trainer(2)
    with pytest.raises(UserError, match="ema_decay.*BlockFSDPStrategy.*DDP"):
        module.setup("fit")


def test_fairness_validation_is_refused_when_parameters_are_sharded():
    from popalign.errors import UserError
    from popalign.evaluation.validation import FairnessValidation

    callback = FairnessValidation(prompts=["a photo of a doctor"], axes=["gender"], classifier="oracle")
    with pytest.raises(UserError, match="FairnessValidation.*BlockFSDPStrategy.*DDP"):
        callback.setup(_sharded_trainer(2), None, "fit")


def test_block_policy_wraps_the_named_classes_and_the_unets():
    from popalign.distributed import BlockFSDPStrategy

    strategy = BlockFSDPStrategy(wrap_blocks=("ResnetBlock2D",), sharding_strategy="SHARD_GRAD_OP")
    assert strategy.wrap_blocks == ("ResnetBlock2D", "UNet2DConditionModel")
    is_unit = strategy.kwargs["auto_wrap_policy"]._lambda_fn

    class ResnetBlock2D(torch.nn.Module):  # matched by class name, as diffusers' own would be
        pass

    assert is_unit(ResnetBlock2D()) and not is_unit(torch.nn.Linear(2, 2))


def test_strategy_name_selects_block_fsdp(tiny_model):
    from popalign.distributed import BlockFSDPStrategy
    from popalign.train_cli import cli_main

    args = ["--config", str(ROOT / "configs/tiny.yaml"), f"--model.init_args.pretrained_model={tiny_model}"]
    cli = cli_main([*args, "--trainer.strategy=fsdp_blocks", "--trainer.logger=false"], run=False)
    assert type(cli.trainer.strategy) is BlockFSDPStrategy
    assert cli.trainer.strategy.wrap_blocks == (
        "BasicTransformerBlock",
        "ResnetBlock2D",
        "UNet2DConditionModel",
    )


def test_block_fsdp_on_cpu_is_a_one_line_error(tiny_run, capsys, monkeypatch):
    from popalign.train_cli import cli_main

    monkeypatch.chdir(tiny_run)  # the config's relative paths (runs/tiny/...) stay out of the checkout
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.strategy=fsdp_blocks"]
    args += [f"--model.init_args.pretrained_model={tiny_run / 'tiny/model'}"]
    args += [f"--data.train_shards={tiny_run / 'tiny/shards'}", "--trainer.logger=false"]
    with pytest.raises(SystemExit) as stop:
        cli_main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: fsdp_blocks") and "--trainer.accelerator gpu" in err[-1]


def test_plain_fsdp_refuses_a_full_checkpoint_file(tiny_run, capsys, monkeypatch, tmp_path):
    import zipfile

    from popalign.train_cli import cli_main

    monkeypatch.chdir(tiny_run)
    ckpt = tmp_path / "last.ckpt"
    with zipfile.ZipFile(ckpt, "w") as z:  # a zip archive passes the file check; it is never loaded
        z.writestr("archive/data.pkl", b"")
    # Lightning refuses its "fsdp" by name on CPU: the same class, wrapped for CPU processes
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml")]
    args += ["--trainer.strategy.class_path=cpu_strategies.CPUFSDPStrategy"]
    args += [f"--model.init_args.pretrained_model={tiny_run / 'tiny/model'}"]
    args += [f"--data.train_shards={tiny_run / 'tiny/shards'}", "--trainer.logger=false"]
    with pytest.raises(SystemExit) as stop:
        cli_main([*args, f"--ckpt_path={ckpt}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"train.py: error: --ckpt_path {ckpt}: Lightning's plain fsdp cannot resume")
    assert err[-1].endswith("--trainer.strategy fsdp_blocks")
