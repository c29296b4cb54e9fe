"""constraints.txt, the versions scripts/setup.sh installs, against pyproject.toml's requirements:
every requirement (test extras and build system included) is pinned once, to a version its range allows."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
UNPINNED = {"torch", "triton"}  # chosen by scripts/setup.sh's TORCH_SPEC and the torch build


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        name = canonicalize_name(name)
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    """The project's requirements, its test extras and its build system's (setup.sh builds with the pins)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    names = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(name) for name in names + pyproject["build-system"]["requires"]]


def test_every_requirement_is_pinned_within_its_range():
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        if name in UNPINNED:
            assert name not in pins, f"constraints.txt pins {name}, which scripts/setup.sh chooses"
            continue
        assert name in pins, f"constraints.txt has no pin for {requirement}: pip freeze it in (see its header)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")
