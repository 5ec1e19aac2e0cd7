"""The ``search:`` section of a recipe: the objective and the space of merge coefficients, validated.

A search recipe is a merge recipe with one more key::

    merge_method: task_arithmetic
    parameters: {scaling: 1.0}
    search:
      objective: {suite: mini, family: full, split: validation, limit: 64}
      scaling: [0.1, 1.5]        # one global lambda
      weights: [0.0, 1.5]        # one coefficient per expert ...
      layer_groups: 4            # ... per expert and per block of contiguous decoder layers (+ one for the rest)
      density: [0.1, 0.9]        # any numeric method parameter
      sampler: tpe               # tpe | cmaes | gp | random | grid
      grid: 4                    # grid sampler: points per dimension
      prune: median              # none (default) | median | hyperband: stop a trial after a task whose
      prune_warmup: 5            #   running score is hopeless; pruning starts after this many trials

With ``suite: mini`` the recipe may leave out ``base_model`` and ``models``: they are the miniature zoo's base and
experts of ``family``. Every problem (an empty or inverted range, a parameter the method does not have, a grid
larger than the trial budget) is one :class:`SearchError` line before any work starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omnimerge.errors import OmniMergeError, RecipeError, quoted
from omnimerge.recipe import MAX_RECIPE_BYTES, Recipe, load_yaml, validate_recipe

SAMPLERS = ("tpe", "cmaes", "gp", "random", "grid")


class SearchError(OmniMergeError):
    """The search section, its objective or its storage is unusable."""


class MiniObjective(BaseModel):
    """The miniature benchmark's five tasks (``omnimerge.bench``), scored by greedy decoding."""

    model_config = ConfigDict(extra="forbid")

    suite: Literal["mini"]
    family: Literal["full", "lora"] = "full"
    split: Literal["validation"] = "validation"
    #: examples per task the trials are scored on (the first ``limit`` of the validation stream)
    limit: int = Field(default=200, ge=1, le=100_000)
    #: examples per task of fresh validation data (beyond the first ``limit``) the top recipes are re-scored on
    fresh: int = Field(default=200, ge=1, le=100_000)
    #: examples per task of the reporting split (test), scored once per reported recipe
    test_limit: int = Field(default=500, ge=1, le=100_000)
    #: the zoo that provides base_model/models when the recipe leaves them out
    zoo: Literal["full", "quick"] = "full"
    zoo_seed: int = 0


