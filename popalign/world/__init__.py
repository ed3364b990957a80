"""The synthetic biased world: its specification (occupations, bias axes, bias, prompts).

The renderer lives in :mod:`popalign.world.render`, the exact classifiers in
:mod:`popalign.world.classify`. The world's two bias axes are ordinary BiasAxis YAML files under
``popalign/world/axes/`` and its occupations are listed in ``popalign/world/occupations.txt``.
The first axis (by ``order``) is drawn as the shirt colour (2 classes), the second as the face tone
(3 classes); see ``docs/world.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from popalign.errors import UserError

WORLD_DIR = Path(__file__).parent
AXES_DIR = WORLD_DIR / "axes"
OCCUPATIONS_FILE = WORLD_DIR / "occupations.txt"
# What the renderer can draw: classes of the first and second axis, and background hues.
AXIS_SIZES = (2, 3)
MAX_OCCUPATIONS = 6
# Neutral-prompt class frequencies by axis position; the first class is the majority.
DEFAULT_BIAS = ((0.85, 0.15), (0.8, 0.1, 0.1))

_WORD = re.compile(r"[a-z]+")


def _check_word(word: object, what: str, where: str | Path) -> str:
    # the world's tokenizer is word-level: one lower-case word per name and phrase
    if not isinstance(word, str) or not _WORD.fullmatch(word):
        raise UserError(f"{where}: {what} must be a single lower-case word, got {word!r}")
    return word


@dataclass(frozen=True)
class WorldAxis:
    """One bias axis of the world: its name, class names and the phrase each class adds."""

    name: str
    classes: tuple[str, ...]
    phrases: tuple[str, ...]

    def class_index(self, cls: int | str) -> int:
        """Index of a class given by index or by name."""
        if isinstance(cls, str):
            if cls not in self.classes:
                raise ValueError(f"axis {self.name!r} has no class {cls!r}; classes: {self.classes}")
            return self.classes.index(cls)
        if not 0 <= int(cls) < len(self.classes):
            raise ValueError(f"axis {self.name!r}: class index {cls} out of range")
        return int(cls)


def load_world_axis(path: str | Path) -> tuple[int, WorldAxis]:
    """Read one BiasAxis YAML file; returns ``(order, axis)``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot read axis file ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise UserError(f"{path}: an axis file needs 'name' and a list of 'classes'")
    name = _check_word(data.get("name"), "the axis name", path)
    classes = []
    for c in data["classes"]:
        if not isinstance(c, dict):
            raise UserError(f"{path}: each class needs 'name' and 'phrase'")
        classes.append((_check_word(c.get("name"), "a class name", path), c.get("phrase")))
    phrases = tuple(_check_word(p, "a class phrase", path) for _, p in classes)
    return int(data.get("order", 0)), WorldAxis(name, tuple(n for n, _ in classes), phrases)


def load_world_axes(directory: str | Path = AXES_DIR) -> tuple[WorldAxis, ...]:
    """Every ``*.yaml`` axis in ``directory``, sorted by ``order`` then name."""
    loaded = sorted(
        (load_world_axis(p) for p in Path(directory).glob("*.yaml")), key=lambda t: (t[0], t[1].name)
    )
    return tuple(ax for _, ax in loaded)


