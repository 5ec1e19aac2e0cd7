"""Entry-selection methods: per entry, which experts' deltas enter the merge (MagMax, EMR, RAM, TALL consensus,
NearSwap, Arcee Fusion) and LiNeS's depth scaling of task arithmetic.

Except RAM+ (whose boosts are counts over the tensor) and Arcee Fusion (a threshold over the tensor's
importances) every method here is elementwise: each output entry
depends on the same entry of the inputs only, so the engine streams them block by block. Definitions and
defaults follow the references named per method (see ``../shared/golden/README.md`` for the conventions the
golden cases pin down).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from omnimerge.errors import MethodParameterError
from omnimerge.methods.base import Capabilities, Param, TaskMasks, TensorContext, merge_method, scaling_param
from omnimerge.methods.operators import kth_smallest

ELEMENTWISE = Capabilities(elementwise=True)


@merge_method(
    "magmax",
    params=[scaling_param(0.5)],
    summary="MagMax: per entry, the expert delta of largest magnitude.",
    paper="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning, ECCV 2024 "
          "(arXiv 2407.06322)",
    url="https://arxiv.org/abs/2407.06322",
    capabilities=ELEMENTWISE,
)
def magmax(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
           scaling: float) -> torch.Tensor:
    """MagMax (FusionBench ``magmax_merge``).

    tau_max = tau_{t*} per entry with t* = argmax_t |tau_t| (ties: the later expert wins);
    W = W0 + lambda tau_max.
    """
    best = task_vectors[0]
    mag = best.abs()
    for tv in task_vectors[1:]:
        a = tv.abs()
        take = a >= mag
        best = torch.where(take, tv, best)
        mag = torch.where(take, a, mag)
    return best.mul(scaling)


@merge_method(
    "emr",
    params=[scaling_param(1.0)],
    summary="EMR-Merging's unified task vector: elected sign times the largest agreeing magnitude.",
    paper="Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024 (arXiv 2405.17461)",
    url="https://arxiv.org/abs/2405.17461",
    capabilities=Capabilities(elementwise=True, task_masks=lambda tvs, ctx, **kw: emr_task_masks(tvs)),
)
def emr(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
        scaling: float) -> torch.Tensor:
    """EMR-Merging, unified task vector (FusionBench ``emr_merge``).

    gamma = sign(sum_t tau_t) with 0 -> -1; eps = max_{t: tau_t gamma > 0} |tau_t| (0 where none agrees);
    tau_uni = gamma eps; W = W0 + scaling tau_uni. With the recipe's ``task_models: true`` the merge also
    writes EMR's per-task masks M_t = [tau_t gamma > 0] and rescalers r_t = sum |tau_t| / sum |M_t tau_uni|
    (sums over every merged tensor), from which ``omnimerge.load_task_model`` rebuilds task t's model
    W0 + r_t M_t tau_uni (:func:`emr_task_masks`).
    """
    total = task_vectors[0].clone()
    for tv in task_vectors[1:]:
        total.add_(tv)
    gamma = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    eps = torch.zeros_like(total)
    for tv in task_vectors:
        eps = torch.maximum(eps, torch.where(tv * gamma > 0, tv.abs(), 0.0))
    return eps.mul_(gamma).mul_(scaling)


def emr_task_masks(task_vectors: Sequence[torch.Tensor]) -> TaskMasks:
    """EMR's per-task masks M_t = [tau_t gamma > 0] (gamma as in ``emr``) and the sums of its rescalers
    (FusionBench ``emr_merge``): sum |tau_t| and sum |M_t tau_uni| over the tensor, in float64. The task vectors
    are not modified."""
    total = task_vectors[0].clone()
    for tv in task_vectors[1:]:
        total.add_(tv)
    gamma = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    del total
    masks = [tv * gamma > 0 for tv in task_vectors]
    eps = torch.zeros_like(gamma)
    for tv, m in zip(task_vectors, masks, strict=True):
        eps = torch.maximum(eps, torch.where(m, tv.abs(), 0.0))
    l1_tau = [float(tv.abs().sum(dtype=torch.float64)) for tv in task_vectors]
    l1_kept = [float(torch.where(m, eps, 0.0).sum(dtype=torch.float64)) for m in masks]
    return TaskMasks(masks, l1_tau, l1_kept, rescale=True)


EPSILON = Param("epsilon", 1e-5, "RAM: an entry of tau_t is active where |tau_t| > epsilon", float, low=0.0)


def _activity(task_vectors: Sequence[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    act = [tv.abs() > epsilon for tv in task_vectors]
    count = torch.zeros_like(task_vectors[0])
    for a in act:
        count.add_(a.to(count.dtype))
    return act, count


@merge_method(
    "ram",
    params=[EPSILON],
    summary="RAM: each entry averaged over the experts where it is active (|tau| > epsilon).",
    paper="Reinforced Agent Merging (arXiv 2601.13572)",
    url="https://arxiv.org/abs/2601.13572",
    capabilities=ELEMENTWISE,
)
def ram(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
        epsilon: float) -> torch.Tensor:
    """Reinforced Agent Merging (mergekit ``ram``).

    a_t = [|tau_t| > epsilon], c = sum_t a_t; W = W0 + sum_t a_t tau_t / max(c, 1): an entry active in one
    expert keeps its value, one active in several is their mean, one active nowhere stays at the base. With
    the default epsilon every entry of a dense fine-tuning delta is active and RAM is plain averaging.
    """
    act, count = _activity(task_vectors, epsilon)
    acc = torch.zeros_like(task_vectors[0])
    for a, tv in zip(act, task_vectors, strict=True):
        acc.add_(torch.where(a, tv, 0.0))
    return acc.div_(count.clamp_(min=1.0))


@merge_method(
    "ramplus_tl",
    params=[EPSILON,
            Param("r", 0.1, "RAM+: boost rate of an expert's unique entries", float, low=0.0),
            Param("alpha", 0.2, "RAM+: cap of the shared/unique ratio", float, low=0.0)],
    summary="RAM+ (tensor-local): RAM with each expert's unique entries boosted by its shared/unique ratio.",
    paper="Reinforced Agent Merging (arXiv 2601.13572)",
    url="https://arxiv.org/abs/2601.13572",
)
def ramplus_tl(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
               epsilon: float, r: float, alpha: float) -> torch.Tensor:
    """RAM+, tensor-local (mergekit ``ramplus_tl``).

    a_t and c as in ``ram``; per expert over the tensor S_t = #{a_t and c > 1}, U_t = #{a_t and c = 1},
    rho_t = S_t / max(U_t, epsilon) (the count floored at epsilon, as the reference), lambda_t = 1 + r
    clip(rho_t, 0, alpha); W = W0 + sum_t lambda_t a_t [c = 1] tau_t + sum_t a_t [c > 1] tau_t / c.
    """
    act, count = _activity(task_vectors, epsilon)
    unique, shared = count == 1, count > 1
    out = torch.zeros_like(task_vectors[0])
    for a, tv in zip(act, task_vectors, strict=True):
        s = int(torch.count_nonzero(a & shared))
        u = int(torch.count_nonzero(a & unique))
        lam = 1.0 + r * min(max(s / max(u, epsilon), 0.0), alpha)
        out.add_(torch.where(a & unique, tv * lam, 0.0))
        out.add_(torch.where(a & shared, tv / count, 0.0))
    return out


def _multi_task_vector(task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """tau_MTL = sum_t tau_t (unscaled), summed in the experts' order into a new tensor."""
    mtl = task_vectors[0].clone()
    for tv in task_vectors[1:]:
        mtl.add_(tv)
    return mtl


