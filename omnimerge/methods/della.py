"""DELLA-Merging (Deep et al., arXiv 2406.11617): magnitude-ranked random pruning, then TIES or task arithmetic.

Each task vector keeps every entry at random with a probability that rises with the entry's magnitude rank within
its row (MagPrune), is rescaled back to its L1 norm, and the experts are merged by TIES's sign election
(``della``) or summed (``della_linear``). Conventions follow mergekit 0.1.5 (``sparsify.della_magprune`` inside
``generalized_task_arithmetic.py``): ranks per row (the last dimension), keep probabilities in
[density - epsilon, density + epsilon], one L1 rescaling factor per tensor (not the paper's 1/p per entry), the
mask before the per-model weight. See ``../shared/golden/README.md`` ("Random methods").

Both are :class:`~omnimerge.methods.operators.SparsePlan` compositions: :class:`MagnitudeRankedDrop` (counter-based
masks keyed by (seed, tensor name, expert), like DARE's, so a merge is reproducible and independent of workers and
merge order), the plan's L1 ``rescale``, then :class:`SignConsensus` with the tensor's majority sign and the
disjoint mean (``della``: exactly ``ties``'s aggregation) or the weighted sum (``della_linear``: exactly
``task_arithmetic``'s). With ``density`` 1 nothing is dropped and they are ``ties`` (density 1) and
``task_arithmetic`` bit for bit. The ranking is per row and the rescaling per tensor, so neither streams: every
tensor is merged whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from omnimerge.errors import MethodParameterError
from omnimerge.methods.base import Param, TensorContext, scaling_param
from omnimerge.methods.linear import WEIGHT
from omnimerge.methods.operators import (
    MagnitudeRankedDrop,
    SignConsensus,
    SparsePlan,
    Sparsifier,
    sparse_method,
)

PAPER = "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling " \
        "(arXiv 2406.11617)"
URL = "https://arxiv.org/abs/2406.11617"

DENSITY = Param(
    "density", 0.7, "DELLA: mean keep probability rho of each task vector's entries (1 keeps everything: then "
    "mergekit's default, the method is TIES / task arithmetic)", float, low=0.0, high=1.0, low_open=True,
)
EPSILON = Param(
    "epsilon", 0.15, "DELLA: spread of the keep probabilities: the smallest |tau| of a row is kept with rho - "
    "epsilon, the largest with rho + epsilon (needs 0 < rho - epsilon and rho + epsilon < 1)", float, low=0.0,
)
RESCALE = Param("rescale", True, "scale each pruned task vector back to its L1 norm (one factor per tensor)", bool)
SEED = Param("seed", 42, "DELLA: random seed (masks are drawn per tensor from (seed, tensor name, expert))", int)


def _normalize(default: bool) -> Param:
    return Param("normalize", default, "divide by the sum of the (agreeing) per-model weights", bool)


def _plan(consensus: SignConsensus | None) -> Callable[[Mapping[str, Any], int, TensorContext], SparsePlan]:
    def plan(params: Mapping[str, Any], numel: int, ctx: TensorContext) -> SparsePlan:
        density = float(params["density"])
        prune = density < 1.0
        sp: tuple[Sparsifier, ...] = (
            (MagnitudeRankedDrop(density, float(params["epsilon"]), int(params["seed"])),) if prune else ())
        return SparsePlan(sp, tuple(float(w) for w in params["weight"]), float(params["scaling"]), consensus,
                          bool(params["normalize"]), rescale=prune and bool(params["rescale"]),
                          fused_sum=consensus is None)

    return plan


def _check(name: str) -> Callable[[Mapping[str, Any]], None]:
    def check(params: Mapping[str, Any]) -> None:
        rho, eps = float(params["density"]), float(params["epsilon"])
        if rho < 1.0 and not (rho - eps > 0.0 and rho + eps < 1.0):
            raise MethodParameterError(
                f"parameters: {name} keeps entries with probabilities density - epsilon to density + epsilon, "
                f"which must lie strictly between 0 and 1; density {rho:g} with epsilon {eps:g} gives "
                f"[{rho - eps:g}, {rho + eps:g}]")
        if name == "della_linear" and params["normalize"] and float(sum(params["weight"])) == 0.0:
            raise MethodParameterError(
                f"models[].parameters: della_linear with normalize: true divides by the sum of the per-model "
                f"weights, and {list(params['weight'])} sums to zero")

    return check


sparse_method(
    "della",
    _plan(SignConsensus("majority")),
    params=[scaling_param(1.0), DENSITY, EPSILON, RESCALE, _normalize(True), SEED, WEIGHT],
    summary="DELLA: keep entries at random, likelier the larger they are in their row; rescale; TIES sign election.",
    paper=PAPER,
    url=URL,
    stream=False,
    check=_check("della"),
    doc="""DELLA-Merging with TIES's sign election (mergekit ``della``).

    1. MagPrune, per expert and per row of tau_t (the last dimension; a 1-D tensor is one row) of n entries:
       rank the entries by |tau_t| (0 = smallest; ties by position), r = rank / (n - 1), keep each entry with
       probability p = rho - eps + 2 eps r (rho = density, eps = epsilon): m_t ~ Bernoulli(p), drawn from a
       counter-based hash of (seed, tensor name, t, flat position).
    2. rescale: t_t = (m_t * tau_t) ||tau_t||_1 / ||m_t * tau_t||_1 (one factor per tensor; left as it is where
       either norm is below 1e-8); else t_t = m_t * tau_t.
    3. d_t = w_t t_t; s = sign(sum_t d_t), s = 0 -> the tensor's majority sign sign(sum s) (as ``ties``; mergekit
       counts 0 as +, which differs only where the weighted sum is exactly 0);
       tau_m = sum_{t: sign(d_t) = s} d_t, divided by sum_{same t} w_t if ``normalize``.
    W = W0 + lambda tau_m. Refused unless 0 < rho - eps and rho + eps < 1; density 1 keeps every entry (then it
    is ``ties`` with density 1, bit for bit). Default density 0.7 (mergekit's 1 would prune nothing).
    """,
)

sparse_method(
    "della_linear",
    _plan(None),
    params=[scaling_param(1.0), DENSITY, EPSILON, RESCALE, _normalize(False), SEED, WEIGHT],
    summary="DELLA with task arithmetic: magnitude-ranked random pruning, L1 rescaling, weighted sum.",
    paper=PAPER,
    url=URL,
    stream=False,
    check=_check("della_linear"),
    doc="""DELLA-Merging with task arithmetic (mergekit ``della_linear``).

    t_t as in ``della`` (MagPrune per row, then the L1 rescaling of ``rescale``);
    W = W0 + lambda sum_t w_t t_t, divided by sum_t w_t if ``normalize``. Refused unless 0 < rho - eps and
    rho + eps < 1; density 1 keeps every entry (then, without ``normalize``, it is ``task_arithmetic``, bit
    for bit).
    """,
)
