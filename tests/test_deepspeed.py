"""`train.py fit` under Lightning's DeepSpeed strategy (ZeRO stages 2 and 3), two gloo CPU processes
on DeepSpeed's CPU accelerator (tests/cpu_strategies.py). Skipped where DeepSpeed is not installed.

ZeRO-2 averages the same per-rank gradients as DDP, clips them by their global norm itself and runs
the same optimizer on its slice of the state; ZeRO-3 also keeps each weight in pieces across the ranks
and gathers it for each forward and backward. So after the same steps from the same seed the policies
must agree with DDP's. Their checkpoints are folders, which `popalign export` takes once Lightning's
converter made them one file. The launched tests are marked ``deepspeed`` (``make test-deepspeed``).
"""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from launch import assert_trains_like, assert_trains_lora_like, deepspeed, finished_run, fit_tiny
from lightning.pytorch.strategies import DeepSpeedStrategy
from safetensors.torch import load_file

from popalign.errors import UserError

pytest.importorskip("deepspeed")

SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}


@pytest.fixture(scope="module")
def ddp_clipped(tiny_run):
    """DDP's run for the ZeRO runs to match: 3 steps of SGD, the gradient (norm ~700) clipped to 1;
    DDP clips with the module's hook, ZeRO by itself."""
    return finished_run(
        fit_tiny(tiny_run, "zero_ddp", "ddp", "float32", clip=1.0, optimizer=SGD), tiny_run, "zero_ddp"
    )


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_like_ddp_resumes_and_exports(tiny_run, ddp_clipped, stage, capsys):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from popalign.cli import main

    ddp_facts, ddp = ddp_clipped
    name, strategy = f"zero{stage}", deepspeed(stage)
    ckpts = tiny_run / f"{name}_ckpts"
    proc = fit_tiny(tiny_run, name, strategy, "float32", clip=1.0, optimizer=SGD, checkpoints=ckpts)
    facts, zero = finished_run(proc, tiny_run, name)
    assert facts["global_step"] == ddp_facts["global_step"] == 3 and facts["world_size"] == 2

    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    moved = assert_trains_like(zero, ddp, initial, f"ZeRO-{stage}")
    # the engine's global norm, before clipping, is the module's under DDP
    assert facts["grad_norm"] == pytest.approx(ddp_facts["grad_norm"], rel=1e-5)
    # the frozen reference, partitioned like the policy under ZeRO-3, is still the base model
    reference = load_file(str(tiny_run / f"{name}.reference.safetensors"))
    assert reference.keys() == initial.keys()
    assert all(torch.equal(reference[k], initial[k].float()) for k in initial)

    (saved,) = ckpts.iterdir()
    assert saved.is_dir() and (saved / "latest").is_file()
    proc = fit_tiny(tiny_run, f"{name}_resumed", strategy, "float32", 5, clip=1.0, optimizer=SGD,
                    checkpoints=tiny_run / f"{name}_ckpts_resumed", ckpt_path=saved)  # fmt: skip
    resumed, after_resume = finished_run(proc, tiny_run, f"{name}_resumed")
    straight_proc = fit_tiny(tiny_run, f"{name}_straight", strategy, "float32", 5, clip=1.0, optimizer=SGD)
    straight_facts, straight = finished_run(straight_proc, tiny_run, f"{name}_straight")
    assert resumed["global_step"] == straight_facts["global_step"] == 5
    # steps 4 and 5 start from the saved weights and see the batches an unstopped run sees
    worst = max((after_resume[k] - straight[k]).abs().max().item() for k in straight)
    assert worst < 1e-4 * moved, f"the resumed run ends {worst:.2e} from the unstopped one"

    # export refuses the folder with the command that makes it one file; that file exports the policy
    out = tiny_run / f"{name}_export"
    assert main(["export", str(saved), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a DeepSpeed checkpoint folder" in err and "convert_zero_checkpoint_to_fp32_state_dict" in err
    convert_zero_checkpoint_to_fp32_state_dict(str(saved), f"{saved}.consolidated")
    assert main(["export", f"{saved}.consolidated", "--out", str(out)]) == 0
    exported = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    assert exported.keys() == zero.keys()
    assert max((exported[k].float() - zero[k]).abs().max().item() for k in zero) == 0


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_save_cut_short_leaves_the_previous_checkpoint_folder(tiny_run):
    # DeepSpeed writes into the target folder itself: a save of last.ckpt stopped after the model
    # states left them beside the previous save's optimizer partitions, in a folder that looked whole.
    # train.py stages the folder beside it and renames it once every rank wrote
    from test_preemption import _saved_step

    ckpts, strategy = tiny_run / "cut_ckpts", deepspeed(2)
    more = {"checkpoints": ckpts, "save_last": True, "optimizer": None}  # AdamW: partitions of state
    finished_run(fit_tiny(tiny_run, "cut_first", strategy, "float32", 2, **more), tiny_run, "cut_first")
    cut = fit_tiny(tiny_run, "cut", strategy, "float32", 4, **more, ckpt_path="last",
                   callbacks=[{"class_path": "cpu_strategies.CutDeepSpeedSave"}])  # fmt: skip
    assert cut.returncode != 0 and "save of" in cut.stderr and "cut short" in cut.stderr
    assert _saved_step(ckpts / "last.ckpt") == 2  # the step-2 folder, whole
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"]  # the staging folder removed
    resumed = fit_tiny(tiny_run, "cut_resumed", strategy, "float32", 4, **more, ckpt_path="last")
    assert finished_run(resumed, tiny_run, "cut_resumed")[0]["global_step"] == 4


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_with_the_sdxl_configs_speed_switches_trains_like_ddp(tiny_run, ddp_clipped):
    # configs/sdxl_popalign.yaml: full gradient checkpointing (the blocks rerun in backward, ZeRO-3
    # gathering their weights again) and compiled blocks (ZeRO-3's hooks around compiled graphs)
    ddp_facts, ddp = ddp_clipped
    more = {"gradient_checkpointing": True, "compile_blocks": "default"}
    proc = fit_tiny(tiny_run, "zero3_fast", deepspeed(3), "float32", clip=1.0, optimizer=SGD, **more)
    facts, policy = finished_run(proc, tiny_run, "zero3_fast")
    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    assert_trains_like(policy, ddp, initial, "ZeRO-3 with checkpointing and compiled blocks")
    assert facts["grad_norm"] == pytest.approx(ddp_facts["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("zero", ["2-offload", "3-offload"])
def test_offloaded_zero_trains_like_ddp(tiny_run, ddp_clipped, zero):
    # the optimizer state and step on the CPU (ZeRO-3: the partitioned weights too); on CPU processes
    # the offload moves nothing, so this checks the offloaded code path's arithmetic, not its transfers
    ddp_facts, ddp = ddp_clipped
    name = f"zero{zero}"
    facts, policy = finished_run(
        fit_tiny(tiny_run, name, deepspeed(zero), "float32", clip=1.0, optimizer=SGD), tiny_run, name
    )
    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    assert_trains_like(policy, ddp, initial, f"ZeRO-{zero}")
    assert facts["grad_norm"] == pytest.approx(ddp_facts["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_offload_trains_with_deepspeeds_cpu_adam(tiny_run):
    # what a user is told to run with offloading (Lightning's deepspeed_stage_2_offload arguments)
    if shutil.which("c++") is None:
        pytest.skip("DeepSpeedCPUAdam compiles its kernel on first use, which needs a C++ compiler")
    strategy = {"class_path": "cpu_strategies.CPUDeepSpeedStrategy",
                "init_args": {"process_group_backend": "gloo", "stage": 2, "offload_optimizer": True}}  # fmt: skip
    adam = {"class_path": "deepspeed.ops.adam.DeepSpeedCPUAdam", "init_args": {"lr": 1e-3}}
    facts, policy = finished_run(
        fit_tiny(tiny_run, "cpu_adam", strategy, "float32", optimizer=adam), tiny_run, "cpu_adam"
    )
    assert facts["global_step"] == 3 and facts["adam_steps"] == [3]  # the CPU optimizer stepped 3 times
    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    assert max((policy[k] - initial[k].float()).abs().max().item() for k in policy) > 1e-3


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_in_bf16_mixed(tiny_run, stage):
    # the SDXL configs' precision: DeepSpeed's bf16 mode stores the policy in bf16 and has no autocast,
    # so the UNet's inputs must follow the weights' dtype (they were float32: a dtype error in the
    # first forward)
    proc = fit_tiny(tiny_run, f"zero{stage}_bf16", deepspeed(stage), "bfloat16", precision="bf16-mixed")
    facts, policy = finished_run(proc, tiny_run, f"zero{stage}_bf16")
    assert facts["global_step"] == 3 and math.isfinite(facts["grad_norm"]) and facts["grad_norm"] > 0
    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    assert max((policy[k] - initial[k].float()).abs().max().item() for k in policy) > 1e-3


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_trains_and_exports_lora_like_ddp(tiny_run, capsys):
    # the adapters partitioned beside the frozen base; the reference is the adapters switched off.
    # Lightning's converter keeps the frozen base weights too (popalign's own checkpoints leave them
    # out): export takes the base's and writes the adapters, as from DDP's checkpoint
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from popalign.cli import main

    runs, exported = {}, {}
    for name, strategy in (("zero_lora_ddp", "ddp"), ("zero3_lora", deepspeed(3))):
        ckpts = tiny_run / f"{name}_ckpts"
        proc = fit_tiny(tiny_run, name, strategy, "float32", lora_rank=4, checkpoints=ckpts)
        runs[name] = finished_run(proc, tiny_run, name)
        (saved,) = ckpts.iterdir()
        if saved.is_dir():
            convert_zero_checkpoint_to_fp32_state_dict(str(saved), f"{saved}.consolidated")
            saved = saved.with_name(f"{saved.name}.consolidated")
        out = tiny_run / f"{name}_export"
        assert main(["export", str(saved), "--out", str(out)]) == 0, capsys.readouterr().err
        exported[name] = load_file(str(out / "pytorch_lora_weights.safetensors"))
    (ddp_facts, ddp), (facts, zero3) = runs["zero_lora_ddp"], runs["zero3_lora"]
    assert_trains_lora_like(zero3, ddp, "ZeRO-3")
    assert facts["grad_norm"] == pytest.approx(ddp_facts["grad_norm"], rel=1e-5)
    assert_trains_lora_like(exported["zero3_lora"], exported["zero_lora_ddp"], "ZeRO-3's exported")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_validates_in_one_process(tiny_run):
    # FairnessValidation samples the policy outside the step; in one process ZeRO-3's hooks gather
    # each partitioned weight as the sampler's UNet calls reach it
    validation = {
        "class_path": "popalign.evaluation.validation.FairnessValidation",
        "init_args": {"prompts": ["a photo of a doctor"], "axes": ["gender"], "every_n_steps": 2,
                      "classifier": "test_validation:MeanClassifier", "images_per_prompt": 2, "steps": 2,
                      "height": 16, "width": 16},
    }  # fmt: skip
    proc = fit_tiny(tiny_run, "zero3_val", deepspeed(3), "float32", 2, devices=1, callbacks=[validation])
    facts, _ = finished_run(proc, tiny_run, "zero3_val")
    assert facts["world_size"] == 1 and 0 <= facts["logged"]["val_fair/discrepancy"] <= 1


def test_what_needs_whole_weights_is_refused_only_where_they_are_in_pieces(tiny_model):
    # ZeRO-3 leaves each parameter an empty placeholder outside its gathers, so the EMA update failed
    # with a size mismatch after the first step of a one-process run; it is refused at set-up instead.
    # Validation samples through ZeRO-3's hooks, which gather the weights: one process can do that
    # alone, not several. ZeRO-2 keeps whole weights on every rank: both are allowed.
    from popalign.evaluation.validation import FairnessValidation
    from popalign.module import PopAlignModule

    module = PopAlignModule(pretrained_model=tiny_model, ema_decay=0.9, reference_dtype="float32")
    callback = FairnessValidation(prompts=["a photo of a doctor"], axes=["gender"], classifier="oracle")
    for processes in (1, 2):
        module._trainer = SimpleNamespace(world_size=processes, strategy=DeepSpeedStrategy(stage=2))
        module.setup("fit")
        callback.setup(module._trainer, module, "validate")
        module._trainer = SimpleNamespace(world_size=processes, strategy=DeepSpeedStrategy(stage=3))
        with pytest.raises(UserError, match="ema_decay.*DeepSpeedStrategy.*partitioned by ZeRO-3"):
            module.setup("fit")
    callback.setup(SimpleNamespace(world_size=1, strategy=DeepSpeedStrategy(stage=3)), module, "validate")
    with pytest.raises(UserError, match="FairnessValidation.*DeepSpeedStrategy"):
        callback.setup(SimpleNamespace(world_size=2, strategy=DeepSpeedStrategy(stage=3)), module, "validate")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero2_keeps_the_average_ddp_keeps_and_exports_it(tiny_run, capsys):
    # every rank holds whole weights after DeepSpeed's step, so each keeps the same EMA; the buffers
    # reach the checkpoint folder, and Lightning's converter keeps them for `popalign export --ema`,
    # which must give DDP's average
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from popalign.cli import main

    averages = {}
    for name, strategy in (("ema_ddp", "ddp"), ("ema_zero2", deepspeed(2))):
        ckpts = tiny_run / f"{name}_ckpts"
        proc = fit_tiny(
            tiny_run, name, strategy, "float32", clip=1.0, optimizer=SGD, ema_decay=0.5, checkpoints=ckpts
        )
        finished_run(proc, tiny_run, name)
        (saved,) = ckpts.iterdir()
        if saved.is_dir():
            convert_zero_checkpoint_to_fp32_state_dict(str(saved), f"{saved}.consolidated")
            saved = saved.with_name(f"{saved.name}.consolidated")
        out = tiny_run / f"{name}_export"
        assert main(["export", str(saved), "--out", str(out), "--ema"]) == 0, capsys.readouterr().err
        averages[name] = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    ddp, zero2 = averages["ema_ddp"], averages["ema_zero2"]
    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    assert_trains_like(zero2, ddp, initial, "ZeRO-2's average")


def test_selective_checkpointing_is_refused_under_zero3(tiny_model):
    # save_matmuls under ZeRO-3 ended 1 % of the training's movement away from DDP's weights after 3
    # steps on two CPU processes (full checkpointing matched: the test above); refused, not guessed at
    from popalign.module import PopAlignModule

    module = PopAlignModule(pretrained_model=tiny_model, gradient_checkpointing="save_matmuls")
    module._trainer = SimpleNamespace(world_size=2, strategy=DeepSpeedStrategy(stage=2))
    module.setup("fit")
    module._trainer = SimpleNamespace(world_size=1, strategy=DeepSpeedStrategy(stage=3))
    with pytest.raises(UserError, match="gradient_checkpointing: save_matmuls .* ZeRO-3 .* true"):
        module.setup("fit")
    full = PopAlignModule(pretrained_model=tiny_model, gradient_checkpointing=True)
    full._trainer = module._trainer
    full.setup("fit")


def _offloading(**config) -> DeepSpeedStrategy:
    zero = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    return DeepSpeedStrategy(config={"zero_optimization": zero, **config})


def test_offload_takes_deepspeeds_cpu_optimizers_or_says_what_to_set():
    from popalign.distributed import check_offloaded_optimizer

    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(
        UserError, match="not AdamW: set --model.init_args.optimizer deepspeed.ops.adam.DeepSpeedCPUAdam"
    ):
        check_offloaded_optimizer(_offloading(), adamw)
    check_offloaded_optimizer(_offloading(zero_force_ds_cpu_optimizer=False), adamw)  # the user's choice
    check_offloaded_optimizer(DeepSpeedStrategy(stage=2), adamw)  # nothing offloaded
    check_offloaded_optimizer(None, adamw)  # no trainer
    if shutil.which("c++") is None:
        pytest.skip("DeepSpeedCPUAdam compiles its kernel on first use, which needs a C++ compiler")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    check_offloaded_optimizer(_offloading(), DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))]))


def test_train_py_refuses_an_optimizer_offload_cannot_run_before_the_run_starts(
    tmp_path, monkeypatch, capsys
):
    from test_train_cli import CONFIG, _fails

    from popalign.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "runs/tiny", "--groups", "2"]) == 0
    strategy = "--trainer.strategy=" + json.dumps(
        {"class_path": "cpu_strategies.CPUDeepSpeedStrategy", "init_args": {"offload_optimizer": True}}
    )
    err = _fails(capsys, ["fit", "--config", CONFIG, strategy])
    assert (
        err[-1].startswith("train.py: error: DeepSpeed's optimizer offload (to cpu)")
        and "not AdamW" in err[-1]
    )
    assert not (tmp_path / "runs/tiny/logs").exists()  # refused before the logger made a run folder


def test_train_py_stages_the_saves_of_lightnings_deepspeed():
    from popalign.checkpointing import prepare_checkpointing
    from popalign.distributed import StagedDeepSpeedStrategy

    trainer = SimpleNamespace(checkpoint_callbacks=[], logger=None, strategy=DeepSpeedStrategy(stage=3))
    prepare_checkpointing(trainer)  # as train.py does with --trainer.strategy deepspeed_stage_3
    assert type(trainer.strategy) is StagedDeepSpeedStrategy and trainer.strategy.zero_stage_3
