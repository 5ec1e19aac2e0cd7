"""Sparsifying methods: TIES-Merging and DARE (with task arithmetic or TIES), composed of the shared operators.

TIES (Yadav et al., NeurIPS 2023) trims each task vector to its largest-magnitude entries, elects a sign per
entry, and averages the entries that agree with it. DARE (Yu et al., ICML 2024) drops entries at random and
rescales the survivors. Definitions follow the OptMerge code (MLLMerging ``baseline_merging.py``, itself taken
from MergeLM): trimming keeps ``|x| >= kthvalue(|x|, int((1 - density) * N))``; entries whose elected sign is 0
take the majority sign of the tensor (or, with ``granularity: global``, of all merged parameters).

Both are :class:`~omnimerge.methods.operators.SparsePlan` compositions (DARE's :class:`RandomDrop`, TIES's
:class:`MagnitudeTopK`, :class:`SignConsensus` with the majority sign, the normalised disjoint mean), so they
stream block by block with the shared machinery and run the compiled TIES kernels; see
:mod:`omnimerge.methods.operators` for DARE's counter-based masks and the streamed order statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from omnimerge.methods.base import Capabilities, GlobalPass, Param, TensorContext, merge_method, scaling_param
from omnimerge.methods.linear import WEIGHT, weighted_sum
from omnimerge.methods.operators import (
    MagnitudeTopK,
    RandomDrop,
    SignConsensus,
    SparsePlan,
    Sparsifier,
    dare_,
    sparse_method,
    trim_,
    trim_count,
)

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
            seed = params["seed"]
            task_vectors = [dare_(tv.clone(), drop, ctx, i, seed=seed) for i, tv in enumerate(task_vectors)]
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


def ties_plan(params: Mapping[str, Any], numel: int, ctx: TensorContext) -> SparsePlan:
    """TIES and DARE-TIES: [random drop], top-density magnitudes, majority-sign consensus, disjoint mean."""
    sp: list[Sparsifier] = []
    drop = float(params.get("drop_rate") or 0.0)
    if drop > 0.0:
        sp.append(RandomDrop(drop, int(params["seed"])))
    sp.append(MagnitudeTopK(float(params["density"]), numel))
    given = majority = None
    if params.get("granularity") == "global":
        given = tuple((t,) for t in ctx.stats["threshold"])
        majority = float(ctx.stats["majority"])
    return SparsePlan(tuple(sp), tuple(float(w) for w in params["weight"]), float(params["scaling"]),
                      SignConsensus("majority"), True, given, majority)


sparse_method(
    "ties",
    ties_plan,
    params=[scaling_param(0.3), DENSITY, GRANULARITY, WEIGHT],
    summary="TIES: trim to the top-density magnitudes, elect signs, mean of the agreeing entries.",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv 2306.01708)",
    url="https://arxiv.org/abs/2306.01708",
    global_pass=_GLOBAL_TIES,
    compiled="ties",
    doc="""TIES-Merging.

    1. Trim: t_i = tau_i * [|tau_i| >= kthvalue(|tau_i|, int((1 - density) N))].
    2. Elect: s = sign(sum_i w_i t_i); s = 0 entries take the majority sign sign(sum s).
    3. Disjoint mean: tau_m = sum_{i: sign(t_i) = s} w_i t_i / sum_{i: sign(t_i) = s} w_i.
    W = W0 + lambda tau_m. ``granularity: tensor`` computes the threshold and majority sign per tensor (OptMerge's
    Qwen2-VL script, ``baseline_merging.py``); ``global`` over all merged parameters of each expert (its InternVL
    script, the TIES paper), exactly, by a radix-select pre-pass.
    """,
)


@merge_method(
    "dare_ta",
    params=[scaling_param(0.3), DROP_RATE, SEED, WEIGHT],
    summary="DARE + task arithmetic: random drop with rate p, survivors x 1/(1-p), then sum.",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    url="https://arxiv.org/abs/2311.03099",
    capabilities=Capabilities(elementwise=True),  # counter-based masks: any block draws the same entries
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

    tau_i' = tau_i * m_i / (1 - p), m_i ~ Bernoulli(1 - p) elementwise (counter-based masks keyed by
    (seed, tensor name, i): see :mod:`omnimerge.methods.operators`); W = W0 + lambda sum_i w_i tau_i'. Paper
    default p = 0.2 (MLLMerging ``weight_mask_rate``). With p = 0 it equals task arithmetic exactly.
    """
    drop = RandomDrop(drop_rate, seed)
    dropped = [drop.apply_(tv, (), ctx, i, ctx.offset) for i, tv in enumerate(task_vectors)]
    return weighted_sum(dropped, weight, inplace=True).mul_(scaling)


sparse_method(
    "dare_ties",
    ties_plan,
    params=[scaling_param(0.3), DROP_RATE, DENSITY, GRANULARITY, SEED, WEIGHT],
    summary="DARE + TIES: random drop and rescale, then TIES trimming, sign election and disjoint mean.",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    url="https://arxiv.org/abs/2311.03099",
    global_pass=_GLOBAL_TIES,
    compiled="ties",
    doc="""DARE followed by TIES.

    Each tau_i is first DARE-masked (drop rate p, survivors x 1/(1-p), per-tensor seeded), then merged by TIES
    with ``density`` (see ``ties``). All experts are masked (the released Qwen2-VL script passed only the last
    expert to TIES: a bug not reproduced here). With p = 0 it equals TIES exactly.
    """,
)