def _tall_mask(tv: torch.Tensor, mtl: torch.Tensor, tall_mask_lambda: float) -> torch.Tensor:
    """TALL mask m_t = [|tau_t| > lambda |tau_MTL - tau_t|] (strict; bool): the one test ``consensus`` counts and
    :func:`consensus_task_masks` writes."""
    return tv.abs() > (mtl - tv).abs_().mul_(tall_mask_lambda)


def consensus_task_masks(task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *, scaling: float,
                         tall_mask_lambda: float, prun_thre_k: int) -> TaskMasks:
    """TALL's per-task masks m_t (as ``consensus`` computes them) with rescalers 1: the loader rebuilds task t as
    W0 + m_t tau_uni, tau_uni = tau_MTL [c >= k] the unified vector, i.e. W0 + m_t [c >= k] tau_MTL. For k <= 1
    that is TALL's theta0 + m_t tau_MTL (an entry any mask keeps has c >= 1); for k >= 2 the entries kept by
    fewer than k tasks are missing, which is said once in a note. The task vectors are not modified."""
    if prun_thre_k >= 2:
        ctx.log(f"consensus: the task models (task_models: true) lack the entries kept by fewer than "
                f"prun_thre_k = {prun_thre_k} tasks' TALL masks (the unified merge drops them); prun_thre_k: 1 "
                f"gives TALL's per-task models theta0 + m_t tau_MTL exactly")
    mtl = _multi_task_vector(task_vectors)
    masks = [_tall_mask(tv, mtl, tall_mask_lambda) for tv in task_vectors]
    zeros = [0.0] * len(masks)
    return TaskMasks(masks, zeros, list(zeros), rescale=False)


