"""KnOTS: merging LoRA adapters in a shared, SVD-aligned basis (Stoica et al., ICLR 2025).

Per weight matrix, with task updates dW_t (LoRA: dW_t = s_t B_t A_t), KnOTS concatenates the updates and takes
one SVD, ``[dW_1 ... dW_T] = U S [V_1^T ... V_T^T]`` (``concat_across_output: true``; ``false`` concatenates the
transposes, so that U is an input-side basis). In the shared basis U each task is ``dW_t = U (S V_t^T)``; the
T coordinate blocks ``S V_t^T`` (k x n, k = rank of the concatenation) are aligned, so an elementwise merge
(TIES, task arithmetic, optionally after DARE) applied to them is meaningful; the result is mapped back with U.

Reference: gstoica27/KnOTS ``task_merger.py`` (``SVDMerger``: float64 SVD, singular values <= 1e-5 dropped,
``s_on_V``, TIES masks from ``masking_ops.py`` over the flattened coordinates of *all* adapted layers, "mean"
merging) and ``configs/vitB_r16_knots_ties.py`` (topK 20, scaling 0.6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from omnimerge.methods.base import LowRank, Param, TensorContext, is_matrix, merge_method, scaling_param
from omnimerge.methods.linear import WEIGHT, weighted_sum
from omnimerge.methods.operators import dare_, disjoint_merge, trim_
from omnimerge.methods.spectral import thin_svd
from omnimerge.methods.ties import DENSITY, SEED, GlobalTiesPass

MERGE = Param(
    "merge",
    "ties",
    "how the aligned coordinates S V_t^T are merged: 'ties' (trim to the top density, elect signs, disjoint "
    "mean; the paper's KnOTS-TIES) or 'task_arithmetic' (weighted sum, no trimming)",
    str,
    choices=("ties", "task_arithmetic"),
)
CONCAT = Param(
    "concat_across_output",
    True,
    "true: SVD of [dW_1 ... dW_T] (out x T*in; shared output basis), false: of [dW_1^T ... dW_T^T]",
    bool,
)
GRANULARITY = Param(
    "granularity",
    "global",
    "TIES trimming threshold and majority sign over the coordinates of all merged parameters (the reference; "
    "needs three extra sweeps, each redoing the per-matrix SVD) or per tensor",
    str,
    choices=("global", "tensor"),
)
DROP_RATE = Param(
    "drop_rate", 0.0, "DARE on the aligned coordinates before merging (KnOTS-DARE-TIES); 0 = off", float,
    low=0.0, high=1.0, high_open=True,
)


def _drop_tolerance(s_max: float, dims: tuple[int, int], dtype: torch.dtype) -> float:
    """Singular values at or below this are rounding noise of the inputs (the reference drops s <= 1e-5,
    an absolute threshold that would also drop every direction of a small update)."""
    return s_max * math.sqrt(max(dims)) * torch.finfo(dtype).eps * 10.0


def shared_basis(
    task_vectors: Sequence[torch.Tensor],
    factors: Sequence[LowRank] | None,
    concat_across_output: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The shared basis U (d x k, float64) of the concatenated updates and each task's coordinates
    ``U^T X_t = S V_t^T`` (k x n, float64), where X_t = dW_t (``concat_across_output``) or dW_t^T.

    With exact LoRA factors for every task the SVD is that of the d x (sum r_t) matrix ``[s_t B_t R_t^T]``
    (``A_t^T = Q_t R_t``): the concatenation is that matrix times the orthonormal block-diagonal
    ``diag(Q_t^T)``, so both have the same U and S. Otherwise a thin SVD of the dense d x (T n) concatenation.
    """
    dtype = task_vectors[0].dtype
    if factors is not None:
        cols, parts = [], []
        for f in factors:
            B, A = f.B.to(torch.float64), f.A.to(torch.float64)
            if not concat_across_output:  # X_t = dW_t^T = s A^T B^T
                B, A = A.T, B.T
            _q, r = torch.linalg.qr(A.T)
            cols.append((B * f.scale) @ r.T)
            parts.append((B * f.scale, A))
        u, s, _ = thin_svd(torch.cat(cols, dim=1))
        d, n = parts[0][0].shape[0], parts[0][1].shape[1]
        dims = (d, n * len(parts))
    else:
        xs = [tv.to(torch.float64) if concat_across_output else tv.to(torch.float64).T for tv in task_vectors]
        u, s, _ = thin_svd(torch.cat(xs, dim=1))
        dims = (xs[0].shape[0], xs[0].shape[1] * len(xs))
    k = 0
    if s.numel() and float(s[0]) > 0.0:
        k = int((s > _drop_tolerance(float(s[0]), dims, dtype)).sum())
    u = u[:, :k]
    # (U^T (s B)) A: k x r times r x n, never the dense d x n product
    coords = [(u.T @ B) @ A for B, A in parts] if factors is not None else [u.T @ x for x in xs]
    return u, coords


def knots_threshold(coords: torch.Tensor, density: float) -> float | None:
    """The reference's trimming (``masking_ops.topk_values_mask``): keep |x| >= the (N - int(density N))-th
    smallest magnitude (omnimerge's ``ties`` uses the int((1 - density) N)-th, which can differ by one entry)."""
    n = coords.numel()
    k = n - int(n * density)
    if density >= 1.0 or k <= 0 or n == 0:
        return None
    return float(coords.abs().flatten().kthvalue(k).values)


def _all_factors(ctx: TensorContext, like: torch.Tensor) -> list[LowRank] | None:
    if not ctx.factors or any(f is None for f in ctx.factors):
        return None
    return [LowRank(f.B.to(like.device), f.A.to(like.device), f.scale) for f in ctx.factors if f is not None]


