"""The Python API: ``omnimerge.merge(recipe, output)``, and merging in memory (:class:`Merger`,
:func:`merge_state_dict`).

Merging in memory writes no files: the merged tensors go into a state dict on any device, or straight into the
parameters of a model already loaded. A :class:`Merger` keeps the inputs open across merges, so that a search
over coefficients merges hundreds of times without reopening checkpoints::

    with omnimerge.Merger("recipe.yaml") as m:
        model = AutoModelForImageTextToText.from_pretrained(base_path)   # once
        for lam in (0.2, 0.4, 0.6):
            m.into(model, parameters={"scaling": lam}, only_merged=True)   # only the merged tensors change
            score(model)

The merged values are bit-identical to those ``omnimerge.merge`` writes for the same recipe and parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from omnimerge.options import MergeOptions, Strategy, as_options
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
    options: MergeOptions | None = None,
    overwrite: bool | None = None,
    device: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    overrides: list[str] | None = None,
    echo: Callable[[str], None] | None = None,
    check_finite: bool | None = None,
    hash_inputs: bool | str | None = None,
    use_kernels: bool | None = None,
    sync: bool | None = None,
    strategy: Strategy | None = None,
    resume: bool | None = None,
) -> Any:
    """Merge the recipe's experts into ``output`` (a Hugging Face checkpoint folder); return a MergeReport.

    ``recipe`` may be a :class:`Recipe`, a dict with the YAML keys, or the path of a YAML recipe.
    ``overrides`` are ``key.path=value`` strings (like the CLI's ``--set``). How the merge runs is
    :class:`~omnimerge.options.MergeOptions` (``options``; the keyword arguments given override its fields):
    ``hash_inputs``: the digest of every input file recorded in the model card: True or 'xxh3' (XXH3-128, fast),
    'sha256', or False/'none'. ``use_kernels=False`` keeps to torch operations (the compiled fused kernels of
    :mod:`omnimerge.kernels` give bit-identical results, faster). ``sync=False`` skips flushing the output to
    disk before it is committed. ``strategy='whole'`` merges every tensor whole (no block streaming; the same
    bits). ``resume=True`` continues an unfinished earlier run of the same merge (see
    :class:`~omnimerge.options.MergeOptions`). Raises :class:`omnimerge.errors.OmniMergeError` with a readable
    message on any bad input; on failure nothing is left at ``output`` (with ``resume``, the unfinished folder is
    kept, hidden beside it).
    """
    from omnimerge.engine import MergeRun

    opts = as_options(options, overwrite=overwrite, device=device, workers=workers, progress=progress, echo=echo,
                      check_finite=check_finite, hash_inputs=hash_inputs, use_kernels=use_kernels, sync=sync,
                      strategy=strategy, resume=resume)
    r = as_recipe(recipe, overrides)
    if r.slices is not None:
        from omnimerge.slices import merge_slices

        return merge_slices(r, output, opts)
    if r.mode == "modality":
        from omnimerge.modality import merge_modalities

        return merge_modalities(r, output, opts)
    return MergeRun(r, output, opts).run()


class Merger:
    """A recipe's inputs opened once, merged in memory as often as needed (see the module docstring).

    ``parameters`` / ``model_parameters`` of :meth:`state_dict` and :meth:`into` replace the recipe's top-level
    and per-expert method parameters for that merge only (validated like the recipe's). Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, recipe: Recipe | dict[str, Any] | str | Path, *, options: MergeOptions | None = None,
                 overrides: list[str] | None = None, **option_kwargs: Any) -> None:
        from omnimerge.engine import MergeRun
        from omnimerge.errors import RecipeError

        r = as_recipe(recipe, overrides)
        if r.mode == "modality":
            raise RecipeError("mode: modality writes one checkpoint per expert; merge it with omnimerge.merge")
        self.recipe = r
        self.options = as_options(options, **option_kwargs)
        self._run = MergeRun(r, None, self.options)
        self.last_report: Any = None

    def _merge(self, parameters: dict[str, Any] | None, model_parameters: list[dict[str, Any]] | None,
               **kw: Any) -> Any:
        self._run.set_parameters(parameters, model_parameters)
        report, sink = self._run.merge_into("memory", **kw)
        self.last_report = report
        return sink

    def state_dict(self, parameters: dict[str, Any] | None = None,
                   model_parameters: list[dict[str, Any]] | None = None, *,
                   device: str | torch.device | None = None, only_merged: bool = False) -> dict[str, torch.Tensor]:
        """The merged model as a state dict under the base checkpoint's tensor names (fresh tensors on
        ``device``, default the compute device); ``only_merged``: just the merged tensors."""
        sink = self._merge(parameters, model_parameters, device=device, only_merged=only_merged)
        return sink.tensors

    def into(self, model: Any, parameters: dict[str, Any] | None = None,
             model_parameters: list[dict[str, Any]] | None = None, *, only_merged: bool = False) -> Any:
        """Write the merge into ``model``'s parameters and buffers in place (any device and dtype; names matched
        through their canonical forms); returns the MergeReport. ``only_merged``: leave the tensors the merge
        copies from the base as they are (right for a model loaded from the base)."""
        self._merge(parameters, model_parameters, model=model, only_merged=only_merged)
        return self.last_report

    def close(self) -> None:
        self._run.close()

    def __enter__(self) -> Merger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_state_dict(recipe: Recipe | dict[str, Any] | str | Path, *, options: MergeOptions | None = None,
                     device: str | torch.device | None = None, **option_kwargs: Any) -> dict[str, torch.Tensor]:
    """One merge in memory: the merged model's state dict (base checkpoint names, planned dtypes)."""
    with Merger(recipe, options=options, **option_kwargs) as m:
        return m.state_dict(device=device)


def merge_into(model: Any, recipe: Recipe | dict[str, Any] | str | Path, *, options: MergeOptions | None = None,
               only_merged: bool = False, **option_kwargs: Any) -> Any:
    """One merge straight into a loaded model's tensors; returns the MergeReport."""
    with Merger(recipe, options=options, **option_kwargs) as m:
        return m.into(model, only_merged=only_merged)
