"""requirements.lock agrees with pyproject.toml, and it is complete (every locked package's own requirements are
locked too), so that installing from it gives the environment the published numbers came from."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"requirements.lock: {line!r} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in pins, f"requirements.lock pins {req.name} twice"
        pins[name] = Version(spec[0].version)
    return pins


def _project_requirements() -> list[Requirement]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for extra in proj.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_lock_satisfies_pyproject() -> None:
    pins = _lock()
    for req in _project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {req}")


def test_pyproject_bounds_the_major_versions_the_numerics_depend_on() -> None:
    reqs = {canonicalize_name(r.name): r for r in _project_requirements()}
    for name in ("torch", "transformers", "peft", "numpy", "numba", "safetensors", "tokenizers", "pillow",
                 "matplotlib"):
        assert any(s.operator == "<" for s in reqs[name].specifier), f"{name} has no upper bound in pyproject.toml"


def test_lock_is_complete() -> None:
    """Each locked package's requirements (read from its installed metadata) are locked, within their ranges."""
    pins = _lock()
    env = default_environment()
    for name, version in pins.items():
        dist = metadata.distribution(name)
        assert Version(dist.version).public == version.public, (
            f"{name} {dist.version} is installed, requirements.lock pins {version}: install with "
            "`pip install -r requirements.lock -e .[dev]`")
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name} requires {req}, which requirements.lock does not pin"
            assert req.specifier.contains(pins[dep], prereleases=True), (
                f"{name} requires {req}; requirements.lock pins {dep}=={pins[dep]}")
