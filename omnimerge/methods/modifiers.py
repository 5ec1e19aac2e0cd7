"""Modifiers: transforms that compose with any dense merge method, declared in the recipe.

    merge_method: ties
    parameters: {scaling: 1.0, density: 0.3}
    modifiers:
      - dare: {drop_rate: 0.5, seed: 1}     # before the method: each task vector sparsified
      - lines: {alpha: 0.4, beta: 0.6}      # after it: the merged task vector scaled by depth

A modifier acts at one of two stages. ``task_vectors`` modifiers rewrite each expert's task vector before the
method sees it (DARE's random drop, Breadcrumbs' outlier mask, TIES's magnitude trim): the papers apply them
to task arithmetic, TIES and others alike. ``merged`` modifiers rewrite the merged task vector (LiNeS's
depth scaling, which its paper applies on top of task arithmetic, TIES and Consensus). Several modifiers run
in the order listed; for one tensor,

    W = W0 + post_k(... post_1(method(pre_j(... pre_1(tau_1..tau_T)))))

:func:`compose` turns a method and its modifiers into one :class:`MergeMethod`, so the engine needs no special
case: the composed method is elementwise (streams block by block) when the method and every modifier are, it
keeps the method's global pass (fed the modified task vectors), and it gives up the method's fast forms
(linear, from the weights, streamed TIES kernels), which do not know the modifiers. A recipe whose modifiers
cannot apply (a modifier on a method without a dense merged model) is refused before any work.

Adding a modifier takes one decorated function here (:func:`modifier`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from omnimerge.errors import MethodParameterError
from omnimerge.methods.base import Capabilities, GlobalPass, MergeMethod, Param, TensorContext
from omnimerge.methods.operators import MagnitudeOutliers, MagnitudeTopK, RandomDrop, kth_smallest

Stage = Literal["task_vectors", "merged"]


@dataclass(frozen=True)
class Modifier:
    """A registered modifier: ``fn(tensors, ctx, **params)``; ``tensors`` is the list of task vectors (stage
    ``task_vectors``, returns the list) or the merged delta (stage ``merged``, returns it); in place allowed."""

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    stage: Stage
    elementwise: bool
    summary: str
    paper: str

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()

    def resolve(self, params: Mapping[str, Any], where: str) -> dict[str, Any]:
        known = {p.name: p for p in self.params}
        for key in params:
            if key not in known:
                raise MethodParameterError(f"{where}: modifier '{self.name}' has no parameter '{key}' (it takes: "
                                           f"{', '.join(sorted(known)) or 'none'})")
        return {p.name: p.validate(params[p.name], where) if p.name in params else p.default for p in self.params}


_MODIFIERS: dict[str, Modifier] = {}


def modifier(name: str, *, params: Sequence[Param] = (), stage: Stage, elementwise: bool, summary: str,
             paper: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as modifier ``name`` (decorator)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _MODIFIERS:
            raise ValueError(f"modifier {name!r} registered twice")
        _MODIFIERS[name] = Modifier(name, fn, tuple(params), stage, elementwise, summary, paper)
        return fn

    return deco


def modifiers() -> dict[str, Modifier]:
    return _MODIFIERS


# --- the modifiers ------------------------------------------------------------------------------------------------

DENSITY_TIES = Param("density", 0.2, "fraction of each task vector's entries kept by magnitude", float, low=0.0,
                     high=1.0, low_open=True)


def _ranked_(tvs: list[torch.Tensor], make: Callable[[int], Any], ctx: TensorContext) -> list[torch.Tensor]:
    """Apply a ranked sparsifier (order statistics of |tau| over the whole tensor) to each task vector."""
    for i, tv in enumerate(tvs):
        s = make(tv.numel())
        a = tv.abs().flatten()
        vals = tuple(float(kth_smallest(a, k)) for k in s.ranks)
        del a
        s.apply_(tv, vals, ctx, i)
    return tvs


@modifier(
    "dare",
    params=[Param("drop_rate", 0.2, "probability of dropping an entry; survivors are scaled by 1/(1-p)", float,
                  low=0.0, high=1.0, high_open=True),
            Param("seed", 42, "random seed (masks are drawn per tensor from (seed, tensor name, expert))", int)],
    stage="task_vectors",
    elementwise=True,
    summary="DARE: drop each task-vector entry with probability p, rescale the survivors by 1/(1-p).",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
)
def dare(tvs: list[torch.Tensor], ctx: TensorContext, *, drop_rate: float, seed: int) -> list[torch.Tensor]:
    """tau_t <- tau_t m_t / (1 - p), m_t ~ Bernoulli(1 - p) per entry, the counter-based masks of ``dare_ta`` /
    ``dare_ties`` (the same seed draws the same masks: ``task_arithmetic`` + ``dare`` is ``dare_ta``)."""
    drop = RandomDrop(drop_rate, seed)
    return [drop.apply_(tv, (), ctx, i, ctx.offset) for i, tv in enumerate(tvs)]


@modifier(
    "magnitude",
    params=[DENSITY_TIES],
    stage="task_vectors",
    elementwise=False,
    summary="TIES's trim: keep each task vector's density largest-magnitude entries.",
    paper="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)",
)
def magnitude(tvs: list[torch.Tensor], ctx: TensorContext, *, density: float) -> list[torch.Tensor]:
    """Per expert, keep |tau_t| >= the int((1 - density) N)-th smallest |tau_t| (ties at it kept), as TIES."""
    return _ranked_(tvs, lambda n: MagnitudeTopK(density, n), ctx)


@modifier(
    "breadcrumbs",
    params=[Param("density", 0.9, "fraction of the entries kept (after the gamma outliers)", float, low=0.0,
                  high=1.0, low_open=True),
            Param("gamma", 0.01, "fraction of the largest-magnitude entries dropped as outliers", float, low=0.0,
                  high=1.0)],
    stage="task_vectors",
    elementwise=False,
    summary="Model Breadcrumbs' mask: drop each task vector's gamma largest and its smallest entries.",
    paper="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv 2312.06795)",
)
def breadcrumbs(tvs: list[torch.Tensor], ctx: TensorContext, *, density: float, gamma: float) -> list[torch.Tensor]:
    """Per expert: rank |tau_t| over the tensor, drop the int(gamma N) largest, keep the next int(density N) (the
    mask of the ``breadcrumbs`` method; ``task_arithmetic`` + ``breadcrumbs`` is that method with weights 1)."""
    return _ranked_(tvs, lambda n: MagnitudeOutliers(density, gamma, n), ctx)


@modifier(
    "lines",
    params=[Param("alpha", 0.3, "the shallowest layer's coefficient (and the one outside the layers)", float),
            Param("beta", 0.6, "added over depth (the deepest layer gets alpha + beta)", float)],
    stage="merged",
    elementwise=True,
    summary="LiNeS: the merged task vector scaled by a coefficient rising linearly with depth.",
    paper="Wang et al., LiNeS, ICLR 2025 (arXiv 2410.17146)",
)
def lines(delta: torch.Tensor, ctx: TensorContext, *, alpha: float, beta: float) -> torch.Tensor:
    """delta <- (alpha + beta l / (L - 1)) delta for a tensor of layer l of L (alpha outside the layers), the
    coefficient of the ``lines`` method (``task_arithmetic`` with scaling 1 + ``lines`` is that method)."""
    if ctx.layer is not None and ctx.num_layers > 1:
        return delta.mul_(alpha + beta * ctx.layer / (ctx.num_layers - 1))
    return delta.mul_(alpha)


# --- composition ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """One modifier of a recipe with its resolved parameters."""

    modifier: Modifier
    params: Mapping[str, Any]


def parse(entries: Sequence[Any]) -> list[Applied]:
    """The recipe's ``modifiers:`` list (each entry ``{name: {params}}`` or a bare name), validated."""
    out: list[Applied] = []
    for i, entry in enumerate(entries):
        where = f"modifiers[{i}]"
        if isinstance(entry, str):
            name, params = entry, {}
        elif isinstance(entry, Mapping) and len(entry) == 1:
            name, params = next(iter(entry.items()))
            params = {} if params is None else params
        else:
            raise MethodParameterError(f"{where}: expected one modifier as {{name: {{parameters}}}}, got {entry!r}")
        if name not in _MODIFIERS:
            raise MethodParameterError(f"{where}: unknown modifier '{name}' (known: {', '.join(sorted(_MODIFIERS))})")
        if not isinstance(params, Mapping):
            raise MethodParameterError(f"{where}.{name}: expected a mapping of parameters, got {params!r}")
        out.append(Applied(_MODIFIERS[name], _MODIFIERS[name].resolve(params, f"{where}.{name}")))
    return out


