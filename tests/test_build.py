"""The build stage: population groups through training's first step, caption encoding, world images."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_LATENT, run_cli

from popalign.data.axes import load_axes
from popalign.data.build import group_quotas
from popalign.data.images import ImageShardWriter, encode_image, iter_image_samples
from popalign.data.prompts import expand_prompts, write_prompt_table

WORLD_AXES = [str(Path("popalign/world/axes") / f"{n}.yaml") for n in ("shirt", "tone")]

pytestmark = pytest.mark.usefixtures("one_thread")


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

    # populations of one member: each group rounds 0.5 up for one class, and a prompt's four groups
    # take turns, two of each class (rounding each group on its own tied by chance, 4-0 at times)
    plain = tmp_path / "plain"
    code, _, _ = run_cli(
        [*args[:-1], plain, "--population-size", 1, "--groups-per-prompt", 4, "--no-source-embeds"], capsys
    )
    plain_groups = [PopulationGroup.from_sample(s) for s in iter_tar_samples(str(plain / "shard-000000.tar"))]
    assert code == 0 and not any(p.has_sources or "sources" in p.meta for p in plain_groups)
    for prompt in ("a photo of a doctor", "a photo of a nurse"):
        genders = [
            p.meta["preferred_labels"][0]["gender"] for p in plain_groups if p.meta["prompt"] == prompt
        ]
        assert sorted(genders) == ["female", "female", "male", "male"]

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


def test_a_damaged_build_is_rebuilt_not_taken_as_up_to_date(
    generated, labels, table, tiny_model, tmp_path, capsys, monkeypatch
):
    """A re-run with unchanged inputs is "up to date" only when every shard has the size summary.json
    recorded and was drawn by the current rule: a truncated shard, a summary from before sizes were
    recorded, or shards drawn by an earlier rule are rebuilt."""
    out = tmp_path / "shards"
    args = ["build", "--images", generated, "--labels", labels, "--prompts", table, "--model", tiny_model,
        "--out", out, "--population-size", 2, "--groups-per-prompt", 2]  # fmt: skip
    assert run_cli(args, capsys)[0] == 0
    shard, summary = out / "shard-000000.tar", out / "summary.json"
    good = shard.read_bytes()
    with shard.open("r+b") as f:
        f.truncate(len(good) // 2)  # cut mid-sample, as a full disk or an interrupted copy would
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "up to date" not in stdout and shard.read_bytes() == good  # same groups, same bytes
    # a summary written before the sizes were recorded cannot vouch for its shards
    old = json.loads(summary.read_text())
    assert old.pop("shard_bytes") == [len(good)]
    summary.write_text(json.dumps(old))
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "up to date" not in stdout and shard.read_bytes() == good
    assert json.loads(summary.read_text())["shard_bytes"] == [len(good)]
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "summary.json"]  # no .partial left
    assert "up to date" in run_cli(args, capsys)[1]
    monkeypatch.setattr("popalign.data.build.DRAW_RULE", 0)  # shards of an earlier rule: drawn again
    assert "up to date" not in run_cli(args, capsys)[1] and "up to date" in run_cli(args, capsys)[1]
    # a shard added since is not part of this build, and training on OUT would read it: refused
    (out / "shard-000009.tar").write_bytes(good)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "shard-000009.tar: 1 shard(s)" in err and "did not write" in err


def test_inputs_rewritten_unchanged_keep_a_build_up_to_date(
    generated, labels, table, tiny_model, tmp_path, capsys
):
    """Re-running ``prompts`` or ``label`` rewrites their files with the same content and a new mtime:
    the build stays up to date. Other content, or an image shard written again, rebuilds it."""
    images, text = tmp_path / "images", {p: tmp_path / p.name for p in (labels, table)}
    shutil.copytree(generated, images)
    for src, dst in text.items():
        dst.write_bytes(src.read_bytes())
    args = ["build", "--images", images, "--labels", text[labels], "--prompts", text[table],
        "--model", tiny_model, "--out", tmp_path / "shards", "--population-size", 2, "--groups-per-prompt", 2]  # fmt: skip
    assert run_cli(args, capsys)[0] == 0

    def later(path: Path) -> None:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    for path in text.values():
        path.write_bytes(path.read_bytes())  # what a re-run of prompts / label does
        later(path)
    assert "up to date" in run_cli(args, capsys)[1]
    rows = text[labels].read_text().splitlines(keepends=True)
    text[labels].write_text("".join(reversed(rows)))  # the same labels in another order: other bytes
    assert "up to date" not in run_cli(args, capsys)[1] and "up to date" in run_cli(args, capsys)[1]
    later(next(images.glob("*.tar")))  # a shard written again
    assert "up to date" not in run_cli(args, capsys)[1] and "up to date" in run_cli(args, capsys)[1]


def test_quotas_round_like_largest_remainder_within_a_group():
    def one(target, size, rng=None):
        return group_quotas(target, size, 1, rng)[0].tolist()

    # exact (2, 1.2, 0.8) -> floors (2, 1, 0) -> the one left goes to the largest remainder (0.8)
    assert one([0.5, 0.3, 0.2], 4) == [2, 1, 1]
    # exact 12 x 0.5 = 6 each: no rounding needed
    assert one([0.5, 0.5], 12) == [6, 6]
    # exact (1.5, 1.5): a tie; lowest index first without rng, a random one with it
    assert one([0.5, 0.5], 3) == [2, 1]
    rng = np.random.default_rng(0)
    draws = np.array([one([1 / 6] * 6, 4, rng) for _ in range(600)])
    assert (draws.sum(1) == 4).all() and set(np.unique(draws)) == {0, 1}
    assert np.abs(draws.mean(0) - 4 / 6).max() < 0.1  # ties spread evenly over the classes


def test_quotas_balance_a_prompts_groups_together():
    # the demo's shape: 8 groups of 8 over 6 equally likely classes; each group takes 1 or 2 of a
    # class, and the 64 members hold 10 or 11 of each (rounding group by group gave 8 to 13)
    quotas = np.array(group_quotas([1 / 6] * 6, 8, 8, np.random.default_rng(0)))
    assert (quotas.sum(1) == 8).all() and set(np.unique(quotas)) == {1, 2}
    assert sorted(quotas.sum(0).tolist()) == [10, 10, 11, 11, 11, 11]
    # any target, size and number of groups: every group rounds each class down or up, and every
    # class's total over the first g groups stays within one member of g * size * p_c
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(20_000):
        classes = int(rng.integers(1, 9))
        target = rng.dirichlet(np.full(classes, rng.choice([0.3, 1.0, 10.0])))
        size, groups = int(rng.integers(1, 40)), int(rng.integers(1, 20))
        quotas = np.array(group_quotas(target, size, groups, rng))
        assert (quotas.sum(1) == size).all()
        assert (np.abs(quotas - size * target) < 1 + 1e-9).all()
        shares = np.arange(1, groups + 1)[:, None] * size * target
        worst = max(worst, float(np.abs(quotas.cumsum(0) - shares).max()))
    assert worst < 1


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
