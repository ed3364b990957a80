"""Prompt adherence: does an image show what its prompt asked for, apart from identity?

Debiasing must not cost prompt following: an aligned model that draws the right mix of identities
but the wrong occupation has failed. An :class:`Adherence` scores each image against its prompt
(1 = correct, 0 = wrong, NaN = the rule cannot judge this prompt); ``adherence.accuracy`` is the mean
over the images it could judge. Real photos have no exact rule; the synthetic world has one
(:class:`WorldOccupationAdherence`), and users can plug in their own (``package.module:ClassName``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from popalign.errors import UserError


def prompt_text(row: Any) -> str:
    """The prompt of a row: an object with ``.prompt`` or a mapping with ``"prompt"``."""
    return row["prompt"] if isinstance(row, Mapping) else row.prompt


class Adherence(ABC):
    """Scores generated images against the prompts that produced them."""

    name: str = "adherence"

    @abstractmethod
    def score(self, images: np.ndarray, prompt_rows: Sequence[Any]) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` images and one prompt row each -> float ``[N]``: 1 correct, 0 wrong,
        NaN where the prompt names nothing this rule can check."""


class WorldOccupationAdherence(Adherence):
    """Synthetic world: the occupation read back from the background equals the prompt's occupation.

    The prompt's occupation is the one occupation word it contains (NaN when it names none or
    several); the image's is :meth:`popalign.world.classify.WorldClassifier.occupation` (an unreadable
    background, -1, counts as wrong).
    """

    name = "world_occupation"

    def __init__(self, spec: Any = None) -> None:
        from popalign.world import WorldSpec
        from popalign.world.classify import WorldClassifier

        self.spec = spec if spec is not None else WorldSpec()
        self.classifier = WorldClassifier(self.spec)
        self._index = {occ: i for i, occ in enumerate(self.spec.occupations)}

    def expected(self, prompt: str) -> int | None:
        """Index of the single occupation named in ``prompt``, or ``None``."""
        found = {self._index[w] for w in prompt.lower().split() if w in self._index}
        return found.pop() if len(found) == 1 else None

    def score(self, images: np.ndarray, prompt_rows: Sequence[Any]) -> np.ndarray:
        if len(images) != len(prompt_rows):
            raise ValueError(f"{len(images)} images but {len(prompt_rows)} prompt rows")
        want = [self.expected(prompt_text(r)) for r in prompt_rows]
        got = self.classifier.occupation(images)
        return np.array([np.nan if w is None else float(g == w) for w, g in zip(want, got)])


ADHERENCE = {"world": WorldOccupationAdherence}


def get_adherence(name: str, **kwargs: Any) -> Adherence:
    """``world`` or a user's ``package.module:ClassName`` (an :class:`Adherence` subclass)."""
    if name in ADHERENCE:
        return ADHERENCE[name](**kwargs)
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"unknown adherence {name!r}: use {', '.join(ADHERENCE)} or package.module:ClassName")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import adherence {name!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Adherence)):
        raise UserError(f"adherence {name!r} is not a subclass of popalign.evaluation.adherence.Adherence")
    return cls(**kwargs)
