"""Balancing methods: SCE (select by variance, weight by energy, erase sign conflicts) and PCB (parameter
competition balancing).

Both weigh each expert's entries by statistics over the whole tensor (SCE's variance selection and energies,
PCB's clamps, min-max normalisation and top-ratio threshold), so neither is elementwise: every tensor is merged
whole. Order statistics come from :func:`~omnimerge.methods.operators.kth_smallest`. Definitions follow the
references named per method (see ``../shared/golden/README.md``, sections ``sce`` and ``pcb``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omnimerge.methods.base import Param, TensorContext, merge_method, scaling_param
from omnimerge.methods.linear import WEIGHT
from omnimerge.methods.operators import kth_smallest

# --- SCE --------------------------------------------------------------------------------------------------------

SELECT_TOPK = Param(
    "select_topk", 1.0, "SCE: fraction of the entries with non-zero variance over the experts kept, by largest "
    "variance (one mask for all experts; 1: no selection)", float, low=0.0, high=1.0,
)


def variance_mask(task_vectors: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor | None:
    """SCE's selection: [sigma^2 >= the k-th largest sigma^2] with sigma^2 the population variance over the
    experts per entry and k = int(select_topk * #{sigma^2 != 0}) (entries tied at the threshold are all kept);
    None for no selection (select_topk >= 1). k = 0 selects nothing."""
    if select_topk >= 1.0:
        return None
    T = len(task_vectors)
    mean = task_vectors[0].clone()
    for tv in task_vectors[1:]:
        mean.add_(tv)
    mean.div_(T)
    var = torch.zeros_like(mean)
    for tv in task_vectors:
        var.add_((tv - mean).square_())
    var.div_(T)
    del mean
    k = int(select_topk * int(torch.count_nonzero(var)))
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    flat = var.reshape(-1)
    return var >= kth_smallest(flat, flat.numel() - k + 1)


@merge_method(
    "sce",
    params=[SELECT_TOPK],
    summary="SCE: keep the entries of largest variance across experts, weight experts by their energy, erase "
            "sign conflicts.",
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models (SCE merging), arXiv 2408.07990",
    url="https://arxiv.org/abs/2408.07990",
)
def sce(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
        select_topk: float) -> torch.Tensor:
    """SCE: Select, Calculate, Erase (mergekit 0.1.5 ``sce``).

    Select: sigma^2 = population variance over the experts of each entry of tau; keep the
    k = int(select_topk #{sigma^2 != 0}) entries of largest sigma^2 (one mask m for all experts; ties at the
    threshold all kept), tau~_t = m * tau_t.
    Calculate: w_t = mean(tau~_t^2) / sum_s mean(tau~_s^2) (from the selected vectors).
    Erase: s = sign(sum_t tau~_t) (unweighted; 0 -> +), a_t = [sign(tau~_t) = s].
    W = W0 + sum_t w_t a_t tau~_t / max(sum_t w_t a_t, 1e-6). No scaling (mergekit has none).

    The weights here always come from the energies. mergekit 0.1.5 switches to equal weights when
    sum_s mean(tau~_s^2) < 1e-6, an absolute threshold that LLM deltas (~1e-4 per entry, mean squares ~1e-8)
    always fall under, so mergekit's SCE on real models is an unweighted sign-erased mean and its Calculate step
    never acts. That switch is not kept (the result here is invariant to scaling all task vectors, as the
    method's definition is); equal weights are used only where every selected vector is zero (then the merge is
    the base).
    """
    mask = variance_mask(task_vectors, select_topk)
    tvs = list(task_vectors)
    if mask is not None:
        m = mask.to(tvs[0].dtype)
        tvs = [tv.mul_(m) for tv in tvs]
        del m, mask
    T = len(tvs)
    n = max(1, tvs[0].numel())
    energy = [float(torch.sum(tv * tv, dtype=torch.float64)) / n for tv in tvs]
    total = sum(energy)
    weight = [e / total for e in energy] if total > 0.0 else [1.0 / T] * T
    sign = tvs[0].clone()
    for tv in tvs[1:]:
        sign.add_(tv)
    sign = torch.where(sign >= 0, 1.0, -1.0).to(tvs[0].dtype)
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for tv, w in zip(tvs, weight, strict=True):
        agree = torch.sign(tv) == sign
        num.add_(torch.where(agree, tv, 0.0), alpha=w)
        den.add_(agree.to(den.dtype), alpha=w)
    return num.div_(den.clamp_(min=1e-6))


# --- PCB --------------------------------------------------------------------------------------------------------

PCB_RATIO = Param(
    "pcb_ratio", 0.1, "PCB: fraction r of each expert's entries kept by balanced score (the authors' function "
    "default; their scripts use 0.05)", float, low=0.0, high=1.0, low_open=True,
)
PCB_CLAMP = 1e-4  # the clamp ratios of the reference (both tails of each expert's |tau|)


def _order_stat(a: torch.Tensor, i: int) -> torch.Tensor:
    """a_(i), the i-th smallest (0-based, clipped to the range) of a 1-D tensor."""
    return kth_smallest(a, min(max(i, 0), a.numel() - 1) + 1)


def _minmax(a: torch.Tensor) -> torch.Tensor:
    """(a - min a) / (max a - min a), in place; all 0 where a is constant."""
    lo, hi = a.min(), a.max()
    if not bool(hi > lo):
        return a.zero_()
    return a.sub_(lo).div_(hi - lo)


@merge_method(
    "pcb",
    params=[scaling_param(1.2), PCB_RATIO, WEIGHT],
    summary="PCB: balance each entry by its magnitude within the expert and its agreement across experts, keep "
            "the top ratio, weighted average.",
    paper="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024 (arXiv 2410.02396)",
    url="https://arxiv.org/abs/2410.02396",
)
def pcb(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *, scaling: float,
        pcb_ratio: float, weight: Sequence[float]) -> torch.Tensor:
    """Parameter Competition Balancing (the authors' ``pcb-merging.py:PCB_merge``, per tensor).

    With tau_t flattened to d entries and T experts:
    1. Clamp: A_t = |tau_t| clipped to [A_(int(1e-4 d)), A_(int((1 - 1e-4) d - 1))] (0-based order statistics of
       that expert's |tau_t|); tau^_t = sign(tau_t) A_t.
    2. Intra-balancing: b_t = exp(T A-_t^2), A-_t the min-max normalisation of A_t (0 where A_t is constant).
    3. Inter-balancing: c_t = tanh(tau_t * sum_s tau_s), on the unclamped vectors.
    4. Drop and rescale: score_t = b_t c_t; kappa_t = score_(int(d (1 - r))) (r = pcb_ratio);
       S_t = (max(score_t, kappa_t) - kappa_t) / (max score_t - kappa_t): 0 at or below kappa_t, 1 at the top
       (all 0 where the top score is kappa_t).
    5. W = W0 + lambda sum_t w_t S_t tau^_t / max(sum_t S_t, 1e-12).
    ``weight`` w_t (default 1) gives the per-expert coefficients lambda_t = lambda w_t the authors find by
    evolutionary search. The authors flatten the whole model into one vector per expert (global clamps and
    thresholds); here each tensor is its own vector, as every method merges tensors independently. Defaults:
    r 0.1 (the function's), lambda 1.2 (the authors' scripts).
    """
    shape = task_vectors[0].shape
    flat = [tv.reshape(-1) for tv in task_vectors]
    T, d = len(flat), flat[0].numel()
    total = flat[0].clone()
    for x in flat[1:]:
        total.add_(x)
    lo_i, hi_i = int(d * PCB_CLAMP), int(d * (1.0 - PCB_CLAMP) - 1)
    kappa_i = int(d * (1.0 - pcb_ratio))
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for x, w in zip(flat, weight, strict=True):
        a = x.abs()
        a.clamp_(min=_order_stat(a, lo_i), max=_order_stat(a, hi_i))
        score = _minmax(a.clone()).square_().mul_(float(T)).exp_()
        score.mul_(torch.tanh(x * total))
        kappa = _order_stat(score, kappa_i)
        top = score.max()
        s = score.clamp_(min=kappa).sub_(kappa).div_(top - kappa) if bool(top > kappa) else score.zero_()
        den.add_(s)
        hat = a.mul_(torch.sign(x))
        if w != 1.0:
            num.add_(hat.mul_(s), alpha=float(w))
        else:
            num.add_(hat.mul_(s))
    return num.div_(den.clamp_(min=1e-12)).mul_(scaling).reshape(shape)
