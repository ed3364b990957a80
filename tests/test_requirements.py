"""The lower bounds in setup.cfg are the versions `make test-min` installs (.ci/min-versions.txt)."""

from __future__ import annotations

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parents[1]


def _lower_bounds() -> dict[str, Version]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    bounds = {}
    for line in cfg["options"]["install_requires"].strip().splitlines():
        req = Requirement(line.strip())
        (low,) = [s.version for s in req.specifier if s.operator == ">="]
        bounds[req.name] = Version(low)
    return bounds


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci/min-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (pin,) = [s.version for s in req.specifier if s.operator == "=="]
            pins[req.name] = Version(pin)
    return pins


def test_every_lower_bound_is_pinned_for_test_min():
    bounds = _lower_bounds()
    # torch comes from TORCH (CI has one CPU build); every other requirement is pinned at its bound
    assert bounds.pop("torch")
    assert _pins() == bounds
