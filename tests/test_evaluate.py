"""``popalign evaluate``: metric arithmetic, stored world images and sampling end to end (flags and
inputs: tests/test_evaluate_inputs.py; the output folder: tests/test_evaluate_output.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import frechet_by_numpy

from popalign.cli import main
from popalign.data.classifiers import AttributeClassifier
from popalign.evaluation.adherence import Adherence, WorldOccupationAdherence
from popalign.evaluation.report import mean_ci, summarise
from popalign.world import AXES_DIR, WorldSpec
from popalign.world.render import render_batch

WORLD_AXES = [str(AXES_DIR / "shirt.yaml"), str(AXES_DIR / "tone.yaml")]


class ParityClassifier(AttributeClassifier):
    """Test plugin: class = pixel sum mod C, unknown when the sum is a multiple of 5."""

    def classify(self, images):
        s = images.reshape(len(images), -1).astype(np.int64).sum(1)
        return {a.name: np.where(s % 5 == 0, -1, s % a.num_classes) for a in self.axes}


class BadClassifier(AttributeClassifier):
    """Test plugin that reports a class the axis does not have."""

    def classify(self, images):
        return {a.name: np.full(len(images), a.num_classes) for a in self.axes}


class DoctorAdherence(Adherence):
    """Test plugin: 1 for prompts with 'doctor', 0 for other neutral/specific prompts, NaN otherwise."""

    def score(self, images, prompt_rows):
        return np.array([np.nan if r.kind == "generic" else float("doctor" in r.prompt) for r in prompt_rows])


def _discrepancy_ci(table, target, pooled: bool = False, num_resamples: int = 1000, seed: int = 0) -> list:
    """Percentile bootstrap of the discrepancy, written out: each prompt's row of counts (last column:
    unknowns) is redrawn as a multinomial of its own size and frequencies; unknowns leave the
    distribution, and a prompt left with no known image drops out of the mean."""
    table, target = np.array(table, dtype=float), np.array(target)
    n = table.sum(1).astype(int)
    draws = np.random.default_rng(seed).multinomial(n, table / n[:, None], size=(num_resamples, len(n)))
    counts = draws[..., :-1].astype(float)  # [R, prompts, classes]
    if pooled:
        total = counts.sum(1)
        stats = np.linalg.norm(total / total.sum(-1, keepdims=True) - target, axis=-1)
    else:
        with np.errstate(invalid="ignore"):
            d = np.linalg.norm(counts / counts.sum(-1, keepdims=True) - target, axis=-1)
        stats = np.nanmean(d, axis=1)
    return list(np.nanquantile(stats, [0.025, 0.975]))


def test_summarise_by_hand():
    # axes A (2 classes) x B (3 classes): joint class = a * 3 + b, uniform target 1/6
    kinds = ["neutral"] * 6 + ["specific"] * 4 + ["generic"] * 2
    groups = np.array([0, 0, 0, 0, 1, 1] + [-1] * 6)
    labels = np.array(
        [[0, 0], [0, 0], [1, 2], [0, -1], [1, 1], [1, 1]]  # neutral: joint 0, 0, 5, unknown | 4, 4
        + [[0, 2], [0, 1], [1, -1], [1, 1]]  # specific predictions
        + [[0, 0], [-1, 0]]  # generic
    )
    requested = np.array([[-1, -1]] * 6 + [[0, 2], [1, -1], [-1, 1], [1, 0]] + [[-1, -1]] * 2)
    clip = np.array([np.nan] * 10 + [10.0, 20.0])
    adherence = np.array([1, 0, 1, 1, np.nan, np.nan, 1, 1, 1, 1, np.nan, np.nan], dtype=float)
    m, per_prompt = summarise(
        ["a", "b"], [2, 3], [1 / 6] * 6, kinds, groups, labels, requested, adherence, clip
    )
    # prompt 0: known joint (0, 0, 5) -> p = (2/3, 0, 0, 0, 0, 1/3):
    #   d^2 = (2/3 - 1/6)^2 + 4 (1/6)^2 + (1/3 - 1/6)^2 = 1/4 + 4/36 + 1/36 = 14/36 -> d = 0.623610
    # prompt 1: (4, 4) -> p = e_4: d^2 = (5/6)^2 + 5 (1/6)^2 = 30/36 -> d = 0.912871; mean 0.768240
    assert m["neutral.discrepancy"] == pytest.approx((math.sqrt(14 / 36) + math.sqrt(30 / 36)) / 2, abs=1e-6)
    # pooled: counts class 0: 2, class 4: 2, class 5: 1 of 5 -> (0.4, 0, 0, 0, 0.4, 0.2):
    #   d^2 = 2 (0.4 - 1/6)^2 + 3 (1/6)^2 + (0.2 - 1/6)^2 = 0.193333
    assert m["neutral.discrepancy_pooled"] == pytest.approx(math.sqrt(0.193333333), abs=1e-6)
    # axis a: prompt 0 (0,0,1,0) -> (3/4, 1/4): d = sqrt(2/16); prompt 1 (1,1) -> d = sqrt(1/2)
    # axis b: prompt 0 (0,0,2) -> (2/3, 0, 1/3): d = sqrt(2/9); prompt 1 (1,1) -> d = sqrt(6/9)
    per_axis = m["neutral.discrepancy_per_axis"]
    assert per_axis["a"] == pytest.approx((math.sqrt(2 / 16) + math.sqrt(0.5)) / 2, abs=1e-6)
    assert per_axis["b"] == pytest.approx((math.sqrt(2 / 9) + math.sqrt(6 / 9)) / 2, abs=1e-6)
    assert m["neutral.unknown_rate"] == pytest.approx(1 / 6)
    assert m["neutral.num_prompts"] == 2 and m["neutral.num_images"] == 6
    assert per_prompt[0]["discrepancy"] == pytest.approx(math.sqrt(14 / 36), abs=1e-6)
    assert per_prompt[0]["unknown"] == 1 and per_prompt[1]["images"] == 2
    # specific: axis a named in rows 1, 2, 4 -> right, wrong, right = 2/3; axis b named in rows 1, 3, 4 ->
    # right, unknown (wrong), wrong = 1/3; joint: only row 1 has every named axis right = 1/4
    assert m["specific.accuracy_per_axis"] == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert m["specific.accuracy"] == pytest.approx(1 / 4)
    assert m["specific.unknown_rate"] == pytest.approx(1 / 4)
    assert m["generic.unknown_rate"] == pytest.approx(1 / 2)
    assert m["generic.clip_score"] == pytest.approx(15.0) and m["clip_score"] == pytest.approx(15.0)
    assert m["adherence.accuracy"] == pytest.approx(7 / 8) and m["adherence.num_images"] == 8
    # intervals: the seeded bootstrap (1000 resamples, seed 0) of the data each metric is computed from
    for key, values in [
        ("specific.accuracy_ci", [1, 0, 0, 0]),  # joint: every named axis right
        ("neutral.unknown_rate_ci", [0, 0, 0, 1, 0, 0]),
        ("adherence.accuracy_ci", [1, 0, 1, 1, 1, 1, 1, 1]),
        ("generic.clip_score_ci", [10.0, 20.0]),
    ]:
        assert m[key] == pytest.approx(mean_ci(np.array(values, dtype=float), num_resamples=1000, seed=0)), (
            key
        )
    assert m["specific.accuracy_per_axis_ci"]["a"] == pytest.approx(mean_ci(np.array([1.0, 0, 1])))
    assert m["specific.accuracy_per_axis_ci"]["b"] == pytest.approx(mean_ci(np.array([1.0, 0, 0])))
    # discrepancy: images resampled within each prompt; rows = prompts, columns = classes + unknown
    joint = [[2, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 2, 0, 0]]
    assert m["neutral.discrepancy_ci"] == pytest.approx(_discrepancy_ci(joint, [1 / 6] * 6))
    assert m["neutral.discrepancy_pooled_ci"] == pytest.approx(
        _discrepancy_ci(joint, [1 / 6] * 6, pooled=True)
    )
    ci_a = _discrepancy_ci([[3, 1, 0], [0, 2, 0]], [1 / 2] * 2)
    ci_b = _discrepancy_ci([[2, 0, 1, 1], [0, 2, 0, 0]], [1 / 3] * 3)
    assert m["neutral.discrepancy_per_axis_ci"]["a"] == pytest.approx(ci_a)
    assert m["neutral.discrepancy_per_axis_ci"]["b"] == pytest.approx(ci_b)
    for key in (
        "neutral.discrepancy",
        "neutral.discrepancy_pooled",
        "specific.accuracy",
        "adherence.accuracy",
    ):
        low, high = m[f"{key}_ci"]
        assert low <= m[key] <= high, key


def test_mean_ci_contains_mean_and_narrows():
    rng = np.random.default_rng(0)
    small, large = rng.random(20), rng.random(2000)
    lo_s, hi_s = mean_ci(small)
    lo_l, hi_l = mean_ci(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < hi_s - lo_s
    assert all(math.isnan(v) for v in mean_ci(np.array([np.nan])))


def test_world_occupation_adherence():
    spec = WorldSpec()
    occ = np.array([0, 1, 2, 3])
    images = render_batch(
        occ, {"shirt": np.zeros(4, int), "tone": np.zeros(4, int)}, np.random.default_rng(0)
    )
    prompts = [
        {"prompt": f"a photo of a {spec.occupations[0]}"},  # right
        {"prompt": f"a photo of a red light {spec.occupations[1]}"},  # right
        {"prompt": f"a photo of a {spec.occupations[0]}"},  # wrong: image shows occupation 2
        {"prompt": "a photo of a person"},  # names no occupation: not judged
    ]
    score = WorldOccupationAdherence(spec).score(images, prompts)
    assert score[:3].tolist() == [1.0, 1.0, 0.0] and math.isnan(score[3])


# ---------------------------------------------------------------- stored world images (no sampling)
def run_evaluate(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_stored_world_images_exact_metrics(world_images, tmp_path, capsys):
    ref = np.concatenate([render_batch(np.arange(6) % 6, {"shirt": np.arange(6) % 2, "tone": np.arange(6) % 3},
                                       np.random.default_rng(s)) for s in range(2)])  # fmt: skip
    np.save(tmp_path / "ref.npy", ref)
    out = tmp_path / "eval"
    argv = ["evaluate", "--images", str(world_images), "--axes", *WORLD_AXES, "--classifier", "world",
            "--adherence", "world", "--fid-reference", str(tmp_path / "ref.npy"), "--fid-features", "pixel",
            "--bootstrap", "200", "--out", str(out), "--no-progress"]  # fmt: skip
    code, err = run_evaluate(argv, capsys)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    # joint shirt x tone (6 classes, target 1/6). doctor: (0,0) (0,0) (0,1) (1,2) -> joint 0, 0, 1, 5
    #   p = (1/2, 1/4, 0, 0, 0, 1/4): d^2 = (1/3)^2 + (1/12)^2 + 3 (1/6)^2 + (1/12)^2 = 0.2083333
    # chef: (0,0) (1,1) (0,2) (1,0) -> joint 0, 4, 2, 3: p = (1/4, 0, 1/4, 1/4, 1/4, 0):
    #   d^2 = 4 (1/12)^2 + 2 (1/6)^2 = 0.0833333
    assert m["neutral.discrepancy"] == pytest.approx(
        (math.sqrt(0.2083333) + math.sqrt(0.0833333)) / 2, abs=1e-6
    )
    # shirt: doctor (3/4, 1/4) -> sqrt(2)/4; chef (1/2, 1/2) -> 0
    assert m["neutral.discrepancy_per_axis"]["shirt"] == pytest.approx(math.sqrt(2) / 8, abs=1e-6)
    assert m["neutral.unknown_rate"] == 0
    # augmented "red medium doctor": shirt right 3/4, tone right 3/4, both right in images 0 and 1 -> 2/4
    assert m["specific.accuracy_per_axis"] == pytest.approx({"shirt": 0.75, "tone": 0.75})
    assert m["specific.accuracy"] == pytest.approx(0.5)
    # occupation read back: doctor images right (4 + 4), chef images show occupation 2 (4 wrong)
    assert m["adherence.accuracy"] == pytest.approx(8 / 12)
    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    # FID of the stored images against ref.npy, from numpy statistics of the same pixel features
    from PIL import Image

    from popalign.metrics import PixelStatsFeatures

    stored = np.stack([np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in rows])
    features = PixelStatsFeatures()
    real, fake = (features(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy() for x in (ref, stored))
    assert m["fid"] == pytest.approx(frechet_by_numpy(real, fake), rel=1e-6)
    assert len(rows) == 12 and rows[3]["labels"] == {"shirt": "blue", "tone": "dark"}
    assert len(list((out / "images").glob("*.png"))) == 12

    # the same images with a label table: the labels decide, the classifier is not run
    labels = tmp_path / "labels.jsonl"
    table = [
        {"key": r["key"], "prompt_id": r["prompt_id"], "labels": {"shirt": "red", "tone": "light"}}
        for r in rows
    ]
    labels.write_text("".join(json.dumps(r) + "\n" for r in table))
    argv2 = ["evaluate", "--images", str(world_images), "--labels", str(labels), "--axes", *WORLD_AXES,
             "--bootstrap", "50", "--out", str(tmp_path / "eval2"), "--no-progress"]  # fmt: skip
    code, err = run_evaluate(argv2, capsys)
    assert code == 0, err
    m2 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())["metrics"]
    # every image (red, light) = joint 0: p = e_0, d^2 = (5/6)^2 + 5/36 = 30/36
    assert m2["neutral.discrepancy"] == pytest.approx(math.sqrt(30 / 36), abs=1e-6)

    # a label table that does not match the images, and one with a class the axis lacks
    labels.write_text("".join(json.dumps(r) + "\n" for r in table[:-1]))
    code, err = run_evaluate(argv2[:-3] + ["--out", str(tmp_path / "eval3"), "--no-progress"], capsys)
    assert code == 2 and "no label for image" in err and len(err.strip().splitlines()) == 1, err
    table[0]["labels"]["shirt"] = "purple"
    labels.write_text("".join(json.dumps(r) + "\n" for r in table))
    code, err = run_evaluate(argv2[:-3] + ["--out", str(tmp_path / "eval3"), "--no-progress"], capsys)
    assert code == 2 and "purple" in err
    assert not (tmp_path / "eval3").exists() and not list(tmp_path.glob(".eval3*"))


# ---------------------------------------------------------------- sampling the tiny pipeline
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPModel

    from popalign.models.tiny import build_word_tokenizer

    torch.manual_seed(0)
    tok = build_word_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)  # fmt: skip
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def sampling_args(model, files, out, images_per_prompt: int = 1):
    return ["evaluate", "--model", model, "--neutral", str(files / "neutral.txt"), "--specific", "expand",
            "--generic", str(files / "generic.txt"), "--axes", "gender", "--classifier", "test_evaluate:ParityClassifier",
            "--images-per-prompt", str(images_per_prompt), "--steps", "2", "--height", "16", "--width", "16", "--batch-size", "8",
            "--bootstrap", "100", "--out", str(out), "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def other_seed_model(tmp_path_factory) -> str:
    """The test base's architecture with other random weights (`popalign tiny --seed 1` makes one)."""
    from popalign.models.tiny import TinySDXLConfig, save_tiny_sdxl

    return str(
        save_tiny_sdxl(tmp_path_factory.mktemp("seed1") / "model", TinySDXLConfig(image_size=16, seed=1))
    )