@merge_method(
    "consensus",
    params=[scaling_param(0.3),
            Param("tall_mask_lambda", 0.6, "TALL masks: tau_t is kept for task t where |tau_t| > lambda "
                  "|tau_MTL - tau_t|", float, low=0.0),
            Param("prun_thre_k", 2, "consensus: keep the entries used by at least k tasks (0: task arithmetic; "
                  "k > T: the base)", int, low=0)],
    summary="Consensus merging: task arithmetic restricted to the entries that at least k TALL masks keep.",
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024 "
          "(arXiv 2405.07813)",
    url="https://arxiv.org/abs/2405.07813",
    capabilities=Capabilities(elementwise=True, task_masks=consensus_task_masks),
)
def consensus(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
              scaling: float, tall_mask_lambda: float, prun_thre_k: int) -> torch.Tensor:
    """Consensus Merging with TALL masks (FusionBench ``tall_mask``; the authors' nik-dim/tall_masks).

    tau_MTL = sum_t tau_t (unscaled); m_t = [|tau_t| > lambda |tau_MTL - tau_t|] (strict), c = sum_t m_t;
    W = W0 + scaling (tau_MTL [c >= k]). The masks test the task vectors, not the pretrained weights
    (FusionBench 0.2.33's TallMaskTaskArithmetic passes the weights: a bug not reproduced here).

    With the recipe's ``task_models: true`` the merge also writes the TALL masks m_t (rescalers 1;
    :func:`consensus_task_masks`), from which ``omnimerge.load_task_model`` rebuilds task t's model
    W0 + m_t tau_uni with tau_uni = tau_MTL [c >= k] the unified vector: W0 + m_t [c >= k] tau_MTL. With
    prun_thre_k <= 1 that is the paper's per-task model theta0 + m_t tau_MTL (every entry a mask keeps has
    c >= 1); with k >= 2 the task models lack the entries kept by fewer than k tasks (the merge says so in a
    note).
    """
    mtl = _multi_task_vector(task_vectors)
    count = torch.zeros_like(mtl)
    for tv in task_vectors:
        count.add_(_tall_mask(tv, mtl, tall_mask_lambda).to(count.dtype))
    return torch.where(count >= prun_thre_k, mtl, 0.0).mul_(scaling)


def _require_t(params: Mapping[str, Any]) -> None:
    if params["t"] is None:
        raise MethodParameterError("parameters: nearswap needs 't' (the swap distance, in weight units)")


@merge_method(
    "nearswap",
    params=[Param("t", None, "NearSwap: entries within t of the base take the expert's value; the others move "
                  "t towards it (absolute, weight units; required)", float, low=0.0, nullable=True)],
    summary="NearSwap: the base, moved towards the expert by at most t per entry.",
    paper="mergekit NearSwap (alchemonaut, QuartetAnemoi model card)",
    url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    capabilities=ELEMENTWISE,
    check=_require_t,
    experts=(1, 1),
)
def nearswap(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
             t: float) -> torch.Tensor:
    """NearSwap (mergekit ``nearswap``), the base and one expert W1.

    w = clip(t / max(|W1 - W0|, 1e-6), 0, 1) per entry; W = w W1 + (1 - w) W0 = W0 + w (W1 - W0). For
    t >= 1e-6 that is W0 + clip(tau, -t, t).
    """
    tau = task_vectors[0]
    w = torch.clamp(t / tau.abs().clamp(min=1e-6), 0.0, 1.0)
    return tau.mul_(w)


