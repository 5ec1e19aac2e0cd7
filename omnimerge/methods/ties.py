"""Sparsifying methods: TIES-Merging and DARE (with task arithmetic or TIES).

TIES (Yadav et al., NeurIPS 2023) trims each task vector to its largest-magnitude entries, elects a sign per
entry, and averages the entries that agree with it. DARE (Yu et al., ICML 2024) drops entries at random and
rescales the survivors. Definitions follow the OptMerge code (MLLMerging ``baseline_merging.py``, itself taken
from MergeLM): trimming keeps ``|x| >= kthvalue(|x|, int((1 - density) * N))``; entries whose elected sign is 0
take the majority sign of the tensor (or, with ``granularity: global``, of all merged parameters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from omnimerge.methods.base import GlobalPass, Param, TensorContext, merge_method, scaling_param
from omnimerge.methods.linear import WEIGHT, weighted_sum

DENSITY = Param(
    "density", 0.2, "TIES: fraction of each task vector's entries kept by magnitude", float, low=0.0, high=1.0,
    low_open=True,
)
GRANULARITY = Param(
    "granularity",
    "tensor",
    "TIES trimming/majority sign per tensor (the paper's Qwen script) or over all merged parameters of an "
    "expert (its InternVL script and the TIES paper; needs a first pass over the tensors)",
    str,
    choices=("tensor", "global"),
)
DROP_RATE = Param(
    "drop_rate", 0.2, "DARE: probability of dropping an entry; survivors are scaled by 1/(1-p)", float,
    low=0.0, high=1.0, high_open=True,
)
SEED = Param("seed", 42, "DARE: random seed (masks are drawn per tensor from (seed, tensor name))", int)


def trim_count(numel: int, density: float) -> int:
    """k = int((1 - density) * N): the number of entries trimmed (the reference's ``num_mask_params``)."""
    return int(numel * (1.0 - density))


def magnitude_threshold(tv: torch.Tensor, density: float) -> float | None:
    """The k-th smallest |x| (k = int((1-density) N)); entries with |x| >= it are kept. None: keep all."""
    k = trim_count(tv.numel(), density)
    if k <= 0:
        return None
    return float(kth_smallest(tv.abs().flatten(), k))


def kth_smallest(a: torch.Tensor, k: int) -> torch.Tensor:
    """``a.kthvalue(k).values`` of a 1-D tensor, exactly, by selection in a bracket instead of over all of it.

    A strided sample of ~64K entries brackets the k-th value [lo, hi] (a margin of many standard deviations
    of the sample quantile). Counts of the entries at or below lo and below hi then place the k-th value
    exactly: at lo, at hi, or strictly inside, where the few percent of entries are sorted. If the bracket
    misses, the full ``kthvalue`` runs. The result is the same value either way.
    """
    n = a.numel()
    if n <= 1 << 18:
        return a.kthvalue(k).values
    step = n // (1 << 16)
    sample = a[::step].sort().values
    m = sample.numel()
    q = k / n
    margin = 8.0 * (m * q * (1.0 - q)) ** 0.5 + 0.005 * m + 16
    lo_i, hi_i = int(q * m - margin), int(q * m + margin) + 1
    lo = sample[lo_i] if lo_i >= 0 else None
    hi = sample[hi_i] if hi_i < m else None
    # counts decide exactly where the k-th value lies; ties (common in bf16-derived deltas) often settle it
    # at lo or hi outright, and the strictly-inside rest is small enough to sort
    # (direct counts, not n - count: NaN compares false everywhere and kthvalue ranks it above every number)
    above_lo = a > lo if lo is not None else None
    upto_lo = int(torch.count_nonzero(a <= lo)) if lo is not None else 0
    if k <= upto_lo:
        return lo if k > int(torch.count_nonzero(a < lo)) else a.kthvalue(k).values  # else: bracket missed
    below_hi = a < hi if hi is not None else None
    if below_hi is not None and k > int(torch.count_nonzero(below_hi)):
        return hi if k <= int(torch.count_nonzero(a <= hi)) else a.kthvalue(k).values  # else: bracket missed
    if above_lo is None:
        inside = a[below_hi] if below_hi is not None else a
    else:
        inside = a[above_lo.logical_and_(below_hi) if below_hi is not None else above_lo]
    if k - upto_lo > inside.numel():  # NaN entries (ranked last by kthvalue) or a missed bracket
        return a.kthvalue(k).values
    return inside.sort().values[k - upto_lo - 1]


def trim_(tv: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Zero the entries with |x| < threshold, in place."""
    if threshold is not None:
        tv.masked_fill_(tv.abs() < threshold, 0.0)
    return tv


def disjoint_merge(
    trimmed: Sequence[torch.Tensor], weight: Sequence[float], majority: float | None = None
) -> torch.Tensor:
    """Sign election and disjoint mean over (weighted) trimmed task vectors.

    s = sign(sum_i w_i t_i); entries with s = 0 take the majority sign sign(sum s) (or ``majority`` when given,
    for the global variant); merged = sum of the w_i t_i whose sign equals s, divided by the sum of their w_i
    (clamped at 1 where nothing agrees: those entries are 0).
    """
    weighted = [t if w == 1.0 else t * w for t, w in zip(trimmed, weight, strict=True)]
    total = weighted_sum(weighted, [1.0] * len(weighted))
    sign = torch.sign(total)
    del total
    maj = float(torch.sign(sign.sum())) if majority is None else majority
    if maj != 0.0:
        sign.masked_fill_(sign == 0, maj)
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for t, w in zip(weighted, weight, strict=True):
        agree = (t * sign) > 0
        num.add_(torch.where(agree, t, 0.0))
        den.add_(agree.to(den.dtype), alpha=w)
    return num.div_(den.masked_fill_(den == 0, 1.0))


def dare_(tv: torch.Tensor, drop_rate: float, gen: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p and scale the survivors by exactly 1/(1-p), in place."""
    if drop_rate <= 0.0:
        return tv
    keep = torch.rand(tv.shape, generator=gen, device=tv.device, dtype=torch.float32) >= drop_rate
    tv.mul_(keep.to(tv.dtype))
    return tv.mul_(1.0 / (1.0 - drop_rate))


class GlobalTiesPass(GlobalPass):
    """Exact global TIES statistics with bounded memory: per-expert k-th smallest |tau| and the majority sign.

    The k-th smallest magnitude over all merged parameters is found by radix selection on the float32 bit
    pattern (non-negative floats sort like their bits): sweep 0 counts the high 16 bits, sweep 1 the low 16
    bits inside the bin that holds the k-th value. Sweep 2 sums the elected signs for the majority sign. Three
    sweeps over the inputs, two 64K-bin histograms per expert, the exact ``kthvalue`` of the flattened vector.
    """

    passes = 3

    def needed(self, params: Mapping[str, Any]) -> bool:
        return params.get("granularity") == "global"

    def init(self, num_models: int, params: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "T": num_models,
            "params": dict(params),
            "n": 0,
            "hi": torch.zeros(num_models, 1 << 16, dtype=torch.int64),
            "lo": torch.zeros(num_models, 1 << 16, dtype=torch.int64),
            "bin": [None] * num_models,
            "rank": [0] * num_models,
            "threshold": [None] * num_models,
            "signsum": 0,
        }

    @staticmethod
    def _bits(tv: torch.Tensor) -> torch.Tensor:
        return tv.detach().abs().to(torch.float32).flatten().view(torch.int32).to(torch.int64)

    def update(self, p: int, state: Any, task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> None:
        params = state["params"]
        drop = params.get("drop_rate", 0.0) or 0.0
        if drop > 0.0:
            ctx.seed = params["seed"]
            gen = ctx.generator(task_vectors[0].device)
            task_vectors = [dare_(tv.clone(), drop, gen) for tv in task_vectors]
        if p == 0:
            state["n"] += task_vectors[0].numel()
            for i, tv in enumerate(task_vectors):
                state["hi"][i] += torch.bincount(self._bits(tv) >> 16, minlength=1 << 16).cpu()
        elif p == 1:
            for i, tv in enumerate(task_vectors):
                if state["bin"][i] is None:
                    continue
                bits = self._bits(tv)
                sel = bits[(bits >> 16) == state["bin"][i]] & 0xFFFF
                state["lo"][i] += torch.bincount(sel, minlength=1 << 16).cpu()
        else:
            trimmed = [
                trim_(tv.clone(), state["threshold"][i]) for i, tv in enumerate(task_vectors)
            ]
            weight = params["weight"]
            total = weighted_sum([t * w for t, w in zip(trimmed, weight, strict=True)], [1.0] * len(trimmed))
            state["signsum"] += int(torch.sign(total).sum())

    def finish(self, p: int, state: Any) -> None:
        density = state["params"]["density"]
        if p == 0:
            k = trim_count(state["n"], density)
            for i in range(state["T"]):
                if k <= 0:
                    continue
                cum = torch.cumsum(state["hi"][i], 0)
                b = int(torch.searchsorted(cum, torch.tensor(k)))
                below = int(cum[b - 1]) if b > 0 else 0
                state["bin"][i] = b
                state["rank"][i] = k - below
        elif p == 1:
            for i in range(state["T"]):
                if state["bin"][i] is None:
                    continue
                cum = torch.cumsum(state["lo"][i], 0)
                lo = int(torch.searchsorted(cum, torch.tensor(state["rank"][i])))
                bits = torch.tensor([(state["bin"][i] << 16) | lo], dtype=torch.int32)
                state["threshold"][i] = float(bits.view(torch.float32))

    def result(self, state: Any) -> dict[str, Any]:
        s = state["signsum"]
        return {"threshold": state["threshold"], "majority": float((s > 0) - (s < 0))}


_GLOBAL_TIES = GlobalTiesPass()


def _ties(
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    density: float,
    granularity: str,
    weight: Sequence[float],
) -> torch.Tensor:
    if granularity == "global":
        stats = ctx.stats
        thresholds = stats["threshold"]
        majority = stats["majority"]
    else:
        thresholds = [magnitude_threshold(tv, density) for tv in task_vectors]
        majority = None
    trimmed = [trim_(tv, th) for tv, th in zip(task_vectors, thresholds, strict=True)]
    return disjoint_merge(trimmed, weight, majority)


@merge_method(
    "ties",
    params=[scaling_param(0.3), DENSITY, GRANULARITY, WEIGHT],
    summary="TIES: trim to the top-density magnitudes, elect signs, mean of the agreeing entries.",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv 2306.01708)",
    url="https://arxiv.org/abs/2306.01708",
    global_pass=_GLOBAL_TIES,
)
def ties(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    density: float,
    granularity: str,
    weight: Sequence[float],
) -> torch.Tensor:
    """TIES-Merging.

    1. Trim: t_i = tau_i * [|tau_i| >= kthvalue(|tau_i|, int((1 - density) N))].
    2. Elect: s = sign(sum_i w_i t_i); s = 0 entries take the majority sign sign(sum s).
    3. Disjoint mean: tau_m = sum_{i: sign(t_i) = s} w_i t_i / sum_{i: sign(t_i) = s} w_i.
    W = W0 + lambda tau_m. ``granularity: tensor`` computes the threshold and majority sign per tensor (OptMerge's
    Qwen2-VL script, ``baseline_merging.py``); ``global`` over all merged parameters of each expert (its InternVL
    script, the TIES paper), exactly, by a radix-select pre-pass.
    """
    merged = _ties(task_vectors, ctx, density, granularity, weight)
    return merged.mul_(scaling)


@merge_method(
    "dare_ta",
    params=[scaling_param(0.3), DROP_RATE, SEED, WEIGHT],
    summary="DARE + task arithmetic: random drop with rate p, survivors x 1/(1-p), then sum.",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    url="https://arxiv.org/abs/2311.03099",
)
def dare_ta(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    drop_rate: float,
    seed: int,
    weight: Sequence[float],
) -> torch.Tensor:
    """DARE followed by task arithmetic.

    tau_i' = tau_i * m_i / (1 - p), m_i ~ Bernoulli(1 - p) elementwise (masks drawn from a generator seeded by
    (seed, tensor name), experts in order); W = W0 + lambda sum_i w_i tau_i'. Paper default p = 0.2
    (MLLMerging ``weight_mask_rate``). With p = 0 it equals task arithmetic exactly.
    """
    ctx.seed = seed
    gen = ctx.generator(task_vectors[0].device)
    dropped = [dare_(tv, drop_rate, gen) for tv in task_vectors]
    return weighted_sum(dropped, weight).mul_(scaling)


@merge_method(
    "dare_ties",
    params=[scaling_param(0.3), DROP_RATE, DENSITY, GRANULARITY, SEED, WEIGHT],
    summary="DARE + TIES: random drop and rescale, then TIES trimming, sign election and disjoint mean.",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    url="https://arxiv.org/abs/2311.03099",
    global_pass=_GLOBAL_TIES,
)
def dare_ties(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    drop_rate: float,
    density: float,
    granularity: str,
    seed: int,
    weight: Sequence[float],
) -> torch.Tensor:
    """DARE followed by TIES.

    Each tau_i is first DARE-masked (drop rate p, survivors x 1/(1-p), per-tensor seeded), then merged by TIES
    with ``density`` (see ``ties``). All experts are masked (the released Qwen2-VL script passed only the last
    expert to TIES: a bug not reproduced here). With p = 0 it equals TIES exactly.
    """
    ctx.seed = seed
    gen = ctx.generator(task_vectors[0].device)
    dropped = [dare_(tv, drop_rate, gen) for tv in task_vectors]
    merged = _ties(dropped, ctx, density, granularity, weight)
    return merged.mul_(scaling)
