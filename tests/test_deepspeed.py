"""`train.py fit` under Lightning's DeepSpeed strategy (ZeRO stage 2), two gloo CPU processes on
DeepSpeed's CPU accelerator (tests/cpu_strategies.py). Skipped where DeepSpeed is not installed.

ZeRO-2 averages the same per-rank gradients as DDP, clips them by their global norm itself and runs
the same optimizer on its slice of the state, so after the same steps from the same seed the policies
must agree. Its checkpoints are folders, which `popalign export` takes once Lightning's converter made
them one file.
"""

from __future__ import annotations

import math

import pytest
from launch import assert_trains_like, finished_run, fit_tiny
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

DEEPSPEED = {
    "class_path": "cpu_strategies.CPUDeepSpeedStrategy",
    "init_args": {"stage": 2, "process_group_backend": "gloo"},
}
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}


@pytest.fixture
def cpu_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # also on a machine with a GPU: the runs are on CPUs


@pytest.mark.slow
def test_zero2_trains_like_ddp_resumes_and_exports(tiny_run, cpu_accelerator, capsys):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from popalign.cli import main

    # clipped SGD (norm ~700 clipped to 1): DDP clips with the module's hook, ZeRO-2 by itself
    ddp_facts, ddp = finished_run(
        fit_tiny(tiny_run, "zero_ddp", "ddp", "float32", clip=1.0, optimizer=SGD), tiny_run, "zero_ddp"
    )
    ckpts = tiny_run / "zero_ckpts"
    proc = fit_tiny(tiny_run, "zero2", DEEPSPEED, "float32", clip=1.0, optimizer=SGD, checkpoints=ckpts)
    facts, zero2 = finished_run(proc, tiny_run, "zero2")
    assert facts["global_step"] == ddp_facts["global_step"] == 3 and facts["world_size"] == 2

    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    moved = assert_trains_like(zero2, ddp, initial, "ZeRO-2")
    # the engine's global norm, before clipping, is the module's under DDP
    assert facts["grad_norm"] == pytest.approx(ddp_facts["grad_norm"], rel=1e-5)

    (saved,) = ckpts.iterdir()
    assert saved.is_dir() and (saved / "latest").is_file()
    proc = fit_tiny(tiny_run, "zero2_resumed", DEEPSPEED, "float32", 5, clip=1.0, optimizer=SGD,
                    checkpoints=tiny_run / "zero_ckpts_resumed", ckpt_path=saved)  # fmt: skip
    resumed, after_resume = finished_run(proc, tiny_run, "zero2_resumed")
    straight_proc = fit_tiny(tiny_run, "zero2_straight", DEEPSPEED, "float32", 5, clip=1.0, optimizer=SGD)
    straight_facts, straight = finished_run(straight_proc, tiny_run, "zero2_straight")
    assert resumed["global_step"] == straight_facts["global_step"] == 5
    # steps 4 and 5 start from the saved weights and see the batches an unstopped run sees
    worst = max((after_resume[k] - straight[k]).abs().max().item() for k in straight)
    assert worst < 1e-4 * moved, f"the resumed run ends {worst:.2e} from the unstopped one"

    # export refuses the folder with the command that makes it one file; that file exports the policy
    out = tiny_run / "zero_export"
    assert main(["export", str(saved), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a DeepSpeed checkpoint folder" in err and "convert_zero_checkpoint_to_fp32_state_dict" in err
    convert_zero_checkpoint_to_fp32_state_dict(str(saved), f"{saved}.consolidated")
    assert main(["export", f"{saved}.consolidated", "--out", str(out)]) == 0
    exported = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    assert exported.keys() == zero2.keys()
    assert max((exported[k].float() - zero2[k]).abs().max().item() for k in zero2) == 0


@pytest.mark.slow
def test_zero2_trains_in_bf16_mixed(tiny_run, cpu_accelerator):
    # the SDXL configs' precision: DeepSpeed's bf16 mode stores the policy in bf16 and has no autocast,
    # so the UNet's inputs must follow the weights' dtype (they were float32: a dtype error in the
    # first forward)
    proc = fit_tiny(tiny_run, "zero2_bf16", DEEPSPEED, "bfloat16", precision="bf16-mixed")
    facts, policy = finished_run(proc, tiny_run, "zero2_bf16")
    assert facts["global_step"] == 3 and math.isfinite(facts["grad_norm"]) and facts["grad_norm"] > 0
    initial = load_file(str(tiny_run / "tiny/model/unet/diffusion_pytorch_model.safetensors"))
    assert max((policy[k] - initial[k].float()).abs().max().item() for k in policy) > 1e-3
