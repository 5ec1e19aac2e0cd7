"""Optimisation-based and closed-form spectral methods: WUDI, OptMerge, SWUDI and ASWUDI.

All of them minimise (or filter the gradient flow of) the data-free interference loss of WUDI per 2-D
parameter::

    L(M) = sum_i || (M - T_i) P_i^T ||_F^2 / ||tau_i||_F^2

with target T_i and "input subspace" P_i: WUDI uses T_i = P_i = tau_i; OptMerge uses rank-r truncations.
L is a quadratic in M: with C = sum_i P_i^T P_i / n_i (n x n) and D = sum_i T_i P_i^T P_i / n_i (m x n),
n_i = ||tau_i||^2, its gradient is ``grad L = 2 (M C - D)`` and, with the stacked factors
F = [P_1/sqrt(n_1); ..] (K x n) and G = [T_1 P_1^T/sqrt(n_1), ..] (m x K), ``L = ||M F^T - G||^2``.

The references (MLLMerging ``wudi_merging``/``wudi_merging2``, FusionBench ``wudi_merge_v2``) differentiate
the m x m products (M - T_i) P_i^T with autograd, after building P_i as m x n matrices from
``full_matrices=True`` SVDs. Here each step costs one (m x n)(n x n) product or two (m x n)(n x K) ones,
whichever is cheaper, with the same Adam / SGD update (``torch.optim``, gradients set by hand), so the
trajectory is the reference's up to float round-off. See :class:`WudiProblem`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omnimerge.errors import MethodParameterError
from omnimerge.methods.base import (
    GlobalPass,
    Param,
    TensorContext,
    is_matrix,
    mean_of,
    merge_method,
)
from omnimerge.methods.spectral import (
    SVD_PARAMS,
    SvdOptions,
    all_factors,
    combine_factors,
    task_triplets,
    thin_svd,
    truncated_svd,
    upcast_half,
)

STEPS = Param("steps", 300, "optimisation steps (one optimiser per tensor, fresh state)", int, low=0)


# --- the quadratic problem --------------------------------------------------------------------------------


@dataclass
class WudiProblem:
    """The WUDI-type loss of one tensor, in the cheaper of two exact forms.

    ``gram`` form: C (n x n), D (m x n): grad = 2 (M C - D), L = <M C - 2 D, M> + const.
    ``factor`` form: F (K x n), G (m x K): R = M F^T - G, grad = 2 R F, L = ||R||^2.
    ``const`` = sum_i ||T_i P_i^T||^2 / n_i (only needed for loss values).
    """

    C: torch.Tensor | None = None
    D: torch.Tensor | None = None
    F: torch.Tensor | None = None
    G: torch.Tensor | None = None
    const: float = 0.0

    @property
    def form(self) -> str:
        return "factor" if self.F is not None else "gram"

    def grad(self, M: torch.Tensor, with_loss: bool = False) -> tuple[torch.Tensor, float | None]:
        """(grad L(M), L(M) if ``with_loss``)."""
        if self.F is not None:
            assert self.G is not None
            R = (M @ self.F.T).sub_(self.G)
            loss = float(R.square().sum()) if with_loss else None
            return (R @ self.F).mul_(2.0), loss
        assert self.C is not None and self.D is not None
        g = M @ self.C
        loss = None
        if with_loss:
            loss = float((g * M).sum() - 2.0 * (self.D * M).sum()) + self.const
        return g.sub_(self.D).mul_(2.0), loss

    def loss(self, M: torch.Tensor) -> float:
        return self.grad(M, with_loss=True)[1] or 0.0


def _use_factor_form(k: int, n: int) -> bool:
    # per step: factor form 2 m n k flops, gram form m n^2 flops
    return 2 * k < n


def problem_from_task_vectors(tvs: Sequence[torch.Tensor], norms: Sequence[float]) -> WudiProblem:
    """WUDI's loss (T_i = P_i = tau_i) from dense task vectors, without any m x m product of the large side.

    Gram form: C = sum tau_i^T tau_i / n_i, D = sum tau_i (tau_i^T tau_i) / n_i, computed through the Gram of
    the smaller side ((tau_i tau_i^T) tau_i when m < n). Factor form (when T m < n / 2): F = [tau_i / sqrt(n_i)]
    stacked, G = [tau_i tau_i^T / sqrt(n_i)] side by side (m x m Grams of the small side).
    """
    m, n = tvs[0].shape
    if _use_factor_form(len(tvs) * m, n):
        F = torch.cat([tv / math.sqrt(nn) for tv, nn in zip(tvs, norms, strict=True)], dim=0)
        G = torch.cat([(tv @ tv.T) / math.sqrt(nn) for tv, nn in zip(tvs, norms, strict=True)], dim=1)
        return WudiProblem(F=F, G=G, const=float(G.square().sum()))
    C = torch.zeros(n, n, dtype=tvs[0].dtype, device=tvs[0].device)
    D = torch.zeros_like(tvs[0])
    const = 0.0
    for tv, nn in zip(tvs, norms, strict=True):
        B = tv.T @ tv
        C.add_(B, alpha=1.0 / nn)
        if m < n:
            A = tv @ tv.T
            D.add_(A @ tv, alpha=1.0 / nn)
            const += float(A.square().sum()) / nn
        else:
            D.add_(tv @ B, alpha=1.0 / nn)
            const += float(B.square().sum()) / nn
    return WudiProblem(C=C, D=D, const=const)


def problem_from_factors(
    P: Sequence[torch.Tensor], H: Sequence[torch.Tensor], norms: Sequence[float]
) -> WudiProblem:
    """The loss from per-expert projector rows P_i (k_i x n) and target products H_i = T_i P_i^T (m x k_i)."""
    n = P[0].shape[1] if P else 0
    F = torch.cat([p / math.sqrt(nn) for p, nn in zip(P, norms, strict=True)], dim=0)
    G = torch.cat([h / math.sqrt(nn) for h, nn in zip(H, norms, strict=True)], dim=1)
    const = float(G.square().sum())
    if _use_factor_form(F.shape[0], n):
        return WudiProblem(F=F, G=G, const=const)
    return WudiProblem(C=F.T @ F, D=G @ F, const=const)


def optimise(
    M: torch.Tensor,
    problem: WudiProblem,
    *,
    optimizer: str,
    lr: float,
    steps: int,
    momentum: float = 0.9,
    record_loss: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Run ``steps`` iterations of Adam (torch defaults: betas 0.9/0.999, eps 1e-8) or SGD with momentum on
    ``M`` (updated in place) with the exact gradient of ``problem``; returns (M, loss history).

    The history holds L before each step and after the last one (``steps + 1`` values) when ``record_loss``.
    """
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([M], lr=lr)
    else:
        opt = torch.optim.SGD([M], lr=lr, momentum=momentum)
    losses: list[float] = []
    for _ in range(steps):
        g, loss = problem.grad(M, with_loss=record_loss)
        if loss is not None:
            losses.append(loss)
        M.grad = g
        opt.step()
        M.grad = None
    if record_loss:
        losses.append(problem.loss(M))
    return M, losses


