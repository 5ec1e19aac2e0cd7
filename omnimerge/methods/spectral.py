"""Spectral methods: TSV-Merge, Iso-C and Iso-CTS, CART and SVC, and the SVD helpers shared with the WUDI family.

TSV, Iso-C, Iso-CTS and CART act on every 2-D parameter except the lm_head (:func:`~omnimerge.methods.base.is_matrix`); every
other parameter gets the mean task vector (MLLMerging / FusionBench convention). Definitions follow the code
behind the OptMerge paper's baselines (MLLMerging ``LLaMA-Factory/baseline_merging.py``: ``svd_merging``,
``iso_merging``) and FusionBench ``method/isotropic_merging/iso_utils.py`` (``iso_c``, ``iso_cts``).

Efficiency notes: SVDs are always economy (``full_matrices=False``); the per-task top-r triplets of a LoRA
input come from its exact factors (:meth:`LowRank.svd`, an r x r SVD) instead of the dense m x n matrix; the
orthogonalisation works on the m x (T r) concatenation rather than the reference's zero-padded m x min(m, n)
one (the padding columns are multiplied by zero singular values, so the result is the same). ``svd:
randomized`` replaces the exact truncated SVDs of dense task vectors by a randomized range finder
(Halko, Martinsson & Tropp 2011) with ``svd_oversample`` extra columns and ``svd_power_iters`` power
iterations, seeded per tensor (deterministic).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omnimerge.methods.base import (
    LowRank,
    Param,
    TensorContext,
    is_matrix,
    mean_of,
    merge_method,
)

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

SVD = Param(
    "svd",
    "exact",
    "how the truncated (top-r) SVDs of dense task vectors are computed: 'exact' (economy SVD, as the "
    "references) or 'randomized' (range finder with oversampling and power iterations; much faster when "
    "r << min(m, n)). LoRA inputs always use their exact factors.",
    str,
    choices=("exact", "randomized"),
)
SVD_OVERSAMPLE = Param(
    "svd_oversample", 10, "svd: randomized: extra random columns beyond the rank r", int, low=0
)
SVD_POWER_ITERS = Param(
    "svd_power_iters", 2, "svd: randomized: power (subspace) iterations; more = more accurate", int, low=0
)
SVD_PARAMS = (SVD, SVD_OVERSAMPLE, SVD_POWER_ITERS)
SPECTRAL_SCALING_DOC = (
    "lambda: W = W0 + lambda * tau_merged. Default 0.3 as MLLMerging's baseline runner "
    "(baseline_merging.py DEFAULT_HPARAMS); FusionBench uses 1.0"
)


@dataclass(frozen=True)
class SvdOptions:
    """How truncated SVDs of dense matrices are computed (the ``svd*`` method parameters)."""

    method: str = "exact"
    oversample: int = 10
    power_iters: int = 2


def upcast_half(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a method in float32 when the compute dtype is float16/bfloat16 (SVD, eigh and the optimisation
    loops need at least float32, as in the references); the result is cast back."""

    @functools.wraps(fn)
    def wrapper(
        base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, **kw: Any
    ) -> Any:
        dt = task_vectors[0].dtype
        wd = torch.promote_types(dt, torch.float32)
        if wd == dt:
            return fn(base, task_vectors, ctx, **kw)
        return fn(base, [t.to(wd) for t in task_vectors], ctx, **kw).to(dt)

    return wrapper


# --- SVD helpers -------------------------------------------------------------------------------------------


