"""Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795), with and without TIES's sign consensus.

Each task vector loses its largest-magnitude outliers and its smallest entries (the "breadcrumbs" in between
are kept), then the experts are summed (``breadcrumbs``) or summed over the entries that agree with the elected
sign (``breadcrumbs_ties``). Conventions follow mergekit 0.1.5 (``generalized_task_arithmetic.py`` with
``sparsify.magnitude_outliers``): the ranking is over the whole tensor (the authors' ``TaskVectorMiddleKeep``
ranks row by row), the mask comes before the per-model weight, and the sign is elected from the sum of the
weighted deltas with 0 counted as +. Both are compositions of the shared operators (:class:`MagnitudeOutliers`,
:class:`SignConsensus`), so they stream block by block: the two cuts of each expert are order statistics
found by the streamed machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omnimerge.methods.base import Param, TensorContext, scaling_param
from omnimerge.methods.linear import WEIGHT
from omnimerge.methods.operators import MagnitudeOutliers, SignConsensus, SparsePlan, sparse_method

PAPER = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024 " \
        "(arXiv 2312.06795)"
URL = "https://arxiv.org/abs/2312.06795"

DENSITY = Param("density", 0.9, "fraction of each task vector's entries kept (after the gamma outliers); 1 keeps "
                "everything, outliers included: mergekit's default, which makes the method task arithmetic",
                float, low=0.0, high=1.0, low_open=True)
GAMMA = Param("gamma", 0.01, "fraction of each task vector's largest-magnitude entries dropped as outliers", float,
              low=0.0, high=1.0)
NORMALIZE = Param("normalize", False, "divide by the sum of the (agreeing) per-model weights", bool)
RESCALE = Param("rescale", False, "rescale each sparsified task vector to its original L1 norm (merges the "
                "tensor whole: the norms are over the whole tensor)", bool)
PARAMS = [scaling_param(1.0), DENSITY, GAMMA, NORMALIZE, RESCALE, WEIGHT]


def _plan(consensus: SignConsensus | None) -> Any:
    def plan(params: Mapping[str, Any], numel: int, ctx: TensorContext) -> SparsePlan:
        mask = MagnitudeOutliers(float(params["density"]), float(params["gamma"]), numel)
        return SparsePlan((mask,), tuple(float(w) for w in params["weight"]), float(params["scaling"]),
                          consensus, bool(params["normalize"]), rescale=bool(params["rescale"]))

    return plan


def _streams(params: Mapping[str, Any]) -> bool:
    return not params["rescale"]


sparse_method(
    "breadcrumbs",
    _plan(None),
    params=PARAMS,
    summary="Model Breadcrumbs: drop each task vector's gamma largest and its smallest entries, then sum.",
    paper=PAPER,
    url=URL,
    streams=_streams,
    doc="""Model Breadcrumbs.

    Per expert, with N = numel(tau_t): rank |tau_t|, drop the n_top = int(gamma N) largest and keep the next
    int(density N) (if they do not fit, n_top shrinks so that the int(density N) smallest are kept); m_t is
    that mask, d_t = w_t (m_t * tau_t). W = W0 + lambda sum_t d_t, divided by sum_t w_t if ``normalize``.
    ``density`` 1 leaves the task vectors whole, so mergekit's default (1) silently makes Breadcrumbs task
    arithmetic; the default here, 0.9 with gamma 0.01, keeps the middle 90 % of each task vector's magnitudes
    (the paper masks both tails). ``rescale``: m_t * tau_t is scaled back to the L1 norm of tau_t.
    """,
)

sparse_method(
    "breadcrumbs_ties",
    _plan(SignConsensus("positive")),
    params=PARAMS,
    summary="Model Breadcrumbs masks with TIES's sign election: sum of the deltas that agree with the sign.",
    paper=PAPER,
    url=URL,
    streams=_streams,
    doc="""Model Breadcrumbs with sign consensus (mergekit ``breadcrumbs_ties``).

    d_t as in ``breadcrumbs``. Elect s = sign(sum_t d_t) per entry (0 counts as +); an expert agrees where
    sign(d_t) = s (zero entries never agree). W = W0 + lambda sum_t d_t [agree], divided by
    sum_t w_t [agree] (0 -> 1) if ``normalize``.
    """,
)
