"""Merge methods: one file per algorithm family, registered by the imports below.

Adding a method: write a function in a family file (or a new file) decorated with
:func:`omnimerge.methods.base.merge_method`, and import the file here (one line).
"""

from __future__ import annotations

from omnimerge.errors import RecipeError

# --- the registry: one import per family file ---------------------------------------------------------------
from omnimerge.methods import (
    balancing,  # noqa: E402,F401  sce, pcb (variance selection, parameter competition balancing)
    breadcrumbs,  # noqa: E402,F401  breadcrumbs, breadcrumbs_ties (composed sparse methods)
    data_aware,  # noqa: E402,F401  regmean, fisher (per-expert statistics: input Grams, diagonal Fisher)
    della,  # noqa: E402,F401  della, della_linear (magnitude-ranked random pruning)
    knots,  # noqa: E402,F401  knots (KnOTS, LoRA merging in a shared SVD basis)
    linear,  # noqa: E402,F401  weight_average, task_arithmetic
    online,  # noqa: E402,F401  online_composition (modality mode)
    selection,  # noqa: E402,F401  magmax, emr, ram, ramplus_tl, consensus, nearswap, lines, arcee_fusion
    spectral,  # noqa: E402,F401  tsv, iso_c, iso_cts, cart, svc
    spherical,  # noqa: E402,F401  slerp, nuslerp, multislerp, karcher, model_stock
    ties,  # noqa: E402,F401  ties, dare_ta, dare_ties
    wudi,  # noqa: E402,F401  wudi, optmerge, swudi, aswudi
)
from omnimerge.methods.base import (
    Capabilities,
    GlobalPass,
    LowRank,
    MergeMethod,
    Param,
    TensorContext,
    merge_method,
    registry,
)

__all__ = [
    "Capabilities",
    "GlobalPass",
    "LowRank",
    "MergeMethod",
    "Param",
    "TensorContext",
    "get_method",
    "merge_method",
    "registry",
]


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; an unknown name raises a :class:`RecipeError` listing the known ones."""
    reg = registry()
    if name not in reg:
        raise RecipeError(f"merge_method: unknown method '{name}' (known: {', '.join(sorted(reg))})")
    return reg[name]