def _metrics_from_labels(out) -> dict:
    """Discrepancy, unknown rate and specific accuracy recomputed from ``labels.jsonl``, whose labels
    are checked first against ParityClassifier on the written PNGs (one gender axis: male, female)."""
    from PIL import Image

    from popalign.data.axes import load_axes

    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in rows])
    names = [
        "unknown" if c < 0 else ["male", "female"][c]
        for c in ParityClassifier(load_axes(["gender"])).classify(images)["gender"]
    ]
    assert [r["labels"]["gender"] for r in rows] == names
    neutral = [r for r in rows if r["kind"] == "neutral"]
    per_prompt, pooled = [], np.zeros(2)
    for pid in sorted({r["prompt_id"] for r in neutral}):
        known = [
            r["labels"]["gender"]
            for r in neutral
            if r["prompt_id"] == pid and r["labels"]["gender"] != "unknown"
        ]
        counts = np.array([known.count("male"), known.count("female")], dtype=float)
        pooled += counts
        if known:
            per_prompt.append(np.linalg.norm(counts / counts.sum() - 0.5))
    specific = [r for r in rows if r["kind"] == "specific"]
    return {
        "neutral.discrepancy": float(np.mean(per_prompt)),
        "neutral.discrepancy_pooled": float(np.linalg.norm(pooled / pooled.sum() - 0.5)),
        "neutral.unknown_rate": float(np.mean([r["labels"]["gender"] == "unknown" for r in neutral])),
        "specific.accuracy": float(np.mean([r["labels"] == r["requested"] for r in specific])),
    }  # fmt: skip


