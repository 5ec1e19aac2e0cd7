"""Spherical methods: SLERP, NuSLERP, MultiSLERP, the Karcher mean and Model Stock.

Every method here needs norms or cosines over a whole tensor (or over each of its rows or columns), so none is
elementwise: the engine hands each one whole tensors. Definitions, defaults and the conventions the golden
cases pin down follow mergekit 0.1.5's methods of the same names, as restated in ``../shared/golden/README.md``
(section "Second wave"); that is also where the reference's known pitfalls are listed.

Precision: the inputs are float32 (half-precision compute dtypes are upcast to float32 and the result cast
back); every dot product and norm is accumulated in float64, chunk by chunk (no float64 copy of a whole
tensor), and the interpolation coefficients are computed in float64 before they scale the float32 tensors.
SLERP needs this: on fine-tuned weights its cosine sits within a few 1e-6 of the linear-fallback threshold.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from omnimerge.errors import MethodParameterError
from omnimerge.methods.base import Capabilities, Param, TensorContext, merge_method
from omnimerge.methods.linear import WEIGHT

#: entries per float64 chunk of a dot product (32 MiB per float64 operand)
_CHUNK = 1 << 22

#: SLERP falls back to linear interpolation when |cos| exceeds this (mergekit's DOT_THRESHOLD)
SLERP_DOT_THRESHOLD = 0.9995

#: NuSLERP floors each vector's norm at this before taking the cosine (as mergekit)
NORM_FLOOR = 1e-7


# --- helpers ------------------------------------------------------------------------------------------------


def _work_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.promote_types(dt, torch.float32)


def _upcast(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a task-vector method in (at least) float32, base included; the delta is cast back."""

    @functools.wraps(fn)
    def wrapper(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext,
                **kw: Any) -> torch.Tensor:
        dt = task_vectors[0].dtype
        wd = _work_dtype(dt)
        if wd == dt and base.dtype == dt:
            return fn(base, task_vectors, ctx, **kw)
        return fn(base.to(wd), [t.to(wd) for t in task_vectors], ctx, **kw).to(dt)

    return wrapper


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum(a * b) over every entry, accumulated in float64 chunk by chunk."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    acc = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, fa.numel(), _CHUNK):
        acc += torch.dot(fa[i:i + _CHUNK].to(torch.float64), fb[i:i + _CHUNK].to(torch.float64))
    return float(acc)


def _dots(a: torch.Tensor, b: torch.Tensor, over: str) -> torch.Tensor:
    """float64 sums of a * b: over every entry (``over="all"``, a 0-d tensor), along the last dimension
    (``"rows"``, shape (..., 1)) or along dimension 0 (``"columns"``, shape (1, ...)); a 1-D tensor is one
    vector in every mode. Chunked over dimension 0, so that no float64 copy of the whole tensor is made."""
    if over == "all" or a.dim() < 2:
        return torch.tensor(_dot(a, b), dtype=torch.float64, device=a.device)
    per = max(1, _CHUNK // max(1, a[0].numel()))
    if over == "rows":
        parts = [(a[i:i + per].to(torch.float64) * b[i:i + per].to(torch.float64)).sum(-1, keepdim=True)
                 for i in range(0, a.shape[0], per)]
        return torch.cat(parts, dim=0)
    acc = torch.zeros((1, *a.shape[1:]), dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], per):
        acc += (a[i:i + per].to(torch.float64) * b[i:i + per].to(torch.float64)).sum(0, keepdim=True)
    return acc