def load_occupations(path: str | Path = OCCUPATIONS_FILE) -> tuple[str, ...]:
    """Occupations, one word per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read occupations ({err})") from err
    words = [ln.split("#")[0].strip() for ln in lines]
    return tuple(_check_word(w, "an occupation", path) for w in words if w)


@dataclass
class WorldSpec:
    """The world: occupations, two bias axes, image size and the bias of neutral prompts.

    Neutral prompt ``"a photo of a {occupation}"`` shows class ``c`` of an axis with probability
    ``neutral_probs[axis][c]`` (``occupation_probs[occupation][axis]`` overrides it per occupation);
    augmented prompt ``"a photo of a {A-phrase} {B-phrase} {occupation}"`` always shows the named
    classes. ``neutral_probs=None`` means :data:`DEFAULT_BIAS` (0.85/0.15 and 0.8/0.1/0.1).
    """

    occupations: tuple[str, ...] = field(default_factory=load_occupations)
    axes: tuple[WorldAxis, ...] = field(default_factory=load_world_axes)
    image_size: int = 32
    neutral_probs: dict[str, tuple[float, ...]] | None = None
    occupation_probs: dict[str, dict[str, tuple[float, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.occupations = tuple(_check_word(o, "an occupation", "world spec") for o in self.occupations)
        self.axes = tuple(self.axes)
        n_occ = len(self.occupations)
        if not 1 <= n_occ <= MAX_OCCUPATIONS or len(set(self.occupations)) != n_occ:
            raise UserError(
                f"world spec: need 1-{MAX_OCCUPATIONS} distinct occupations, got {self.occupations}"
            )
        if tuple(len(ax.classes) for ax in self.axes) != AXIS_SIZES:
            raise UserError(
                f"world spec: the world draws two axes with {AXIS_SIZES} classes, got {self.axes}"
            )
        if self.image_size < 16 or self.image_size % 8:
            raise UserError(
                f"world spec: image_size must be a multiple of 8 and >= 16, got {self.image_size}"
            )
        if self.neutral_probs is None:
            self.neutral_probs = {ax.name: p for ax, p in zip(self.axes, DEFAULT_BIAS)}
        self._check_probs(self.neutral_probs, "neutral_probs", require_all=True)
        for occ, probs in self.occupation_probs.items():
            if occ not in self.occupations:
                raise UserError(f"world spec: occupation_probs names unknown occupation {occ!r}")
            self._check_probs(probs, f"occupation_probs[{occ!r}]", require_all=False)

    def _check_probs(self, probs: Mapping[str, Sequence[float]], what: str, require_all: bool) -> None:
        names = set(self.axis_names)
        if set(probs) - names or (require_all and set(probs) != names):
            raise UserError(f"world spec: {what} must give the axes {sorted(names)}, got {sorted(probs)}")
        for name, p in probs.items():
            arr = np.asarray(p, dtype=float)
            if arr.shape != (len(self.axis(name).classes),) or (arr < 0).any() or abs(arr.sum() - 1) > 1e-6:
                raise UserError(
                    f"world spec: {what}[{name!r}] must be one probability per class summing to 1"
                )

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(ax.name for ax in self.axes)

    def axis(self, name: str) -> WorldAxis:
        """The axis called ``name``."""
        return self.axes[self.axis_names.index(name)]

    def occupation_index(self, occupation: int | str) -> int:
        """Index of an occupation given by index or by name."""
        if isinstance(occupation, str):
            if occupation not in self.occupations:
                raise ValueError(f"unknown occupation {occupation!r}; known: {self.occupations}")
            return self.occupations.index(occupation)
        if not 0 <= int(occupation) < len(self.occupations):
            raise ValueError(f"occupation index {occupation} out of range")
        return int(occupation)

    def class_probs(self, occupation: int | str, axis: str, biased: bool = True) -> np.ndarray:
        """Class frequencies of ``axis`` for the neutral prompt (uniform when not ``biased``)."""
        k = len(self.axis(axis).classes)
        if not biased:
            return np.full(k, 1.0 / k)
        occ = self.occupations[self.occupation_index(occupation)]
        p = self.occupation_probs.get(occ, {}).get(axis, self.neutral_probs[axis])
        return np.asarray(p, dtype=float)

    def neutral_prompt(self, occupation: int | str) -> str:
        return f"a photo of a {self.occupations[self.occupation_index(occupation)]}"

    def augmented_prompt(self, occupation: int | str, classes: Sequence[int | str]) -> str:
        """The prompt naming one class per axis, in axis order (indices or names)."""
        words = [ax.phrases[ax.class_index(c)] for ax, c in zip(self.axes, classes, strict=True)]
        return f"a photo of a {' '.join(words)} {self.occupations[self.occupation_index(occupation)]}"

    def vocabulary(self) -> list[str]:
        """Every word a world prompt can contain, sorted."""
        words = {"a", "photo", "of", *self.occupations}
        for ax in self.axes:
            words.update(ax.phrases)
        return sorted(words)
