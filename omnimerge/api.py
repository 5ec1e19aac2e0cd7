"""The Python API: ``omnimerge.merge(recipe, output)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnimerge.recipe import Recipe, apply_overrides, load_recipe, validate_recipe


def as_recipe(recipe: Recipe | dict[str, Any] | str | Path, overrides: list[str] | None = None) -> Recipe:
    """A :class:`Recipe` from a Recipe, a mapping (paths relative to the working directory) or a YAML path."""
    if isinstance(recipe, Recipe):
        if overrides:
            data = apply_overrides(recipe.model_dump(exclude={"base_dir"}), overrides)
            return validate_recipe(data, "recipe", recipe.base_path)
        return recipe
    if isinstance(recipe, dict):
        return validate_recipe(apply_overrides(recipe, overrides or []), "recipe")
    return load_recipe(recipe, overrides)


def merge(
    recipe: Recipe | dict[str, Any] | str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    device: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    overrides: list[str] | None = None,
    echo: Callable[[str], None] | None = None,
    check_finite: bool = True,
    hash_inputs: bool | str = True,
    use_kernels: bool = True,
    sync: bool = True,
) -> Any:
    """Merge the recipe's experts into ``output`` (a Hugging Face checkpoint folder); return a MergeReport.

    ``recipe`` may be a :class:`Recipe`, a dict with the YAML keys, or the path of a YAML recipe.
    ``overrides`` are ``key.path=value`` strings (like the CLI's ``--set``). Raises
    :class:`omnimerge.errors.OmniMergeError` with a readable message on any bad input; on failure nothing is
    left at ``output``. ``hash_inputs``: the digest of every input file recorded in the model card: True or
    'xxh3' (XXH3-128, fast), 'sha256', or False/'none'. ``use_kernels=False`` keeps to torch operations
    (the compiled fused kernels of :mod:`omnimerge.kernels` give bit-identical results, faster). ``sync=False``
    skips flushing the output to disk before it is committed (faster; a power loss soon after may truncate it).
    """
    from omnimerge.engine import MergeRun

    r = as_recipe(recipe, overrides)
    if r.mode == "modality":
        from omnimerge.modality import merge_modalities

        return merge_modalities(
            r, output, overwrite=overwrite, device=device, workers=workers, progress=progress, echo=echo,
            check_finite=check_finite, hash_inputs=hash_inputs, use_kernels=use_kernels, sync=sync,
        )
    return MergeRun(
        r,
        output,
        overwrite=overwrite,
        device=device,
        workers=workers,
        progress=progress,
        echo=echo,
        check_finite=check_finite,
        hash_inputs=hash_inputs,
        use_kernels=use_kernels,
        sync=sync,
    ).run()
