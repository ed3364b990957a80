"""The generate stage on a tiny SDXL pipeline: seeds, sampling, shards, resuming, Lightning predict."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GEN_FLAGS, N_IMAGES, TINY_LATENT, run_cli

from popalign.data.generate import (
    GenerateSettings,
    check_settings,
    generate,
    image_seed,
    record_settings,
)
from popalign.data.images import completed_prompts, iter_image_samples, prompt_records, recorded_image_count
from popalign.data.pipeline import sample
from popalign.data.prompts import read_prompt_table
from popalign.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_image_seed_is_a_stable_function_of_seed_prompt_and_index():
    seeds = {image_seed(s, p, i) for s in (0, 1) for p in ("p0000", "p0001") for i in (0, 1)}
    assert len(seeds) == 8  # every argument changes the seed
    assert image_seed(0, "p0000", 1) == image_seed(0, "p0000", 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_sample_keeps_scaled_latents_and_decodes_like_the_pipeline(pipe):
    prompts, seeds = ["a photo of a doctor", "a photo of a nurse"], [11, 12]
    images, latents = sample(pipe, prompts, seeds, steps=2, guidance_scale=5.0, height=16, width=16)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    assert latents.dtype == np.float16 and latents.shape == (2, 4, TINY_LATENT, TINY_LATENT)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ref = pipe(
        prompt=prompts,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=16,
        width=16,
        generator=gens,
        output_type="np",
    ).images
    assert np.abs(images.astype(int) - np.round(ref * 255).astype(int)).max() <= 1
    # an image does not depend on its batch: the second prompt alone gives the same latent
    _, alone = sample(pipe, prompts[1:], seeds[1:], steps=2, guidance_scale=5.0, height=16, width=16)
    np.testing.assert_allclose(alone[0].astype(np.float32), latents[1].astype(np.float32), atol=2e-3)


def test_generate_writes_prompt_whole_shards_with_latents_and_metadata(generated, table, pipe):
    names = sorted(p.name for p in generated.iterdir())
    # 6 prompts x 4 images, shards closed after 8 images = 2 prompts each
    assert names == ["done-r0.jsonl", "generate.json"] + [f"images-r0-00000{i}.tar" for i in range(3)]
    with tarfile.open(generated / "images-r0-000000.tar") as tar:
        assert sorted(tar.getnames()[:3]) == ["p0000-0000.json", "p0000-0000.latent.npy", "p0000-0000.png"]
    samples = list(iter_image_samples(generated))
    rows = {r.prompt_id: r for r in read_prompt_table(table)}
    assert [s.key for s in samples] == [f"{pid}-{i:04d}" for pid in rows for i in range(N_IMAGES)]
    s = samples[N_IMAGES + 1]  # p0000-a0000, image 1
    assert s.meta["prompt"] == rows["p0000-a0000"].prompt and s.meta["classes"] == {"gender": "male"}
    assert s.meta["seed"] == image_seed(0, "p0000-a0000", 1)
    assert {k: s.meta[k] for k in ("steps", "guidance_scale", "height", "width", "kind", "neutral_id")} == {
        "steps": 2, "guidance_scale": 1.0, "height": 16, "width": 16, "kind": "augmented", "neutral_id": "p0000",
    }  # fmt: skip
    latent = s.latent()
    assert latent.dtype == np.float16 and latent.shape == (4, TINY_LATENT, TINY_LATENT)
    from popalign.data.encode import decode_latents

    decoded = decode_latents(pipe.vae, torch.from_numpy(latent[None]).float())[0]
    assert np.abs(decoded.astype(int) - s.image().astype(int)).mean() < 2  # the image is that latent decoded
    assert completed_prompts(generated) == set(rows)
    assert recorded_image_count(generated) == len(samples) == 6 * N_IMAGES  # `label`'s progress total


def test_generate_resumes_and_skips_finished_prompts(tiny_model, table, tmp_path, pipe, monkeypatch, capsys):
    out = tmp_path / "images"

    def generate_cli(*extra):
        return run_cli(
            ["generate", "--model", tiny_model, "--prompts", table, "--out", out, *GEN_FLAGS, *extra], capsys
        )

    code, stdout, _ = generate_cli("--kinds", "neutral")
    assert code == 0 and "0 already done, 8 images" in stdout
    first = (out / "images-r0-000000.tar").read_bytes()
    # a run that dies in its third prompt keeps the shard of the first two, drops the unfinished one
    rows = read_prompt_table(table)
    settings = GenerateSettings(tiny_model, N_IMAGES, steps=2, guidance_scale=1.0, height=16, width=16)
    calls = {"n": 0}
    real = sample

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr("popalign.data.generate.sample", flaky)
    with pytest.raises(RuntimeError):
        generate(rows, settings, out, shard_size=8, pipe=pipe, progress=False)
    monkeypatch.setattr("popalign.data.generate.sample", real)
    assert not list(out.glob("*.tmp"))
    assert completed_prompts(out) == {"p0000", "p0001", "p0000-a0000", "p0000-a0001"}
    # a crash between a shard's rename and its done record: the shard itself still counts
    assert recorded_image_count(out) == 4 * N_IMAGES
    (out / "done-r0.jsonl").write_text((out / "done-r0.jsonl").read_text().splitlines()[0] + "\n")
    assert completed_prompts(out) == {"p0000", "p0001", "p0000-a0000", "p0000-a0001"}
    assert recorded_image_count(out) is None  # uncounted by the records alone
    (out / "images-r0-000099.tar.tmp").write_bytes(b"half a shard")
    (out / "images-r3-000000.tar.tmp").write_bytes(b"half a shard of an earlier run on 4 devices")
    report = generate(rows, settings, out, shard_size=8, pipe=pipe, progress=False)
    assert report["already_done"] == 4 and report["images"] == 2 * N_IMAGES
    assert not list(out.glob("*.tar.tmp"))
    assert (out / "images-r0-000000.tar").read_bytes() == first  # finished work untouched
    keys = [s.key for s in iter_image_samples(out)]
    assert len(keys) == len(set(keys)) == 6 * N_IMAGES
    # more images per prompt: only the missing indices are sampled, with their own seeds
    before = {s.key: s.files["png"] for s in iter_image_samples(out)}
    code, stdout, _ = generate_cli("--images-per-prompt", 6)
    assert code == 0 and "0 already done, 12 images generated (6 topped up to 6)" in stdout
    samples = {s.key: s for s in iter_image_samples(out)}
    assert sorted(samples) == sorted(f"{r.prompt_id}-{i:04d}" for r in rows for i in range(6))
    assert all(samples[k].files["png"] == png for k, png in before.items())  # kept as they were
    assert samples["p0001-a0001-0005"].meta["seed"] == image_seed(0, "p0001-a0001", 5)
    have = {p: sorted(d.indices) for p, d in prompt_records(out).items()}
    assert have == {r.prompt_id: list(range(6)) for r in rows}
    # fewer than a prompt has (a neutral-only run with more images, then this): nothing to do
    code, stdout, _ = generate_cli("--images-per-prompt", 2)
    assert code == 0 and "6 already done, 0 images" in stdout
    # resuming with other settings would mix two samplers in one folder
    code, _, err = generate_cli("--steps", "3")
    assert code == 2 and "generate.json" in err and "steps=2" in err and len(err.strip().splitlines()) == 1


def _cut(shard: Path, how: str) -> None:
    """Cut a finished shard short, as a full disk or a bad copy would."""
    with tarfile.open(shard) as tar:
        last_image = tar.getmembers()[-3]  # the first file of the shard's last image
    cut = {
        "empty": 0,
        "mid-data": last_image.offset_data + 10,  # tarfile: "unexpected end of data"
        "mid-header": last_image.offset + 100,  # tarfile reads it as a shorter archive, no error
    }[how]
    shard.write_bytes(shard.read_bytes()[:cut])


@pytest.mark.parametrize("how", ["empty", "mid-data", "mid-header"])
def test_resume_refuses_a_recorded_shard_cut_short(generated, tiny_model, table, tmp_path, capsys, how):
    # the done log still lists the shard's prompts: a resume must not trust it (label and build
    # would fail on it), nor top its prompts up into a new shard beside it
    out = tmp_path / "images"
    shutil.copytree(generated, out)
    shard = out / "images-r0-000001.tar"
    _cut(shard, how)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["generate", "--model", tiny_model, "--prompts", table, "--out", out, *GEN_FLAGS]
    for per_prompt in (N_IMAGES, N_IMAGES + 1):
        code, stdout, err = run_cli([*args, "--images-per-prompt", per_prompt], capsys)
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
        assert f"{shard}: " in err and "delete it to regenerate its prompts" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    # the advice works: the deleted shard's prompts are sampled again, the folder reads whole
    shard.unlink()
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and f"4 already done, {2 * N_IMAGES} images generated" in stdout
    keys = [s.key for s in iter_image_samples(out)]
    assert len(keys) == len(set(keys)) == 6 * N_IMAGES


def test_generate_through_lightning_predict_gives_the_same_images(
    generated, table, tiny_model, pipe, tmp_path
):
    rows = [r for r in read_prompt_table(table) if r.prompt_id == "p0001-a0001"]
    settings = GenerateSettings(tiny_model, N_IMAGES, steps=2, guidance_scale=1.0, height=16, width=16)
    report = generate(
        rows, settings, tmp_path, use_trainer=True, devices=1, accelerator="cpu", pipe=pipe, progress=False
    )
    assert report["images"] == N_IMAGES
    ours = {s.key: s.image() for s in iter_image_samples(tmp_path)}
    loop = {s.key: s.image() for s in iter_image_samples(generated) if s.prompt_id == "p0001-a0001"}
    assert ours.keys() == loop.keys()
    for key in ours:
        assert np.abs(ours[key].astype(int) - loop[key].astype(int)).max() <= 1


def test_settings_compare_local_folders_by_path_and_record_the_vae_dtype(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "images"
    out.mkdir()
    record_settings(out, GenerateSettings(tiny_model, steps=2))
    # the same folder spelled another way (relative, with ./, from another cwd) is the same model
    monkeypatch.chdir(Path(tiny_model).parent)
    for spelling in ("model", "./model", "model/", f"{tiny_model}/../model"):
        check_settings(out, GenerateSettings(spelling, steps=2))
    with pytest.raises(UserError, match="steps=2"):
        check_settings(out, GenerateSettings("./model", steps=3))
    # the VAE's decode dtype changes the images: a resume with another one is refused
    with pytest.raises(UserError, match="vae_dtype=None, not 'float16'"):
        check_settings(out, GenerateSettings(tiny_model, steps=2, vae_dtype="float16"))


def test_loaders_ask_for_the_dtype_without_the_deprecated_argument(tiny_model):
    """Every loader gets the dtype it asked for, and none passes ``torch_dtype`` where the installed
    diffusers/transformers have renamed it (they print a FutureWarning on every load)."""
    import warnings

    from popalign.data.encode import TextEncoders
    from popalign.data.pipeline import load_pipeline
    from popalign.models.loading import load_unet

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(tiny_model, vae=tiny_model, unet=tiny_model, dtype="bfloat16")
        unet = load_unet(tiny_model)
        text = TextEncoders.from_pretrained(tiny_model, dtype="bfloat16")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert unet.dtype == torch.float32
    assert {p.dtype for enc in text.encoders for p in enc.parameters()} == {torch.bfloat16}
    assert not [str(w.message) for w in caught if "torch_dtype" in str(w.message)]


@pytest.mark.parametrize(
    "library, installed, name",
    [
        ("diffusers", "0.39.0", "torch_dtype"),
        ("diffusers", "0.40.0", "dtype"),
        ("diffusers", "1.2.0.dev0", "dtype"),
        ("transformers", "4.55.4", "torch_dtype"),
        ("transformers", "4.56.0", "dtype"),
    ],
)
def test_dtype_argument_follows_the_installed_version(monkeypatch, library, installed, name):
    import importlib.metadata

    from popalign.models.loading import dtype_kwarg

    monkeypatch.setattr(importlib.metadata, "version", lambda lib: installed if lib == library else "0")
    assert dtype_kwarg(torch.float16, library) == {name: torch.float16}


def test_cast_changes_the_dtype_without_diffusers_float32_warning(tiny_model, monkeypatch):
    """diffusers' ``to`` warns about "modules that should be kept in float32" on every cast, even for
    models that keep none; ``cast`` skips that warning for them and keeps diffusers' path for the rest."""
    import diffusers.models.modeling_utils as mu

    from popalign.models.loading import cast, load_unet

    warned, through_diffusers = [], []
    monkeypatch.setattr(mu.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    diffusers_to = mu.ModelMixin.to
    monkeypatch.setattr(
        mu.ModelMixin, "to", lambda self, *a, **k: through_diffusers.append(k) or diffusers_to(self, *a, **k)
    )
    unet = load_unet(tiny_model)
    assert cast(unet, torch.bfloat16) is unet and {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert warned == [] and through_diffusers == []
    monkeypatch.setattr(type(unet), "_keep_in_fp32_modules", ["conv_out"])
    cast(unet, torch.float16)  # such a model goes through diffusers' own to() (which may warn)
    assert unet.dtype == torch.float16 and through_diffusers == [{"dtype": torch.float16}]


@pytest.mark.parametrize("layout", ["unet/config.json", "config.json"])
def test_a_unet_export_given_as_lora_says_so(tmp_path, layout):
    # `popalign export` of a full run (unet/ or a bare UNet folder) passed to --lora: diffusers would
    # report a missing pytorch_lora_weights.bin
    from popalign.errors import UserError
    from popalign.models.loading import load_lora_weights

    (tmp_path / layout).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / layout).write_text("{}")
    with pytest.raises(
        UserError,
        match=f"^{tmp_path}: a UNet export \\(full weights\\), not LoRA weights; pass it as --unet$",
    ):
        load_lora_weights(None, str(tmp_path))