def test_evaluate_tiny_pipeline_with_baseline(
    tiny_model, other_seed_model, tiny_clip, prompt_files, tmp_path, capsys
):
    ref = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "ref.npy", ref)
    extra = ["--adherence", "test_evaluate:DoctorAdherence", "--clip-model", tiny_clip,
             "--fid-reference", str(tmp_path / "ref.npy"), "--fid-features", "pixel"]  # fmt: skip
    out = tmp_path / "eval"
    argv = sampling_args(tiny_model, prompt_files, out, images_per_prompt=3)
    code, err = run_evaluate(argv + ["--baseline", other_seed_model] + extra, capsys)
    assert code == 0, err
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    # 2 neutral prompts, 2 x 2 specific (gender expanded), 1 generic; three images each
    assert m["neutral.num_images"] == 6 and m["specific.num_images"] == 12 and m["generic.num_images"] == 3
    assert set(m["neutral.discrepancy_per_axis"]) == {"gender"}
    # doctor prompts: 1 neutral + 2 specific of 6 judged prompts
    assert m["adherence.accuracy"] == pytest.approx(3 / 6)
    assert 0 <= m["clip_score"] <= 100 and 0 <= m["generic.clip_score"] <= 100
    # the model's and the baseline's numbers are those of their own images' labels
    for folder, metrics in ((out, m), (out / "baseline", result["baseline"])):
        for key, value in _metrics_from_labels(folder).items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), (folder, key)
    # the baseline's numbers are those the other model gets evaluated alone, on the same prompts and seeds
    code, err = run_evaluate(
        sampling_args(other_seed_model, prompt_files, tmp_path / "alone", 3) + extra, capsys
    )
    assert code == 0, err
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())["metrics"]
    assert result["baseline"] == alone
    # ... which are not the model's: another seed's weights draw other images from the same seeds
    assert result["baseline"]["fid"] != pytest.approx(m["fid"], rel=1e-3)
    # delta = model - baseline, for every scalar metric (counts and intervals excluded)
    from popalign.evaluation.report import flatten

    flat_m, flat_b = flatten(m), flatten(result["baseline"])
    scalar = {k for k, v in flat_m.items() if isinstance(v, (int, float)) and "num_" not in k}
    assert set(result["delta"]) == scalar and "fid" in scalar and "neutral.discrepancy" in scalar
    for key in scalar:
        assert result["delta"][key] == pytest.approx(flat_m[key] - flat_b[key], abs=1e-9), key
    assert any(abs(v) > 1e-3 for v in result["delta"].values())
    assert result["settings"]["images_per_prompt"] == 3 and result["settings"]["baseline"] == other_seed_model
    report = (out / "report.md").read_text()
    assert "| metric | model | baseline | delta |" in report and "| neutral.discrepancy |" in report
    for name in ("neutral_distributions.png", "comparison.png", "samples.png"):
        assert (out / "plots" / name).stat().st_size > 0
    assert len((out / "labels.jsonl").read_text().splitlines()) == 21
    assert len((out / "baseline" / "labels.jsonl").read_text().splitlines()) == 21
    assert len(list((out / "images").glob("*.png"))) == 21


