"""omnimerge: merge fine-tuned (multimodal) LLMs into one model, streaming, tensor by tensor.

    >>> import omnimerge
    >>> report = omnimerge.merge("recipe.yaml", "merged/")          # doctest: +SKIP

See :func:`omnimerge.merge`, :mod:`omnimerge.methods` (the registry), :mod:`omnimerge.components`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["merge", "load_recipe", "Recipe", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import omnimerge` stays cheap (no torch import)
    if name == "merge":
        from omnimerge.api import merge

        return merge
    if name in ("load_recipe", "Recipe"):
        from omnimerge import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'omnimerge' has no attribute {name!r}")
