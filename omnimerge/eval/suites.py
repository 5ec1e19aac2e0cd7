"""Evaluation suites other than the task pool, added by plugins: ``omnimerge eval MODEL --suite NAME`` runs
them. The miniature benchmark (:mod:`omnimerge.bench`) adds ``mini``: its five tasks are scored by its own
classifier heads, not generated text, so they sit beside the pool's :class:`~omnimerge.eval.protocol.Backend`
protocol rather than behind it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from omnimerge.errors import OmniMergeError

__all__ = ["Suite", "get_suite", "register_suite", "suite_names"]


class Suite(Protocol):
    def __call__(self, model: Path, *, split: str, n: int, json_out: Path | None) -> None:
        """Evaluate ``model`` on ``n`` examples per task of ``split``; print a table; optionally write JSON."""
        ...


_SUITES: dict[str, Suite] = {}


def register_suite(name: str, run: Suite | Callable[..., None]) -> None:
    """Make ``omnimerge eval MODEL --suite name`` call ``run``."""
    _SUITES[name] = run  # type: ignore[assignment]


def suite_names() -> list[str]:
    return sorted(_SUITES)


def get_suite(name: str) -> Suite:
    if name not in _SUITES:
        known = ", ".join(suite_names()) or "none installed"
        raise OmniMergeError(f"unknown suite '{name}' (known: {known}); the paper's benchmarks are tasks: --tasks")
    return _SUITES[name]
