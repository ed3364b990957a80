"""The synthetic world's biased base model: build, cache, load as SDXL, evaluate."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_WORLD_BASE, all_threads, assert_usual_modes

from popalign.cli import main as cli_main
from popalign.errors import UserError
from popalign.world import WorldSpec
from popalign.world import base as wb
from popalign.world import base_eval as be

TINY = TINY_WORLD_BASE


def test_loads_as_sdxl_pipeline(tiny_base):
    from diffusers import StableDiffusionXLPipeline

    meta = json.loads((tiny_base / wb.META_FILE).read_text())
    assert meta["key"] == wb.cache_key(WorldSpec(), TINY)
    assert meta["sampling"] == {"num_inference_steps": 20, "guidance_scale": 1.5, "height": 32, "width": 32}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_base))
    assert pipe.vae.config.scaling_factor == pytest.approx(meta["vae_scaling_factor"])
    assert pipe.vae_scale_factor == 4  # three VAE blocks: 32 px -> 8x8 latents
    assert pipe.unet.config.addition_embed_type == "text_time"
    # every word of the world's prompts is in the tokenizer's vocabulary
    unk = pipe.tokenizer.unk_token_id
    ids = pipe.tokenizer(WorldSpec().augmented_prompt("firefighter", ("blue", "dark"))).input_ids
    assert unk not in ids
    out = pipe(
        ["a photo of a doctor"],
        num_inference_steps=2,
        guidance_scale=2.0,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_frozen_text_encoders_are_the_initial_ones(tiny_base):
    # the text encoders are not trained: the saved weights equal a fresh build with the same seed
    from transformers import CLIPTextModel

    from popalign.models.tiny import TinySDXLConfig, build_tiny_components

    fresh = build_tiny_components(
        TinySDXLConfig(text_hidden=16, text_layers=1, projection_dim=16, vocab_words=WorldSpec().vocabulary())
    )["text_encoder"]
    saved = CLIPTextModel.from_pretrained(str(tiny_base / "text_encoder"))
    for (name, p), q in zip(fresh.named_parameters(), saved.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_cache_hit_returns_without_training(tiny_base, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in tiny_base.rglob("*") if p.is_file()}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached base model was retrained")

    monkeypatch.setattr(wb, "_train", no_training)
    assert wb.build_base_model(tiny_base, config=TINY) == tiny_base
    assert {p: p.stat().st_mtime_ns for p in tiny_base.rglob("*") if p.is_file()} == before


def test_force_and_new_config_rebuild(tiny_base, tmp_path, count_training, umask_022):
    out = tmp_path / "model"
    shutil.copytree(tiny_base, out)
    wb.build_base_model(out, config=TINY, progress=False)
    assert count_training == []  # same key: cached
    wb.build_base_model(out, config=TINY, force=True, progress=False)
    assert count_training == [1]
    other = dataclasses.replace(TINY, seed=1)
    wb.build_base_model(out, config=other, progress=False)
    assert count_training == [1, 1]
    assert wb.read_meta(out)["key"] == wb.cache_key(WorldSpec(), other)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left behind
    assert_usual_modes(out, umask_022)  # the weights too, which safetensors writes 0600


def test_cache_key_covers_spec_config_and_code(monkeypatch):
    spec = WorldSpec()
    key = wb.cache_key(spec, TINY)
    assert key == wb.cache_key(WorldSpec(), dataclasses.replace(TINY))  # deterministic
    assert key != wb.cache_key(spec, dataclasses.replace(TINY, seed=1))
    assert key != wb.cache_key(spec, dataclasses.replace(TINY, unet_steps=3))
    biased_less = WorldSpec(neutral_probs={"shirt": (0.6, 0.4), "tone": (0.8, 0.1, 0.1)})
    assert key != wb.cache_key(biased_less, TINY)
    monkeypatch.setattr(wb, "CODE_VERSION", "another")
    assert key != wb.cache_key(spec, TINY)


def test_cache_key_follows_the_renderer(monkeypatch):
    from popalign.world import render

    key = wb.cache_key(WorldSpec(), TINY)
    monkeypatch.setattr(render, "SHIRTS", render.SHIRTS + 1.0)  # a renderer change the spec cannot see
    assert wb.cache_key(WorldSpec(), TINY) != key


def test_failed_rebuild_keeps_the_old_model(tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "model"
    shutil.copytree(tiny_base, out)

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(wb, "_train", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        wb.build_base_model(out, config=TINY, force=True)
    assert wb.read_meta(out)["key"] == wb.cache_key(WorldSpec(), TINY)
    assert (out / "unet").is_dir() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a popalign base model"):
        wb.build_base_model(tmp_path, config=TINY)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_spec_round_trips_through_metadata():
    spec = WorldSpec(occupation_probs={"chef": {"shirt": (0.3, 0.7)}})
    assert wb.spec_from_dict(json.loads(json.dumps(dataclasses.asdict(spec)))) == spec


def test_joint_discrepancy_arithmetic():
    # labels (a, b): (0,0) x3, (1,0) x1, and one unknown that is left out
    # p = [3/4, 0, 0, 1/4, 0, 0] over the 2x3 cells, u = 1/6:
    # ||p - u||^2 = (3/4 - 1/6)^2 + (1/4 - 1/6)^2 + 4 (1/6)^2 = 49/144 + 1/144 + 16/144 = 66/144
    a = np.array([0, 0, 0, 1, -1])
    b = np.array([0, 0, 0, 0, 2])
    assert be.joint_discrepancy(a, b, 2, 3) == pytest.approx(np.sqrt(66 / 144))
    assert be.joint_discrepancy(np.array([0, 1, 0, 1, 0, 1]), np.array([0, 0, 1, 1, 2, 2]), 2, 3) == 0.0
    assert np.isnan(be.joint_discrepancy(np.array([-1]), np.array([0]), 2, 3))


def test_evaluate_base_reports_every_goal(tiny_base):
    r = be.evaluate_base(tiny_base, n_per_prompt=1, num_inference_steps=2)
    assert r["n_images"] == 6 * 7  # 6 occupations x (1 neutral + 6 augmented prompts)
    assert r["guidance_scale"] == 1.5 and r["num_inference_steps"] == 2
    assert r["train_majority"] == pytest.approx({"shirt": 0.85, "tone": 0.8})
    # joint training bias: outer([.85,.15],[.8,.1,.1]) = [.68,.085,.085,.12,.015,.015] against 1/6:
    # squares .26351 + 2 x .00667 + .00218 + 2 x .02300 = .32503 -> sqrt = 0.5701
    assert r["train_discrepancy"] == pytest.approx(0.5701, abs=1e-4)
    for k in ("augmented_accuracy", "occupation_accuracy", "unknown_rate"):
        assert 0.0 <= r[k] <= 1.0
    assert set(r["augmented_axis_accuracy"]) == {"shirt", "tone"}


class _PlannedPipeline:
    """Stands in for the sampled pipeline: the k-th sample of a prompt is the k-th image planned for it
    (float RGB in [0, 1], as ``output_type="np"`` gives)."""

    def __init__(self, plan: dict[str, list[np.ndarray]]):
        self.plan, self.seen = plan, {}

    def to(self, device):
        return self

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompts, **kw):
        images = []
        for p in prompts:
            k = self.seen[p] = self.seen.get(p, -1) + 1
            images.append(self.plan[p][k].astype(np.float32) / 255)
        return type("Out", (), {"images": np.stack(images)})()


def test_evaluate_base_arithmetic_on_planned_renders(tiny_base, monkeypatch):
    # 6 occupations x (1 neutral + 6 augmented prompts) x 2 samples, rendered with known classes
    from diffusers import StableDiffusionXLPipeline

    from popalign.world.render import render_batch

    spec = wb.spec_from_dict(wb.read_meta(tiny_base)["spec"])
    rng = np.random.default_rng(0)

    def render(occ, shirt, tone):
        return render_batch(np.array([occ]), {"shirt": np.array([shirt]), "tone": np.array([tone])}, rng)[0]

    blank = np.zeros((spec.image_size,) * 2 + (3,), np.uint8)  # nothing readable: every label -1
    plan = {}
    for o in range(6):
        # neutral: (red, light) and (blue, dark) for occupations 0-2; (red, light) twice for 3-4;
        # occupation 5's second sample is unreadable
        second = render(o, 1, 2) if o < 3 else render(o, 0, 0) if o < 5 else blank
        plan[spec.neutral_prompt(o)] = [render(o, 0, 0), second]
        for s in range(2):
            for t in range(3):
                plan[spec.augmented_prompt(o, (s, t))] = [render(o, s, t), render(o, s, t)]
    # "red light doctor": one sample with the wrong shirt, the other with the wrong tone;
    # "blue dark chef": one sample shows a pilot
    plan[spec.augmented_prompt(0, (0, 0))] = [render(0, 1, 0), render(0, 0, 1)]
    plan[spec.augmented_prompt(1, (1, 2))][0] = render(2, 1, 2)
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", lambda *a, **k: _PlannedPipeline(plan))

    r = be.evaluate_base(tiny_base, n_per_prompt=2, num_inference_steps=2)
    assert r["n_images"] == 84
    # joint: both named classes shown. Two of 72 augmented samples miss one axis each -> 70/72
    # (either axis right would give 72/72); per axis one miss each -> 71/72
    assert r["augmented_accuracy"] == pytest.approx(70 / 72)
    assert r["augmented_axis_accuracy"] == pytest.approx({"shirt": 71 / 72, "tone": 71 / 72})
    # occupation: the pilot in a chef prompt and the blank image are wrong
    assert r["occupation_accuracy"] == pytest.approx(82 / 84)
    assert r["unknown_rate"] == pytest.approx(1 / 84)
    # neutral joint over 2 x 3 cells, target 1/6: two cells at 1/2 -> d^2 = 2 (1/3)^2 + 4 (1/6)^2 = 1/3;
    # one cell at 1 (occupations 3-5; occupation 5's unknown sample is left out) -> d^2 = 30/36
    assert r["neutral_discrepancy"] == pytest.approx((3 * np.sqrt(1 / 3) + 3 * np.sqrt(30 / 36)) / 6)
    # majority: known neutral samples showing the training-majority class of their occupation (11 known)
    shown = {"shirt": [[0, 1]] * 3 + [[0, 0]] * 2 + [[0]], "tone": [[0, 2]] * 3 + [[0, 0]] * 2 + [[0]]}
    for axis, per_occ in shown.items():
        top = [spec.class_probs(o, axis).argmax() for o in range(6)]
        expected = sum(c == top[o] for o, cs in enumerate(per_occ) for c in cs) / 11
        assert r["neutral_majority"][axis] == pytest.approx(expected), axis


def test_evaluate_needs_a_base_folder(tmp_path):
    with pytest.raises(UserError, match="popalign_base.json"):
        be.evaluate_base(tmp_path)


def test_cli_world_command(tiny_base, tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_build(out, config, force, device, progress):
        seen.update(out=out, seed=config.seed, force=force, device=str(device))
        return tiny_base

    monkeypatch.setattr(wb, "build_base_model", fake_build)
    assert cli_main(["world", "--out", str(tmp_path / "m"), "--force", "--seed", "3", "--quiet"]) == 0
    assert seen == {"out": tmp_path / "m", "seed": 3, "force": True, "device": "cpu"}
    assert str(tiny_base) in capsys.readouterr().out
    assert cli_main(["world", "--out", str(tmp_path / "m"), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert cli_main(["world", "--out", str(tmp_path / "m"), "--seed", "-1"]) == 2  # was numpy's traceback
    assert capsys.readouterr().err.strip() == "popalign world: error: --seed must be >= 0, got -1"


@pytest.mark.e2e
def test_default_base_is_biased_and_faithful(world_base):
    """The full default build (minutes, shared with the demo test): neutral prompts biased,
    augmented prompts obeyed."""
    path = world_base
    with all_threads():
        r = be.evaluate_base(path, n_per_prompt=32, seed=1)
    print(json.dumps(r, indent=2))
    assert r["neutral_discrepancy"] >= 0.3
    assert r["augmented_accuracy"] >= 0.9
    assert r["occupation_accuracy"] >= 0.9
    assert r["unknown_rate"] <= 0.05
    for axis, train in r["train_majority"].items():  # the bias is kept, roughly at its strength
        assert abs(r["neutral_majority"][axis] - train) <= 0.15, axis