def test_evaluate_model_from_python(tiny_model, prompt_files):
    from popalign.evaluation import EvalConfig, evaluate_model

    config = EvalConfig(model=tiny_model, neutral=str(prompt_files / "neutral.txt"), axes=["gender"],
                        classifier="test_evaluate:ParityClassifier", images_per_prompt=2, steps=2, height=16,
                        width=16, batch_size=4, bootstrap=50, progress=False)  # fmt: skip
    m = evaluate_model(config)
    assert m["neutral.num_prompts"] == 2 and "specific.accuracy" not in m and "clip_score" not in m
    assert m["neutral.discrepancy_ci"][0] <= m["neutral.discrepancy_ci"][1]


def test_specific_prompts_can_take_fewer_images():
    from popalign.errors import UserError
    from popalign.evaluation.config import EvalConfig

    c = EvalConfig(model="m", images_per_prompt=100, specific_images_per_prompt=8)
    assert (c.images_for("neutral"), c.images_for("specific"), c.images_for("generic")) == (100, 8, 100)
    assert EvalConfig(model="m", images_per_prompt=5).images_for("specific") == 5
    with pytest.raises(UserError, match="specific_images_per_prompt"):
        EvalConfig(model="m", specific_images_per_prompt=0).check()


def test_report_shows_no_delta_where_neither_model_scored():
    from popalign.evaluation.report import render_report

    metrics = {"neutral.discrepancy": math.nan, "specific.accuracy": 0.5}
    baseline = {"neutral.discrepancy": math.nan, "specific.accuracy": 0.25}
    report = render_report(metrics, {"axes": ["gender"]}, baseline)
    assert "| neutral.discrepancy | – | – | – |" in report and "nan" not in report
    assert "| specific.accuracy | 0.5000 | 0.2500 | +0.2500 |" in report