def thin_svd(x: torch.Tensor) -> Triplets:
    """Economy SVD ``x = U diag(S) Vh``. A wide matrix is decomposed through its transpose: LAPACK's
    divide-and-conquer SVD in torch runs 2.5-3x slower on an m x n matrix with m < n than on its n x m
    transpose (measured: 74 s vs 25 s for 3584 x 18944 float32 on 2 cores); the factors are the same."""
    if x.shape[-2] < x.shape[-1]:
        u, s, vh = torch.linalg.svd(x.mT, full_matrices=False)
        return vh.mT, s, u.mT
    return torch.linalg.svd(x, full_matrices=False)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The polar factor ``U Vh`` of ``x = U S Vh``: the closest matrix with orthonormal columns (or rows)."""
    u, _, vh = thin_svd(x)
    return u @ vh


def randomized_svd(
    x: torch.Tensor, q: int, power_iters: int, generator: torch.Generator | None = None
) -> Triplets:
    """Rank-q randomized SVD of ``x`` (Halko et al. 2011, Alg. 4.4 + 5.1): Gaussian range finder of q columns,
    ``power_iters`` QR-stabilised subspace iterations, then an exact SVD of the q x n projection."""
    m, n = x.shape
    omega = torch.randn(n, q, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
    qm, _ = torch.linalg.qr(x @ omega)
    for _ in range(power_iters):
        qn, _ = torch.linalg.qr(x.T @ qm)
        qm, _ = torch.linalg.qr(x @ qn)
    u, s, vh = thin_svd(qm.T @ x)
    return qm @ u, s, vh


def truncated_svd(
    x: torch.Tensor, r: int, opts: SvdOptions = SvdOptions(), generator: torch.Generator | None = None
) -> Triplets:
    """Top-r singular triplets ``(U[:, :r], S[:r], Vh[:r])`` of a dense matrix (economy or randomized SVD)."""
    k = min(x.shape)
    r = max(0, min(r, k))
    if opts.method == "randomized" and r + opts.oversample < k:
        u, s, vh = randomized_svd(x, r + opts.oversample, opts.power_iters, generator)
    else:
        u, s, vh = thin_svd(x)
    # compact copies: a view would keep the full m x min(m, n) factors alive
    return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous()


def all_factors(ctx: TensorContext) -> list[LowRank] | None:
    """The experts' exact low-rank factors when *every* expert has one (LoRA inputs), else None."""
    if not ctx.factors or any(f is None for f in ctx.factors):
        return None
    return [f for f in ctx.factors if f is not None]


def factor_on(f: LowRank, like: torch.Tensor) -> LowRank:
    """``f`` moved to the device and dtype of ``like`` (the compute device/dtype)."""
    return LowRank(f.B.to(like.device, like.dtype), f.A.to(like.device, like.dtype), f.scale)


def combine_factors(factors: Sequence[LowRank], coeffs: Sequence[float], like: torch.Tensor) -> LowRank:
    """Exact factors of ``sum_j c_j tau_j`` from the experts' factors: ``[c_1 s_1 B_1, ...] [A_1; ...]``."""
    fs = [factor_on(f, like) for f in factors]
    B = torch.cat([f.B * (c * f.scale) for f, c in zip(fs, coeffs, strict=True)], dim=1)
    A = torch.cat([f.A for f in fs], dim=0)
    return LowRank(B, A, 1.0)


def task_triplets(
    i: int,
    tv: torch.Tensor,
    ctx: TensorContext,
    r: int,
    opts: SvdOptions = SvdOptions(),
    generator: torch.Generator | None = None,
) -> Triplets:
    """Top-r singular triplets of expert i's task vector: from its LoRA factors when known, else dense.

    From factors the rank is at most the adapter rank k: for r > k the triplets beyond k have zero singular
    values (a dense SVD would return arbitrary null-space vectors for them) and are left out.
    """
    f = ctx.low_rank(i)
    if f is not None:
        u, s, vh = factor_on(f, tv).svd()
        r = min(r, s.shape[0])
        return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous()
    return truncated_svd(tv, r, opts, generator)


def _mean_delta(task_vectors: Sequence[torch.Tensor], scaling: float) -> torch.Tensor:
    return mean_of(task_vectors).mul_(scaling)


# --- TSV-Merge ---------------------------------------------------------------------------------------------


def tsv_rank(min_dim: int, num_models: int, rank_fraction: float | None) -> int:
    """Per-task rank r = int(min(m, n) / T) (the references' ``int(k * 1/T)``), or ``int(k * rank_fraction)``
    clamped so that the T concatenated blocks fit in min(m, n) columns."""
    budget = min_dim // num_models
    if rank_fraction is None:
        return budget
    return min(int(min_dim * rank_fraction), budget)


def tsv_combine(triplets: list[Triplets] | Sequence[Triplets], consume: bool = False) -> torch.Tensor:
    """``polar([U_1 .. U_T]) diag([s_1 .. s_T]) polar([Vh_1; ..; Vh_T])`` from per-task (U_i, s_i, Vh_i).

    ``consume``: empty the (list) argument as soon as the concatenations are built, to free its memory."""
    u_cat = torch.cat([t[0] for t in triplets], dim=1)
    s_cat = torch.cat([t[1] for t in triplets])
    vh_cat = torch.cat([t[2] for t in triplets], dim=0)
    if consume and isinstance(triplets, list):
        triplets.clear()
    left = polar(u_cat).mul_(s_cat)
    del u_cat
    return left @ polar(vh_cat)