@merge_method(
    "lines",
    params=[Param("alpha", 0.3, "LiNeS: the shallowest layer's coefficient (and the one outside the layers)",
                  float),
            Param("beta", 0.6, "LiNeS: added over depth (the deepest layer gets alpha + beta)", float)],
    summary="LiNeS: task arithmetic with a coefficient rising linearly with the layer's depth.",
    paper="Wang et al., LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging, "
          "ICLR 2025 (arXiv 2410.17146)",
    url="https://arxiv.org/abs/2410.17146",
    capabilities=ELEMENTWISE,
)
def lines(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
          alpha: float, beta: float) -> torch.Tensor:
    """LiNeS on task arithmetic (the authors' ``LiNeS_scaling``).

    tau = sum_t tau_t; for a tensor of layer l in {0, ..., L - 1} of a stack of L layers,
    W = W0 + (alpha + beta l / (L - 1)) tau; tensors outside the layers (and a one-layer stack) get alpha.
    l is the tensor's position in the layer stack (``layers.N.``) and L the stack's depth in the base model,
    not among the merged tensors. The authors' multi-task default alpha = 1 / T (for task arithmetic), beta
    tuned on validation data: both are given explicitly here.
    """
    acc = task_vectors[0]
    for tv in task_vectors[1:]:
        acc.add_(tv)
    coef = alpha
    if ctx.layer is not None and ctx.num_layers > 1:
        coef = alpha + beta * ctx.layer / (ctx.num_layers - 1)
    return acc.mul_(coef)


@merge_method(
    "arcee_fusion",
    params=[],
    summary="Arcee Fusion: keep the expert's changes whose importance (|delta| times the row's KL) is an outlier.",
    paper="mergekit Arcee Fusion (Arcee AI, mergekit 0.1.x `arcee_fusion`)",
    url="https://github.com/arcee-ai/mergekit",
    experts=(1, 1),
)
def arcee_fusion(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """Arcee Fusion (mergekit ``arcee_fusion``), the base W0 and one expert W1 = W0 + tau, in float64.

    Per row i (over the input dimension; a 1-D tensor is one row): p_i = softmax(W1[i, :]) + 1e-8,
    q_i = softmax(W0[i, :]) + 1e-8, KL_i = sum_j p_ij log(p_ij / q_ij). Importance I = |tau| * KL_i (broadcast
    along the row). theta = Q2 + 1.5 (Q3 - Q1) with Q_k = I_(floor(q_k (n - 1))) for q = 0.25, 0.5, 0.75, the
    lower order statistics of all n importances (no interpolation). W = W0 + tau [I >= theta].
    The rows are nearly uniform softmaxes, where a float32 KL is off by up to ~15 %: everything is float64.
    mergekit estimates the quartiles of tensors above 10^6 entries from 10^6 random samples (drawn anew on each
    run); here they are exact for every tensor, so the merge is reproducible.
    """
    tau = task_vectors[0]
    w0 = base.to(torch.float64)
    t64 = tau.to(torch.float64)
    rows0 = w0.reshape(-1, w0.shape[-1]) if w0.dim() > 1 else w0.reshape(1, -1)
    rows1 = (w0 + t64).reshape(rows0.shape)
    p = torch.softmax(rows1, dim=-1).add_(1e-8)
    q = torch.softmax(rows0, dim=-1).add_(1e-8)
    kl = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
    del p, q, rows1
    imp = (t64.reshape(rows0.shape).abs_().mul_(kl)).reshape(-1)
    n = imp.numel()
    q1, q2, q3 = (float(kth_smallest(imp, int(f * (n - 1)) + 1)) for f in (0.25, 0.5, 0.75))  # 1-based
    theta = q2 + 1.5 * (q3 - q1)
    keep = (imp >= theta).reshape(tau.shape)
    return tau.mul_(keep.to(tau.dtype))
