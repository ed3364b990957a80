"""The synthetic world: renderer, spec/bias, prompts, axis files and the exact classifiers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import yaml

from popalign.errors import UserError
from popalign.models.tiny import word_tokenize
from popalign.world import AXES_DIR, OCCUPATIONS_FILE, WorldSpec, load_world_axis
from popalign.world.classify import WorldClassifier
from popalign.world.render import (
    BACKGROUNDS,
    FACE_WINDOW,
    SHIRT_WINDOW,
    SHIRTS,
    TONES,
    render,
    render_batch,
    sample_dataset,
    save_world_grid,
)


@pytest.fixture(scope="module")
def spec() -> WorldSpec:
    return WorldSpec()


@pytest.fixture(scope="module")
def balanced(spec):
    """3000 renders cycling through every (occupation, shirt, tone) combination."""
    combos = list(itertools.product(range(len(spec.occupations)), range(2), range(3)))
    idx = np.array([combos[i % len(combos)] for i in range(3000)])
    occ, attrs = idx[:, 0], {"shirt": idx[:, 1], "tone": idx[:, 2]}
    return render_batch(occ, attrs, np.random.default_rng(1), spec), occ, attrs


def painted(bg, shirt, face) -> np.ndarray:
    """One 32x32 image: flat background with the shirt and face read-out windows painted."""
    img = np.empty((1, 32, 32, 3), dtype=np.uint8)
    img[:] = bg
    (r0, r1), (c0, c1) = SHIRT_WINDOW
    img[0, r0:r1, c0:c1] = shirt
    (r0, r1), (c0, c1) = FACE_WINDOW
    img[0, r0:r1, c0:c1] = face
    return img


def test_default_spec(spec):
    assert spec.occupations == ("doctor", "chef", "pilot", "farmer", "teacher", "firefighter")
    assert spec.axis_names == ("shirt", "tone")
    assert spec.axis("tone").classes == ("light", "medium", "dark")
    assert spec.neutral_probs == {"shirt": (0.85, 0.15), "tone": (0.8, 0.1, 0.1)}
    assert spec.neutral_prompt("pilot") == "a photo of a pilot"
    assert spec.augmented_prompt(2, (1, "dark")) == "a photo of a blue dark pilot"


def test_render_shapes_and_determinism(spec):
    attrs = {"shirt": np.array([0, 1, 1]), "tone": np.array([2, 0, 1])}
    a = render_batch(np.array([0, 3, 5]), attrs, np.random.default_rng(7), spec)
    b = render_batch(np.array([0, 3, 5]), attrs, np.random.default_rng(7), spec)
    c = render_batch(np.array([0, 3, 5]), attrs, np.random.default_rng(8), spec)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    one = render("chef", {"shirt": "blue", "tone": 1}, np.random.default_rng(0), spec)
    assert one.shape == (32, 32, 3) and one.dtype == np.uint8


def test_same_attributes_vary(spec):
    rng = np.random.default_rng(3)
    x = render("doctor", {"shirt": "red", "tone": "light"}, rng, spec).astype(int)
    y = render("doctor", {"shirt": "red", "tone": "light"}, rng, spec).astype(int)
    # jittered layout and colours: well beyond pixel noise alone (sigma 4 -> mean |diff| ~ 4.5)
    assert np.abs(x - y).mean() > 6


def test_render_rejects_bad_indices(spec):
    with pytest.raises(ValueError, match="tone"):
        render_batch(
            np.array([0]), {"shirt": np.array([0]), "tone": np.array([3])}, np.random.default_rng(0), spec
        )
    with pytest.raises(ValueError, match="occupation"):
        render("astronaut", {"shirt": 0, "tone": 0}, np.random.default_rng(0), spec)


def test_classifier_exact_on_renders(spec, balanced):
    images, occ, attrs = balanced
    clf = WorldClassifier(spec)
    pred = clf.classify(images)
    for name, k in (("shirt", 2), ("tone", 3)):
        for c in range(k):
            sel = attrs[name] == c
            assert (pred[name][sel] == c).mean() >= 0.99, (name, c)
    got = clf.occupation(images)
    for o in range(len(spec.occupations)):
        assert (got[occ == o] == o).mean() >= 0.99, spec.occupations[o]
    probs = clf.probabilities(images)
    np.testing.assert_allclose(probs["tone"].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probs["tone"].argmax(axis=1), pred["tone"])


def test_classifier_robust_to_blur_and_noise(spec, balanced):
    images, occ, attrs = balanced
    x = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(x[:, i : i + 32, j : j + 32] for i in range(3) for j in range(3)) / 9.0  # 3x3 box
    noisy = blurred + np.random.default_rng(2).normal(0.0, 8.0, blurred.shape)
    degraded = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    clf = WorldClassifier(spec)
    pred = clf.classify(degraded)
    for name, k in (("shirt", 2), ("tone", 3)):
        for c in range(k):
            assert (pred[name][attrs[name] == c] == c).mean() >= 0.95, (name, c)
    got = clf.occupation(degraded)
    for o in range(len(spec.occupations)):
        assert (got[occ == o] == o).mean() >= 0.95


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_images_are_unknown(spec, value):
    blank = np.full((2, 32, 32, 3), value, dtype=np.uint8)
    clf = WorldClassifier(spec)
    assert all((v == -1).all() for v in clf.classify(blank).values())
    assert (clf.occupation(blank) == -1).all()


def test_threshold_and_softmin_arithmetic(spec):
    clf = WorldClassifier(spec)  # max_distance 60, temperature 10
    # red + (30, 40, 0): distance 50 (3-4-5 triangle) < 60 -> red
    near_red = SHIRTS[0] + np.array([30, 40, 0])
    # midpoint of red (205,35,45) and blue (35,65,205) = (120,50,125): both at |red-blue|/2 = 117.7 > 60
    mid = (SHIRTS[0] + SHIRTS[1]) / 2
    images = np.concatenate(
        [painted(BACKGROUNDS[1], near_red, TONES[2]), painted(BACKGROUNDS[1], mid, TONES[0])]
    )
    d = clf.distances(images)
    np.testing.assert_allclose(d["shirt"][0, 0], 50.0, atol=1e-4)
    np.testing.assert_allclose(d["shirt"][1], [117.686] * 2, atol=1e-2)
    assert clf.classify(images)["shirt"].tolist() == [0, -1]
    assert clf.classify(images)["tone"].tolist() == [2, 0]
    assert clf.occupation(images).tolist() == [1, 1]
    p = clf.probabilities(images)["shirt"]
    np.testing.assert_allclose(p[1], [0.5, 0.5])  # equal distances
    # d = (50, |blue - near_red| = 207.8): p_red = 1 / (1 + exp(-(207.8 - 50) / 10)) = 1 - 1.4e-7
    assert p[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_classifier_rejects_non_uint8(spec):
    clf = WorldClassifier(spec)
    with pytest.raises(TypeError, match="uint8"):
        clf.classify(np.zeros((1, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        clf.occupation(np.zeros((1, 16, 16, 3), dtype=np.uint8))


def test_biased_neutral_frequencies():
    # one occupation, 2000 neutral samples; std of a frequency <= sqrt(.25/2000) = 0.011, tolerance 0.04
    spec = WorldSpec(occupations=("doctor",))
    _, prompts, attrs, occ = sample_dataset(spec, 2000, np.random.default_rng(0), n_augmented=1)
    assert len(prompts) == len(occ) == 2000 + 2 * 3  # neutral + one of each augmented prompt
    neutral = np.array([p == "a photo of a doctor" for p in prompts])
    assert neutral.sum() == 2000
    for name, want in spec.neutral_probs.items():
        freq = np.bincount(attrs[name][neutral], minlength=len(want)) / neutral.sum()
        np.testing.assert_allclose(freq, want, atol=0.04)


def test_per_occupation_bias_and_unbiased_variant():
    spec = WorldSpec(occupations=("chef", "pilot"), occupation_probs={"pilot": {"shirt": (0.1, 0.9)}})
    assert spec.class_probs("chef", "shirt").tolist() == [0.85, 0.15]
    assert spec.class_probs("pilot", "shirt").tolist() == [0.1, 0.9]
    assert spec.class_probs("pilot", "tone").tolist() == [0.8, 0.1, 0.1]  # no override: the default
    assert spec.class_probs("pilot", "tone", biased=False).tolist() == pytest.approx([1 / 3] * 3)
    _, _, attrs, occ = sample_dataset(spec, 1000, np.random.default_rng(4), n_augmented=0)
    np.testing.assert_allclose(np.bincount(attrs["shirt"][occ == 1]) / 1000, [0.1, 0.9], atol=0.04)
    np.testing.assert_allclose(np.bincount(attrs["shirt"][occ == 0]) / 1000, [0.85, 0.15], atol=0.04)
    _, _, attrs, _ = sample_dataset(spec, 1000, np.random.default_rng(5), biased=False, n_augmented=0)
    np.testing.assert_allclose(np.bincount(attrs["tone"]) / 2000, [1 / 3] * 3, atol=0.04)
    np.testing.assert_allclose(np.bincount(attrs["shirt"]) / 2000, [0.5, 0.5], atol=0.04)


def test_augmented_prompts_show_named_classes(spec):
    images, prompts, attrs, occ = sample_dataset(spec, 4, np.random.default_rng(5))
    assert len(prompts) == len(spec.occupations) * 7 * 4
    pred = WorldClassifier(spec).classify(images)
    n_aug = 0
    for i, prompt in enumerate(prompts):
        words = prompt.split()
        assert words[-1] == spec.occupations[occ[i]]
        if len(words) == 7:  # "a photo of a {shirt} {tone} {occupation}"
            n_aug += 1
            assert attrs["shirt"][i] == spec.axis("shirt").phrases.index(words[4])
            assert attrs["tone"][i] == spec.axis("tone").phrases.index(words[5])
            assert pred["shirt"][i] == attrs["shirt"][i] and pred["tone"][i] == attrs["tone"][i]
    assert n_aug == len(spec.occupations) * 6 * 4


def test_vocabulary_covers_prompts(spec):
    _, prompts, _, _ = sample_dataset(spec, 1, np.random.default_rng(0))
    vocab = set(spec.vocabulary())
    assert set(itertools.chain.from_iterable(word_tokenize(p) for p in prompts)) <= vocab
    assert {"photo", "firefighter", "blue", "medium"} <= vocab


def test_axis_and_occupation_files():
    files = sorted(AXES_DIR.glob("*.yaml"))
    assert [f.name for f in files] == ["shirt.yaml", "tone.yaml"]
    for f in files:
        data = yaml.safe_load(f.read_text())
        assert {"name", "description", "classes", "target", "order"} <= set(data), f
        assert isinstance(data["order"], int) and isinstance(data["description"], str)
        assert len(data["target"]) == len(data["classes"]) and sum(data["target"]) == pytest.approx(1.0)
        for c in data["classes"]:
            assert {"name", "phrase", "classifier_prompts"} <= set(c)
            assert (
                c["name"].isalpha()
                and c["name"].islower()
                and c["phrase"].isalpha()
                and c["phrase"].islower()
            )
            assert isinstance(c["classifier_prompts"], list) and all(
                isinstance(s, str) for s in c["classifier_prompts"]
            )
    words = OCCUPATIONS_FILE.read_text().split()
    assert len(words) == len(set(words)) == 6


def test_bad_inputs_raise_user_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: tone\nclasses:\n  - name: Very Light\n    phrase: light\n")
    with pytest.raises(UserError, match="bad.yaml"):
        load_world_axis(bad)
    with pytest.raises(UserError, match="neutral_probs"):
        WorldSpec(neutral_probs={"shirt": (0.5, 0.6), "tone": (0.8, 0.1, 0.1)})
    with pytest.raises(UserError, match="astronaut"):
        WorldSpec(occupation_probs={"astronaut": {"shirt": (0.5, 0.5)}})
    with pytest.raises(UserError, match="occupations"):
        WorldSpec(occupations=("a", "b", "c", "d", "e", "f", "g"))


def test_save_world_grid(tmp_path):
    path = save_world_grid(tmp_path / "grid.png", WorldSpec(occupations=("doctor", "chef")))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