@merge_method(
    "tsv",
    params=[
        Param("scaling", 0.3, SPECTRAL_SCALING_DOC, float, low=0.0),
        Param(
            "rank_fraction",
            None,
            "share of min(m, n) singular triplets kept per task; null = 1/T (TSV-Merge's sv_reduction). "
            "Clamped to 1/T so that the T blocks fit",
            float,
            low=0.0,
            high=1.0,
            low_open=True,
            nullable=True,
        ),
        *SVD_PARAMS,
    ],
    summary="TSV-Merge: each task's top-r singular triplets, U and V decorrelated by polar factors.",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 "
    "(arXiv 2412.00081)",
    url="https://arxiv.org/abs/2412.00081",
)
@upcast_half
def tsv(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    rank_fraction: float | None,
    svd: str,
    svd_oversample: int,
    svd_power_iters: int,
) -> torch.Tensor:
    """TSV-Merge (Task Singular Vectors merging).

    Per 2-D parameter: tau_i = U_i S_i V_i^T; keep each task's top r = int(min(m, n) / T) triplets;
    U_cat = [U_1,r .. U_T,r], s_cat = [s_1,r .. s_T,r], V_cat = [V_1,r .. V_T,r];
    U_perp = polar(U_cat), V_perp = polar(V_cat) (the closest orthonormal matrices, P Q^T of their SVDs);
    tau_m = U_perp diag(s_cat) V_perp^T;  W = W0 + lambda tau_m.
    The concatenated singular values are kept (Gargiulo et al., CVPR 2025; MLLMerging ``baseline_merging.py:
    svd_merging`` with its lm_head-guard bug fixed, i.e. not the released script that silently averaged).
    Non-matrix parameters and the lm_head: mean task vector. LoRA inputs take the triplets from their factors.
    """
    if not is_matrix(ctx, task_vectors[0]):
        return _mean_delta(task_vectors, scaling)
    T = len(task_vectors)
    r = tsv_rank(min(task_vectors[0].shape), T, rank_fraction)
    opts = SvdOptions(svd, svd_oversample, svd_power_iters)
    gen = ctx.generator(task_vectors[0].device) if svd == "randomized" else None
    trips = [task_triplets(i, tv, ctx, r, opts, gen) for i, tv in enumerate(task_vectors)]
    if sum(t[1].numel() for t in trips) == 0:
        return torch.zeros_like(task_vectors[0])
    return tsv_combine(trips, consume=True).mul_(scaling)


# --- Iso-C / Iso-CTS ---------------------------------------------------------------------------------------


def _sum_factors_svd(factors: Sequence[LowRank], like: torch.Tensor) -> Triplets:
    return combine_factors(factors, [1.0] * len(factors), like).svd()


@merge_method(
    "iso_c",
    params=[Param("scaling", 0.3, SPECTRAL_SCALING_DOC, float, low=0.0)],
    summary="Iso-C: SVD of the summed task vector with all singular values replaced by their mean.",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, ICML 2025 (arXiv 2502.04959)",
    url="https://arxiv.org/abs/2502.04959",
)
@upcast_half
def iso_c(
    base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *, scaling: float
) -> torch.Tensor:
    """Iso-C (isotropic merging in common space).

    tau_sum = sum_i tau_i = U S V^T (economy SVD); sigma_bar = mean of all min(m, n) singular values (zeros
    included); tau_m = sigma_bar U V^T (a flat spectrum);  W = W0 + lambda tau_m.
    Marczak et al., ICML 2025; MLLMerging ``baseline_merging.py:iso_merging``; FusionBench
    ``iso_utils.iso_c``.
    Non-matrix parameters and the lm_head: mean task vector.

    With LoRA inputs (exact factors, sum of rank R < min(m, n)) the SVD comes from the factors; sigma_bar is
    still the mean over min(m, n) values, but the min(m, n) - R null directions, which a dense SVD fills with
    arbitrary (round-off) singular vectors, are left out: tau_m = sigma_bar U_R V_R^T.
    """
    tv0 = task_vectors[0]
    if not is_matrix(ctx, tv0):
        return _mean_delta(task_vectors, scaling)
    k = min(tv0.shape)
    factors = all_factors(ctx)
    if factors is not None and sum(f.A.shape[0] for f in factors) < k:
        u, s, vh = _sum_factors_svd(factors, tv0)
        ctx.log("iso_c: LoRA inputs: flat spectrum on the adapters' span (null directions left out)")
    else:
        total = task_vectors[0].clone()
        for tv in task_vectors[1:]:
            total.add_(tv)
        u, s, vh = thin_svd(total)
        del total
    sigma = s.sum() / k
    return (u @ vh).mul_(sigma * scaling)


