"""Attribute classifiers: zero-shot CLIP (tiny model built in code), the world adapter, the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from popalign.data.axes import AxisClass, BiasAxis, load_axes
from popalign.data.classifiers import (
    AttributeClassifier,
    CLIPZeroShotClassifier,
    WorldAttributeClassifier,
    get_classifier,
)
from popalign.errors import UserError

WORLD_DIR = Path(__file__).resolve().parent.parent / "popalign" / "world" / "axes"
# one zero-shot text per class, so the classifier's probabilities equal CLIP's own softmax
TEXTS = ("a photo of a man", "a photo of a woman", "a photo of a child")
NONE_TEXT = "a photo with no person"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as Processor  # no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    from popalign.models.tiny import build_word_tokenizer

    tok = build_word_tokenizer(["child", "no"])
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(layers, vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(
            text_config=text, vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16
        )
    )
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def axis() -> BiasAxis:
    return BiasAxis("who", tuple(AxisClass(n, n, (t,)) for n, t in zip(("man", "woman", "child"), TEXTS)))


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_clip_probabilities_are_clips_softmax_over_class_texts_and_no_person(clip_dir, axis):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clf = CLIPZeroShotClassifier([axis], model=clip_dir, device="cpu", no_person_threshold=1.0, batch_size=4)
    x = images()
    labels, probs = clf.predict(x)
    # expected: p = softmax(logit_scale * cos(image, text)) over [man, woman, child, no person]
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokens = AutoTokenizer.from_pretrained(clip_dir)([*TEXTS, NONE_TEXT], padding=True, return_tensors="pt")
    tokens = {k: tokens[k] for k in ("input_ids", "attention_mask")}  # older transformers' CLIP takes no more
    pixels = AutoImageProcessor.from_pretrained(clip_dir)(images=list(x), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        p = model(**tokens, pixel_values=pixels).logits_per_image.softmax(-1).numpy()
    expected = p[:, :3] / p[:, :3].sum(1, keepdims=True)
    np.testing.assert_allclose(probs["who"], expected, atol=1e-5)
    np.testing.assert_allclose(probs["who"].sum(1), 1.0, atol=1e-6)
    assert labels["who"].dtype == np.int64 and (labels["who"] == expected.argmax(1)).all()
    # a "no person" probability above the threshold makes the image unknown
    cut = float(np.median(p[:, 3]))
    clf.threshold = cut
    assert (clf.classify(x)["who"] == np.where(p[:, 3] > cut, -1, expected.argmax(1))).all()
    clf.threshold = 0.0
    assert (clf.classify(x)["who"] == -1).all()


def test_clip_uses_a_phrase_prompt_for_classes_without_texts(clip_dir):
    bare = BiasAxis("gender", (AxisClass("male", "male"), AxisClass("female", "female")))
    assert CLIPZeroShotClassifier._prompts(bare, "female") == ["a photo of a female person"]
    clf = get_classifier("clip", [bare], model=clip_dir, device="cpu")
    assert clf.probabilities(images(3))["gender"].shape == (3, 2)


def test_world_adapter_reads_rendered_classes_in_the_axis_files_order(tmp_path):
    from popalign.world import WorldSpec
    from popalign.world.render import render_batch

    spec, rng = WorldSpec(), np.random.default_rng(1)
    shirt = np.array([0, 1, 0, 1, 1, 0])
    tone = np.array([0, 1, 2, 2, 1, 0])
    x = render_batch(np.arange(6) % len(spec.occupations), {"shirt": shirt, "tone": tone}, rng, spec)
    axes = load_axes([WORLD_DIR / "shirt.yaml", WORLD_DIR / "tone.yaml"])
    clf = get_classifier("world", axes)
    got = clf.classify(x)
    assert got["shirt"].tolist() == shirt.tolist() and got["tone"].tolist() == tone.tolist()
    # an axis file listing the classes in reverse: indices follow the file (dark=0, medium=1, light=2)
    reordered = WorldAttributeClassifier([BiasAxis("tone", tuple(reversed(axes[1].classes)))])
    assert reordered.classify(x)["tone"].tolist() == (2 - tone).tolist()
    probs = reordered.probabilities(x)["tone"]
    assert probs.shape == (6, 3) and (probs.argmax(1) == 2 - tone).all()
    blank = np.full((1, 32, 32, 3), 128, np.uint8)
    assert {k: v.tolist() for k, v in clf.classify(blank).items()} == {"shirt": [-1], "tone": [-1]}


def test_world_adapter_rejects_other_axes_and_image_sizes():
    with pytest.raises(UserError, match="not a world axis") as err:
        WorldAttributeClassifier(load_axes(["gender"]))
    # the message shows where the world's axis files are, so a user can pass them from anywhere
    for name in ("shirt", "tone"):
        assert str(WORLD_DIR.resolve() / f"{name}.yaml") in str(err.value)
    clf = WorldAttributeClassifier(load_axes([WORLD_DIR / "shirt.yaml"]))
    with pytest.raises(UserError, match="world classifier"):
        clf.classify(np.zeros((1, 16, 16, 3), np.uint8))


PLUGIN = '''
import numpy as np
from popalign.data.classifiers import AttributeClassifier

class Brightness(AttributeClassifier):
    """Class 1 for images brighter than the threshold, else class 0."""
    def __init__(self, axes, threshold=128):
        super().__init__(axes)
        self.threshold = threshold
    def classify(self, images):
        return {a.name: (images.mean(axis=(1, 2, 3)) > self.threshold).astype(np.int64) for a in self.axes}

class NotAClassifier:
    pass
'''


def test_registry_loads_user_plugins_and_rejects_bad_names(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    axes = load_axes(["gender"])
    clf = get_classifier("my_plugins:Brightness", axes, threshold=100)
    assert isinstance(clf, AttributeClassifier)
    x = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (50, 150)])
    labels, probs = clf.predict(x)
    assert labels["gender"].tolist() == [0, 1] and probs is None
    with pytest.raises(UserError, match="unknown classifier 'blip'"):
        get_classifier("blip", axes)
    with pytest.raises(UserError, match="not a subclass"):
        get_classifier("my_plugins:NotAClassifier", axes)
    with pytest.raises(UserError, match="cannot import"):
        get_classifier("my_plugins:Missing", axes)
    with pytest.raises(UserError, match="colour"):
        get_classifier("my_plugins:Brightness", axes, colour="red")
    with pytest.raises(UserError, match="at least one"):
        get_classifier("world", [])
