"""Bias axes: the shipped YAML files, every refusal of a bad one (naming the file and the problem),
subclasses through class_path, and intersections of several axes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from popalign.data.axes import AxisClass, BiasAxis, Intersection, load_axes, shipped_axes
from popalign.data.prompts import expand_prompts
from popalign.errors import UserError
from popalign.world import AXES_DIR as WORLD_AXES_DIR

GOOD_AXIS = {
    "name": "mood",
    "classes": [{"name": "happy", "phrase": "happy"}, {"name": "sad", "phrase": "sad"}],
    "target": [0.25, 0.75],
}


class ShoutingAxis(BiasAxis):
    """A subclass computing its phrase instead of reading it (the override hook)."""

    def phrase(self, class_name: str) -> str:
        return super().phrase(class_name).upper()


def write_yaml(tmp_path: Path, data, name: str = "axis.yaml") -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("name", "classes", "first_phrase"),
    [
        ("gender", ["male", "female"], "male"),
        ("race", ["white", "black", "asian", "indian", "latino", "middle_eastern"], "white"),
        ("age", ["young", "middle_aged", "old"], "young"),
        ("couple", ["man_woman", "two_men", "two_women"], "a man and a woman"),
    ],
)
def test_shipped_axis_loads(name, classes, first_phrase):
    (axis,) = load_axes([name])
    assert axis.name == name and list(axis.class_names) == classes
    assert axis.num_classes == len(classes) and axis.phrase(classes[0]) == first_phrase
    assert axis.target == pytest.approx([1 / len(classes)] * len(classes))
    assert all(c.classifier_prompts for c in axis.classes)  # the CLIP labeler needs them
    assert axis.index(classes[-1]) == len(classes) - 1
    assert BiasAxis.from_dict(axis.to_dict()) == axis  # YAML mapping round trip


def test_shipped_axes_listed_and_loaded_by_path(tmp_path):
    assert shipped_axes() == ["age", "couple", "gender", "race"]
    (axis,) = load_axes([write_yaml(tmp_path, GOOD_AXIS)])
    assert axis.target == (0.25, 0.75) and axis.order == 100 and axis.placeholder == "identity"
    with pytest.raises(KeyError, match="no class 'calm'"):
        axis.index("calm")


def axis_with(**changes):
    data = json.loads(json.dumps(GOOD_AXIS))
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


BAD_AXES = {
    "unknown top-level key": (axis_with(colour="red"), "unknown key"),
    "unknown class key": (axis_with(classes=[{"name": "a", "frase": "x"}]), "unknown key"),
    "missing name": (axis_with(name=None), "missing 'name'"),
    "missing classes": (axis_with(classes=None), "missing 'classes'"),
    "empty classes": (axis_with(classes=[]), "non-empty list"),
    "one class": (axis_with(classes=[{"name": "a"}], target=None), "at least two classes (it has 1)"),
    "duplicate classes": (axis_with(classes=[{"name": "a"}, {"name": "a"}], target=None), "duplicate class"),
    "target too short": (axis_with(target=[1.0]), "1 values for 2 classes"),
    "negative target": (axis_with(target=[1.5, -0.5]), ">= 0"),
    "target not summing to 1": (axis_with(target=[0.5, 0.4]), "sum to 1"),
    "target not numbers": (axis_with(target=["a", "b"]), "list of numbers"),
    "invalid name": (axis_with(name="Mood!"), "invalid axis name"),
    "reserved class name": (axis_with(classes=[{"name": "unknown"}, {"name": "b"}]), "reserved"),
    "slash in class name": (axis_with(classes=[{"name": "a/b"}, {"name": "b"}]), "invalid class name"),
    "class_path not an axis": (axis_with(class_path="pathlib:Path"), "not a subclass"),
    "not a mapping": ("- just\n- a list\n", "must be a YAML mapping"),
    "broken YAML": ("name: [unclosed\n", "invalid YAML"),
    "not UTF-8": (b"\xd7\x00\xff binary", "not a text file"),
    "classifier_prompts a number": (
        axis_with(classes=[{"name": "a", "classifier_prompts": 3}, {"name": "b"}], target=None),
        "'classifier_prompts' must be a list of strings",
    ),
    "placeholder a number": (axis_with(placeholder=5), "'placeholder' must be a name"),
}


@pytest.mark.parametrize("case", list(BAD_AXES))
def test_bad_axis_yaml_names_file_and_problem(tmp_path, case):
    data, problem = BAD_AXES[case]
    path = write_yaml(tmp_path, data, "bad_axis.yaml")
    with pytest.raises(UserError) as err:
        BiasAxis.from_yaml(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_unknown_axis_name_and_duplicate_axes():
    with pytest.raises(UserError, match="unknown axis 'hair'.*gender"):
        load_axes(["hair"])
    # a synthetic-world axis by name: the error points at its file
    with pytest.raises(UserError, match="unknown axis 'tone'") as err:
        load_axes(["tone"])
    assert str(WORLD_AXES_DIR.resolve() / "tone.yaml") in str(err.value)
    assert load_axes([WORLD_AXES_DIR.resolve() / "tone.yaml"])[0].name == "tone"
    with pytest.raises(UserError, match="more than once"):
        load_axes(["gender", "gender"])


def test_subclass_via_class_path(tmp_path):
    path = write_yaml(tmp_path, axis_with(class_path=f"{__name__}:ShoutingAxis"))
    (axis,) = load_axes([path])
    assert type(axis) is ShoutingAxis and axis.phrase("sad") == "SAD"
    rows = expand_prompts(["a {identity} clown"], [axis])
    assert [r.prompt for r in rows] == ["a clown", "a HAPPY clown", "a SAD clown"]


def test_intersection_classes_and_target():
    gender = BiasAxis(
        "gender", (AxisClass("male", "male"), AxisClass("female", "female")), (0.3, 0.7), order=10
    )
    (race,) = load_axes(["race"])
    joint = Intersection([gender, race])
    assert joint.name == "gender/race" and joint.num_classes == 12
    # row-major, last axis fastest: index(female/asian) = 1 * 6 + 2 = 8
    assert joint.class_names[:2] == ("male/white", "male/black") and joint.index("female/asian") == 8
    assert joint.index({"race": "asian", "gender": "female"}) == 8
    assert joint.split("female/middle_eastern") == {"gender": "female", "race": "middle_eastern"}
    # joint target = product: p(female, asian) = 0.7 * 1/6 = 0.11666...
    assert joint.target[8] == pytest.approx(0.7 / 6) and math.fsum(joint.target) == pytest.approx(1.0)
    assert joint.phrase("female/middle_eastern") == "female middle eastern"
    given = Intersection([gender], target=[0.9, 0.1])
    assert given.target == (0.9, 0.1)
    with pytest.raises(ValueError, match="summing to 1"):
        Intersection([gender], target=[0.5, 0.6])