def _gram(vecs: Sequence[torch.Tensor], over: str) -> torch.Tensor:
    """The float64 Gram matrices G[..., i, j] = <v_i, v_j> of same-shaped tensors in one pass over them: one
    (T x T) matrix (``over="all"``) or one per row of dimension 0 (``"rows"``, shape (rows, T, T)). Chunked as
    :func:`_dots`, each chunk converted to float64 once for all T (T + 1) / 2 products."""
    T = len(vecs)
    dev = vecs[0].device
    if over == "all" or vecs[0].dim() < 2:
        flat = [v.reshape(-1) for v in vecs]
        n = flat[0].numel()
        g = torch.zeros((T, T), dtype=torch.float64, device=dev)
        buf = torch.empty((T, min(n, _CHUNK)), dtype=torch.float64, device=dev)  # one buffer, reused
        for i in range(0, n, _CHUNK):
            m = min(_CHUNK, n - i)
            for k, f in enumerate(flat):
                buf[k, :m].copy_(f[i:i + m])
            x = buf[:, :m]
            g += x @ x.T
        return g
    rows = [v.reshape(v.shape[0], -1) for v in vecs]
    R, n = rows[0].shape
    per = max(1, _CHUNK // max(1, n))
    out = torch.empty((R, T, T), dtype=torch.float64, device=dev)
    buf = torch.empty((min(R, per), T, n), dtype=torch.float64, device=dev)
    for i in range(0, R, per):
        m = min(per, R - i)
        for k, r in enumerate(rows):
            buf[:m, k].copy_(r[i:i + m])
        x = buf[:m]
        torch.bmm(x, x.transpose(1, 2), out=out[i:i + m])
    return out


def _scaled(coef: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """coef * x with a float64 coefficient (scalar or broadcastable) applied in x's dtype."""
    if isinstance(coef, torch.Tensor):
        return x * coef.to(x.dtype)
    return x * coef


# --- slerp --------------------------------------------------------------------------------------------------


def _require_t(params: Mapping[str, Any]) -> None:
    if params["t"] is None:
        raise MethodParameterError(
            "parameters: slerp needs 't' (the interpolation fraction: 0 gives the base, 1 the expert)")


@merge_method(
    "slerp",
    params=[Param("t", None, "SLERP: the interpolation fraction from the base (0) to the expert (1) (required)",
                  float, low=0.0, high=1.0, nullable=True)],
    summary="SLERP: the base and one expert interpolated along the great circle through their weights.",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985; mergekit `slerp`",
    url="https://doi.org/10.1145/325165.325242",
    check=_require_t,
    experts=(1, 1),
)
@_upcast
def slerp(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
          t: float) -> torch.Tensor:
    """Spherical linear interpolation of the base W0 and one expert W1 = W0 + tau (mergekit ``slerp``).

    u = vec(W0), v = vec(W1): the whole tensor is one vector (mergekit's helper called on a bare 2-D weight
    would interpolate each row instead). c = <u, v> / (|u| |v|) clipped to [-1, 1], in float64. If
    |c| > 0.9995 (decided per tensor): W = (1 - t) W0 + t W1, i.e. delta = t tau. Otherwise, with
    Omega = arccos c, a = sin((1 - t) Omega) / sin Omega and b = sin(t Omega) / sin Omega,
    W = a W0 + b W1, written as delta = (a + b - 1) W0 + b tau (the same value without cancelling two
    weight-sized terms). A zero-norm base or expert counts as orthogonal to the other (c = 0, as mergekit).
    t = 0 gives the base, t = 1 the expert.
    """
    tau = task_vectors[0]
    w1 = base + tau
    uu, vv, uv = _dot(base, base), _dot(w1, w1), _dot(base, w1)
    del w1
    # a zero-norm base or expert has cosine 0 with the other (mergekit leaves a zero vector unnormalised)
    c = 0.0 if uu <= 0.0 or vv <= 0.0 else min(max(uv / math.sqrt(uu * vv), -1.0), 1.0)
    if abs(c) > SLERP_DOT_THRESHOLD:
        return tau.mul_(t)
    omega = math.acos(c)
    so = math.sin(omega)
    a = math.sin((1.0 - t) * omega) / so
    b = math.sin(t * omega) / so
    out = tau.mul_(b)
    if a + b - 1.0 != 0.0:
        out.add_(base, alpha=a + b - 1.0)
    return out


# --- nuslerp ------------------------------------------------------------------------------------------------


def _slerp_vectors(t: float, x: torch.Tensor, y: torch.Tensor, over: str) -> torch.Tensor:
    """slerp(t, x, y) of each vector pair (``over`` as in :func:`_dots`): c = <x, y> / (|x| |y|) with each norm
    floored at 1e-7 (so a zero vector is orthogonal to any other, as in mergekit), Omega = arccos c,
    [sin((1 - t) Omega) x + sin(t Omega) y] / sin Omega, or (1 - t) x + t y where 1 - c^2 <= 1e-16.
    Overwrites x."""
    xy, xx, yy = _dots(x, y, over), _dots(x, x, over), _dots(y, y, over)
    nn = xx.sqrt_().clamp_(min=NORM_FLOOR) * yy.sqrt_().clamp_(min=NORM_FLOOR)
    c = (xy / nn).clamp_(-1.0, 1.0)
    lin = (1.0 - c * c) <= 1e-16
    omega = torch.arccos(c)
    so = torch.where(lin, torch.ones_like(omega), torch.sin(omega))
    a = torch.where(lin, torch.full_like(c, 1.0 - t), torch.sin((1.0 - t) * omega) / so)
    b = torch.where(lin, torch.full_like(c, t), torch.sin(t * omega) / so)
    return _scaled(a, x).add_(_scaled(b, y))


@merge_method(
    "nuslerp",
    params=[WEIGHT,
            Param("nuslerp_flatten", True, "NuSLERP: interpolate the whole tensor as one vector (false: per row or "
                  "column, see nuslerp_row_wise)", bool),
            Param("nuslerp_row_wise", False, "NuSLERP, with nuslerp_flatten false: true interpolates each column "
                  "W[:, j] of an (out, in) weight, false each row W[i, :] (mergekit's code; its documentation "
                  "says the opposite)", bool)],
    summary="NuSLERP: SLERP of two task vectors, t set by the per-model weights (whole tensor, rows or columns).",
    paper="mergekit `nuslerp` (Arcee AI, mergekit 0.1.x)",
    url="https://github.com/arcee-ai/mergekit",
    experts=(2, 2),
)
@_upcast
def nuslerp(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
            weight: Sequence[float], nuslerp_flatten: bool, nuslerp_row_wise: bool) -> torch.Tensor:
    """NuSLERP with a base (mergekit ``nuslerp``): SLERP of the two task vectors x = tau_0, y = tau_1.

    t = w_1 / (w_0 + w_1), the weight of the *second* model (0.5 if |w_0 + w_1| < 1e-6); W = W0 + slerp(t, x, y)
    with, per vector pair, c = cos(x, y) (in float64), Omega = arccos c and
    slerp = [sin((1 - t) Omega) x + sin(t Omega) y] / sin Omega, or (1 - t) x + t y when 1 - c^2 <= 1e-16
    (norms floored at 1e-7: a zero vector counts as orthogonal to the other). The vectors: the whole tensor (``nuslerp_flatten``, the default); else each row
    W[i, :] (vectors along the last dimension), or with ``nuslerp_row_wise`` each column W[:, j] (vectors along
    dimension 0), as mergekit's code does it. A 1-D tensor is one vector in every mode. No scaling (mergekit
    has none). Task vectors, not weights, are interpolated.
    """
    w0, w1 = float(weight[0]), float(weight[1])
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    over = "all" if nuslerp_flatten else ("columns" if nuslerp_row_wise else "rows")
    return _slerp_vectors(t, task_vectors[0], task_vectors[1], over)


# --- multislerp ---------------------------------------------------------------------------------------------


def _check_multislerp(params: Mapping[str, Any]) -> None:
    if params["normalize_weights"] and float(sum(params["weight"])) == 0.0:
        raise MethodParameterError(
            f"models[].parameters: multislerp with normalize_weights: true divides by the sum of the per-model "
            f"weights, and {list(params['weight'])} sums to zero")


@merge_method(
    "multislerp",
    params=[WEIGHT,
            Param("normalize_weights", True, "MultiSLERP: divide the per-model weights by their sum", bool),
            Param("eps", 1e-8, "MultiSLERP: added to the norms it divides by", float, low=0.0)],
    summary="MultiSLERP: the weighted mean direction of the task vectors on the sphere, at their mean norm.",
    paper="C. Goddard, multislerp (mergekit `multislerp`, Arcee AI)",
    url="https://github.com/arcee-ai/mergekit",
    check=_check_multislerp,
)
@_upcast
def multislerp(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
               weight: Sequence[float], normalize_weights: bool, eps: float) -> torch.Tensor:
    """Barycentric SLERP of the task vectors (mergekit ``multislerp``, with a base).

    x_i = vec(tau_i), w^_i = w_i / sum_j w_j (``normalize_weights``; else w_i), u_i = x_i / (|x_i| + eps):
    s = sum_i w^_i u_i, m = s / |s|; v_i = u_i - <u_i, m> m (the orthogonal projection onto the tangent space at
    m, not the Riemannian log map: this is not the Karcher mean); v = sum_i w^_i v_i; nu = |v| + eps;
    r = cos(nu) m + (sin(nu) / nu) v; W = W0 + (sum_i w^_i |x_i|) r.

    Since sum_i w^_i <u_i, m> = <s, m> = |s|, v = s - |s| m is parallel to m (zero in exact arithmetic): it is
    computed as (|s| - k) m with k = sum_i w^_i <u_i, m> from float64 dot products, so the result is m times
    cos(nu) + (sin(nu) / nu)(|s| - k), i.e. the normalised weighted mean direction up to rounding.

    One expert returns that expert. Where every weighted norm vanishes (sum_i w^_i |x_i| = 0) the result is the
    base. If |s| < eps, two experts fall back to sum_i w^_i x_i and more raise an error naming the tensor.
    """
    T = len(task_vectors)
    if T == 1:
        return task_vectors[0]
    w = [float(x) for x in weight]
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    norms = [math.sqrt(_dot(x, x)) for x in task_vectors]
    scale = sum(wi * ni for wi, ni in zip(w, norms, strict=True))
    coef = [wi / (ni + eps) for wi, ni in zip(w, norms, strict=True)]
    s = _scaled(coef[0], task_vectors[0])
    for c, x in zip(coef[1:], task_vectors[1:], strict=True):
        s.add_(x, alpha=c)
    if scale == 0.0:
        return s.zero_()
    s_norm = math.sqrt(_dot(s, s))
    if s_norm < eps:
        if T == 2:
            out = task_vectors[0].mul_(w[0])
            return out.add_(task_vectors[1], alpha=w[1])
        raise MethodParameterError(
            f"tensor '{ctx.name}': multislerp: the weighted mean direction of the {T} task vectors vanishes "
            f"(norm {s_norm:.3g} < eps {eps:g}), so their spherical mean is undefined")
    # k = sum_i w^_i <u_i, m> = sum_i w^_i <x_i, s> / ((|x_i| + eps) |s|)
    k = sum(ci * _dot(x, s) for ci, x in zip(coef, task_vectors, strict=True)) / s_norm
    v_len = s_norm - k  # v = (|s| - k) m
    nu = abs(v_len) + eps
    r = math.cos(nu) + math.sin(nu) / nu * v_len  # r = this * m
    return s.mul_(scale * r / s_norm)


# --- karcher ------------------------------------------------------------------------------------------------


def _karcher_mean(weights: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean of the experts' full weights (see :func:`karcher`); may overwrite ``weights``."""
    T = len(weights)
    norms = [math.sqrt(_dot(w, w)) for w in weights]
    scale = sum(norms) / T
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(weights[0])
    pts = [weights[i] for i in valid]
    nrm = [norms[i] for i in valid]
    alpha = 1.0 / len(valid)
    m = _scaled(alpha / nrm[0], pts[0])
    for p, n in zip(pts[1:], nrm[1:], strict=True):
        m.add_(p, alpha=alpha / n)
    m.div_(math.sqrt(_dot(m, m)))
    for _ in range(max_iter):
        g = torch.zeros_like(m)
        for p, n in zip(pts, nrm, strict=True):
            cos = min(max(_dot(m, p) / n, -1.0), 1.0)
            theta = math.acos(cos)
            if theta < tol:
                continue
            f = alpha * theta / math.sin(theta)
            g.add_(p, alpha=f / n).add_(m, alpha=-f * cos)  # f (u_i - cos theta_i m)
        g_norm = math.sqrt(_dot(g, g))
        if g_norm < tol:
            break
        m.mul_(math.cos(g_norm)).add_(g, alpha=math.sin(g_norm) / g_norm)
        m.div_(math.sqrt(_dot(m, m)))
    return m.mul_(scale)


def _karcher_of_weights(weights: Sequence[torch.Tensor], ctx: TensorContext, *, max_iter: int,
                        tol: float) -> torch.Tensor:
    """The Karcher merge from the experts' weights alone: returns the merged **weight** W."""
    dt = weights[0].dtype
    wd = _work_dtype(dt)
    ws = list(weights) if wd == dt else [w.to(wd) for w in weights]
    return _karcher_mean(ws, max_iter, tol).to(dt)


@merge_method(
    "karcher",
    params=[Param("max_iter", 10, "Karcher: at most this many Riemannian gradient steps", int, low=0),
            Param("tol", 1e-5, "Karcher: stop when the tangent step's norm is below tol (also the angle under "
                  "which an expert adds no tangent term, and the norm under which it leaves the mean)",
                  float, low=0.0)],
    summary="Karcher mean: the Frechet mean of the experts' weight directions on the sphere, at their mean norm.",
    paper="Karcher, Riemannian center of mass and mollifier smoothing, CPAM 1977; mergekit `karcher`",
    url="https://doi.org/10.1002/cpa.3160300502",
    capabilities=Capabilities(from_weights=_karcher_of_weights),
)
@_upcast
def karcher(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
            max_iter: int, tol: float) -> torch.Tensor:
    """Karcher (Frechet) mean on the unit sphere of the experts' full weights (mergekit ``karcher``).

    u_i = vec(W_i) / |W_i| with W_i = W0 + tau_i the experts only (the base is not one of the points: it only
    supplies the unmerged tensors) and alpha_i = 1 / T. m = normalise(sum_i alpha_i u_i); up to ``max_iter``
    times: theta_i = arccos <m, u_i>, g = sum_i alpha_i (theta_i / sin theta_i)(u_i - cos theta_i m) (terms with
    theta_i < tol skipped); stop if |g| < tol, else m <- cos|g| m + sin|g| g / |g|, renormalised.
    W = (sum_i alpha_i |W_i|) m: the mean of the norms, not the norm of the mean. Experts with |W_i| <= tol
    leave the mean (alpha is then 1 / #remaining) but still count in the scale; if all do, W = 0. With full
    experts the engine uses the same computation on their weights directly (the base is not read).
    """
    for tv in task_vectors:
        tv.add_(base)  # W_i = W0 + tau_i
    return _karcher_mean(task_vectors, max_iter, tol).sub_(base)


# --- model_stock --------------------------------------------------------------------------------------------


@merge_method(
    "model_stock",
    params=[Param("filter_wise", False, "Model Stock: one interpolation ratio per output row W[i, :] instead of "
                  "one for the whole tensor", bool)],
    summary="Model Stock: the experts' average pulled towards the base by a ratio set by their task vectors' cosines.",
    paper="Jang, Yun, Han, Model Stock: All we need is just a few fine-tuned models, ECCV 2024 (arXiv 2403.19522)",
    url="https://arxiv.org/abs/2403.19522",
    experts=(2, None),
)
@_upcast
def model_stock(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *,
                filter_wise: bool) -> torch.Tensor:
    """Model Stock (mergekit ``model_stock``).

    c = mean over expert pairs i < j of cos(tau_i, tau_j), each cosine <tau_i, tau_j> / max(|tau_i| |tau_j|,
    1e-6) clipped to [-1, 1] (cosines of the task vectors, not of the weights); t = T c / (1 + (T - 1) c), or
    t = 0 (the base) where |1 + (T - 1) c| < 1e-6, applied as it is (it can be negative);
    W = t W_avg + (1 - t) W0 with W_avg = (1/T) sum_i W_i, i.e. delta = t (1/T) sum_i tau_i. T is the number of
    experts. ``filter_wise``: c and t per output row (W.reshape(out, -1)[i]; a 1-D tensor is one row).
    Needs at least two experts (the ratio is built from pairs).
    """
    T = len(task_vectors)
    shape = task_vectors[0].shape
    per_row = filter_wise and len(shape) >= 2
    vecs = [tv.reshape(shape[0], -1) for tv in task_vectors] if per_row else list(task_vectors)
    g = _gram(vecs, "rows" if per_row else "all")  # every <tau_i, tau_j> in one pass over the experts
    norms = torch.diagonal(g, dim1=-2, dim2=-1).sqrt()
    total = torch.zeros(g.shape[:-2], dtype=torch.float64, device=g.device)
    pairs = 0
    for i in range(T):
        for j in range(i + 1, T):
            den = (norms[..., i] * norms[..., j]).clamp_(min=1e-6)
            total += (g[..., i, j] / den).clamp_(-1.0, 1.0)
            pairs += 1
    c = total / pairs
    if per_row:
        c = c.unsqueeze(-1)
    den = 1.0 + (T - 1) * c
    small = den.abs() < 1e-6
    t = torch.where(small, torch.zeros_like(c), T * c / torch.where(small, torch.ones_like(den), den))
    acc = vecs[0]
    for v in vecs[1:]:
        acc.add_(v)
    out = _scaled(t / T, acc)
    return out.reshape(shape)