def reference_loss(
    M: torch.Tensor,
    targets: Sequence[torch.Tensor],
    projectors: Sequence[torch.Tensor],
    norms: Sequence[float],
) -> float:
    """sum_i ||(M - T_i) P_i^T||^2 / n_i literally (m x k_i products): for tests and small checks only."""
    return float(
        sum(((M - t) @ p.T).square().sum() / nn for t, p, nn in zip(targets, projectors, norms, strict=True))
    )


def _sq_norms(tvs: Sequence[torch.Tensor]) -> list[float]:
    """||tau_i||^2 in the task vectors' dtype (at least float32, as the references)."""
    return [float(tv.to(torch.promote_types(tv.dtype, torch.float32)).square().sum()) for tv in tvs]


def _nonzero(tvs: Sequence[torch.Tensor], norms: Sequence[float]) -> list[int]:
    return [i for i, nn in enumerate(norms) if nn > 1e-30]


def _sum(tvs: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = tvs[0].clone()
    for tv in tvs[1:]:
        acc.add_(tv)
    return acc


# --- WUDI --------------------------------------------------------------------------------------------------


def wudi_merge(
    task_vectors: Sequence[torch.Tensor], steps: int, lr: float, record_loss: bool = False
) -> tuple[torch.Tensor, list[float]]:
    """WUDI's optimisation for one 2-D tensor (no scaling): Adam from the sum; returns (M, loss history)."""
    norms = _sq_norms(task_vectors)
    keep = _nonzero(task_vectors, norms)
    M = _sum(task_vectors)
    if not keep:
        return mean_of(task_vectors), []
    problem = problem_from_task_vectors([task_vectors[i] for i in keep], [norms[i] for i in keep])
    return optimise(M, problem, optimizer="adam", lr=lr, steps=steps, record_loss=record_loss)


@merge_method(
    "wudi",
    params=[
        Param(
            "scaling",
            0.3,
            "lambda: W = W0 + lambda * M. Default 0.3 as MLLMerging's baseline runner (the WUDI paper: 1.0)",
            float,
            low=0.0,
        ),
        STEPS,
        Param("lr", 1e-5, "Adam learning rate", float, low=0.0, low_open=True),
    ],
    summary="WUDI: Adam on sum_i ||(M - tau_i) tau_i^T||^2 / ||tau_i||^2 from the sum of task vectors.",
    paper="Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via "
    "Task Vectors, ICML 2025 (arXiv 2503.08099)",
    url="https://arxiv.org/abs/2503.08099",
)
@upcast_half
def wudi(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """WUDI merging (data-free, per linear layer).

    minimise L(M) = sum_i ||(M - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 with Adam (lr 1e-5, betas 0.9/0.999,
    eps 1e-8), ``steps`` = 300 iterations from M_0 = sum_i tau_i;  W = W0 + lambda M.
    Cheng et al., ICML 2025; MLLMerging ``baseline_merging.py:wudi_merging`` (the OptMerge paper's baseline).
    Computed exactly as grad L = 2 (M C - D), C = sum tau_i^T tau_i / n_i, D = sum tau_i tau_i^T tau_i / n_i
    (or the stacked-factor form when T m < n / 2): no m x m products. Experts with a zero task vector
    (0/0 terms) are left out of the loss. Non-matrix parameters and the lm_head: mean task vector.
    """
    if not is_matrix(ctx, task_vectors[0]):
        return mean_of(task_vectors).mul_(scaling)
    M, _ = wudi_merge(task_vectors, steps, lr)
    return M.mul_(scaling)


# --- OptMerge ----------------------------------------------------------------------------------------------

VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"scaling": 1.0, "lr": 1e-4, "optimizer": "sgd", "init": "mean"},
    "full": {"scaling": 0.1, "lr": 1e-5, "optimizer": "adam", "init": "sum"},
}