def _coordinates(
    task_vectors: Sequence[torch.Tensor], ctx: TensorContext, concat_across_output: bool
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(U, coordinates in the task vectors' dtype) for a matrix; (None, the task vectors) otherwise. Matrices:
    every 2-D tensor with LoRA factors for all experts; without factors, the 2-D tensors other than the lm_head
    (whose dense vocab x hidden concatenation would be costly to decompose)."""
    tv0 = task_vectors[0]
    factors = _all_factors(ctx, tv0) if tv0.dim() == 2 else None
    if factors is None and not is_matrix(ctx, tv0):
        return None, list(task_vectors)
    u, coords = shared_basis(task_vectors, factors, concat_across_output)
    return u, [c.to(tv0.dtype) for c in coords]


class KnotsGlobalPass(GlobalTiesPass):
    """Global TIES statistics (exact k-th magnitude per task, majority sign) over the aligned coordinates of all
    merged parameters, as the reference trims the flattened coordinates of every adapted layer at once.
    Parameters no expert changes are left out (the reference only sees adapted layers)."""

    def needed(self, params: Mapping[str, Any]) -> bool:
        return params.get("granularity") == "global" and params.get("merge") == "ties"

    def finish(self, p: int, state: Any) -> None:
        if p == 0 and state["n"]:
            # the reference's rank N - int(density N) as the int((1 - density') N) of the TIES pass
            n, density = state["n"], state["params"]["density"]
            if density < 1.0:
                state["params"] = {**state["params"], "density": (int(n * density) - 0.5) / n}
        super().finish(p, state)

    def update(self, p: int, state: Any, task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> None:
        if not any(bool(tv.any()) for tv in task_vectors):
            return
        _u, coords = _coordinates(task_vectors, ctx, state["params"]["concat_across_output"])
        if coords and coords[0].numel():
            super().update(p, state, coords, ctx)


@merge_method(
    "knots",
    params=[scaling_param(0.6), MERGE, DENSITY, GRANULARITY, DROP_RATE, SEED, CONCAT, WEIGHT],
    summary="KnOTS: SVD of the concatenated (LoRA) updates gives a shared basis; TIES or TA on the aligned "
    "coordinates; reconstruct.",
    paper="Stoica et al., Model merging with SVD to tie the KnOTS, ICLR 2025 (arXiv 2410.19735)",
    url="https://arxiv.org/abs/2410.19735",
    global_pass=KnotsGlobalPass(),
)
def knots(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    merge: str,
    density: float,
    granularity: str,
    drop_rate: float,
    seed: int,
    concat_across_output: bool,
    weight: Sequence[float],
) -> torch.Tensor:
    """KnOTS (Stoica et al., ICLR 2025, arXiv 2410.19735).

    For a weight matrix with updates dW_t (t = 1..T), X_t = dW_t (``concat_across_output: true``) or dW_t^T:

    1. Shared basis: thin SVD ``[X_1 ... X_T] = U S [V_1^T ... V_T^T]`` (float64); singular values at the
       rounding-noise level are dropped, leaving k directions. Task t's aligned coordinates are
       ``C_t = S V_t^T = U^T X_t`` (k x n).
    2. Optional DARE on every C_t (``drop_rate``, survivors x 1/(1-p), seeded per tensor).
    3. Merge the coordinates: ``ties`` (default): trim each C_t to its top-``density`` magnitudes (keep
       |x| >= the (N - int(density N))-th smallest, as the reference's ``topk_values_mask``), elect the sign
       of sum_t w_t C_t (zeros take the majority sign), mean of the agreeing entries; ``task_arithmetic``:
       sum_t w_t C_t (then KnOTS equals task arithmetic exactly, as U U^T X_t = X_t).
    4. Reconstruct ``dW = U C_merged`` (transposed back if needed); W = W0 + lambda dW.

    With ``granularity: global`` (default, as the reference) the TIES threshold of each task and the majority
    sign are taken over the coordinates of all merged parameters (three extra sweeps); ``tensor`` per matrix.
    LoRA experts give exact factors, and the SVD is then that of a d x (sum r_t) matrix (cheap). Full fine-tuned
    experts (or a mix) have no factors: the same algorithm runs on their dense deltas, with a thin SVD of the
    d x (T n) concatenation. Parameters that are not matrices (norms, biases), and a dense lm_head, are merged by
    the same TIES / task arithmetic on their raw task vectors (the reference folds biases into the matrix as an
    extra column and norms as diagonal matrices; here they are separate tensors).
    Defaults as the reference's ViT-B/32 config: density 0.2 (topK 20), lambda 0.6.
    """
    tv0 = task_vectors[0]
    if not any(bool(tv.any()) for tv in task_vectors):
        return torch.zeros_like(tv0)
    u, coords = _coordinates(task_vectors, ctx, concat_across_output)
    if u is not None and u.shape[1] == 0:
        return torch.zeros_like(tv0)
    if drop_rate > 0.0:
        coords = [dare_(c, drop_rate, ctx, i, seed=seed) for i, c in enumerate(coords)]
    if merge == "task_arithmetic":
        merged = weighted_sum(coords, weight)
    else:
        if granularity == "global" and ctx.stats is not None:
            thresholds = ctx.stats["threshold"]
            majority: float | None = ctx.stats["majority"]
        else:
            thresholds = [knots_threshold(c, density) for c in coords]
            majority = None
        trimmed = [trim_(c, th) for c, th in zip(coords, thresholds, strict=True)]
        merged = disjoint_merge(trimmed, weight, majority)
    if u is not None:
        out = u @ merged.to(torch.float64)
        if not concat_across_output:
            out = out.T
        merged = out.to(tv0.dtype)
    return merged.mul_(scaling).contiguous()
