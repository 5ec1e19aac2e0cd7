"""omnimerge: merge fine-tuned (multimodal) LLMs into one model, streaming, tensor by tensor.

    >>> import omnimerge
    >>> report = omnimerge.merge("recipe.yaml", "merged/")          # doctest: +SKIP
    >>> state = omnimerge.merge_state_dict("recipe.yaml")           # doctest: +SKIP  (in memory, no files)

See :func:`omnimerge.merge`, :class:`omnimerge.Merger` (repeated merges in memory), :mod:`omnimerge.methods`
(the registry), :mod:`omnimerge.components`, :class:`omnimerge.MergeOptions`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["MergeOptions", "Merger", "Recipe", "__version__", "load_recipe", "load_task_model", "merge",
           "merge_into", "merge_state_dict"]


def __getattr__(name: str) -> Any:  # lazy: `import omnimerge` stays cheap (no torch import)
    if name in ("merge", "Merger", "merge_state_dict", "merge_into"):
        from omnimerge import api

        return getattr(api, name)
    if name == "MergeOptions":
        from omnimerge.options import MergeOptions

        return MergeOptions
    if name == "load_task_model":
        from omnimerge.task_models import load_task_model

        return load_task_model
    if name in ("load_recipe", "Recipe"):
        from omnimerge import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'omnimerge' has no attribute {name!r}")