def iso_cts_sizes(min_dim: int, num_models: int, common_space_fraction: float) -> tuple[int, int]:
    """(k_common, dims_per_task) exactly as FusionBench ``iso_cts``: k_c = int(k * f), then the task-specific
    total is rounded (Python ``round``) to a multiple of T and k_c = k - that total; each task gets
    int((k - k_c) / T) dims. Where the reference's rounding would overflow (k_c < 0, only for tiny f), the
    task-specific total is floored instead."""
    kc = int(min_dim * common_space_fraction)
    ts_total = round((min_dim - kc) / num_models) * num_models
    if ts_total > min_dim:
        ts_total = (min_dim // num_models) * num_models
    kc = min_dim - ts_total
    return kc, int((min_dim - kc) / num_models)


@merge_method(
    "iso_cts",
    params=[
        Param("scaling", 0.3, SPECTRAL_SCALING_DOC, float, low=0.0),
        Param(
            "common_space_fraction",
            0.8,
            "share of the min(m, n) directions taken from the common subspace (top singular vectors of the "
            "summed task vector); the rest is split equally among the tasks",
            float,
            low=0.0,
            high=1.0,
        ),
        *SVD_PARAMS,
    ],
    summary="Iso-CTS: common subspace of the sum + per-task residual subspaces, flat spectrum.",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, ICML 2025 (arXiv 2502.04959)",
    url="https://arxiv.org/abs/2502.04959",
)
@upcast_half
def iso_cts(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    common_space_fraction: float,
    svd: str,
    svd_oversample: int,
    svd_power_iters: int,
) -> torch.Tensor:
    """Iso-CTS (isotropic merging in common and task-specific subspaces).

    k = min(m, n); (k_c, d) = sizes of the common space and of each task's space (see :func:`iso_cts_sizes`).
    tau_sum = sum_i tau_i = U S V^T; common space (U_c, S_c, V_c) = its top k_c triplets.
    Per task: r_i = tau_i - U_c U_c^T tau_i, top-d triplets (U_i, S_i, V_i) of r_i.
    U = [U_1 .. U_T, U_c], V = [V_1 .. V_T, V_c], S = [S_1 .. S_T, S_c] (k columns in all);
    tau_m = mean(S) polar(U) polar(V)^T (polar(X) = P Q^T of X = P Sigma Q^T);  W = W0 + lambda tau_m.
    Marczak et al., ICML 2025; FusionBench ``isotropic_merging/iso_utils.py:iso_cts`` (rank rules included).
    Non-matrix parameters and the lm_head: mean task vector.

    LoRA inputs whose summed rank R fits in the common space (R <= k_c) and whose adapters lie in the sum's
    span: every residual r_i is zero, and the result is sigma_bar U_R V_R^T as Iso-C's (the directions with
    zero singular value, arbitrary in a dense SVD, are left out). Otherwise the dense path is used.
    """
    tv0 = task_vectors[0]
    if not is_matrix(ctx, tv0):
        return _mean_delta(task_vectors, scaling)
    T = len(task_vectors)
    k = min(tv0.shape)
    kc, d = iso_cts_sizes(k, T, common_space_fraction)
    factors = all_factors(ctx)
    if factors is not None and sum(f.A.shape[0] for f in factors) <= kc:
        u, s, vh = _sum_factors_svd(factors, tv0)
        inside = True
        for f in factors:
            fb = factor_on(f, tv0).B
            resid = fb - u @ (u.T @ fb)
            if float(resid.norm()) > 1e-4 * float(fb.norm()):
                inside = False
                break
        if inside:
            ctx.log("iso_cts: LoRA inputs span the common space: flat spectrum on the adapters' span")
            return (u @ vh).mul_(s.sum() / k * scaling)

    total = tv0.clone()
    for tv in task_vectors[1:]:
        total.add_(tv)
    u, s, vh = thin_svd(total)
    del total
    uc, sc, vhc = u[:, :kc], s[:kc], vh[:kc]
    opts = SvdOptions(svd, svd_oversample, svd_power_iters)
    gen = ctx.generator(tv0.device) if svd == "randomized" else None
    us, ss, vs = [], [], []
    for tv in task_vectors:
        resid = tv - uc @ (uc.T @ tv)
        ui, si, vi = truncated_svd(resid, d, opts, gen)
        us.append(ui)
        ss.append(si)
        vs.append(vi)
    u_all = torch.cat([*us, uc], dim=1)
    s_all = torch.cat([*ss, sc])
    vh_all = torch.cat([*vs, vhc], dim=0)
    del us, vs, u, vh, uc, vhc
    sigma = s_all.sum() / k
    left = polar(u_all)
    del u_all
    return (left @ polar(vh_all)).mul_(sigma * scaling)



# --- CART, SVC -------------------------------------------------------------------------------------------------


@merge_method(
    "cart",
    params=[
        Param("scaling", 2.0, "lambda: multiplies the sum of the centred low-rank parts (the authors' 'prior')",
              float),
        Param("rank_ratio", 0.12, "share of min(m, n) kept by each centred task vector's truncated SVD (the "
              "authors' 'initial_rank_ratio'); at least rank 1", float, low=0.0, high=1.0, low_open=True),
    ],
    summary="CART: the mean task vector plus lambda times the low-rank parts of the centred task vectors.",
    paper="Choi et al., Revisiting Weight Averaging for Model Merging (arXiv 2412.12153)",
    url="https://arxiv.org/abs/2412.12153",
)
@upcast_half
def cart(
    base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *, scaling: float,
    rank_ratio: float,
) -> torch.Tensor:
    """CART, centred task arithmetic (the authors' ``StaticMergeModule._merge_weights('CART')``).

    tau_bar = (1/T) sum_t tau_t; W = W0 + tau_bar + lambda sum_t SVD_k(tau_t - tau_bar), SVD_k the best rank-k
    approximation (economy SVD, top k triplets), k = max(1, int(rank_ratio min(m, n))). Around the weight
    average the centred vectors are low rank; with two experts they are +-(tau_1 - tau_2)/2, their truncations
    cancel, and CART is exactly weight averaging. The reference picks its matrices by name (``attn`` or
    ``mlp``); here every 2-D parameter but the lm_head, as the other spectral methods; other parameters get
    tau_bar.
    """
    mean = mean_of(task_vectors)
    if not is_matrix(ctx, mean):
        return mean
    k = max(1, int(rank_ratio * min(mean.shape)))
    low = torch.zeros_like(mean)
    for tv in task_vectors:
        u, s, vh = thin_svd(tv.sub_(mean))
        low.addmm_(u[:, :k] * s[:k], vh[:k])
    return mean.add_(low, alpha=scaling)


@merge_method(
    "svc",
    params=[
        Param("scaling", 0.3, "lambda: the task-arithmetic coefficient, applied before the calibration", float),
        Param("alpha", 1.0, "floor of each task's projection ratio: gamma_r = T / sum_t max(alpha, s_r^t), at most "
              "T / (T alpha) = 1 / alpha (FusionBench's class default 1.0; its task-arithmetic config 0.1)", float,
              low=0.0, low_open=True),
    ],
    summary="SVC: task arithmetic with each singular direction rescaled by how consistently the tasks share it.",
    paper="Singular Value Calibration for model merging (arXiv 2602.05536)",
    url="https://arxiv.org/abs/2602.05536",
)
def svc(
    base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *, scaling: float, alpha: float,
) -> torch.Tensor:
    """Singular Value Calibration on task arithmetic (FusionBench ``SingularValueCalibrationArithmeticTask``,
    its float64 implementation).

    dW = lambda sum_t tau_t = U S V^T (thin SVD). Per direction r: a_r = u_r^T dW, a_r^t = u_r^T tau_t,
    s_r^t = <a_r, a_r^t> / max(||a_r^t||^2, 1e-12) (NaN -> alpha), gamma_r = T / sum_t max(alpha, s_r^t);
    W = W0 + U diag(gamma * S) V^T. lambda acts before the calibration (s scales with it): W is not
    W0 + lambda SVC(sum tau). Computed in float64, cast back. Parameters other than 2-D ones get dW.
    """
    dt = task_vectors[0].dtype
    total = task_vectors[0].clone()
    for tv in task_vectors[1:]:
        total.add_(tv)
    if total.dim() != 2:
        return total.mul_(scaling)
    dw = total.to(torch.float64).mul_(scaling)
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    a = u.T @ dw  # (k, n): row r is u_r^T dW
    denom = torch.zeros_like(s)
    for tv in task_vectors:
        at = u.T @ tv.to(torch.float64)
        ratio = (a * at).sum(dim=1) / (at * at).sum(dim=1).clamp_(min=1e-12)
        denom.add_(torch.nan_to_num(ratio, nan=alpha).clamp_(min=alpha))
    gamma = len(task_vectors) / denom
    return ((u * (gamma * s)) @ vh).to(dt)


__all__ = [
    "SVD_PARAMS",
    "cart",
    "SvdOptions",
    "all_factors",
    "combine_factors",
    "factor_on",
    "iso_c",
    "iso_cts",
    "iso_cts_sizes",
    "polar",
    "randomized_svd",
    "svc",
    "task_triplets",
    "truncated_svd",
    "tsv",
    "tsv_combine",
    "tsv_rank",
]
