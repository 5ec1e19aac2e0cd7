"""``omnimerge search``: choose merge coefficients on validation data with optuna (resumable, parallel).

See :mod:`omnimerge.search.spec` (the recipe's ``search:`` section), :mod:`omnimerge.search.objective` (what is
scored), :mod:`omnimerge.search.fast` (trials merged in memory) and :mod:`omnimerge.search.run` (the study, its
storage, the outputs).
"""

from __future__ import annotations

__all__ = ["run_search"]


def __getattr__(name: str) -> object:
    if name == "run_search":
        from omnimerge.search.run import run_search

        return run_search
    raise AttributeError(f"module 'omnimerge.search' has no attribute {name!r}")
