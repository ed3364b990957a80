"""Bias axes: the identity attributes a population is aligned over, defined as data (YAML).

An axis names its classes, the phrase each class puts into a prompt, the zero-shot texts a CLIP
labeler scores, and the target distribution (uniform unless stated). Axes listed together are
crossed by :class:`Intersection` (gender x race -> 12 joint classes). The YAML format, the shipped
axes and how to add one are described in ``docs/prompts.md``.
"""

from __future__ import annotations

import importlib
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from popalign.errors import UserError

AXES_DIR = Path(__file__).resolve().parent.parent / "axes"
NAME_RE = re.compile(r"[a-z0-9_]+")
UNKNOWN = "unknown"  # reserved: the label of an image with no person in it
JOINT_SEP = "/"  # joint class names read "female/asian"

_AXIS_KEYS = {"name", "description", "classes", "target", "order", "placeholder", "neutral", "class_path"}
_CLASS_KEYS = {"name", "phrase", "classifier_prompts"}


@dataclass(frozen=True)
class AxisClass:
    """One class of an axis: its id, the words it adds to a prompt, and its zero-shot CLIP texts."""

    name: str
    phrase: str
    classifier_prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class BiasAxis:
    """A bias axis: named classes, their prompt phrases and a target distribution over them.

    ``placeholder`` is the ``{...}`` slot of a prompt template the phrase fills: ``identity`` for
    attributive words ("a {identity} doctor"; several axes on one slot join in ``order``), or an
    axis's own slot whose phrase stands in for the subject ("a photo of {couple} dancing"), with
    ``neutral`` the text the neutral prompt carries there ("a couple").
    """

    name: str
    classes: tuple[AxisClass, ...]
    target: tuple[float, ...] = ()
    description: str = ""
    order: int = 100
    placeholder: str = "identity"
    neutral: str = ""

    def __post_init__(self) -> None:
        if not self.target and self.classes:  # uniform unless stated
            object.__setattr__(self, "target", tuple(1.0 / len(self.classes) for _ in self.classes))
        name, names, target = self.name, self.class_names, self.target
        if not NAME_RE.fullmatch(name or ""):
            raise ValueError(f"invalid axis name {name!r}: use lower-case letters, digits and '_'")
        if not NAME_RE.fullmatch(self.placeholder or "") or self.placeholder == "subject":
            raise ValueError(
                f"invalid placeholder {self.placeholder!r}: a name like 'identity' ('subject' is taken)"
            )
        if len(names) < 2:  # one class: every population is already "balanced", nothing to learn
            raise ValueError(
                f"an axis needs at least two classes (it has {len(names)}): one has nothing to balance"
            )
        for n in names:
            if not n or JOINT_SEP in n or n != n.strip() or n == UNKNOWN:
                raise ValueError(
                    f"invalid class name {n!r}: non-empty, no '{JOINT_SEP}', '{UNKNOWN}' is reserved"
                )
        if len(set(names)) < len(names):
            raise ValueError(f"duplicate class name(s) {sorted({n for n in names if names.count(n) > 1})}")
        if len(target) != len(names):
            raise ValueError(f"'target' has {len(target)} values for {len(names)} classes")
        if any(not math.isfinite(p) or p < 0 for p in target):
            raise ValueError(f"'target' values must be >= 0, got {list(target)}")
        if abs(sum(target) - 1.0) > 1e-6:
            raise ValueError(f"'target' must sum to 1, sums to {sum(target):.6g}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def index(self, name: str) -> int:
        """Position of class ``name``; ``KeyError`` naming the axis when it has no such class."""
        for i, c in enumerate(self.classes):
            if c.name == name:
                return i
        raise KeyError(f"axis {self.name!r} has no class {name!r} (classes: {', '.join(self.class_names)})")

    def phrase(self, class_name: str) -> str:
        """The words class ``class_name`` puts into a prompt; override for computed phrases."""
        return self.classes[self.index(class_name)].phrase

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping :meth:`from_dict` reads back."""
        out: dict[str, Any] = {"name": self.name}
        if type(self) is not BiasAxis:
            out["class_path"] = f"{type(self).__module__}:{type(self).__qualname__}"
        out["description"] = self.description
        out["classes"] = [
            {"name": c.name, "phrase": c.phrase, "classifier_prompts": list(c.classifier_prompts)}
            for c in self.classes
        ]
        out.update(target=list(self.target), order=self.order, placeholder=self.placeholder)
        if self.neutral:
            out["neutral"] = self.neutral
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "<axis>") -> BiasAxis:
        """Build an axis from a parsed YAML mapping; ``UserError`` naming ``source`` if it is invalid."""

        def fail(problem: str) -> UserError:
            return UserError(f"{source}: {problem}")

        if not isinstance(data, Mapping):
            raise fail("an axis file must be a YAML mapping with 'name' and 'classes'")
        unknown = sorted(set(map(str, data)) - _AXIS_KEYS)
        if unknown:
            raise fail(f"unknown key(s) {unknown}; allowed: {sorted(_AXIS_KEYS)}")
        for key in ("name", "classes"):
            if key not in data:
                raise fail(f"missing '{key}'")
        if not isinstance(data["classes"], list) or not data["classes"]:
            raise fail("'classes' must be a non-empty list")
        classes = []
        for i, item in enumerate(data["classes"]):
            if not isinstance(item, Mapping) or "name" not in item:
                raise fail(f"classes[{i}] must be a mapping with a 'name'")
            unknown = sorted(set(map(str, item)) - _CLASS_KEYS)
            if unknown:
                raise fail(f"classes[{i}]: unknown key(s) {unknown}; allowed: {sorted(_CLASS_KEYS)}")
            texts = item.get("classifier_prompts")
            if texts is not None and not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
                raise fail(f"classes[{i}]: 'classifier_prompts' must be a list of strings")
            name = str(item["name"])
            phrase = str(item.get("phrase", name.replace("_", " ")))
            classes.append(AxisClass(name, phrase, tuple(texts or ())))
        target = data.get("target")
        if target is not None and (
            not isinstance(target, list) or not all(isinstance(p, (int, float)) for p in target)
        ):
            raise fail("'target' must be a list of numbers, one per class")
        if not isinstance(data.get("order", 0), int):
            raise fail("'order' must be an integer")
        if not isinstance(data.get("placeholder", ""), str):  # str(5) would pass as the slot {5}
            raise fail("'placeholder' must be a name like 'identity'")
        axis_cls = _import_axis_class(data["class_path"], fail) if "class_path" in data else cls
        try:
            return axis_cls(
                name=str(data["name"]),
                classes=tuple(classes),
                target=tuple(float(p) for p in target or ()),
                description=str(data.get("description", "")),
                order=data.get("order", 100),
                placeholder=str(data.get("placeholder", "identity")),
                neutral=str(data.get("neutral", "")),
            )
        except ValueError as err:  # the dataclass checks its own fields; name the file here
            raise fail(str(err)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> BiasAxis:
        """Load one axis from a YAML file; ``UserError`` naming the file on any problem."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise UserError(f"{path}: cannot read axis file ({err.strerror or err})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a text file (not UTF-8); an axis file is YAML") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
        return cls.from_dict(data, source=str(path))


def _import_axis_class(spec: Any, fail: Any) -> type[BiasAxis]:
    """Import ``package.module:ClassName`` (or ``package.module.ClassName``), a BiasAxis subclass."""
    module_name, _, attr = str(spec).replace(":", ".").rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise fail(f"cannot import class_path {spec!r} ({err})") from None
    if not (isinstance(obj, type) and issubclass(obj, BiasAxis)):
        raise fail(f"class_path {spec!r} is not a subclass of popalign.data.axes.BiasAxis")
    return obj


def shipped_axes() -> list[str]:
    """Names of the axes shipped in ``popalign/axes/``."""
    return sorted(p.stem for p in AXES_DIR.glob("*.yaml"))


def load_axes(names_or_paths: Iterable[str | Path]) -> list[BiasAxis]:
    """Load axes by shipped name (``gender``, ``race``, ``age``, ``couple``) or YAML path."""
    axes: list[BiasAxis] = []
    for item in names_or_paths:
        text = str(item)
        if NAME_RE.fullmatch(text) and not Path(text).is_file():
            path = AXES_DIR / f"{text}.yaml"
            if not path.is_file():
                raise UserError(
                    f"unknown axis {text!r}: shipped axes are {', '.join(shipped_axes())}{_world_hint(text)}"
                )
        else:
            path = Path(text)
            if not path.is_file():
                raise UserError(f"{path}: axis file not found")
        axes.append(BiasAxis.from_yaml(path))
    names = [a.name for a in axes]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UserError(f"axis {dups[0]!r} given more than once")
    return axes


def _world_hint(name: str) -> str:
    from popalign.world import AXES_DIR as WORLD_AXES_DIR

    path = WORLD_AXES_DIR.resolve() / f"{name}.yaml"
    return f"; the synthetic world's {name!r} axis is given as its file: {path}" if path.is_file() else ""


@dataclass(frozen=True)
class Intersection:
    """The product of several axes: one joint class per combination, row-major (last axis fastest).

    ``class_names`` read ``"female/asian"``; the joint target is the product of the member targets,
    p(c_1, ..., c_k) = p_1(c_1) * ... * p_k(c_k), unless ``target`` is given.
    """

    axes: tuple[BiasAxis, ...]
    target: tuple[float, ...] = ()
    combos: tuple[tuple[str, ...], ...] = field(init=False, repr=False)

    def __init__(self, axes: Iterable[BiasAxis], target: Iterable[float] | None = None) -> None:
        axes = tuple(axes)
        if not axes or len({a.name for a in axes}) < len(axes):
            raise ValueError(f"an Intersection needs one or more distinct axes, got {[a.name for a in axes]}")
        combos = tuple(itertools.product(*(a.class_names for a in axes)))
        joint = tuple(target) if target is not None else ()
        if not joint:
            joint = tuple(math.prod(a.target[a.index(c)] for a, c in zip(axes, combo)) for combo in combos)
        if len(joint) != len(combos) or any(p < 0 for p in joint) or abs(sum(joint) - 1) > 1e-6:
            raise ValueError(f"joint target must be {len(combos)} values >= 0 summing to 1")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "target", tuple(float(p) for p in joint))
        object.__setattr__(self, "combos", combos)

    @property
    def name(self) -> str:
        return JOINT_SEP.join(a.name for a in self.axes)

    @property
    def num_classes(self) -> int:
        return len(self.combos)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(JOINT_SEP.join(combo) for combo in self.combos)

    def index(self, name: str | Mapping[str, str]) -> int:
        """Position of a joint class, given as ``"female/asian"`` or ``{"gender": ..., "race": ...}``."""
        parts = (
            tuple(name[a.name] for a in self.axes)
            if isinstance(name, Mapping)
            else tuple(name.split(JOINT_SEP))
        )
        try:
            return self.combos.index(parts)
        except ValueError:
            raise KeyError(f"{self.name!r} has no joint class {JOINT_SEP.join(parts)!r}") from None

    def split(self, name: str) -> dict[str, str]:
        """``"female/asian"`` -> ``{"gender": "female", "race": "asian"}``."""
        return dict(zip((a.name for a in self.axes), self.combos[self.index(name)]))

    def phrase(self, name: str) -> str:
        """Member phrases joined in axis ``order`` (ties keep the listed order)."""
        members = self.split(name)
        ordered = sorted(self.axes, key=lambda a: a.order)
        return " ".join(p for a in ordered if (p := a.phrase(members[a.name])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "axes": [a.name for a in self.axes],
            "classes": list(self.class_names),
            "target": list(self.target),
        }