class _ModifiedPass(GlobalPass):
    """The method's global pass, fed the task vectors as the ``task_vectors`` modifiers leave them."""

    def __init__(self, inner: GlobalPass, pre: Callable[[list[torch.Tensor], TensorContext], list[torch.Tensor]]):
        self.inner, self.pre = inner, pre
        self.passes = inner.passes
        self.reads_tensors = inner.reads_tensors

    def init(self, num_models: int, params: Mapping[str, Any]) -> Any:
        return self.inner.init(num_models, params)

    def update(self, p: int, state: Any, task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> None:
        if not self.reads_tensors:  # a pass over statistics only: no task vectors to modify
            self.inner.update(p, state, task_vectors, ctx)
            return
        self.inner.update(p, state, self.pre([t.clone() for t in task_vectors], ctx), ctx)

    def finish(self, p: int, state: Any) -> None:
        return self.inner.finish(p, state)

    def result(self, state: Any) -> Any:
        return self.inner.result(state)

    def needed(self, params: Mapping[str, Any]) -> bool:
        return self.inner.needed(params)


def compose(method: MergeMethod, entries: Sequence[Any]) -> MergeMethod:
    """``method`` with the recipe's modifiers applied (see the module docstring); ``method`` if there are none."""
    applied = parse(entries)
    if not applied:
        return method
    if method.output_kind != "dense":
        raise MethodParameterError(f"modifiers: method '{method.name}' has no merged task vector to modify "
                                   f"(output kind {method.output_kind})")
    pre = [a for a in applied if a.modifier.stage == "task_vectors"]
    post = [a for a in applied if a.modifier.stage == "merged"]
    inner = method.fn

    def run_pre(tvs: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        for a in pre:
            tvs = a.modifier.fn(tvs, ctx, **a.params)
        return tvs

    def fn(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, **kw: Any) -> torch.Tensor:
        delta = inner(base, run_pre(list(task_vectors), ctx), ctx, **kw)
        for a in post:
            delta = a.modifier.fn(delta, ctx, **a.params)
        return delta

    fn.__doc__ = method.doc + "\n\nModifiers: " + "; ".join(
        f"{a.modifier.name} ({a.modifier.stage}) {dict(a.params)}" for a in applied)
    elementwise = method.capabilities.elementwise and all(a.modifier.elementwise for a in applied)
    gp = method.global_pass
    return dataclasses.replace(
        method,
        name=method.name + "".join(f"+{a.modifier.name}" for a in applied),
        fn=fn,
        capabilities=Capabilities(elementwise=elementwise),
        global_pass=_ModifiedPass(gp, run_pre) if gp is not None and pre else gp,
    )


__all__ = ["Applied", "Modifier", "compose", "modifier", "modifiers", "parse"]