class TasksObjective(BaseModel):
    """Real benchmarks of the task pool (``omnimerge.eval``): trials are scored on a seeded sample of ``limit``
    examples per task of ``split``, the top recipes re-scored on ``fresh`` more examples of the same split
    (disjoint: one stratified sample of ``limit + fresh``, cut in two), and reported on ``test_split`` (default:
    each task's standard evaluation split), which must differ from ``split``."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1)
    split: str = "validation"
    limit: int = Field(default=200, ge=1)
    fresh: int = Field(default=200, ge=1)
    #: where each task's data is (a save_to_disk folder, parquet, JSONL or hub id; default: its hub id)
    data: dict[str, str] = Field(default_factory=dict)
    #: a separate image table per task (GQA)
    images: dict[str, str] = Field(default_factory=dict)
    test_split: str | None = None
    #: examples per task of the reporting split (None: all of it)
    test_limit: int | None = Field(default=None, ge=1)
    seed: int = 0
    device: str = "cpu"
    batch_size: int = Field(default=8, ge=1)


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # extra keys: ranges of the method's numeric parameters

    objective: MiniObjective | TasksObjective
    scaling: tuple[float, float] | None = None
    weights: tuple[float, float] | None = None
    layer_groups: int | None = Field(default=None, ge=1, le=64)
    sampler: Literal["tpe", "cmaes", "gp", "random", "grid"] = "tpe"
    grid: int = Field(default=4, ge=2, le=100)
    #: the top recipes (by validation score) re-scored on fresh data before one is chosen
    top: int = Field(default=3, ge=1, le=50)
    #: stop a trial between tasks when its running mean is hopeless (optuna's pruners; none: every trial runs
    #: every task). Pruned trials count toward the budget, and only complete ones can win.
    prune: Literal["none", "median", "hyperband"] = "none"
    #: trials finished before pruning starts (the median pruner's startup trials)
    prune_warmup: int = Field(default=5, ge=0, le=10_000)

    @field_validator("scaling", "weights", mode="before")
    @classmethod
    def _pair(cls, v: Any) -> Any:
        return _range(v)

    def method_ranges(self) -> dict[str, tuple[float, float]]:
        return {k: _range(v) for k, v in (self.model_extra or {}).items()}


def _range(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise ValueError(f"a range is [low, high], got {quoted(v, 40)}")
    try:
        lo, hi = float(v[0]), float(v[1])
    except (TypeError, ValueError):
        raise ValueError(f"a range is two numbers [low, high], got {quoted(v, 40)}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"the range {quoted(v, 40)} is not finite")
    if lo > hi:
        raise ValueError(f"the range [{lo:g}, {hi:g}] is inverted (low > high)")
    if lo == hi:
        raise ValueError(f"the range [{lo:g}, {hi:g}] is empty (low == high)")
    return (lo, hi)


class Dimension(BaseModel):
    """One searched coefficient: its optuna name, range and where it goes in the recipe."""

    name: str
    low: float
    high: float
    kind: Literal["scaling", "weight", "param"]
    expert: int | None = None
    group: int | None = None  # layer group (None: 'other', or no layer groups)
    param: str | None = None
    integer: bool = False  # an integer method parameter (suggested as an int)


class SearchPlan(BaseModel):
    """A validated search: the merge recipe (without ``search:``), the spec and the dimensions."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    recipe: Recipe
    spec: SearchSpec
    dims: list[Dimension]
    source: str

    def fixed_parameters(self, params: dict[str, float]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The recipe's top-level and per-expert parameters for one point of the space."""
        top: dict[str, Any] = dict(self.recipe.parameters)
        per: list[dict[str, Any]] = [dict(m.parameters) for m in self.recipe.models]
        k = self.spec.layer_groups
        for d in self.dims:
            v = float(params[d.name])
            if d.kind == "scaling":
                top["scaling"] = v
            elif d.kind == "param":
                top[str(d.param)] = int(round(v)) if d.integer else v
        if self.spec.weights is not None:
            for i in range(len(per)):
                if k is None:
                    per[i]["weight"] = float(params[weight_name(self, i)])
                else:
                    per[i]["weight"] = {"layers": [float(params[weight_name(self, i, g)]) for g in range(k)],
                                        "other": float(params[weight_name(self, i, None, other=True)])}
        return top, per

    def recipe_at(self, params: dict[str, float]) -> Recipe:
        """The merge recipe with the searched coefficients of ``params`` written in."""
        top, per = self.fixed_parameters(params)
        data = self.recipe.model_dump(exclude={"base_dir"})
        data["parameters"] = top
        for m, p in zip(data["models"], per, strict=True):
            m["parameters"] = p
        return validate_recipe(data, self.source, self.recipe.base_path)

    def expert_labels(self) -> list[str]:
        return [m.name or Path(m.model.rstrip("/")).name or f"model{i}" for i, m in enumerate(self.recipe.models)]

    def grid_size(self) -> int:
        return self.spec.grid ** len(self.dims)


def weight_name(plan: SearchPlan, expert: int, group: int | None = None, other: bool = False) -> str:
    label = f"w{expert}"
    if other:
        return f"{label}.other"
    return label if group is None else f"{label}.g{group}"


def read_search_recipe(path: str | Path, trials: int, zoo_models: Any = None) -> SearchPlan:
    """Read and validate a search recipe (every check that needs no model data); ``zoo_models(objective)``
    returns (base, experts) for a ``suite: mini`` recipe that leaves them out."""
    p = Path(path)
    try:
        raw = p.read_bytes()[: MAX_RECIPE_BYTES + 1]
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not UTF-8 text") from None
    data = load_yaml(text, str(p))
    if not isinstance(data, dict) or "search" not in data:
        raise SearchError(f"{p}: no 'search:' section (the objective and the ranges to search)")
    section = data.pop("search")
    if not isinstance(section, dict):
        raise SearchError(f"{p}: search: expected a mapping (objective, scaling, weights, ...), got "
                          f"{quoted(section, 40)}")
    spec = _validate_spec(section, str(p))
    if trials < 1:
        raise SearchError(f"--trials: expected at least 1, got {trials}")
    if isinstance(spec.objective, MiniObjective) and ("base_model" not in data or "models" not in data):
        if zoo_models is None:
            raise SearchError(f"{p}: base_model and models are required")
        base, experts = zoo_models(spec.objective)
        data.setdefault("base_model", str(base))
        data.setdefault("models", [{"model": str(e), "name": n} for n, e in experts])
    recipe = validate_recipe(data, str(p), p.resolve().parent)
    plan = SearchPlan(recipe=recipe, spec=spec, dims=_dimensions(recipe, spec, str(p)), source=str(p))
    if not plan.dims:
        raise SearchError(f"{p}: search: nothing to search (give scaling, weights or a method parameter's range)")
    if spec.sampler == "grid" and plan.grid_size() > trials:
        raise SearchError(f"{p}: search: the grid has {spec.grid}^{len(plan.dims)} = {plan.grid_size()} points, "
                          f"more than the trial budget ({trials}); lower grid, fewer dimensions, or more --trials")
    # every point of the space must be a valid recipe: check the corners now, before any work
    for corner in ("low", "high"):
        plan.recipe_at({d.name: getattr(d, corner) for d in plan.dims})
    from omnimerge.api import as_recipe
    from omnimerge.methods import get_method

    m = get_method(recipe.merge_method)
    for corner in ("low", "high"):
        top, per = plan.fixed_parameters({d.name: getattr(d, corner) for d in plan.dims})
        m.resolve(top, per)
    as_recipe(recipe)
    return plan


def _validate_spec(section: dict[str, Any], where: str) -> SearchSpec:
    try:
        spec = SearchSpec.model_validate(section)
        ranges = spec.method_ranges()
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if not str(x).endswith("Objective"))
            if err["type"] == "extra_forbidden":
                msgs.append(f"search.{loc}: unknown key")
            elif err["type"] == "missing":
                msgs.append(f"search.{loc}: required key is missing")
            else:
                msgs.append(f"search.{loc}: {err['msg']}")
        raise SearchError(f"{where}: " + "; ".join(dict.fromkeys(msgs))) from None
    except ValueError as e:
        raise SearchError(f"{where}: search: {e}") from None
    if spec.layer_groups is not None and spec.weights is None:
        raise SearchError(f"{where}: search.layer_groups: needs a weights range (the per-expert, per-group "
                          f"coefficients are drawn from it)")
    del ranges
    return spec


