"""Attribute classifiers for ``popalign label``: one interface, several plugins.

A classifier is built with the bias axes it labels and maps uint8 images ``[N, H, W, 3]`` to, per
axis, a class index per image (``-1`` = unknown: no person found, or no class close enough).
Shipped: ``clip`` (zero-shot CLIP for photos), ``world`` (the exact rule of the synthetic world);
any ``package.module:ClassName`` subclass of :class:`AttributeClassifier` plugs in by name.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from popalign.data.axes import BiasAxis
from popalign.errors import UserError, load_reason

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # label's and evaluate's CLIP when none is named


def check_images(images: Any) -> np.ndarray:
    """``images`` as uint8 ``[N, H, W, 3]``; ``ValueError`` otherwise."""
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[-1] != 3
    ):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {got}")
    return images


class AttributeClassifier(ABC):
    """Labels images on a list of bias axes.

    Subclasses implement :meth:`classify` and, when they can, :meth:`probabilities`.

    Args:
        axes: the axes to label; class indices follow each axis's ``class_names``.
    """

    def __init__(self, axes: Sequence[BiasAxis]) -> None:
        if not axes:
            raise UserError("a classifier needs at least one bias axis")
        self.axes = list(axes)

    @abstractmethod
    def classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 ``[N, H, W, 3]`` -> axis name -> int ``[N]`` class index, ``-1`` = unknown."""

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """axis name -> ``[N, C]`` class probabilities (rows sum to 1); optional."""
        raise NotImplementedError

    def predict(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """``(labels, probabilities or None)``; override to share work between the two."""
        labels = self.classify(images)
        try:
            return labels, self.probabilities(images)
        except NotImplementedError:
            return labels, None


class CLIPZeroShotClassifier(AttributeClassifier):
    """Zero-shot CLIP: each class is the mean of its ``classifier_prompts`` text embeddings.

    For axis ``a`` with class embeddings ``t_1..t_C`` and a "no person" embedding ``t_0`` (mean of
    ``no_person_prompts``), an image embedding ``v`` (all L2-normalised) gets
    ``p = softmax(s * [v.t_1, ..., v.t_C, v.t_0])`` with ``s`` the model's logit scale. The label is
    ``argmax_c p_c`` over the classes, or ``-1`` (unknown) when ``p_0 > no_person_threshold``;
    :meth:`probabilities` returns ``p_1..p_C`` renormalised to sum to 1. A class without
    ``classifier_prompts`` uses ``"a photo of a {phrase} person"``.

    Args:
        axes: the axes to label.
        model: CLIP hub id or folder (``openai/clip-vit-large-patch14``) with a ``CLIPModel``,
            its tokenizer and its image processor.
        device: where CLIP runs (default: cuda when available).
        no_person_threshold: "no person" probability above which an image is unknown.
        no_person_prompts: the texts describing an image without a person.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        axes: Sequence[BiasAxis],
        model: str = DEFAULT_CLIP,
        device: str | None = None,
        no_person_threshold: float = 0.5,
        no_person_prompts: Sequence[str] = ("a photo with no person",),
        batch_size: int = 32,
    ) -> None:
        super().__init__(axes)
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.threshold, self.batch_size = float(no_person_threshold), max(1, batch_size)
        try:
            self.model = CLIPModel.from_pretrained(model).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.processor = AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError) as err:
            raise UserError(f"{model}: cannot load a CLIP model ({load_reason(err)})") from None
        none = self._text_embedding(list(no_person_prompts))
        # per axis: [C + 1, P] = class embeddings then the "no person" embedding
        self.text = {
            a.name: torch.stack([*(self._text_embedding(self._prompts(a, c)) for c in a.class_names), none])
            for a in self.axes
        }

    @staticmethod
    def _prompts(axis: BiasAxis, name: str) -> list[str]:
        cls = axis.classes[axis.index(name)]
        return list(cls.classifier_prompts) or [f"a photo of a {axis.phrase(name)} person"]

    @staticmethod
    def _features(out: Any) -> Any:
        # transformers 4 returns the projected tensor, 5 an output whose pooler_output is projected
        return out if hasattr(out, "norm") else out.pooler_output

    def _text_embedding(self, texts: list[str]) -> Any:
        import torch

        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        # only what CLIP's text tower takes: some tokenizers add token_type_ids, which older
        # transformers' get_text_features refuses
        tokens = {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask") if k in tokens}
        with torch.no_grad():
            e = self._features(self.model.get_text_features(**tokens)).float()
        e = torch.nn.functional.normalize(e, dim=-1).mean(0)
        return torch.nn.functional.normalize(e, dim=0)

    def _axis_probs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        images = check_images(images)
        out: dict[str, list[np.ndarray]] = {a.name: [] for a in self.axes}
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            with torch.no_grad():
                v = self._features(
                    self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
                )
                v = torch.nn.functional.normalize(v.float(), dim=-1)
                scale = self.model.logit_scale.exp().float()
                for name, t in self.text.items():
                    out[name].append(torch.softmax(scale * v @ t.T, dim=-1).cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros((0, len(self.text[k]))) for k, v in out.items()}

    def predict(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        labels, probs = {}, {}
        for name, p in self._axis_probs(images).items():
            cls = p[:, :-1] / np.maximum(p[:, :-1].sum(1, keepdims=True), 1e-12)
            labels[name] = np.where(p[:, -1] > self.threshold, -1, cls.argmax(1)).astype(np.int64)
            probs[name] = cls
        return labels, probs

    def classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.predict(images)[0]

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.predict(images)[1]


class WorldAttributeClassifier(AttributeClassifier):
    """The synthetic world's exact rule (:class:`popalign.world.classify.WorldClassifier`) as a plugin.

    Each axis must be one of the world's axes (``popalign/world/axes/*.yaml``), matched by name;
    classes are matched by name, so an axis file may list them in another order.

    Args:
        axes: world axes to label.
        max_distance: RGB distance beyond which a read-out is unknown (see the world classifier).
    """

    def __init__(self, axes: Sequence[BiasAxis], max_distance: float = 60.0) -> None:
        super().__init__(axes)
        from popalign.world.classify import WorldClassifier

        self.world = WorldClassifier(max_distance=max_distance)
        self._order: dict[str, np.ndarray] = {}  # axis -> our index of each world class
        for axis in self.axes:
            if axis.name not in self.world.spec.axis_names:
                from popalign.world import AXES_DIR

                files = " ".join(str(AXES_DIR.resolve() / f"{n}.yaml") for n in self.world.spec.axis_names)
                raise UserError(
                    f"axis {axis.name!r} is not a world axis; the world labeler reads "
                    f"{', '.join(self.world.spec.axis_names)}, given as files: --axes {files}"
                )
            world_classes = self.world.spec.axis(axis.name).classes
            if sorted(world_classes) != sorted(axis.class_names):
                raise UserError(
                    f"axis {axis.name!r}: classes {list(axis.class_names)} differ from the world's {list(world_classes)}"
                )
            self._order[axis.name] = np.array([axis.index(c) for c in world_classes])

    def _call(self, fn: Any, images: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return fn(images)
        except (TypeError, ValueError) as err:
            raise UserError(f"world classifier: {err}") from None

    def classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raw = self._call(self.world.classify, images)
        return {n: np.where(raw[n] < 0, -1, order[np.maximum(raw[n], 0)]) for n, order in self._order.items()}

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raw = self._call(self.world.probabilities, images)
        out = {}
        for name, order in self._order.items():
            p = np.empty_like(raw[name])
            p[:, order] = raw[name]
            out[name] = p
        return out


CLASSIFIERS: dict[str, type[AttributeClassifier]] = {
    "clip": CLIPZeroShotClassifier,
    "world": WorldAttributeClassifier,
}


def get_classifier(name: str, axes: Sequence[BiasAxis], **kwargs: Any) -> AttributeClassifier:
    """Build a classifier by registry name (``clip``, ``world``) or ``package.module:ClassName``.

    ``kwargs`` go to its constructor after ``axes``; ``UserError`` for an unknown name, a class that
    is not an :class:`AttributeClassifier`, or arguments its constructor does not take.
    """
    if name in CLASSIFIERS:
        cls = CLASSIFIERS[name]
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UserError(
                f"classifier {name!r}: cannot import ({err}; is the module's folder on PYTHONPATH?)"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, AttributeClassifier)):
            raise UserError(
                f"classifier {name!r} is not a subclass of popalign.data.classifiers.AttributeClassifier"
            )
    else:
        raise UserError(
            f"unknown classifier {name!r}: use {', '.join(CLASSIFIERS)} or package.module:ClassName"
        )
    try:
        inspect.signature(cls).bind(list(axes), **kwargs)
    except TypeError as err:
        raise UserError(f"classifier {name!r}: {err}") from None
    return cls(list(axes), **kwargs)
