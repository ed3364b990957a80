"""The step-throughput benchmark (benchmarks/step_throughput.py) runs in-process on the tiny model; its
pieces (popalign.models.step_timing, synthetic_step, flops, sdxl_arch) are checked directly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from popalign.errors import UserError
from popalign.models.flops import count_flops
from popalign.models.loading import load_unet
from popalign.models.sdxl_arch import SDXL_UNET, SDXL_VAE
from popalign.models.step_timing import StepConfig
from popalign.models.synthetic_step import Shapes, make_batch, make_step, read_shapes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# tiny ops: a second OpenMP thread only adds spin-waiting, badly so on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_writes_rows(bench, tiny_model, tmp_path, capsys, monkeypatch):
    from popalign.models import step_timing

    def broken(module):
        raise ValueError("channels-last broken on purpose")

    monkeypatch.setattr(step_timing, "to_channels_last", broken)
    out = tmp_path / "b.json"
    argv = ["--model", tiny_model, "--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out)]
    # a configuration that fails while it runs is recorded and the run goes on (exit status 1); the
    # module is rebuilt after it, and b2 after b4+ckpt also checks that checkpointing does not leak
    # into the next row
    configs = ["b2+original", "b4+ckpt", "b2+cl", "b2"]
    assert bench.main([*argv, "--configs", *configs]) == 1
    result = json.loads(out.read_text())
    rows = {r["spec"]: r for r in result["rows"]}
    assert list(rows) == configs
    assert rows.pop("b2+cl")["error"] == "ValueError: channels-last broken on purpose"
    for row in rows.values():
        assert row["error"] is None
        assert row["samples_per_s"] > 0 and row["counted_tflop"] > 0 and row["model_tflop"] > 0
        assert row["mfu"] > 0 and row["vs_original"] > 0
    assert rows["b2+original"]["original"] is True and rows["b2+original"]["vs_original"] == 1.0
    # model FLOPs are counted on one pair and scale with the pairs: b4 holds twice b2's
    assert rows["b4+ckpt"]["model_tflop"] == pytest.approx(2 * rows["b2"]["model_tflop"])
    # what the step really computes: + the VAE encoder (original), + the rerun forward (checkpointing)
    assert rows["b2+original"]["counted_tflop"] > rows["b2"]["counted_tflop"] == rows["b2"]["model_tflop"]
    assert rows["b4+ckpt"]["counted_tflop"] > rows["b4+ckpt"]["model_tflop"]
    assert result["meta"]["model"] == tiny_model and result["meta"]["precision"] == "32"
    assert result["meta"]["unet_params"] == sum(p.numel() for p in load_unet(tiny_model).parameters())
    assert result["meta"]["peak_tflops"] == 989.0 and "--model" in result["meta"]["command"]
    table = capsys.readouterr().out
    assert "MFU %" in table and "b2+cl" in table and "error" in table


def test_profile_names_where_a_step_spends_its_time(bench, tiny_model, tmp_path):
    out = tmp_path / "p.json"
    argv = ["--model", tiny_model, "--device", "cpu", "--steps", "1", "--warmup", "1", "--profile"]
    assert bench.main([*argv, "--configs", "b2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    profile = row["profile"]
    assert profile["wall_ms"] > 0 and profile["kernel_ms"] is None and row["busy"] is None  # no CUDA here
    names = [name for name, _, _ in profile["top"]]
    assert len(names) == 15 and ("aten::mm" in names or "aten::addmm" in names)
    assert all(ms >= 0 and calls >= 1 for _, ms, calls in profile["top"])
    # self times of distinct ops on one thread cannot add up to more than the step took
    assert 0 < sum(ms for _, ms, _ in profile["top"]) <= profile["wall_ms"]


def test_counted_flops_are_linear_in_the_batch(tiny_model):
    # per-pair counting then scaling is exact: count a 1-pair and a 2-pair step of the same module
    from popalign.module import PopAlignModule

    module = PopAlignModule(tiny_model)
    opt = module.configure_optimizers()
    shapes = Shapes(latent=8, text_dim=64, pooled_dim=32, image=16)
    cpu = torch.device("cpu")
    flops = [count_flops(make_step(module, opt, make_batch(n, shapes, cpu, False), None, "32"))
             for n in (2, 4)]  # fmt: skip
    assert flops[0] > 0 and flops[1] == 2 * flops[0]


def test_shapes_read_from_the_folder(tiny_model):
    # conftest's tiny model: 16 px images, VAE downsampling x2 -> 8 x 8 latents, D = 64, Dp = 32
    assert read_shapes(Path(tiny_model)) == Shapes(latent=8, text_dim=64, pooled_dim=32, image=16)


def test_missing_model_folder_is_a_user_error(bench, tmp_path):
    with pytest.raises(UserError, match="no unet/config.json"):
        bench.main(["--model", str(tmp_path), "--device", "cpu"])


def test_batch_layout_matches_the_datamodule():
    shapes = Shapes(latent=8, text_dim=64, pooled_dim=32, image=16)
    b = make_batch(4, shapes, torch.device("cpu"), images=True)
    assert b["latents"].shape == (4, 4, 8, 8) and b["latents"].dtype == torch.float16
    assert b["prompt_embeds"].shape == (4, 77, 64) and b["pooled_prompt_embeds"].shape == (4, 32)
    assert b["time_ids"].tolist()[0] == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    assert b["preferred"].tolist() == [True, True, False, False]
    assert b["group"].tolist() == [0, 1, 0, 1]  # row i pairs with row i + 2
    assert b["images"].shape == (4, 3, 16, 16) and -1 <= b["images"].min() and b["images"].max() <= 1


def test_config_specs():
    cfg = StepConfig.parse("b8+ckpt=save_attention+compile_all=max-autotune-no-cudagraphs+cl+lora16")
    assert (cfg.batch, cfg.checkpointing, cfg.compile, cfg.compile_all) == (
        8, "save_attention", "max-autotune-no-cudagraphs", True)  # fmt: skip
    assert cfg.channels_last and cfg.lora_rank == 16 and not cfg.original
    plain = StepConfig.parse("b4+ckpt+compile+original")
    assert (plain.checkpointing, plain.compile, plain.compile_all, plain.original) == (
        "full",
        "default",
        False,
        True,
    )
    with pytest.raises(UserError, match="unknown token 'fast'"):
        StepConfig.parse("b4+fast")
    with pytest.raises(UserError, match="must be even"):
        StepConfig.parse("b3")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("b4+ckpt=bogus", "unknown checkpoint policy 'bogus'"),
        ("b2+lora0", "LoRA rank must be >= 1"),
        ("b2+compile=fast", "unknown compile mode 'fast'"),
    ],
)
def test_specs_that_cannot_run_fail_before_any_work(bench, tmp_path, monkeypatch, spec, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was written for a spec that cannot run")

    monkeypatch.setattr(bench, "write_model", no_model)
    with pytest.raises(UserError, match=message):
        bench.main(["--tiny", "--device", "cpu", "--configs", spec])


def test_cuda_without_cuda_is_a_user_error(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device 'cuda': CUDA is not available"):
        bench.main(["--tiny", "--device", "cuda", "--configs", "b2"])
    with pytest.raises(UserError, match="--device 'nope'"):
        bench.main(["--tiny", "--device", "nope", "--configs", "b2"])


def test_help_shows_the_defaults(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "per configuration (default: 10)" in text and "happens (default: 2)" in text
    assert "torch CPU threads (default: torch's)" in text


def test_sdxl_config_has_sdxl_size():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
