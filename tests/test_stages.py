"""The data stages generate -> label -> build on a tiny SDXL pipeline, through training's first step."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE, TINY_LATENT

from popalign.cli import main
from popalign.data.axes import load_axes
from popalign.data.build import largest_remainder
from popalign.data.generate import GenerateSettings, generate, image_seed, load_pipeline, sample
from popalign.data.images import ImageShardWriter, completed_prompts, encode_image, iter_image_samples
from popalign.data.prompts import expand_prompts, read_prompt_table, write_prompt_table

N_IMAGES = 4  # per prompt
GEN_FLAGS = ["--images-per-prompt", str(N_IMAGES), "--steps", "2", "--height", str(TINY_IMAGE)]
GEN_FLAGS += ["--width", str(TINY_IMAGE), "--guidance-scale", "1.0", "--batch-size", "4", "--shard-size", "8"]
GEN_FLAGS += ["--no-progress"]
WORLD_AXES = [str(Path("popalign/world/axes") / f"{n}.yaml") for n in ("shirt", "tone")]

ORACLE = '''
import hashlib, json
import numpy as np
from popalign.data.classifiers import AttributeClassifier

class Oracle(AttributeClassifier):
    """Labels an image by looking its pixels up in a JSON table {sha1: {axis: class}}."""
    def __init__(self, axes, truth):
        super().__init__(axes)
        self.truth = json.load(open(truth))
    def classify(self, images):
        out = {a.name: np.zeros(len(images), dtype=np.int64) for a in self.axes}
        for i, im in enumerate(images):
            lab = self.truth[hashlib.sha1(im.tobytes()).hexdigest()]
            for a in self.axes:
                out[a.name][i] = -1 if lab[a.name] == "unknown" else a.index(lab[a.name])
        return out
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: threads only add contention on a shared CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """2 neutral prompts x gender: 2 neutral + 4 augmented rows."""
    rows = expand_prompts(
        ["a photo of a {identity} doctor", "a photo of a {identity} nurse"], load_axes(["gender"])
    )
    return write_prompt_table(rows, tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


@pytest.fixture(scope="module")
def generated(tiny_model, table, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "images"
    assert (
        main(["generate", "--model", tiny_model, "--prompts", str(table), "--out", str(out), *GEN_FLAGS]) == 0
    )
    return out


@pytest.fixture(scope="module")
def oracle(generated, tmp_path_factory):
    """A plugin classifier and its truth: augmented images get their prompt's class, except one
    unknown (p0000-a0000-0000) and one disagreeing (p0000-a0001-0001); neutral images are male,
    except p0001-0003 which is unknown."""
    d = tmp_path_factory.mktemp("plugin")
    (d / "oracle_plugin.py").write_text(ORACLE)
    truth = {}
    for s in iter_image_samples(generated):
        label = dict(s.meta["classes"]) or {"gender": "male"}
        label = {"p0000-a0000-0000": {"gender": "unknown"}, "p0000-a0001-0001": {"gender": "male"}}.get(
            s.key, label
        )
        label = {"gender": "unknown"} if s.key == "p0001-0003" else label
        truth[hashlib.sha1(s.image().tobytes()).hexdigest()] = label
    (d / "truth.json").write_text(json.dumps(truth))
    sys.path.insert(0, str(d))
    yield ["--classifier", "oracle_plugin:Oracle", "--classifier-option", f"truth={d / 'truth.json'}"]
    sys.path.remove(str(d))


@pytest.fixture(scope="module")
def labels(generated, oracle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    assert (
        main(
            [
                "label",
                "--images",
                str(generated),
                "--axes",
                "gender",
                *oracle,
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


# ---------------------------------------------------------------- generate
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


def test_generate_resumes_and_skips_finished_prompts(tiny_model, table, tmp_path, pipe, monkeypatch, capsys):
    out = tmp_path / "images"
    code, stdout, _ = run_cli(
        [
            "generate",
            "--model",
            tiny_model,
            "--prompts",
            table,
            "--out",
            out,
            "--kinds",
            "neutral",
            *GEN_FLAGS,
        ],
        capsys,
    )
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
    (out / "done-r0.jsonl").write_text((out / "done-r0.jsonl").read_text().splitlines()[0] + "\n")
    assert completed_prompts(out) == {"p0000", "p0001", "p0000-a0000", "p0000-a0001"}
    (out / "images-r0-000099.tar.tmp").write_bytes(b"half a shard")
    report = generate(rows, settings, out, shard_size=8, pipe=pipe, progress=False)
    assert report["already_done"] == 4 and report["images"] == 2 * N_IMAGES
    assert not (out / "images-r0-000099.tar.tmp").exists()
    assert (out / "images-r0-000000.tar").read_bytes() == first  # finished work untouched
    keys = [s.key for s in iter_image_samples(out)]
    assert len(keys) == len(set(keys)) == 6 * N_IMAGES
    # another count per prompt is fine (images do not depend on it); finished prompts stay skipped
    code, stdout, _ = run_cli(
        [
            "generate",
            "--model",
            tiny_model,
            "--prompts",
            table,
            "--out",
            out,
            *GEN_FLAGS,
            "--images-per-prompt",
            6,
        ],
        capsys,
    )
    assert code == 0 and "6 already done, 0 images" in stdout
    # resuming with other settings would mix two samplers in one folder
    code, _, err = run_cli(
        ["generate", "--model", tiny_model, "--prompts", table, "--out", out, *GEN_FLAGS, "--steps", "3"],
        capsys,
    )
    assert code == 2 and "generate.json" in err and "steps=2" in err and len(err.strip().splitlines()) == 1


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


# ---------------------------------------------------------------- label
def test_label_writes_rows_and_resumes(generated, labels, oracle, tmp_path, capsys):
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 6 * N_IMAGES
    by_key = {r["key"]: r for r in rows}
    assert by_key["p0000-a0001-0000"]["labels"] == {"gender": "female"}
    assert by_key["p0000-a0000-0000"]["labels"] == {"gender": "unknown"}
    assert by_key["p0000-0002"] == {
        "key": "p0000-0002",
        "prompt_id": "p0000",
        "shard": "images-r0-000000.tar",
        "labels": {"gender": "male"},
    }
    # an interrupted run left 5 rows and half a line in OUT.partial: only the other 19 are labelled
    out = tmp_path / "labels.jsonl"
    lines = labels.read_text().splitlines(keepends=True)
    (tmp_path / "labels.jsonl.partial").write_text("".join(lines[:5]) + lines[5][:20])
    code, stdout, _ = run_cli(
        ["label", "--images", generated, "--axes", "gender", *oracle, "--out", out, "--no-progress"], capsys
    )
    assert code == 0 and "19 labelled, 5 already labelled" in stdout
    assert sorted(out.read_text().splitlines()) == sorted(labels.read_text().splitlines())
    assert not (tmp_path / "labels.jsonl.partial").exists()
    code, stdout, _ = run_cli(
        ["label", "--images", generated, "--axes", "gender", *oracle, "--out", out, "--no-progress"], capsys
    )
    assert code == 0 and "0 labelled, 24 already labelled" in stdout


# ---------------------------------------------------------------- build -> datamodule -> training step
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_build_balances_populations_and_trains_one_step(
    generated, labels, table, tiny_model, pipe, tmp_path, capsys
):
    from popalign.data.datamodule import PopulationDataModule
    from popalign.data.schema import PopulationGroup
    from popalign.data.shards import iter_tar_samples
    from popalign.module import PopAlignModule
    from popalign.objectives import PopAlignLoss

    out = tmp_path / "shards"
    args = [
        "build",
        "--images",
        generated,
        "--labels",
        labels,
        "--prompts",
        table,
        "--model",
        tiny_model,
        "--out",
        out,
    ]
    code, stdout, _ = run_cli([*args, "--population-size", 2, "--groups-per-prompt", 2], capsys)
    assert code == 0 and "groups written: 4" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["excluded"] == {"label_disagreed": 1, "unknown": 1}
    # K = 2 over target (0.5, 0.5): one male and one female per group, 2 prompts x 2 groups
    assert summary["counts"]["preferred"]["joint"] == {"female": 4, "male": 4}
    assert sum(summary["counts"]["dispreferred"]["gender"].values()) == 8
    assert summary["prompts"] == {"neutral": 2, "built": 2, "skipped": []}

    latents = {s.key: s.latent() for s in iter_image_samples(generated)}
    groups = [PopulationGroup.from_sample(s) for s in iter_tar_samples(str(out / "shard-000000.tar"))]
    assert [g.key for g in groups] == ["p0000-g0000", "p0000-g0001", "p0001-g0000", "p0001-g0001"]
    g = groups[2]
    assert (
        g.meta["prompt"] == "a photo of a nurse"
        and g.meta["dispreferred_sources"] == ["a photo of a nurse"] * 2
    )
    assert sorted(lab["gender"] for lab in g.meta["preferred_labels"]) == ["female", "male"]
    np.testing.assert_array_equal(g.preferred, np.stack([latents[k] for k in g.meta["preferred_keys"]]))
    np.testing.assert_array_equal(g.dispreferred, np.stack([latents[k] for k in g.meta["dispreferred_keys"]]))
    assert all(k.startswith("p0001-") and k.count("-") == 1 for k in g.meta["dispreferred_keys"])
    np.testing.assert_array_equal(g.time_ids, [16, 16, 0, 0, 16, 16])
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            "a photo of a nurse", device="cpu", do_classifier_free_guidance=False
        )
    np.testing.assert_allclose(g.prompt_embeds.astype(np.float32), embeds[0].numpy(), atol=2e-3)
    np.testing.assert_allclose(g.pooled_prompt_embeds.astype(np.float32), pooled[0].numpy(), atol=2e-3)
    # each preferred member's own (identity-specific) caption is stored too, for preservation_weight
    assert set(g.meta["sources"]) == set(g.meta["preferred_sources"]) and "nurse" in g.meta["sources"][0]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            g.meta["sources"], device="cpu", do_classifier_free_guidance=False
        )
    np.testing.assert_allclose(g.source_prompt_embeds.astype(np.float32), embeds.numpy(), atol=2e-3)
    np.testing.assert_allclose(g.source_pooled_prompt_embeds.astype(np.float32), pooled.numpy(), atol=2e-3)

    plain = tmp_path / "plain"
    code, _, _ = run_cli(
        [*args[:-1], plain, "--population-size", 2, "--groups-per-prompt", 2, "--no-source-embeds"], capsys
    )
    plain_groups = [PopulationGroup.from_sample(s) for s in iter_tar_samples(str(plain / "shard-000000.tar"))]
    assert code == 0 and not any(p.has_sources or "sources" in p.meta for p in plain_groups)

    before = (out / "shard-000000.tar").stat().st_mtime_ns
    code, stdout, _ = run_cli([*args, "--population-size", 2, "--groups-per-prompt", 2], capsys)
    assert code == 0 and "up to date" in stdout and (out / "shard-000000.tar").stat().st_mtime_ns == before

    dm = PopulationDataModule(train_shards=str(out), groups_per_batch=2, pairs_per_group=2, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (8, 4, TINY_LATENT, TINY_LATENT)
    assert batch["source_prompt_embeds"].shape == (4, *batch["prompt_embeds"].shape[1:])
    module = PopAlignModule(
        pretrained_model=tiny_model,
        objective=PopAlignLoss(beta=500.0),
        reference_dtype="float32",
        preservation_weight=100.0,
    )
    loss = module.training_step(batch, 0)
    # policy == reference at the start: g = 0 for every sample, kappa = 0, loss = -log sigmoid(0) = log 2,
    # and the preservation term is 0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())


def test_largest_remainder_rounding():
    # exact (2, 1.2, 0.8) -> floors (2, 1, 0) -> the one left goes to the largest remainder (0.8)
    assert largest_remainder([0.5, 0.3, 0.2], 4).tolist() == [2, 1, 1]
    # exact 12 x 0.5 = 6 each: no rounding needed
    assert largest_remainder([0.5, 0.5], 12).tolist() == [6, 6]
    # exact (1.5, 1.5): a tie; lowest index first without rng, a random one with it
    assert largest_remainder([0.5, 0.5], 3).tolist() == [2, 1]
    rng = np.random.default_rng(0)
    draws = np.array([largest_remainder([1 / 6] * 6, 4, rng) for _ in range(600)])
    assert (draws.sum(1) == 4).all() and set(np.unique(draws)) == {0, 1}
    assert np.abs(draws.mean(0) - 4 / 6).max() < 0.1  # ties spread evenly over the classes


def test_world_images_without_latents_are_labelled_and_vae_encoded(tiny_model, tmp_path, capsys):
    """World images at 32 px without latent.npy: the world rule labels them, build VAE-encodes them."""
    from diffusers import AutoencoderKL

    from popalign.data.encode import encode_images
    from popalign.data.schema import PopulationGroup
    from popalign.data.shards import iter_tar_samples
    from popalign.world import WorldSpec
    from popalign.world.render import render_batch

    spec, axes = WorldSpec(), load_axes(WORLD_AXES)
    rows = expand_prompts(["a photo of a {identity} doctor", "a photo of a {identity} chef"], axes)
    write_prompt_table(rows, tmp_path / "prompts.jsonl")
    rng, pixels = np.random.default_rng(0), {}
    with ImageShardWriter(tmp_path / "images") as writer:
        for row in rows:
            if row.prompt_id == "p0001-a0000":
                continue  # the chef prompt lacks its red/light images: skipped
            n = 6 if row.kind == "neutral" else 2
            cls = row.classes or {"shirt": "red", "tone": "light"}
            attrs = {a: np.full(n, spec.axis(a).class_index(c)) for a, c in cls.items()}
            images = render_batch(np.zeros(n, dtype=np.int64), attrs, rng, spec)
            if row.prompt_id == "p0000-a0000":  # red/light, but one image shows a blue shirt
                images[1] = render_batch(np.zeros(1, dtype=np.int64), {"shirt": [1], "tone": [0]}, rng, spec)[
                    0
                ]
            if row.prompt_id == "p0000-a0001":  # red/medium, but one image is blank grey: unknown
                images[0] = 128
            meta = {
                "prompt_id": row.prompt_id,
                "kind": row.kind,
                "prompt": row.prompt,
                "height": 32,
                "width": 32,
            }
            keys = [f"{row.prompt_id}-{i:04d}" for i in range(n)]
            pixels.update(zip(keys, images))
            writer.write_prompt(
                row.prompt_id, [encode_image(k, im, None, {**meta, "seed": 0}) for k, im in zip(keys, images)]
            )
    label_args = ["label", "--images", tmp_path / "images", "--axes", *WORLD_AXES, "--classifier", "world"]
    assert run_cli([*label_args, "--out", tmp_path / "labels.jsonl", "--no-progress"], capsys)[0] == 0
    labels = {
        json.loads(x)["key"]: json.loads(x)["labels"]
        for x in (tmp_path / "labels.jsonl").read_text().splitlines()
    }
    assert labels["p0000-a0000-0001"] == {"shirt": "blue", "tone": "light"}
    assert labels["p0000-a0001-0000"] == {"shirt": "unknown", "tone": "unknown"}
    assert labels["p0000-a0005-0001"] == {"shirt": "blue", "tone": "dark"}

    out = tmp_path / "shards"
    code, stdout, _ = run_cli(["build", "--images", tmp_path / "images", "--labels", tmp_path / "labels.jsonl",
        "--prompts", tmp_path / "prompts.jsonl", "--axes", *WORLD_AXES, "--model", tiny_model, "--out", out,
        "--population-size", 6, "--groups-per-prompt", 1], capsys)  # fmt: skip
    assert code == 0, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["excluded"] == {"label_disagreed": 1, "unknown": 1}
    # K = 6 over a uniform target on 2 x 3 joint classes: exactly one member of each
    assert summary["counts"]["preferred"]["joint"] == {
        c: 1 for c in ("blue/dark", "blue/light", "blue/medium", "red/dark", "red/light", "red/medium")
    }
    assert summary["prompts"]["built"] == 1 and summary["groups_written"] == 1
    (skip,) = summary["prompts"]["skipped"]
    assert skip["neutral_id"] == "p0001" and "red/light 0/1" in skip["reason"]
    assert summary["vae_encoded"] == 12  # 6 preferred + 6 dispreferred, none had latent.npy
    (group,) = [PopulationGroup.from_sample(s) for s in iter_tar_samples(str(out / "shard-000000.tar"))]
    assert group.preferred.shape == (6, 4, 16, 16) and group.dispreferred.shape == (6, 4, 16, 16)
    np.testing.assert_array_equal(group.time_ids, [32, 32, 0, 0, 32, 32])
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    key = group.meta["preferred_keys"][0]
    np.testing.assert_allclose(
        group.preferred[0].astype(np.float32),
        encode_images(vae, pixels[key][None])[0].astype(np.float32),
        atol=1e-3,
    )


# ---------------------------------------------------------------- text encoding
def test_text_encoders_match_the_pipelines_encode_prompt(tiny_model, pipe, caplog):
    from popalign.data.encode import TextEncoders, time_ids

    long = "a photo of a doctor " + "with a smiling person " * 20  # 85 words: over 77 tokens
    prompts = ["a photo of a nurse", long]
    with caplog.at_level("WARNING", logger="popalign.data.encode"):
        embeds, pooled = TextEncoders.from_pretrained(tiny_model).encode(prompts)
    assert "1 of 2 captions are longer than 77 tokens" in caplog.text
    assert embeds.dtype == np.float16 and embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    np.testing.assert_allclose(embeds.astype(np.float32), ref.numpy(), rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(pooled.astype(np.float32), ref_pooled.numpy(), rtol=1e-3, atol=2e-3)
    assert time_ids(1024, 768).tolist() == [1024, 768, 0, 0, 1024, 768]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing complete
def fails(args: list, capsys, *needles: str) -> str:
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def inputs(generated, labels, table, tmp_path) -> dict:
    """Writable copies of the generated images, labels and prompt table."""
    shutil.copytree(generated, tmp_path / "images")
    shutil.copy(labels, tmp_path / "labels.jsonl")
    shutil.copy(table, tmp_path / "prompts.jsonl")
    return {
        k: tmp_path / n
        for k, n in (("images", "images"), ("labels", "labels.jsonl"), ("prompts", "prompts.jsonl"))
    }


def build_args(inputs: dict, model: str, out: Path) -> list:
    args = ["build", "--model", model, "--out", out, "--population-size", 2, "--groups-per-prompt", 1]
    return args + [x for k in ("images", "labels", "prompts") for x in (f"--{k}", inputs[k])]


def nothing_built(out: Path) -> bool:
    return not (out / "summary.json").exists() and not list(out.glob("*.tar"))


def test_bad_prompt_tables_and_labels(inputs, tiny_model, tmp_path, capsys):
    out = tmp_path / "shards"
    rows = inputs["prompts"].read_text().splitlines()
    inputs["prompts"].write_text("\n".join(rows[:2] + [rows[2].replace('"classes"', '"klasses"')] + rows[3:]))
    fails(build_args(inputs, tiny_model, out), capsys, f"{inputs['prompts']}:3", "missing key(s) classes")
    fails(
        ["generate", "--model", tiny_model, "--prompts", inputs["prompts"], "--out", tmp_path / "g"],
        capsys,
        "prompts.jsonl:3",
    )
    inputs["prompts"].write_text("\n".join(rows))
    good = inputs["labels"].read_text().splitlines()
    inputs["labels"].write_text("\n".join([good[0].replace('"labels"', '"labelz"'), *good[1:]]))
    fails(build_args(inputs, tiny_model, out), capsys, f"{inputs['labels']}:1", "missing key(s) labels")
    inputs["labels"].write_text("\n".join(good[:-1]))  # one image without a label
    fails(
        build_args(inputs, tiny_model, out), capsys, str(inputs["labels"]), "no label for", "p0001-a0001-0003"
    )
    extra = good[0].replace("p0000-0000", "p0000-0042")
    inputs["labels"].write_text("\n".join([*good, extra]))  # a label for an image that is not there
    fails(build_args(inputs, tiny_model, out), capsys, "1 labelled images are not in", "p0000-0042")
    inputs["labels"].write_text("\n".join([good[0].replace('"male"', '"martian"'), *good[1:]]))
    fails(build_args(inputs, tiny_model, out), capsys, f"{inputs['labels']}:1", "'martian' is not a class")
    assert nothing_built(out)


def test_bad_image_shards(inputs, tiny_model, oracle, tmp_path, capsys):
    out, labels_out = tmp_path / "shards", tmp_path / "new_labels.jsonl"
    # an image of another size than the rest (and than the latents the model gives)
    with ImageShardWriter(inputs["images"], rank=1) as writer:
        meta = {
            "prompt_id": "p0000",
            "kind": "neutral",
            "prompt": "a photo of a doctor",
            "seed": 0,
            "height": 24,
            "width": 24,
        }
        writer.write_prompt(
            "p0000", [encode_image("p0000-0099", np.zeros((24, 24, 3), np.uint8), None, meta)]
        )
    row = json.loads(inputs["labels"].read_text().splitlines()[0])
    with open(inputs["labels"], "a") as f:
        f.write(json.dumps({**row, "key": "p0000-0099"}) + "\n")
    fails(
        build_args(inputs, tiny_model, out),
        capsys,
        "images-r1-000000.tar",
        "p0000-0099",
        "24x24, expected 16x16",
    )
    (inputs["images"] / "images-r1-000000.tar").unlink()
    # a shard cut short (a copy interrupted mid-file)
    shard = inputs["images"] / "images-r0-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    label = [
        "label",
        "--images",
        inputs["images"],
        "--axes",
        "gender",
        *oracle,
        "--out",
        labels_out,
        "--no-progress",
    ]
    fails(label, capsys, str(shard), "truncated")
    assert not labels_out.exists()  # only the .partial, never a table that looks complete
    fails(build_args(inputs, tiny_model, out), capsys, str(shard), "truncated")
    shard.write_bytes(b"not a tar file at all" * 100)
    fails(build_args(inputs, tiny_model, out), capsys, str(shard))
    fails(
        [
            "label",
            "--images",
            tmp_path / "nowhere",
            "--axes",
            "gender",
            "--classifier",
            "world",
            "--out",
            labels_out,
        ],
        capsys,
        "nowhere",
    )
    fails(
        [
            "label",
            "--images",
            inputs["images"],
            "--axes",
            "gender",
            "--classifier",
            "world",
            "--out",
            labels_out,
        ],
        capsys,
        "not a world axis",
    )
    assert nothing_built(out)


def test_model_folder_missing_a_component(inputs, tiny_model, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "text_encoder_2")
    out = tmp_path / "shards"
    fails(build_args(inputs, str(broken), out), capsys, str(broken), "no 'text_encoder_2/' folder")
    assert nothing_built(out)
    fails(
        [
            "generate",
            "--model",
            broken,
            "--prompts",
            inputs["prompts"],
            "--out",
            tmp_path / "g",
            "--no-progress",
        ],
        capsys,
        "text_encoder_2",
    )
    fails(build_args(inputs, str(tmp_path / "no" / "such" / "model"), out), capsys, "model folder not found")