def optmerge_rank(min_dim: int, num_models: int, variant: str) -> int:
    """r = int(min(m, n) / T) for ``lora`` (Qwen2-VL script); max(1, min(m, n) // T) for ``full``."""
    if variant == "lora":
        return int(min_dim / num_models)
    return max(1, min_dim // num_models)


def optmerge_problem(
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    variant: str,
    opts: SvdOptions = SvdOptions(),
    keep: Sequence[int] | None = None,
    keep_dense: bool = False,
) -> tuple[WudiProblem, list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Build OptMerge's loss for one tensor: (problem, targets' low-rank pieces, projectors, norms).

    Variant ``lora`` (A): T_i = P-truncation of tau_i: with tau_i ~ U_r S_r V_r^T, P_i = S_r V_r^T (r x n) and
    T_i P_i^T = U_r S_r^2 (m x r).  Variant ``full`` (B): P_i as in A (from the raw tau_i), target
    T_i = trunc_r(tau_i - mean) + mean, so T_i P_i^T = U'_r S'_r (V'_r^T P_i^T) + mean P_i^T.
    The dense m x n targets T_i are built only with ``keep_dense`` (the float16 loop and tests need them).
    """
    T = len(task_vectors)
    m, n = task_vectors[0].shape
    r = optmerge_rank(min(m, n), T, variant)
    norms = _sq_norms(task_vectors)
    idx = list(keep) if keep is not None else _nonzero(task_vectors, norms)
    gen = ctx.generator(task_vectors[0].device) if opts.method == "randomized" else None
    factors = all_factors(ctx)
    mean = mean_of(task_vectors) if variant == "full" else None
    P: list[torch.Tensor] = []
    H: list[torch.Tensor] = []
    dense_targets: list[torch.Tensor] = []
    for i in idx:
        u, s, vh = task_triplets(i, task_vectors[i], ctx, r, opts, gen)
        p = vh * s[:, None]
        if variant == "lora":
            h = u * s.square()
            if keep_dense:
                dense_targets.append((u * s) @ vh)
        else:
            assert mean is not None
            if factors is not None:
                coeffs = [-1.0 / T] * T
                coeffs[i] += 1.0
                uc, sc, vhc = combine_factors(factors, coeffs, task_vectors[0]).svd()
                uc, sc, vhc = uc[:, :r], sc[:r], vhc[:r]
            else:
                uc, sc, vhc = truncated_svd(task_vectors[i] - mean, r, opts, gen)
            h = (uc * sc) @ (vhc @ p.T) + mean @ p.T
            if keep_dense:
                dense_targets.append((uc * sc) @ vhc + mean)
        P.append(p)
        H.append(h)
    kept_norms = [norms[i] for i in idx]
    return problem_from_factors(P, H, kept_norms), dense_targets, P, kept_norms


def _optmerge_fp16(
    M0: torch.Tensor,
    targets: Sequence[torch.Tensor],
    projectors: Sequence[torch.Tensor],
    norms: Sequence[float],
    *,
    optimizer: str,
    lr: float,
    steps: int,
) -> torch.Tensor:
    """The reference's half-precision loop (variant A on fp16 experts): autograd of
    sum_i sum(((M - T_i) P_i^T)^2 / n_i) with every tensor, the norms included, in float16 (r x n projectors
    instead of the reference's zero-padded m x n ones: the same products without the zero columns)."""
    half = torch.float16
    Ts = torch.stack([t.to(half) for t in targets])
    rmax = max(p.shape[0] for p in projectors)
    Ps = torch.stack([torch.nn.functional.pad(p, (0, 0, 0, rmax - p.shape[0])).to(half) for p in projectors])
    ns = torch.tensor(list(norms), dtype=torch.float32, device=M0.device).to(half)
    M = torch.nn.Parameter(M0.to(half))
    opt: torch.optim.Optimizer = (
        torch.optim.SGD([M], lr=lr, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam([M], lr=lr)
    )
    for _ in range(steps):
        inner = torch.matmul(M.unsqueeze(0) - Ts, Ps.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / ns[:, None, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return M.detach()


def lowrank_energy(tv: torch.Tensor, k: int, generator: torch.Generator | None = None) -> float | None:
    """Estimated share of ||tv||^2 in its top ~k singular directions (randomized range finder, k + 8 columns,
    2 power iterations; exact singular values when the matrix is small): close to 1 for LoRA-style
    (low-rank) deltas, well below for full fine-tuning ones. None when k >= min(m, n) or tv = 0."""
    x = tv.to(torch.promote_types(tv.dtype, torch.float32))
    total = float(x.square().sum())
    m, n = tv.shape
    q = k + 8
    if total <= 0.0 or k >= min(m, n):
        return None
    if q >= min(m, n):
        return float(torch.linalg.svdvals(x)[:k].square().sum()) / total
    omega = torch.randn(n, q, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
    qm, _ = torch.linalg.qr(x @ omega)
    for _ in range(2):
        qn, _ = torch.linalg.qr(x.T @ qm)
        qm, _ = torch.linalg.qr(x @ qn)
    return float((qm.T @ x).square().sum()) / total


AUTO_MATRICES = 4
AUTO_ENERGY = 0.99


def auto_rank_probe(min_dim: int) -> int:
    """k for :func:`lowrank_energy` in ``variant: auto``: max(8, min(m, n) // 8)."""
    return max(8, min_dim // 8)


def probe_energy(task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> float | None:
    """Smallest top-k energy share over the experts of one tensor (None: too small to tell)."""
    k = auto_rank_probe(min(task_vectors[0].shape))
    gen = ctx.generator(task_vectors[0].device)
    shares = [lowrank_energy(tv, k, gen) for tv in task_vectors]
    known = [e for e in shares if e is not None]
    return min(known) if known else None


def decide_variant(task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> tuple[str, str]:
    """('lora' | 'full', why) from one tensor (the fallback when no global pass ran)."""
    if all_factors(ctx) is not None:
        return "lora", "the inputs are LoRA adapters"
    e = probe_energy(task_vectors, ctx)
    if e is None:
        return "full", "matrix too small to probe"
    ctx.info["optmerge_energy"] = e
    return ("lora" if e >= AUTO_ENERGY else "full"), "from the tensor's own spectrum"


class OptMergeAutoPass(GlobalPass):
    """``variant: auto``: one cheap sweep decides lora/full for the whole model.

    LoRA inputs (exact factors given) -> lora. Dense inputs: the first ``AUTO_MATRICES`` 2-D matrices are
    probed with a randomized estimate of the share of each expert's ||tau||^2 in its top max(8, min(m,n)/8)
    singular directions; lora when the smallest share is >= 0.99 (rank-deficient deltas), full otherwise.
    """

    passes = 1

    def needed(self, params: Mapping[str, Any]) -> bool:
        return params.get("variant") == "auto"

    def init(self, num_models: int, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"factors": False, "probed": 0, "energy": []}

    def update(self, p: int, state: Any, task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> None:
        if state["factors"]:
            return
        if all_factors(ctx) is not None:
            state["factors"] = True
            return
        if state["probed"] >= AUTO_MATRICES or not is_matrix(ctx, task_vectors[0]):
            return
        e = probe_energy(task_vectors, ctx)
        if e is not None:
            state["probed"] += 1
            state["energy"].append(e)

    def result(self, state: Any) -> dict[str, Any]:
        if state["factors"]:
            return {"variant": "lora", "reason": "the inputs are LoRA adapters"}
        if not state["energy"]:
            return {"variant": "full", "reason": "no 2-D matrix large enough to probe"}
        e = min(state["energy"])
        v = "lora" if e >= AUTO_ENERGY else "full"
        how = "low-rank" if v == "lora" else "not low-rank"
        return {
            "variant": v,
            "reason": f"dense deltas are {how} (top-k energy share {e:.4f}, {len(state['energy'])} matrices)",
        }


@merge_method(
    "optmerge",
    params=[
        Param(
            "variant",
            "auto",
            "'lora' (variant A, the paper's Qwen2-VL/LoRA branch), 'full' (variant B, its InternVL/full "
            "fine-tuning branch) or 'auto' (lora for LoRA adapters or low-rank dense deltas, else full)",
            str,
            choices=("lora", "full", "auto"),
        ),
        Param(
            "scaling",
            None,
            "lambda: W = W0 + lambda * M. null = the variant's default: 1.0 for lora, 0.1 for full (the "
            "original scripts' defaults)",
            float,
            low=0.0,
            nullable=True,
        ),
        Param(
            "lr",
            None,
            "learning rate; null = the variant's: 1e-4 (SGD, lora), 1e-5 (Adam, full)",
            float,
            low=0.0,
            low_open=True,
            nullable=True,
        ),
        STEPS,
        Param(
            "compute_dtype",
            "float32",
            "dtype of the optimisation loop: float32, or float16 to reproduce the paper's half-precision "
            "loop of variant A (experts stored in fp16)",
            str,
            choices=("float32", "float16"),
        ),
        *SVD_PARAMS,
    ],
    summary="OptMerge: WUDI's loss on rank-r truncated task vectors (SGD + mean init: LoRA; Adam: full FT).",
    paper="Wei et al., OptMerge: Unifying Multimodal LLM Capabilities and Modalities via Model Merging, "
    "ICLR 2026 (arXiv 2505.19892)",
    url="https://arxiv.org/abs/2505.19892",
    global_pass=OptMergeAutoPass(),
)
@upcast_half
def optmerge(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    variant: str,
    scaling: float | None,
    lr: float | None,
    steps: int,
    compute_dtype: str,
    svd: str,
    svd_oversample: int,
    svd_power_iters: int,
) -> torch.Tensor:
    """OptMerge (code name wudi2).

    minimise L(M) = sum_i ||(M - T_i) P_i^T||_F^2 / ||tau_i||_F^2 over ``steps`` = 300 iterations, with
    tau_i = U S V^T truncated to r triplets and P_i = S_r V_r^T (the "input subspace"), ||tau_i|| untruncated:
      * ``lora`` (variant A, Qwen2-VL: MLLMerging ``run_merge_wudi2.py``, ``model_merging.py:wudi_merging2``):
        r = int(min(m, n) / T), T_i = U_r S_r V_r^T (raw truncation), M_0 = mean_i tau_i,
        SGD(lr 1e-4, momentum 0.9), lambda = 1.0;
      * ``full`` (variant B, InternVL script / FusionBench ``wudi_merge_v2``): r = max(1, min(m, n) // T),
        T_i = trunc_r(tau_i - tau_bar) + tau_bar (centred target), P_i from the raw tau_i, M_0 = sum_i tau_i,
        Adam(lr 1e-5), lambda = 0.1;
      * ``auto``: lora for LoRA adapters or low-rank dense deltas, else full, decided once for the model.
    W = W0 + lambda M.  Wei et al., ICLR 2026.
    Computed as ||(M - T_i) V_r S_r||^2 (n x r factors; or the n x n C = sum P_i^T P_i / n_i when cheaper),
    never the reference's m x m products or full_matrices SVDs. Non-matrix parameters: mean task vector.
    """
    if variant == "auto":
        stats = ctx.stats
        if isinstance(stats, Mapping) and stats.get("variant") in ("lora", "full"):
            variant = str(stats["variant"])
            ctx.log(f"optmerge: variant auto -> {variant} ({stats.get('reason', '')})")
        elif is_matrix(ctx, task_vectors[0]):
            variant, why = decide_variant(task_vectors, ctx)
            ctx.log(f"optmerge: variant auto -> {variant} (decided per tensor: {why})")
        else:  # no global pass ran and nothing to probe: LoRA factors say lora, else full
            variant = "lora" if all_factors(ctx) is not None else "full"
    defaults = VARIANT_DEFAULTS[variant]
    lam = defaults["scaling"] if scaling is None else scaling
    rate = defaults["lr"] if lr is None else lr
    if not is_matrix(ctx, task_vectors[0]):
        return mean_of(task_vectors).mul_(lam)
    M, _ = optmerge_merge(
        task_vectors,
        ctx,
        variant,
        steps=steps,
        lr=rate,
        compute_dtype=compute_dtype,
        opts=SvdOptions(svd, svd_oversample, svd_power_iters),
    )
    return M.mul_(lam)


def optmerge_merge(
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    variant: str,
    *,
    steps: int = 300,
    lr: float | None = None,
    compute_dtype: str = "float32",
    opts: SvdOptions = SvdOptions(),
    record_loss: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """OptMerge's optimisation for one 2-D tensor (no scaling); returns (M, loss history)."""
    d = VARIANT_DEFAULTS[variant]
    rate = d["lr"] if lr is None else lr
    norms = _sq_norms(task_vectors)
    keep = _nonzero(task_vectors, norms)
    if not keep:
        return mean_of(task_vectors), []
    M = mean_of(task_vectors) if d["init"] == "mean" else _sum(task_vectors)
    if compute_dtype == "float16":
        _, targets, P, kept = optmerge_problem(task_vectors, ctx, variant, opts, keep, keep_dense=True)
        out = _optmerge_fp16(M, targets, P, kept, optimizer=d["optimizer"], lr=rate, steps=steps)
        return out.to(task_vectors[0].dtype), []
    problem, _, _, _ = optmerge_problem(task_vectors, ctx, variant, opts, keep)
    return optimise(M, problem, optimizer=d["optimizer"], lr=rate, steps=steps, record_loss=record_loss)


# --- SWUDI / ASWUDI (closed form) --------------------------------------------------------------------------

MIN_EIGENVALUE = 1e-8


@dataclass
class Spectrum:
    """Eigen-pairs of C = sum tau_i^T tau_i / n_i on its range, descending, with D V and the full-length
    eigenvalue list (structural zeros appended, clamped to 1e-8 as the reference's)."""

    lam: torch.Tensor  # (K,) descending, clamped
    V: torch.Tensor  # (n, K)
    DV: torch.Tensor  # (m, K)
    lam_full: torch.Tensor  # (n,) descending, clamped


def wudi_spectrum(tvs: Sequence[torch.Tensor], norms: Sequence[float]) -> Spectrum:
    """Eigen-decomposition of WUDI's C and the projection D V, without n x n work when T m <= n / 2.

    T m > n / 2: C and D are formed (small-side Grams) and C is diagonalised by ``eigh``, as the reference.
    T m <= n / 2: C = X^T X with X = [tau_i / sqrt(n_i)] (T m x n), so its eigen-pairs come from the economy
    SVD of X (rank <= T m, cheaper than an n x n ``eigh`` when T m is well below n); the other n - T m
    eigenvalues are exactly 0 and their directions carry neither theta_0 nor D (both have rows in the span
    of the tau_i), so they drop out of the filter formula.
    """
    m, n = tvs[0].shape
    T = len(tvs)
    D = torch.zeros_like(tvs[0])
    for tv, nn in zip(tvs, norms, strict=True):
        if m < n:
            D.add_((tv @ tv.T) @ tv, alpha=1.0 / nn)
        else:
            D.add_(tv @ (tv.T @ tv), alpha=1.0 / nn)
    if 2 * T * m > n:
        C = torch.zeros(n, n, dtype=tvs[0].dtype, device=tvs[0].device)
        for tv, nn in zip(tvs, norms, strict=True):
            C.add_(tv.T @ tv, alpha=1.0 / nn)
        lam, V = torch.linalg.eigh(C)
        lam, V = lam.flip(0).clamp(min=MIN_EIGENVALUE), V.flip(1)
        return Spectrum(lam, V, D @ V, lam)
    X = torch.cat([tv / math.sqrt(nn) for tv, nn in zip(tvs, norms, strict=True)], dim=0)
    _, s, vh = thin_svd(X)
    del X
    lam = s.square().clamp(min=MIN_EIGENVALUE)
    V = vh.T
    full = torch.cat(
        [lam, torch.full((n - lam.shape[0],), MIN_EIGENVALUE, dtype=lam.dtype, device=lam.device)]
    )
    return Spectrum(lam, V, D @ V, full)


def spectral_solution(
    tvs: Sequence[torch.Tensor], spec: Spectrum, f: torch.Tensor, init: str
) -> torch.Tensor:
    """theta = theta_0 - theta_0 V diag(f) V^T + D V diag(f / lambda) V^T, over the directions with f != 0."""
    sel = torch.nonzero(f[: spec.lam.shape[0]] != 0).flatten()
    V = spec.V[:, sel]
    fk = f[sel]
    lam = spec.lam[sel]
    theta = (spec.DV[:, sel] * (fk / lam)) @ V.T
    if init != "zero":
        t0 = _sum(tvs)
        if init == "mean":
            t0.div_(len(tvs))
        theta.add_(t0).sub_(((t0 @ V) * fk) @ V.T)
    return theta


INIT = Param(
    "init",
    "sum",
    "theta_0: 'sum' of the task vectors (WUDI-compatible), 'mean', or 'zero' (pure filtered closed form)",
    str,
    choices=("sum", "mean", "zero"),
)
FILTER = Param(
    "filter",
    "exponential",
    "spectral filter on the kept eigen-directions: 'exponential' f = 1 - exp(-lambda t) (gradient flow for "
    "time t), or 'none' (f = 1: the truncated closed form D C_K^+)",
    str,
    choices=("exponential", "none"),
)
SWUDI_SCALING = Param(
    "scaling",
    0.2,
    "lambda: W = W0 + lambda * theta. Default 0.2, the MLLMerging README's Qwen2-VL recipe (about 1/T for "
    "the sum initialisation; its InternVL recipe uses 0.1; the functions' own default is 1.0)",
    float,
    low=0.0,
)


def _swudi_input(task_vectors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
    norms = _sq_norms(task_vectors)
    keep = _nonzero(task_vectors, norms)
    return [task_vectors[i] for i in keep], [norms[i] for i in keep]


@merge_method(
    "swudi",
    params=[
        SWUDI_SCALING,
        Param("exp_time", 300.0, "t of the exponential filter 1 - exp(-lambda t)", float, low=0.0),
        Param(
            "truncate_rank_ratio",
            0.65,
            "keep the top ceil(n * ratio) eigen-directions of C (others f = 0); null keeps all (IWUDI)",
            float,
            low=0.0,
            high=1.0,
            low_open=True,
            nullable=True,
        ),
        Param(
            "filter",
            "exponential",
            FILTER.doc,
            str,
            choices=("exponential", "none"),
        ),
        INIT,
    ],
    summary="SWUDI: closed-form WUDI gradient flow (exponential spectral filter) with hard top-K truncation.",
    paper="Wei et al., Closed-Form Spectral Regularization for Multi-Task Model Merging (MLLMerging "
    "follow-up; code: MLLMerging fusion_bench/.../yongxianwei_merging/functional.py:swudi_merge)",
    url="https://github.com/WalkerWorldPeace/MLLMerging",
)
@upcast_half
def swudi(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    exp_time: float,
    truncate_rank_ratio: float | None,
    filter: str,
    init: str,
) -> torch.Tensor:
    """SWUDI (spectral WUDI), closed form.

    C = sum_i tau_i^T tau_i / ||tau_i||^2 = V diag(lambda) V^T (lambda clamped at 1e-8),
    D = sum_i tau_i tau_i^T tau_i / ||tau_i||^2;  f(lambda) = 1 - exp(-lambda t) (``filter: exponential``, the
    gradient flow of WUDI's loss for time t) or 1 (``none``), times a mask keeping the top
    K = ceil(n * truncate_rank_ratio) eigen-directions;
    theta = theta_0 - theta_0 V diag(f) V^T + D V diag(f / lambda) V^T with theta_0 = sum_i tau_i;
    W = W0 + lambda_scale theta.  MLLMerging ``swudi_aswudi.py:swudi_merge`` (defaults of ``run_merge.py``:
    t = 300, ratio 0.65). When T m <= n / 2 the eigen-pairs come from an SVD of the stacked task vectors
    (exact).
    Non-matrix parameters and the lm_head: mean task vector.
    """
    if not is_matrix(ctx, task_vectors[0]):
        return mean_of(task_vectors).mul_(scaling)
    tvs, norms = _swudi_input(task_vectors)
    if not tvs:
        return mean_of(task_vectors).mul_(scaling)
    spec = wudi_spectrum(tvs, norms)
    n = spec.lam_full.shape[0]
    lam = spec.lam_full
    f = torch.ones_like(lam) if filter == "none" else 1.0 - torch.exp(-lam * float(exp_time))
    if truncate_rank_ratio is not None:
        top = max(1, int((n * truncate_rank_ratio + 0.999) // 1))
        f[top:] = 0.0
    return spectral_solution(tvs, spec, f, init).mul_(scaling)


def aswudi_rank(lam_desc: torch.Tensor, m: int, n: int, rule: str, cumvar_fraction: float = 0.95) -> int:
    """Per-layer rank K from the descending (clamped) eigenvalues of C, as MLLMerging ``_aswudi_pick_rank``.

    participation_sqrt: ceil((sum sqrt(l))^2 / sum l); participation: ceil((sum l)^2 / sum l^2);
    entropy: ceil(exp(H(l / sum l))); stable_rank: ceil(sum l^2 / l_max^2); gavish_donoho: singular-value hard
    threshold of Gavish & Donoho (2014) on sqrt(l); cumvar: smallest K with top-K share >= cumvar_fraction;
    none: n.
    """
    lam = lam_desc
    if rule == "none":
        return lam.numel()
    if rule == "stable_rank":
        return int(torch.ceil((lam * lam).sum() / lam[0].square().clamp(min=1e-30)).item())
    if rule == "entropy":
        p = (lam / lam.sum().clamp(min=1e-30)).clamp(min=1e-30)
        return int(torch.ceil((-(p * p.log()).sum()).exp()).item())
    if rule == "participation":
        return int(torch.ceil(lam.sum().square() / (lam * lam).sum().clamp(min=1e-30)).item())
    if rule == "participation_sqrt":
        y = lam.sqrt()
        return int(torch.ceil(y.sum().square() / (y * y).sum().clamp(min=1e-30)).item())
    if rule == "cumvar":
        cum = lam.cumsum(0) / lam.sum().clamp(min=1e-30)
        return int((cum < cumvar_fraction).sum().item()) + 1
    if rule == "gavish_donoho":
        beta = float(min(m, n)) / float(max(m, n))
        y = lam.sqrt()
        y_med = float(y.median().clamp(min=1e-30))
        mu_beta = max((1.0 - beta) ** 2 + beta, 1e-3) ** 0.5 if beta < 0.9999 else (2.0 + 3.0**0.5) ** 0.5
        coef = (
            (2.0 * (beta + 1.0)) + (8.0 * beta) / ((beta + 1.0) + (beta * beta + 14.0 * beta + 1.0) ** 0.5)
        ) ** 0.5
        omega = coef / max(mu_beta, 1e-3)
        return max(1, int((y > omega * y_med).sum().item()))
    raise MethodParameterError(f"parameters: 'rank_rule' {rule!r} is not known")


@merge_method(
    "aswudi",
    params=[
        SWUDI_SCALING,
        Param(
            "rank_rule",
            "participation_sqrt",
            "per-layer data-free rank K from the spectrum of C (see the method's doc)",
            str,
            choices=(
                "participation_sqrt",
                "participation",
                "entropy",
                "stable_rank",
                "gavish_donoho",
                "cumvar",
                "none",
            ),
        ),
        Param(
            "cumvar_fraction",
            0.95,
            "rank_rule: cumvar: share of sum(lambda) kept",
            float,
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        Param("min_rank", 1, "lower bound of K", int, low=0),
        Param(
            "max_rank_ratio", 1.0, "upper bound of K as a share of n", float, low=0.0, high=1.0, low_open=True
        ),
        Param(
            "rank_scale",
            1.0,
            "multiplies the chosen K (then clamped to [min_rank, n])",
            float,
            low=0.0,
            low_open=True,
        ),
        Param(
            "filter",
            "none",
            FILTER.doc,
            str,
            choices=("exponential", "none"),
        ),
        Param("exp_time", 1e6, "filter: exponential: t", float, low=0.0),
        INIT,
    ],
    summary="ASWUDI: SWUDI's truncated closed form with a data-free per-layer rank from the spectrum of C.",
    paper="Wei et al., Closed-Form Spectral Regularization for Multi-Task Model Merging (MLLMerging "
    "follow-up; code: MLLMerging fusion_bench/.../yongxianwei_merging/functional.py:aswudi_merge)",
    url="https://github.com/WalkerWorldPeace/MLLMerging",
)
@upcast_half
def aswudi(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    rank_rule: str,
    cumvar_fraction: float,
    min_rank: int,
    max_rank_ratio: float,
    rank_scale: float,
    filter: str,
    exp_time: float,
    init: str,
) -> torch.Tensor:
    """ASWUDI (adaptive SWUDI), closed form.

    As SWUDI (C = V diag(lambda) V^T, D, theta_0 = sum_i tau_i), with the kept rank chosen per layer from the
    eigenvalues of C: default K = ceil((sum_k sqrt(lambda_k))^2 / sum_k lambda_k) (participation ratio of
    sqrt(lambda), over all n eigenvalues clamped at 1e-8), clamped to [min_rank, round(max_rank_ratio n)],
    times ``rank_scale``; f = 1 on the top K (``filter: none``: theta = theta_0 (I - V_K V_K^T) + D V_K
    diag(1/lambda) V_K^T) or 1 - exp(-lambda t);  W = W0 + lambda_scale theta.
    MLLMerging ``swudi_aswudi.py:aswudi_merge``. Non-matrix parameters and the lm_head: mean task vector.
    """
    if not is_matrix(ctx, task_vectors[0]):
        return mean_of(task_vectors).mul_(scaling)
    tvs, norms = _swudi_input(task_vectors)
    if not tvs:
        return mean_of(task_vectors).mul_(scaling)
    m, n = tvs[0].shape
    spec = wudi_spectrum(tvs, norms)
    lam = spec.lam_full
    K = aswudi_rank(lam, m, n, rank_rule, cumvar_fraction)
    K = max(min_rank, min(K, max(min_rank, int(round(max_rank_ratio * n)))))
    if abs(rank_scale - 1.0) > 1e-8:
        K = max(min_rank, min(n, int(round(K * rank_scale))))
    ctx.info["aswudi_rank"] = K
    f = torch.zeros_like(lam)
    if K > 0:
        f[:K] = 1.0 if filter == "none" else (1.0 - torch.exp(-lam[:K] * float(exp_time))).clamp(0.0, 1.0)
    return spectral_solution(tvs, spec, f, init).mul_(scaling)


__all__ = [
    "OptMergeAutoPass",
    "WudiProblem",
    "aswudi",
    "aswudi_rank",
    "decide_variant",
    "lowrank_energy",
    "optimise",
    "optmerge",
    "optmerge_merge",
    "optmerge_problem",
    "optmerge_rank",
    "problem_from_factors",
    "problem_from_task_vectors",
    "reference_loss",
    "spectral_solution",
    "swudi",
    "wudi",
    "wudi_merge",
    "wudi_spectrum",
]
