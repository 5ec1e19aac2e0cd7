"""Operators that sparse merge methods compose: sparsifiers, sign consensus, aggregation; and their streamed form.

A sparse merge of one tensor (TIES, DARE-TIES, Model Breadcrumbs, ...) is

    t_i = S_k(... S_1(tau_i))          sparsifiers: random drop (DARE), magnitude top-k (TIES), outliers
                                       (Breadcrumbs), applied in order to each expert's task vector
    d_i = w_i t_i                      per-model weights
    s   = sign(sum_i d_i)              consensus (optional): entries with s = 0 take the tensor's majority sign
                                       (TIES) or +1 (mergekit's ``sum`` consensus)
    tau = sum_{i: sign(d_i) = s} d_i   aggregation over the agreeing entries (all entries without consensus),
          [/ sum_{same i} w_i]         divided by their weights when ``normalize`` (0 agreeing: 0)
    W   = W0 + lambda tau

A method states its composition as a :class:`SparsePlan` built from its parameters (:func:`sparse_method`
registers it). It then has two forms that give the same bits: :func:`sparse_merge` on whole tensors, and
:class:`SparseBlockwise`, which streams a tensor in blocks. Sparsifiers that rank magnitudes need order
statistics of |t_i| over the whole tensor; the streamed form finds any number of them exactly with one shared
machinery (:class:`RankBracket`): a strided sample brackets each wanted order statistic, one counting sweep
places it. Consensus with the tensor's majority sign streams with a guess of that sign, amended afterwards
where the full count disagrees (``fixups``). The compiled kernels (:class:`omnimerge.kernels.TiesBlocks`) run
the TIES-shaped plans (optional DARE, then top-k, majority-sign consensus, normalised).

DARE's masks are counter-based: entry j of expert i's task vector in tensor ``name`` is kept iff
``h(j) >= p * 2^32``, with h a 32-bit integer hash (lowbias32, C. Wellons) of an affine map of j keyed by
sha256(seed, name, i). The mask of an entry depends on nothing else: the same with any block size, number of
workers, merge order or device, and cheap to draw for any subset of entries (2-4x faster than torch's CPU RNG).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from omnimerge.methods.base import Capabilities, Param, TensorContext, merge_method
from omnimerge.methods.linear import weighted_sum

__all__ = [
    "MagnitudeOutliers", "MagnitudeRankedDrop", "MagnitudeTopK", "RandomDrop", "RankBracket", "SignConsensus",
    "SparseBlockwise", "SparsePlan", "Sparsifier", "dare_", "della_key", "disjoint_merge", "kth_smallest",
    "sparse_merge", "sparse_method", "trim_",
]

# --- order statistics of magnitudes ----------------------------------------------------------------------------


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
    lo_i, hi_i = _bracket_indices(k, n, m)
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


def _bracket_indices(k: int, n: int, m: int) -> tuple[int, int]:
    """Indices into a sorted strided sample of m of n entries that bracket the k-th smallest (1-based) with a
    margin of 8 standard deviations of the sample quantile (plus a little for ties)."""
    q = k / n
    margin = 8.0 * (m * q * (1.0 - q)) ** 0.5 + 0.005 * m + 16
    return int(q * m - margin), int(q * m + margin) + 1


@dataclass
class RankBracket:
    """The streamed search for one order statistic (the k-th smallest, 1-based) of one expert's magnitudes.

    ``lo``/``hi`` come from a sample (:meth:`from_sample`); :meth:`count` runs over every block of the tensor
    (counts at/below lo and below/at hi, and the values strictly inside); :meth:`resolve` then gives the exact
    k-th value, or None if the bracket missed, in which case the next sweep gathers every magnitude
    (``collect_all``) and resolves by selection.
    """

    lo: float | None
    hi: float | None
    k: int = 0
    le_lo: int = 0
    lt_lo: int = 0
    lt_hi: int = 0
    le_hi: int = 0
    inside: list[np.ndarray] = field(default_factory=list)
    collect_all: bool = False  # the sample's bracket missed: gather every magnitude in the next sweep

    @classmethod
    def from_sample(cls, sorted_sample: np.ndarray, k: int, numel: int) -> RankBracket:
        m = sorted_sample.size
        lo_i, hi_i = _bracket_indices(k, numel, m)
        return cls(float(sorted_sample[lo_i]) if lo_i >= 0 else None,
                   float(sorted_sample[hi_i]) if hi_i < m else None, k)

    def count(self, a: np.ndarray) -> None:
        """One block's magnitudes ``a`` (float32)."""
        if self.collect_all:
            self.inside.append(a.copy())
            return
        inside = None
        if self.lo is not None:
            flo = np.float32(self.lo)
            self.le_lo += int(np.count_nonzero(a <= flo))
            self.lt_lo += int(np.count_nonzero(a < flo))
            inside = a > flo
        if self.hi is not None:
            fhi = np.float32(self.hi)
            below = a < fhi
            self.lt_hi += int(np.count_nonzero(below))
            self.le_hi += int(np.count_nonzero(a <= fhi))
            inside = below if inside is None else np.logical_and(inside, below, out=inside)
        self.inside.append(a[inside] if inside is not None else a.copy())

    def resolve(self) -> float | None:
        """The exact k-th smallest magnitude after a full sweep, or None: the bracket missed (the caller sweeps
        again with ``collect_all``)."""
        k = self.k
        vals = np.concatenate(self.inside) if self.inside else np.empty(0, np.float32)
        self.inside = []
        if self.collect_all:
            return float(np.partition(vals, k - 1)[k - 1])
        if self.lo is not None and k <= self.le_lo:
            return self.lo if k > self.lt_lo else None
        if self.hi is not None and k > self.lt_hi:
            return self.hi if k <= self.le_hi else None
        r = k - (self.le_lo if self.lo is not None else 0)
        return float(np.partition(vals, r - 1)[r - 1]) if 0 < r <= vals.size else None


