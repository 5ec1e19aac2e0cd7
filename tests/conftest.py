"""Shared test helpers: run the CLI in-process, locate the golden cases, build tiny real checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

try:  # the fuzzing tests' profiles: a short one for CI (default), HYPOTHESIS_PROFILE=long for a deep run
    from hypothesis import HealthCheck, settings

    _common = dict(deadline=None, database=None, derandomize=False, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=50, **{**_common, "derandomize": True})
    settings.register_profile("long", max_examples=2000, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a dev dependency; only the fuzzing tests need it
    pass
GOLDEN = REPO.parent / "shared" / "golden"


def golden_root() -> Path:
    if not (GOLDEN / "README.md").is_file():
        pytest.fail(f"golden cases not found at {GOLDEN} (the repository must sit beside ../shared)")
    return GOLDEN


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run ``omnimerge ARGS...`` through the console entry point, in this process."""
    from omnimerge.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["omnimerge", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The miniature benchmark's quick (CI-size) zoo, built once per test session into a temporary cache."""
    from rich.console import Console

    from omnimerge.bench.zoo import ZooConfig, build_zoo

    root = tmp_path_factory.mktemp("quick-zoo")
    return build_zoo(ZooConfig.quick_config(0), root=root, console=Console(quiet=True))
