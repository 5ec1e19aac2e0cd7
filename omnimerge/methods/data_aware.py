"""Data-aware methods that read per-expert statistics: RegMean (input Grams) and Fisher-weighted averaging.

The statistics come from ``models[i].statistics`` (safetensors files, see
:mod:`omnimerge.checkpoint.statistics`; collected by ``omnimerge stats``); the engine checks them against the
plan before any work (kind, presence, shapes, the digest of the weights they were collected on) and hands each
tensor's statistic to the method as ``ctx.statistics``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from omnimerge.errors import MethodParameterError
from omnimerge.methods.base import GlobalPass, Param, Statistics, TensorContext, merge_method, scaling_param
from omnimerge.methods.linear import WEIGHT

# --- RegMean -----------------------------------------------------------------------------------------------------


def _gram_shape(name: str, shape: tuple[int, ...], component: str) -> tuple[int, ...] | None:
    """A linear weight (out, in) takes an (in, in) Gram; embeddings (token, position, patch: the component, or
    'embed' in the name, as a vision tower's position embedding) and every non-2-D tensor take none."""
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if len(shape) != 2 or component == "embedding" or "embed" in module:
        return None
    return (shape[1], shape[1])


class _Factors:
    """Cholesky factors of summed reduced Grams, shared by the tensors of one input site (q/k/v, gate/up: their
    Grams are the same matrix, so their sums are the same bytes). Keyed by the sum's bytes; the last few are
    kept (the plan runs a layer's tensors one after another)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.lock = threading.Lock()
        self.items: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor, str | None]] = OrderedDict()

    @staticmethod
    def key(s: torch.Tensor) -> bytes:
        import xxhash

        return xxhash.xxh3_128(s.contiguous().cpu().numpy().tobytes()).digest() + bytes(str(tuple(s.shape)), "ascii")

    def get(self, k: bytes, s: torch.Tensor) -> tuple[torch.Tensor, str | None] | None:
        with self.lock:
            hit = self.items.get(k)
            if hit is None or not torch.equal(hit[0], s):
                return None
            self.items.move_to_end(k)
            return hit[1], hit[2]

    def put(self, k: bytes, s: torch.Tensor, factor: torch.Tensor, note: str | None) -> None:
        with self.lock:
            self.items[k] = (s, factor, note)
            while len(self.items) > self.keep:
                self.items.popitem(last=False)


class _FactorCachePass(GlobalPass):
    """No sweep: gives each run a fresh factor cache (as ``ctx.stats``)."""

    passes = 0
    reads_tensors = False

    def init(self, num_models: int, params: Mapping[str, Any]) -> Any:
        return _Factors()

    def update(self, p: int, state: Any, task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> None:
        return None


def reduced_gram(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries multiplied by α, the diagonal kept."""
    if alpha == 1.0:
        return g
    d = torch.diagonal(g).clone()
    out = g * alpha
    out.diagonal().copy_(d)
    return out


def cholesky_with_fallback(s: torch.Tensor, max_condition: float, ridge: float) -> tuple[torch.Tensor, str | None]:
    """The lower Cholesky factor of the symmetric ``s`` (float64), and None; or, where ``s`` is not positive
    definite or its condition number exceeds ``max_condition`` (estimated from the factor's diagonal:
    (max L_ii / min L_ii)², a lower bound), the factor of s + ε·mean(diag s)·I, ε = ``ridge`` × 10^k for the
    smallest k ≥ 0 that passes, and a note saying so. Raises ValueError where diag s is all zero."""
    def factor(m: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        chol, info = torch.linalg.cholesky_ex(m)
        if int(info) != 0:
            return None, math.inf
        d = torch.diagonal(chol)
        lo = float(d.min())
        return chol, (float(d.max()) / lo) ** 2 if lo > 0 else math.inf

    chol, cond = factor(s)
    if chol is not None and cond <= max_condition:
        return chol, None
    scale = float(torch.diagonal(s).mean())
    if not scale > 0:
        raise ValueError("the summed Gram is zero")
    why = "not positive definite" if chol is None else f"ill-conditioned (condition number >= {cond:.3g})"
    eps = ridge
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    for _ in range(12):
        chol, cond2 = factor(s + (eps * scale) * eye)
        if chol is not None and cond2 <= max_condition:
            return chol, (f"the summed reduced Gram is {why}; solved with the ridge fallback "
                          f"+ {eps:g}·mean(diag)·I")
        eps *= 10
    raise ValueError(f"the summed reduced Gram is {why} even with a ridge of {eps / 10:g}·mean(diag)")


def _regmean_check(params: Mapping[str, Any]) -> None:
    if params["ridge"] <= 0:
        raise MethodParameterError(f"parameters: 'ridge' of regmean must be positive, got {params['ridge']!r}")


@merge_method(
    "regmean",
    params=[
        Param("reduce_non_diagonal_ratio", 0.6, "alpha: off-diagonal entries of each Gram multiplied by alpha "
              "(1: exact RegMean; 0: a per-input-feature weighted average)", float, low=0.0, high=1.0),
        Param("max_condition", 1e8, "the largest condition number of the summed reduced Gram solved as is "
              "(estimated from its Cholesky factor); above it, or if it is not positive definite, the ridge "
              "fallback is taken and stated in the run's notes", float, low=1.0),
        Param("ridge", 1e-6, "the fallback's first ridge, relative to mean(diag(sum G~)); multiplied by 10 until "
              "the condition holds", float, low=0.0, low_open=True),
        scaling_param(1.0),
    ],
    summary="RegMean: per linear layer, W = (sum_t W_t G~_t)(sum_t G~_t)^-1 from the experts' input Grams.",
    paper="Jin, Ren, Preotiuc-Pietro, Cheng, Dataless Knowledge Fusion by Merging Weights of Language Models, "
          "ICLR 2023 (arXiv 2212.09849)",
    url="https://arxiv.org/abs/2212.09849",
    global_pass=_FactorCachePass(),
    statistics=Statistics("regmean_gram", _gram_shape),
    check=_regmean_check,
)
def regmean(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
            reduce_non_diagonal_ratio: float, max_condition: float, ridge: float, scaling: float) -> torch.Tensor:
    """Math (Jin et al. 2023, eq. 2; FusionBench ``merging_with_regmean_weights``): for a linear weight
    W ∈ ℝ^{out×in} and expert Grams G_t = X_tᵀX_t / N_t (X_t the N_t × in inputs of that layer on expert t's own
    data), G̃_t = α G_t + (1 − α) diag(G_t) and

        W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹,

    the minimiser of Σ_t ‖X_t W*ᵀ − X_t W_tᵀ‖² (for α = 1). The base cancels: the delta returned is
    λ · (Σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹ (λ = ``scaling``, 1 by default: W* itself). The Grams are used as stored (a
    per-expert scalar on G_t changes the result: per-token means weigh the tasks equally).

    Solve: in float64, one Cholesky factorisation of Σ G̃_t per input site (the tensors that share an input,
    q/k/v and gate/up, share the factor), then a triangular solve for the tensor's rows. Where the sum is not
    positive definite or its condition number exceeds ``max_condition``, the ridge fallback
    Σ G̃_t + ε·mean(diag)·I is solved instead and the run's notes say so for that tensor. Where every Gram is
    zero (no input ever reached the layer) the tensor takes the plain average of the task vectors, also noted.

    Tensors without a Gram: non-linear parameters (norms, biases, every non-2-D tensor) and embeddings take no
    Gram and **stay at the base** when selected (as the golden cases do: every unmerged tensor equals the
    base). FusionBench instead **averages** them (``merging_with_regmean_weights`` averages every parameter
    without a Gram) and hooks every ``nn.Linear`` including ``lm_head``; MergeBench keeps embeddings and
    ``lm_head`` unmerged. A selected linear weight whose Gram is missing from a statistics file is an error
    before any work.
    """
    grams = ctx.statistics
    if grams is None or base.dim() != 2 or any(g is None for g in grams):
        if grams is not None and base.dim() == 2 and any(g is not None for g in grams):
            raise MethodParameterError(f"regmean: tensor '{ctx.name}': some experts have a Gram for it, others not")
        ctx.log(f"regmean: tensors without an input Gram (non-linear parameters, embeddings) stay at the base, "
                f"e.g. '{ctx.name}'")
        return torch.zeros_like(base)
    alpha = float(reduce_non_diagonal_ratio)
    red = [reduced_gram(g.to(torch.float64), alpha) for g in grams if g is not None]
    s = red[0].clone()
    for g in red[1:]:
        s.add_(g)
    cache: _Factors | None = ctx.stats if isinstance(ctx.stats, _Factors) else None
    key = cache.key(s) if cache is not None else b""
    hit = cache.get(key, s) if cache is not None else None
    if hit is None:
        try:
            chol, note = cholesky_with_fallback(s, max_condition, ridge)
        except ValueError as e:
            ctx.log(f"regmean: tensor '{ctx.name}': {e}; it takes the plain average of the task vectors")
            acc = task_vectors[0].clone()
            for tv in task_vectors[1:]:
                acc.add_(tv)
            return acc.mul_(scaling / len(task_vectors))
        if cache is not None:
            cache.put(key, s, chol, note)
    else:
        chol, note = hit
    if note is not None:
        ctx.log(f"regmean: tensor '{ctx.name}': {note}")
    rhs = torch.zeros(base.shape[1], base.shape[0], dtype=torch.float64, device=base.device)  # (Σ τ_t G̃_t)ᵀ
    for tv, g in zip(task_vectors, red, strict=True):
        rhs.addmm_(g, tv.to(torch.float64).t())  # G̃_t symmetric: (τ_t G̃_t)ᵀ = G̃_t τ_tᵀ
    delta = torch.cholesky_solve(rhs, chol).t()
    if scaling != 1.0:
        delta.mul_(scaling)
    return delta.to(base.dtype)


# --- Fisher merging ------------------------------------------------------------------------------------------------


def _fisher_shape(name: str, shape: tuple[int, ...], component: str) -> tuple[int, ...] | None:
    return tuple(shape)


class _FisherNorms(GlobalPass):
    """One sweep over the statistics alone: per expert, Σ F_t² over every merged tensor (float64)."""

    passes = 1
    reads_tensors = False

    def init(self, num_models: int, params: Mapping[str, Any]) -> Any:
        return [0.0] * num_models

    def update(self, p: int, state: Any, task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> None:
        assert ctx.statistics is not None
        for i, f in enumerate(ctx.statistics):
            assert f is not None
            state[i] += float(f.to(torch.float64).square().sum())

    def result(self, state: Any) -> Any:
        return [math.sqrt(v) for v in state]

    def needed(self, params: Mapping[str, Any]) -> bool:
        return bool(params["normalize_fisher_weight"])


def _fisher_check(params: Mapping[str, Any]) -> None:
    """Before any work: the weights c_t (F_t + eps) must be non-negative and not all zero (the denominator)."""
    ws = list(params["weight"])
    if any(w < 0 for w in ws) or all(w == 0 for w in ws):
        raise MethodParameterError(f"models[].parameters: fisher weighs each expert by weight * (F + eps); the "
                                   f"weights must be non-negative and not all zero, got {ws}")


@merge_method(
    "fisher",
    params=[
        WEIGHT,
        Param("normalize_fisher_weight", True, "scale each expert's Fisher by 1 / its L2 norm over every merged "
              "tensor (one number per expert), renormalised over the experts", bool),
        Param("minimal_fisher_weight", 1e-6, "epsilon: added to every Fisher entry and to the norms", float,
              low=0.0),
    ],
    summary="Fisher-weighted averaging: W = sum_t c_t (F_t + eps) W_t / sum_t c_t (F_t + eps), per entry.",
    paper="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv 2111.09832)",
    url="https://arxiv.org/abs/2111.09832",
    global_pass=_FisherNorms(),
    statistics=Statistics("fisher_diagonal", _fisher_shape),
    check=_fisher_check,
)
def fisher(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
           weight: Sequence[float], normalize_fisher_weight: bool, minimal_fisher_weight: float) -> torch.Tensor:
    """Math (Matena & Raffel 2022, eq. 3; FusionBench ``merging_with_fisher_weights``): with F_t the diagonal
    Fisher of expert t for this tensor, ε = ``minimal_fisher_weight`` and w_t = ``weight``,

        W = Σ_t c_t (F_t + ε) ⊙ W_t / Σ_t c_t (F_t + ε),

    c_t = w_t, or with ``normalize_fisher_weight`` c_t = w_t · n_t, n_t = (1 / (‖F_t‖ + ε)) / Σ_s 1 / (‖F_s‖ + ε),
    ‖F_t‖ the L2 norm of expert t's Fisher over **every merged tensor together** (one number per expert,
    computed by a pass over the statistics before any tensor is merged). The base cancels: the delta returned is
    Σ_t c_t (F_t + ε) τ_t / Σ_t c_t (F_t + ε). ε keeps entries whose Fisher is zero in every expert defined
    (they take the c-weighted average). Every selected tensor needs a Fisher in every expert's file.
    """
    fs = ctx.statistics
    assert fs is not None and all(f is not None for f in fs)
    eps = float(minimal_fisher_weight)
    coef = [float(w) for w in weight]
    if normalize_fisher_weight:
        norms = ctx.stats
        inv = [1.0 / (n + eps) for n in norms]
        total = sum(inv)
        coef = [w * (v / total) for w, v in zip(coef, inv, strict=True)]
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for tv, f, c in zip(task_vectors, fs, coef, strict=True):
        assert f is not None
        wf = (f.to(base.dtype) + eps).mul_(c)
        num.addcmul_(wf, tv)
        den.add_(wf)
    return num.div_(den)