# --- sparsifiers ------------------------------------------------------------------------------------------------


class Sparsifier(Protocol):
    """Sparsifies one expert's task vector in place.

    ``ranks``: the order statistics of |t| over the whole tensor (1-based k of the k-th smallest, the vector as
    the earlier sparsifiers of the plan leave it) that ``apply_`` needs, given as ``values`` in the same order;
    empty for elementwise sparsifiers, which may be given any block (``start``: its first flat index, or
    ``positions``: its flat indices). A ranked sparsifier may need no order statistic for some tensors
    (TIES with density 1): ``ranks`` is then empty. A sparsifier with the class attribute ``whole_tensor = True``
    (:class:`MagnitudeRankedDrop`) is only ever given whole tensors in their own shape: plans that hold one have
    no streamed form (:attr:`SparsePlan.whole_tensor`).
    """

    #: whether it ranks magnitudes over the whole tensor (then it comes last in a plan)
    ranked: ClassVar[bool]
    ranks: tuple[int, ...]

    def apply_(self, tv: torch.Tensor, values: Sequence[float | None], ctx: TensorContext, i: int, start: int = 0,
               positions: np.ndarray | None = None) -> torch.Tensor: ...


def trim_(tv: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Zero the entries with |x| < threshold, in place."""
    if threshold is None:
        return tv
    if tv.device.type == "cpu" and tv.dtype == torch.float32 and tv.is_contiguous():
        # x * [|x| >= t]: numpy's vectorised compare is ~10x torch's on CPU (a dropped entry becomes a signed
        # zero, which the consensus treats like +0)
        a = tv.numpy()
        keep = np.greater_equal(np.abs(a), np.float32(threshold))
        return tv.mul_(torch.from_numpy(keep.view(np.uint8).astype(np.float32)).view(tv.shape))
    tv.masked_fill_(tv.abs() < threshold, 0.0)
    return tv


def trim_count(numel: int, density: float) -> int:
    """k = int((1 - density) * N): the number of entries TIES trims (the reference's ``num_mask_params``)."""
    return int(numel * (1.0 - density))


@dataclass(frozen=True)
class MagnitudeTopK:
    """TIES trimming: keep |x| >= kthvalue(|x|, int((1 - density) N)) (MergeLM / OptMerge convention; ties at the
    threshold are all kept). density 1 keeps everything."""

    density: float
    numel: int
    ranked: ClassVar[bool] = True

    @property
    def ranks(self) -> tuple[int, ...]:
        k = trim_count(self.numel, self.density)
        return (k,) if k > 0 else ()

    def apply_(self, tv: torch.Tensor, values: Sequence[float | None], ctx: TensorContext, i: int, start: int = 0,
               positions: np.ndarray | None = None) -> torch.Tensor:
        return trim_(tv, values[0] if values else None)


@dataclass(frozen=True)
class MagnitudeOutliers:
    """Model Breadcrumbs' mask (mergekit ``sparsify.magnitude_outliers``): of the N entries ranked by |x|, drop
    the n_top = int(gamma N) largest and keep the next int(density N); where both do not fit, n_top shrinks
    to N - int(density N) (the int(density N) smallest are kept). density >= 1 leaves the vector unchanged
    (outliers included, as mergekit). Order statistics place the cuts: keep x_(n_bot) <= |x| < x_(N - n_top)
    (0-based), which equals the reference's sorted-index mask except among entries tied at a cut."""

    density: float
    gamma: float
    numel: int
    ranked: ClassVar[bool] = True

    def _cuts(self) -> tuple[int, int]:
        n = self.numel
        keep, top = int(self.density * n), int(self.gamma * n)
        bot = n - keep - top
        if bot < 0:
            top, bot = top + bot, 0
        return bot, top

    @property
    def ranks(self) -> tuple[int, ...]:
        if self.density >= 1.0:
            return ()
        bot, top = self._cuts()
        return tuple(([bot + 1] if bot > 0 else []) + ([self.numel - top + 1] if top > 0 else []))

    def apply_(self, tv: torch.Tensor, values: Sequence[float | None], ctx: TensorContext, i: int, start: int = 0,
               positions: np.ndarray | None = None) -> torch.Tensor:
        if self.density >= 1.0:
            return tv
        bot, top = self._cuts()
        vals = list(values)
        lo = vals.pop(0) if bot > 0 else None
        hi = vals.pop(0) if top > 0 else None
        a = tv.abs()
        keep = torch.ones_like(tv, dtype=torch.bool)
        if lo is not None:
            keep &= a >= lo
        if hi is not None:
            keep &= a < hi
        return tv.mul_(keep.to(tv.dtype))


_M32 = 0xFFFFFFFF


def dare_key(ctx: TensorContext, i: int, seed: int) -> tuple[int, int, int]:
    """The (odd multiplier, offset, high-word key) of expert ``i``'s DARE mask in this tensor, for the method's
    ``seed`` parameter (given explicitly: methods do not write into the context)."""
    d = hashlib.sha256(f"dare:{int(seed)}:{ctx.canonical or ctx.name}:{i}".encode()).digest()
    return int.from_bytes(d[0:4], "little") | 1, int.from_bytes(d[4:8], "little"), int.from_bytes(d[8:12], "little")


def _mix32_(x: np.ndarray, tmp: np.ndarray) -> None:
    """lowbias32 (Wellons) on uint32, in place: xorshift-multiply rounds with full avalanche."""
    np.right_shift(x, 16, out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    np.multiply(x, np.uint32(0x7FEB352D), out=x)
    np.right_shift(x, 15, out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    np.multiply(x, np.uint32(0x846CA68B), out=x)
    np.right_shift(x, 16, out=tmp)
    np.bitwise_xor(x, tmp, out=x)


def _dare_hash(pos: np.ndarray, key: tuple[int, int, int]) -> np.ndarray:
    """h(j) for the entries ``pos`` (int64 flat indices)."""
    a, b, c = key
    lo = (pos & _M32).astype(np.uint32)
    x = np.multiply(lo, np.uint32(a))
    np.add(x, np.uint32(b), out=x)
    tmp = np.empty_like(x)
    _mix32_(x, tmp)
    if pos.size and int(pos.max()) > _M32:  # positions past 2^32 (tensors that large): key the high word in too
        far = pos > _M32  # only there: the mask of an entry must not depend on the other positions asked for
        y = x[far] ^ np.multiply((pos[far] >> 32).astype(np.uint32), np.uint32(c))
        _mix32_(y, np.empty_like(y))
        x[far] = y
    return x


_ARANGE: dict[int, np.ndarray] = {}


def dare_multiplier(
    ctx: TensorContext, i: int, start: int, count: int, drop_rate: float, positions: np.ndarray | None = None,
    *, seed: int,
) -> torch.Tensor:
    """Expert ``i``'s DARE factor for entries ``[start, start + count)`` of the flattened tensor (or for
    ``positions``): 0 where dropped, ``1 / (1 - p)`` where kept (float32)."""
    if positions is None:
        base = _ARANGE.get(count)
        if base is None:
            base = _ARANGE.setdefault(count, np.arange(count, dtype=np.int64)) if count <= 1 << 20 else \
                np.arange(count, dtype=np.int64)
        positions = base + start
    h = _dare_hash(positions, dare_key(ctx, i, seed))
    thr = round(drop_rate * 2.0**32)
    keep = np.greater_equal(h, np.uint32(thr)) if thr <= _M32 else np.zeros(h.shape, dtype=bool)
    mult = keep.view(np.uint8).astype(np.float32)
    np.multiply(mult, np.float32(1.0 / (1.0 - drop_rate)), out=mult)
    return torch.from_numpy(mult)


def dare_(tv: torch.Tensor, drop_rate: float, ctx: TensorContext, i: int, start: int = 0,
          positions: np.ndarray | None = None, *, seed: int) -> torch.Tensor:
    """Drop each entry with probability p and scale the survivors by exactly 1/(1-p), in place. ``tv`` holds
    the flat entries ``[start, start + numel)`` of expert ``i``'s task vector (or the entries ``positions``)."""
    if drop_rate <= 0.0:
        return tv
    mult = dare_multiplier(ctx, i, start, tv.numel(), drop_rate, positions, seed=seed)
    if tv.dtype != torch.float32 or tv.device.type != "cpu":
        mult = mult.to(device=tv.device, dtype=tv.dtype)
    # x * (keep / (1 - p)): one rounding, the same bits as (x * keep) * (1 / (1 - p))
    return tv.mul_(mult.view(tv.shape))


@dataclass(frozen=True)
class RandomDrop:
    """DARE: drop each entry with probability ``drop_rate`` and scale the survivors by 1 / (1 - p), with the
    counter-based masks above (elementwise: any block draws the same entries)."""

    drop_rate: float
    seed: int
    ranks: tuple[int, ...] = ()
    ranked: ClassVar[bool] = False

    def apply_(self, tv: torch.Tensor, values: Sequence[float | None], ctx: TensorContext, i: int, start: int = 0,
               positions: np.ndarray | None = None) -> torch.Tensor:
        return dare_(tv, self.drop_rate, ctx, i, start, positions, seed=self.seed)


def della_key(ctx: TensorContext, i: int, seed: int) -> tuple[int, int, int]:
    """The hash key of expert ``i``'s DELLA mask in this tensor (as :func:`dare_key`, keyed apart from DARE's:
    the same seed draws unrelated masks for the two)."""
    d = hashlib.sha256(f"della:{int(seed)}:{ctx.canonical or ctx.name}:{i}".encode()).digest()
    return int.from_bytes(d[0:4], "little") | 1, int.from_bytes(d[4:8], "little"), int.from_bytes(d[8:12], "little")


#: entries per chunk of rows in :class:`MagnitudeRankedDrop` (bounds its int64/float64 working copies)
_RANKED_DROP_CHUNK = 1 << 20


@dataclass(frozen=True)
class MagnitudeRankedDrop:
    """DELLA's MagPrune (mergekit ``sparsify.della_magprune``): per row of the tensor (the last dimension; a 1-D
    tensor is one row), rank the entries by |x| (0 = smallest; ties by position), r = rank / (n - 1), and keep
    each entry with probability p = density - epsilon + 2 epsilon r (a row of one entry: p = density). No
    rescaling here (the plan's ``rescale`` does the L1 one; DELLA's paper would divide by p per entry).
    density >= 1 leaves the vector unchanged.

    The draw is counter-based like DARE's: entry j (flat index) of expert i is kept iff h(j) < p * 2^32, h the
    lowbias32 hash keyed by (seed, tensor name, i) (:func:`della_key`), so the mask depends on nothing but the
    tensor, the expert and the seed. It is neither elementwise (p depends on the row's ranking) nor an order
    statistic the streamed machinery could find, so ``whole_tensor``: it is applied to whole tensors only (it
    ranks, so it comes last in a plan; it needs no order statistic, ``ranks`` is empty) and the methods that
    use it do not stream.
    """

    density: float
    epsilon: float
    seed: int
    ranks: tuple[int, ...] = ()
    ranked: ClassVar[bool] = True
    whole_tensor: ClassVar[bool] = True

    def keep_probability(self, rows: torch.Tensor) -> torch.Tensor:
        """p per entry of ``rows`` (2-D: rows x n), float64."""
        n = rows.shape[-1]
        if n == 1:
            return torch.full(rows.shape, float(self.density), dtype=torch.float64)
        order = rows.abs().argsort(dim=-1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(n, dtype=order.dtype).expand_as(order))
        del order
        p = rank.to(torch.float64).mul_(2.0 * self.epsilon / (n - 1))
        return p.add_(self.density - self.epsilon)

    def apply_(self, tv: torch.Tensor, values: Sequence[float | None], ctx: TensorContext, i: int, start: int = 0,
               positions: np.ndarray | None = None) -> torch.Tensor:
        if self.density >= 1.0 or tv.numel() == 0:
            return tv
        assert start == 0 and positions is None, "MagnitudeRankedDrop ranks rows: whole tensors only"
        n = tv.shape[-1] if tv.dim() > 0 else 1
        rows = tv.reshape(-1, n)
        key = della_key(ctx, i, self.seed)
        step = max(1, _RANKED_DROP_CHUNK // n)
        for r0 in range(0, rows.shape[0], step):
            chunk = rows[r0:r0 + step]
            p = self.keep_probability(chunk.cpu() if chunk.device.type != "cpu" else chunk)
            pos = np.arange(r0 * n, r0 * n + chunk.numel(), dtype=np.int64)
            h = _dare_hash(pos, key).astype(np.float64)
            keep = np.less(h, p.reshape(-1).numpy() * 2.0**32)
            mult = torch.from_numpy(keep.view(np.uint8).astype(np.float32)).view(chunk.shape)
            chunk.mul_(mult.to(device=chunk.device, dtype=chunk.dtype))
        if rows.data_ptr() != tv.data_ptr():  # reshape copied (a non-contiguous tv): write the result back
            tv.copy_(rows.view(tv.shape))
        return tv


# --- consensus and aggregation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignConsensus:
    """Sign election s = sign(sum_i w_i t_i); entries with s = 0 take ``zero``: "majority" (the sign of the sum
    of s over the tensor, TIES; or the one given by a global pass) or "positive" (+1, mergekit's ``sum``)."""

    zero: str = "majority"


def disjoint_mean(weighted: Sequence[torch.Tensor], weight: Sequence[float], sign: torch.Tensor,
                  normalize: bool = True) -> torch.Tensor:
    """sum_{i: sign(w_i t_i) = s} w_i t_i [/ sum_{same i} w_i] (0 where none agrees), for elected signs ``sign``.

    Computed without boolean masks where all weights are positive: c_i = max(w_i t_i s, 0) is |w_i t_i| where
    it agrees and 0 elsewhere, sign(c_i) its indicator; s * sum_i c_i / den equals the masked sum over den
    bit for bit (IEEE addition and division are symmetric in sign); ``+ 0.0`` turns -0 into +0 as the masked
    form gives. Zero entries never agree.
    """
    if all(w > 0.0 for w in weight):
        num = torch.zeros_like(sign)
        den = torch.zeros_like(sign) if normalize else None
        for t, w in zip(weighted, weight, strict=True):
            c = (t * sign).clamp_(min=0.0)
            num.add_(c)
            if den is not None:
                den.add_(torch.sign(c), alpha=w)
        if den is not None:
            # den = 0 exactly where nothing agrees (then num = 0): divide by 1 there
            den.add_(torch.sign(den).neg_().add_(1.0))
            num.div_(den)
        return num.mul_(sign).add_(0.0)
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for t, w in zip(weighted, weight, strict=True):
        agree = (t * sign) > 0
        num.add_(torch.where(agree, t, 0.0))
        den.add_(agree.to(den.dtype), alpha=w)
    return num.div_(den.masked_fill_(den == 0, 1.0)) if normalize else num


def _fill_zero_sign_(sign: torch.Tensor, value: float) -> torch.Tensor:
    """s = 0 -> value: s + (1 - |s|) * value (exact on {-1, 0, 1})."""
    if value != 0.0:
        sign.add_(sign.abs().neg_().add_(1.0).mul_(value))
    return sign


def disjoint_merge(
    trimmed: Sequence[torch.Tensor], weight: Sequence[float], majority: float | None = None,
    zero: str = "majority", normalize: bool = True,
) -> torch.Tensor:
    """Sign election and disjoint mean over (weighted) sparsified task vectors.

    s = sign(sum_i w_i t_i); entries with s = 0 take the majority sign sign(sum s) (or ``majority`` when given,
    for the global variant; 0 leaves them at 0), or +1 with ``zero="positive"``; merged = sum of the w_i t_i
    whose sign equals s, divided by the sum of their w_i with ``normalize`` (clamped at 1 where nothing agrees:
    those entries are 0).
    """
    weighted = [t if w == 1.0 else t * w for t, w in zip(trimmed, weight, strict=True)]
    total = weighted_sum(weighted, [1.0] * len(weighted))
    sign = torch.sign(total)
    del total
    if zero == "positive":
        _fill_zero_sign_(sign, 1.0)
    else:
        maj = float(torch.sign(sign.sum())) if majority is None else majority
        if maj != 0.0:
            sign.masked_fill_(sign == 0, maj)
    return disjoint_mean(weighted, weight, sign, normalize)


# --- the composition -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparsePlan:
    """One tensor's sparse merge: ``sparsifiers`` in order (elementwise ones, then at most one that ranks
    magnitudes), an optional ``consensus``, aggregation ``normalize``d by the agreeing weights or not, and the
    final ``scaling``; ``rescale``: each sparsified t_i multiplied by ||tau_i||_1 / ||t_i||_1 (left as it is
    where either norm is below 1e-8, as mergekit). ``given``: per expert, the ranked sparsifier's order statistics when a global pass has
    computed them (global TIES), with ``majority`` its majority sign."""

    sparsifiers: tuple[Sparsifier, ...]
    weight: tuple[float, ...]
    scaling: float
    consensus: SignConsensus | None = None
    normalize: bool = True
    given: tuple[tuple[float | None, ...], ...] | None = None
    majority: float | None = None
    #: after sparsifying, scale each t_i back to the L1 norm of tau_i (mergekit's ``rescale``; whole tensors only)
    rescale: bool = False
    #: without consensus: sum the weighted t_i as task arithmetic does (``weighted_sum``: acc + w_i t_i in one
    #: fused multiply-add per entry), so that a plan that keeps everything is task arithmetic bit for bit
    fused_sum: bool = False

    def __post_init__(self) -> None:
        ranked = [k for k, s in enumerate(self.sparsifiers) if s.ranked]
        assert len(ranked) <= 1 and (not ranked or ranked[0] == len(self.sparsifiers) - 1), \
            "a plan ranks magnitudes with at most one sparsifier, the last one"

    @property
    def ranked(self) -> Sparsifier | None:
        return self.sparsifiers[-1] if self.sparsifiers and self.sparsifiers[-1].ranked else None

    @property
    def elementwise(self) -> tuple[Sparsifier, ...]:
        return self.sparsifiers[:-1] if self.ranked is not None else self.sparsifiers

    @property
    def drop(self) -> RandomDrop | None:
        drops = [s for s in self.sparsifiers if isinstance(s, RandomDrop)]
        return drops[0] if drops else None

    @property
    def whole_tensor(self) -> bool:
        """Whether a sparsifier of the plan works on whole tensors only (no streamed form)."""
        return any(getattr(s, "whole_tensor", False) for s in self.sparsifiers)

    @property
    def ties_shaped(self) -> bool:
        """[DARE], then top-k, majority-sign consensus, normalised: what the compiled TIES kernels compute."""
        kinds = [type(s) for s in self.sparsifiers]
        return (kinds in ([MagnitudeTopK], [RandomDrop, MagnitudeTopK]) and self.consensus is not None
                and self.consensus.zero == "majority" and self.normalize)


PlanFn = Callable[[Mapping[str, Any], int, TensorContext], SparsePlan]


def sparse_merge(task_vectors: Sequence[torch.Tensor], ctx: TensorContext, plan: SparsePlan) -> torch.Tensor:
    """The plan on whole tensors (the reference form; the task vectors are used in place): the merged delta."""
    tvs = list(task_vectors)
    l1 = [float(tv.abs().sum(dtype=torch.float64)) for tv in tvs] if plan.rescale else None
    for s in plan.elementwise:
        tvs = [s.apply_(tv, (), ctx, i) for i, tv in enumerate(tvs)]
    r = plan.ranked
    if r is not None:
        for i, tv in enumerate(tvs):
            if plan.given is not None:
                vals: tuple[float | None, ...] = plan.given[i]
            else:
                a = tv.abs().flatten()
                vals = tuple(float(kth_smallest(a, k)) for k in r.ranks)
                del a
            r.apply_(tv, vals, ctx, i)
    if l1 is not None:
        for before, tv in zip(l1, tvs, strict=True):
            after = float(tv.abs().sum(dtype=torch.float64))
            if before >= 1e-8 and after >= 1e-8:
                tv.mul_(before / after)
    if plan.consensus is None:
        if plan.fused_sum:
            acc = weighted_sum(tvs, plan.weight, inplace=True)
        else:
            acc = _sum_weighted([t if w == 1.0 else t.mul_(w) for t, w in zip(tvs, plan.weight, strict=True)])
        if plan.normalize:
            acc.div_(float(sum(plan.weight)))
    else:
        acc = disjoint_merge(tvs, plan.weight, plan.majority, plan.consensus.zero, plan.normalize)
    return acc.mul_(plan.scaling)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


_SAMPLE = 1 << 16


@dataclass
class SparseState:
    """One tensor's streamed sparse merge (see :class:`SparseBlockwise`)."""

    ctx: TensorContext
    numel: int
    plan: SparsePlan
    #: per expert, the ranked sparsifier's order statistics (None: not known yet)
    values: list[list[float | None]]
    #: the searches still running, and the (expert, index into its values) each fills
    brackets: list[RankBracket | None]
    slots: list[tuple[int, int]]
    majority: float | None = None
    signsum: int = 0
    # the majority sign predicted from the sample, then from the sign sum so far: undecided entries are merged
    # with it as they stream, and amended afterwards only where it differs from the tensor's majority
    guess: float = 0.0
    fix_idx: list[np.ndarray] = field(default_factory=list)
    fix_guess: list[float] = field(default_factory=list)  # the guess each group of fix_idx was merged with
    fix_pos: list[torch.Tensor | None] = field(default_factory=list)
    fix_neg: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def weight(self) -> tuple[float, ...]:
        return self.plan.weight

    @property
    def scaling(self) -> float:
        return self.plan.scaling

    @property
    def drop_rate(self) -> float:
        d = self.plan.drop
        return d.drop_rate if d is not None else 0.0

    @property
    def seed(self) -> int:
        d = self.plan.drop
        return d.seed if d is not None else 0

    @property
    def thresholds(self) -> list[float | None]:
        """Per expert, its single order statistic (TIES-shaped plans: the trim threshold; None: keep all)."""
        return [v[0] if v else None for v in self.values]

    @property
    def tracks_majority(self) -> bool:
        """Whether undecided entries wait for the tensor's majority sign (guess and fix-ups)."""
        c = self.plan.consensus
        return c is not None and c.zero == "majority" and self.majority is None

    def record(self, signsum: int, idx: np.ndarray | None, pos: torch.Tensor | None,
               neg: torch.Tensor | None) -> None:
        """After a block or chunk merged with ``guess``: its sign sum and undecided entries (``idx``) with their
        deltas for elected sign +1 (``pos``) and -1 (``neg``); update the guess. The delta for the guessed sign
        itself may be left out (None): it is what was written, never a fix-up."""
        self.signsum += signsum
        if idx is not None and len(idx):
            self.fix_idx.append(idx)
            self.fix_pos.append(pos)
            self.fix_neg.append(neg)
            self.fix_guess.append(self.guess)
        self.guess = float((self.signsum > 0) - (self.signsum < 0)) if self.signsum else self.guess


class SparseBlockwise:
    """A :class:`SparsePlan` over a tensor streamed in blocks, bit-identical to :func:`sparse_merge`.

    Protocol (driven by the engine, see ``MergeRun._merge_job_blockwise``): ``begin`` (with a sampler that returns
    the task vectors at given flat positions), then while ``wants_sweep``: ``sweep`` over every block in order and
    ``end_sweep``; then ``merge`` of every block in order (returns the delta block); finally ``fixups``: the flat
    indices and delta values of the entries that could only be decided once the whole tensor was seen.

    Order statistics: a strided sample of 65,536 magnitudes brackets each wanted one with a margin of 8 standard
    deviations of the sample quantile; one counting sweep places it exactly (:class:`RankBracket`). A missed
    bracket costs one more sweep that gathers all magnitudes of that expert. Majority sign (consensus
    ``majority``): entries whose elected sign is 0 while some sparsified entry is non-zero are merged with the
    majority sign guessed from the sample, then from the sign sum so far; their values for the other sign are
    kept, and once the tensor's sign sum is known the entries merged with a wrong guess are amended
    (``fixups``).
    """

    def __init__(self, plan: PlanFn, streams: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        self.plan = plan
        self._streams = streams

    def streams(self, params: Mapping[str, Any]) -> bool:
        """Whether these parameters stream (else the engine merges the tensor whole)."""
        return self._streams is None or self._streams(params)

    def begin(
        self,
        ctx: TensorContext,
        numel: int,
        params: Mapping[str, Any],
        sample: Callable[[np.ndarray], list[torch.Tensor]],
    ) -> SparseState:
        plan = self.plan(params, numel, ctx)
        assert not plan.whole_tensor, "a plan with a whole-tensor sparsifier has no streamed form"
        T = len(plan.weight)
        r = plan.ranked
        ranks = r.ranks if r is not None else ()
        st = SparseState(ctx, numel, plan, [[None] * len(ranks) for _ in range(T)], [], [], plan.majority)
        if plan.given is not None:
            st.values = [list(v) for v in plan.given]
            return st
        if not ranks:  # no order statistics to find: no sample (undecided entries wait for the full count)
            return st
        step = max(1, numel // _SAMPLE)
        pos = np.arange(0, numel, step, dtype=np.int64)
        tvs = sample(pos)
        m = pos.size
        for i, tv in enumerate(tvs):
            for s in plan.elementwise:
                s.apply_(tv, (), ctx, i, positions=pos)
            srt = np.sort(np.abs(_np(tv)))
            for j, k in enumerate(ranks):
                st.brackets.append(RankBracket.from_sample(srt, k, numel))
                st.slots.append((i, j))
            assert r is not None
            # the sample's own order statistics, for the majority guess below
            r.apply_(tv, [float(srt[min(m - 1, int(k / numel * m))]) for k in ranks], ctx, i, positions=pos)
        if st.tracks_majority:
            # the tensor's majority sign predicted from the sample: undecided entries are merged with it as they
            # stream, and only if the full count disagrees are they amended in the output (see fixups)
            total = weighted_sum([t * w for t, w in zip(tvs, plan.weight, strict=True)], [1.0] * T)
            ssum = float(torch.sign(total).sum())
            st.guess = float((ssum > 0) - (ssum < 0))
        return st

    def wants_sweep(self, st: SparseState) -> bool:
        return any(b is not None for b in st.brackets)

    def _prepare(self, st: SparseState, start: int, tvs: list[torch.Tensor]) -> list[torch.Tensor]:
        for s in st.plan.elementwise:
            for i, tv in enumerate(tvs):
                s.apply_(tv, (), st.ctx, i, start)
        return tvs

    def sweep(self, st: SparseState, start: int, tvs: list[torch.Tensor]) -> None:
        self._prepare(st, start, tvs)
        mags: dict[int, np.ndarray] = {}
        for b, (i, _j) in zip(st.brackets, st.slots, strict=True):
            if b is None:
                continue
            if i not in mags:
                mags[i] = np.abs(_np(tvs[i]))
            b.count(mags[i])

    def end_sweep(self, st: SparseState) -> None:
        for n, b in enumerate(st.brackets):
            if b is None:
                continue
            v = b.resolve()
            i, j = st.slots[n]
            if v is None:  # the sample's bracket missed: one more sweep gathering everything
                st.brackets[n] = RankBracket(None, None, b.k, collect_all=True)
                continue
            st.values[i][j] = v
            st.brackets[n] = None

    def merge(self, st: SparseState, start: int, tvs: list[torch.Tensor]) -> torch.Tensor:
        plan = st.plan
        self._prepare(st, start, tvs)
        r = plan.ranked
        if r is not None:
            for i, tv in enumerate(tvs):
                r.apply_(tv, st.values[i], st.ctx, i, start)
        if plan.consensus is None and plan.fused_sum:
            acc = weighted_sum(tvs, plan.weight, inplace=True)
            if plan.normalize:
                acc.div_(float(sum(plan.weight)))
            return acc.mul_(plan.scaling)
        weighted = [t if w == 1.0 else t.mul_(w) for t, w in zip(tvs, plan.weight, strict=True)]
        if plan.consensus is None:
            acc = _sum_weighted(weighted)
            if plan.normalize:
                acc.div_(float(sum(plan.weight)))
            return acc.mul_(plan.scaling)
        total = weighted_sum(weighted, [1.0] * len(weighted))
        sign = torch.sign(total)
        del total
        if plan.consensus.zero == "positive":
            _fill_zero_sign_(sign, 1.0)
        elif st.majority is not None:
            _fill_zero_sign_(sign, st.majority)
        else:
            block_sum = int(sign.sum())
            recorded: tuple[Any, Any, Any] = (None, None, None)
            s_np = _np(sign)
            amb = s_np == 0
            if bool(amb.any()):
                live = weighted[0].abs()
                for t in weighted[1:]:
                    live.add_(t.abs())
                np.logical_and(amb, _np(live) > 0, out=amb)
                idx = np.flatnonzero(amb)
                if idx.size:
                    ti = torch.from_numpy(idx)
                    sub = [t.reshape(-1)[ti] for t in weighted]
                    one = torch.ones(idx.size, dtype=sign.dtype)
                    recorded = (idx + start, disjoint_mean(sub, plan.weight, one, plan.normalize).mul_(plan.scaling),
                                disjoint_mean(sub, plan.weight, one.neg(), plan.normalize).mul_(plan.scaling))
                _fill_zero_sign_(sign, st.guess)
            st.record(block_sum, *recorded)
        return disjoint_mean(weighted, plan.weight, sign, plan.normalize).mul_(plan.scaling)

    def fixups(self, st: SparseState) -> tuple[np.ndarray, torch.Tensor] | None:
        """(flat indices, delta values) of the entries whose elected sign was 0, if the tensor's majority sign
        (now known) differs from the guess they were merged with; None when nothing needs amending."""
        if not st.tracks_majority or not st.fix_idx:
            return None
        maj = (st.signsum > 0) - (st.signsum < 0)
        wrong = [i for i, g in enumerate(st.fix_guess) if g != maj]
        if not wrong:
            return None
        idx = np.concatenate([st.fix_idx[i] for i in wrong])
        if maj == 0:  # they stay unmerged: delta = (0 / 1 * 0 + 0) * lambda
            return idx, torch.zeros(len(idx), dtype=torch.float32).mul_(st.scaling)
        vals = st.fix_pos if maj > 0 else st.fix_neg
        picked = [vals[i] for i in wrong]  # recorded for every guess but maj (record's None is the guess's own)
        assert all(v is not None for v in picked)
        return idx, torch.cat(picked)  # type: ignore[arg-type]


def _sum_weighted(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = weighted[0]
    for t in weighted[1:]:
        acc.add_(t)
    return acc


#: tensors smaller than this are merged whole (the block machinery would not pay off)
BLOCKWISE_MIN_NUMEL = 1 << 18


def sparse_method(
    name: str,
    plan: PlanFn,
    *,
    params: Sequence[Param],
    summary: str,
    paper: str,
    url: str = "",
    doc: str,
    compiled: str | None = None,
    streams: Callable[[Mapping[str, Any]], bool] | None = None,
    stream: bool = True,
    **kwargs: Any,
) -> None:
    """Register a sparse merge method from its plan: the whole-tensor form is :func:`sparse_merge`, the streamed
    form :class:`SparseBlockwise` (used for tensors of at least ``BLOCKWISE_MIN_NUMEL`` entries). ``doc`` is
    the method's math (its docstring); ``compiled`` names a kernel family that runs its TIES-shaped plans;
    ``streams(params)`` says which parameters have no streamed form (a whole-tensor statistic such as
    ``rescale``); ``stream=False``: no streamed form at all (plans with a ``whole_tensor`` sparsifier)."""

    def fn(base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, **kw: Any) -> torch.Tensor:
        return sparse_merge(task_vectors, ctx, plan(kw, task_vectors[0].numel(), ctx))

    fn.__doc__ = doc
    fn.__name__ = fn.__qualname__ = name
    caps = Capabilities(blockwise=SparseBlockwise(plan, streams) if stream else None,
                        blockwise_min_numel=BLOCKWISE_MIN_NUMEL, compiled=compiled if stream else None)
    merge_method(name, params=params, summary=summary, paper=paper, url=url, capabilities=caps, **kwargs)(fn)
