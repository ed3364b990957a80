"""FID with a weight-free extractor, CLIP score on a tiny local CLIPModel, optional scorers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import frechet_by_numpy

from popalign.errors import UserError
from popalign.metrics import FID, CLIPScore, PixelStatsFeatures, Scorer, frechet_distance, optional_scorers


def _images(n: int, seed: int, low: float = 0.2, high: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 3, 32, 32, generator=g)


def test_frechet_distance_by_hand_and_against_scipy():
    # 1-D: (0 - 2)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 4 + 5 - 4 = 5
    one = torch.ones(1, 1, dtype=torch.float64)
    fd = frechet_distance(
        torch.zeros(1, dtype=torch.float64), one, torch.full((1,), 2.0, dtype=torch.float64), 4 * one
    )
    assert fd.item() == pytest.approx(5.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ref = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    )
    got = frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2)))
    assert got.item() == pytest.approx(ref, rel=1e-8)


def test_pixel_stats_features():
    extractor = PixelStatsFeatures(grid=4, bins=8)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = extractor(x)
    assert feats.shape == (5, 3 * 16 + 6 + 3 * 8) == (5, extractor.num_features)
    assert torch.allclose(feats, extractor(x.float() / 255), atol=1e-6)  # uint8 and [0, 1] floats agree
    hist = feats[:, -24:].view(5, 3, 8)
    assert torch.allclose(hist.sum(-1), torch.ones(5, 3))  # a distribution per channel
    # a flat mid-grey image: thumbnail .5 everywhere, std 0, all mass in bin 4 ([.5, .625))
    grey = extractor(torch.full((1, 3, 8, 8), 0.5))[0]
    assert torch.allclose(grey[:48], torch.full((48,), 0.5)) and grey[51:54].abs().max() == 0
    assert grey[54:62].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]


def test_fid_zero_for_identical_sets_and_growing_with_shift():
    base = _images(64, seed=0)
    values = []
    for shift in (0.0, 0.05, 0.1, 0.2, 0.3):
        fid = FID(PixelStatsFeatures())
        fid.update(base, real=True)
        fid.update(base + shift, real=False)
        values.append(fid.compute().item())
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(values, values[1:])), values
    # a fresh draw of the same distribution sits far closer than the smallest shift
    fresh = FID(PixelStatsFeatures())
    fresh.update(base, real=True)
    fresh.update(_images(64, seed=1), real=False)
    assert fresh.compute().item() < values[1]


def test_fid_batches_sum_and_real_features_survive_reset():
    real, fake = _images(40, seed=2), _images(40, seed=3, low=0.3, high=0.7)
    whole = FID(PixelStatsFeatures())
    whole.update(real, real=True)
    whole.update(fake, real=False)
    split = FID(PixelStatsFeatures(), reset_real_features=False)
    for chunk in (real[:15], real[15:]):
        split.update(chunk, real=True)
    for chunk in (fake[:7], fake[7:]):
        split.update(chunk, real=False)
    expected = whole.compute().item()
    assert split.compute().item() == pytest.approx(expected, rel=1e-6)
    split.reset()  # keeps the real statistics
    assert int(split.real_n) == 40 and int(split.fake_n) == 0
    split.update(fake, real=False)
    assert split.compute().item() == pytest.approx(expected, rel=1e-6)


def test_fid_matches_numpy_statistics_of_the_features():
    # mean and covariance from the accumulated sums (fed in uneven batches) against numpy's from the
    # features themselves; the fake set is shifted, so dropping the centering moves FID (0.73 -> 1.46)
    real, fake = _images(40, seed=2), _images(40, seed=3, low=0.3, high=0.7)
    fid = FID(PixelStatsFeatures())
    for chunk in (real[:15], real[15:]):
        fid.update(chunk, real=True)
    for chunk in (fake[:7], fake[7:]):
        fid.update(chunk, real=False)
    features = PixelStatsFeatures()
    expected = frechet_by_numpy(features(real).double().numpy(), features(fake).double().numpy())
    assert fid.compute().item() == pytest.approx(expected, rel=1e-6)


def test_fid_input_errors():
    fid = FID(PixelStatsFeatures())
    fid.update(_images(3, seed=0), real=True)
    fid.update(_images(1, seed=1), real=False)
    with pytest.raises(ValueError, match="at least|>= 2"):
        fid.compute()
    with pytest.raises(ValueError, match="num_features"):
        FID(torch.nn.Flatten())


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity installed")
def test_fid_inception_needs_torch_fidelity():
    with pytest.raises(UserError, match="torch-fidelity"):
        FID()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from popalign.models.tiny import build_word_tokenizer

    torch.manual_seed(0)
    tok = build_word_tokenizer()
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return str(path)


PROMPTS = ["a photo of a doctor", "a photo of a nurse", "a portrait of a chef", "a pilot"]


def test_clip_score_tiny_local_model(tiny_clip):
    images = torch.randint(
        0, 256, (4, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    metric = CLIPScore(tiny_clip)
    metric.update(images[:2], PROMPTS[:2])
    metric.update(images[2:], PROMPTS[2:])
    score = metric.compute().item()
    assert np.isfinite(score) and 0.0 <= score <= 100.0
    # the mean of 100 * max(cos, 0) over the four pairs
    cos = metric.encoder.cosine(images, PROMPTS)
    assert score == pytest.approx((100 * cos.clamp(min=0)).mean().item(), rel=1e-5)
    # flipping the text projection flips every cosine: the two clamped scores add up to 100 * mean |cos|
    flipped = CLIPScore(tiny_clip)
    flipped.encoder.model.text_projection.weight.mul_(-1)
    flipped.update(images, PROMPTS)
    assert flipped.compute().item() == pytest.approx((100 * (-cos).clamp(min=0)).mean().item(), rel=1e-5)
    assert score + flipped.compute().item() == pytest.approx(100 * cos.abs().mean().item(), rel=1e-5)
    assert max(score, flipped.compute().item()) > 0
    again = CLIPScore(tiny_clip)
    again.update(images, PROMPTS)
    assert again.compute().item() == pytest.approx(score, rel=1e-6)  # deterministic
    one_caption, repeated = CLIPScore(tiny_clip), CLIPScore(tiny_clip)
    one_caption.update(images[:2], PROMPTS[0])  # one string captions every image
    repeated.update(images[:2], [PROMPTS[0], PROMPTS[0]])
    assert one_caption.compute().item() == pytest.approx(repeated.compute().item(), rel=1e-6)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        one_caption.update(images[:2], PROMPTS[:1])


def test_clip_score_bad_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load a CLIP model"):
        CLIPScore(str(tmp_path), local_files_only=True)


def test_optional_scorers_report_notes_when_absent():
    available, notes = optional_scorers(["pickscore", "hpsv2", "aesthetic"])
    assert available == {}
    assert len(notes) == 3
    assert "pickscore" in notes[0] and "PickScore_v1" in notes[0]
    assert "hpsv2" in notes[1] and ("not installed" in notes[1] or "pickle" in notes[1])
    assert "aesthetic" in notes[2] and "aesthetic_head.safetensors" in notes[2]
    with pytest.raises(UserError, match="unknown scorer"):
        optional_scorers(["imagereward"])


def test_optional_scorers_from_local_folders(tiny_clip):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    head = {
        "layers.0.weight": torch.randn(8, 16),
        "layers.0.bias": torch.randn(8),
        "layers.2.weight": torch.randn(1, 8),
    }
    save_file(head, f"{tiny_clip}/aesthetic_head.safetensors")
    available, notes = optional_scorers([f"pickscore={tiny_clip}", f"aesthetic = {tiny_clip}"])
    assert notes == [] and set(available) == {"pickscore", "aesthetic"}
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for scorer in available.values():
        assert isinstance(scorer, Scorer)
        scores = scorer(images, PROMPTS[:3])
        assert scores.shape == (3,) and torch.isfinite(scores).all()
    aesthetic = available["aesthetic"]
    emb = aesthetic.encoder.embed_images(images)
    # the head is layer 0 then layer 2, no activation: W2 (W0 e + b0)
    expected = (emb @ head["layers.0.weight"].T + head["layers.0.bias"]) @ head["layers.2.weight"].T
    assert torch.allclose(available["aesthetic"](images, PROMPTS[:3]), expected.squeeze(-1), atol=1e-5)
    pick = available["pickscore"]
    assert torch.allclose(
        pick(images, PROMPTS[:3]),
        pick.encoder.model.logit_scale.exp() * pick.encoder.cosine(images, PROMPTS[:3]),
    )