def _dimensions(recipe: Recipe, spec: SearchSpec, where: str) -> list[Dimension]:
    from omnimerge.methods import get_method

    method = get_method(recipe.merge_method)
    params = {p.name: p for p in method.params}
    dims: list[Dimension] = []

    def check(name: str, lo: float, hi: float, key: str) -> None:
        p = params.get(name)
        if p is None:
            raise SearchError(f"{where}: search.{key}: method '{method.name}' has no parameter '{name}' "
                              f"(it takes: {', '.join(sorted(params)) or 'none'})")
        if p.kind not in (int, float) or p.choices is not None:
            raise SearchError(f"{where}: search.{key}: '{name}' of '{method.name}' is not numeric "
                              f"({p.describe_range()})")
        for v in (lo, hi):
            p.validate(v, f"search.{key}")

    if spec.scaling is not None:
        check("scaling", *spec.scaling, "scaling")
        dims.append(Dimension(name="scaling", low=spec.scaling[0], high=spec.scaling[1], kind="scaling"))
    if spec.weights is not None:
        check("weight", *spec.weights, "weights")
        if not params["weight"].per_model:
            raise SearchError(f"{where}: search.weights: 'weight' of '{method.name}' is not per expert")
        lo, hi = spec.weights
        for i in range(len(recipe.models)):
            if spec.layer_groups is None:
                dims.append(Dimension(name=f"w{i}", low=lo, high=hi, kind="weight", expert=i))
                continue
            for g in range(spec.layer_groups):
                dims.append(Dimension(name=f"w{i}.g{g}", low=lo, high=hi, kind="weight", expert=i, group=g))
            dims.append(Dimension(name=f"w{i}.other", low=lo, high=hi, kind="weight", expert=i))
    for name, (lo, hi) in spec.method_ranges().items():
        if name in ("scaling", "weight"):
            raise SearchError(f"{where}: search.{name}: write it as search.{'scaling' if name == 'scaling' else 'weights'}")
        check(name, lo, hi, name)
        integer = params[name].kind is int
        if integer and (not float(lo).is_integer() or not float(hi).is_integer()):
            raise SearchError(f"{where}: search.{name}: '{name}' is an integer; give integer bounds")
        dims.append(Dimension(name=name, low=lo, high=hi, kind="param", param=name, integer=integer))
    return dims
