"""Sparsifying methods: TIES-Merging and DARE (with task arithmetic or TIES).

TIES (Yadav et al., NeurIPS 2023) trims each task vector to its largest-magnitude entries, elects a sign per
entry, and averages the entries that agree with it. DARE (Yu et al., ICML 2024) drops entries at random and
rescales the survivors. Definitions follow the OptMerge code (MLLMerging ``baseline_merging.py``, itself taken
from MergeLM): trimming keeps ``|x| >= kthvalue(|x|, int((1 - density) * N))``; entries whose elected sign is 0
take the majority sign of the tensor (or, with ``granularity: global``, of all merged parameters).

DARE's masks are counter-based: entry j of expert i's task vector in tensor ``name`` is kept iff
``h(j) >= p * 2^32``, with h a 32-bit integer hash (lowbias32, C. Wellons) of an affine map of j keyed by
sha256(seed, name, i). The mask of an entry depends on nothing else: the same with any block size, number of
workers, merge order or device, and cheap to draw for any subset of entries (2-4x faster than torch's CPU RNG).

TIES and DARE-TIES also run block by block (:class:`TiesBlockwise`): the per-tensor thresholds come from a
strided sample that brackets the k-th magnitude and one counting sweep that places it exactly; the merge sweep
then streams; the few entries whose elected sign is 0 are amended once the tensor's majority sign is known.
The result is bit-identical to the whole-tensor computation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from omnimerge.methods.base import Capabilities, GlobalPass, Param, TensorContext, merge_method, scaling_param
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
    if threshold is None:
        return tv
    if tv.device.type == "cpu" and tv.dtype == torch.float32 and tv.is_contiguous():
        # x * [|x| >= t]: numpy's vectorised compare is ~10x torch's on CPU (a dropped entry becomes a signed
        # zero, which disjoint_merge treats like +0)
        a = tv.numpy()
        keep = np.greater_equal(np.abs(a), np.float32(threshold))
        return tv.mul_(torch.from_numpy(keep.view(np.uint8).astype(np.float32)).view(tv.shape))
    tv.masked_fill_(tv.abs() < threshold, 0.0)
    return tv


def disjoint_merge(
    trimmed: Sequence[torch.Tensor], weight: Sequence[float], majority: float | None = None
) -> torch.Tensor:
    """Sign election and disjoint mean over (weighted) trimmed task vectors.

    s = sign(sum_i w_i t_i); entries with s = 0 take the majority sign sign(sum s) (or ``majority`` when given,
    for the global variant; 0 leaves them at 0); merged = sum of the w_i t_i whose sign equals s, divided by the
    sum of their w_i (clamped at 1 where nothing agrees: those entries are 0).
    """
    weighted = [t if w == 1.0 else t * w for t, w in zip(trimmed, weight, strict=True)]
    total = weighted_sum(weighted, [1.0] * len(weighted))
    sign = torch.sign(total)
    del total
    maj = float(torch.sign(sign.sum())) if majority is None else majority
    if maj != 0.0:
        sign.masked_fill_(sign == 0, maj)
    return _disjoint_mean(weighted, weight, sign)


def _disjoint_mean(weighted: Sequence[torch.Tensor], weight: Sequence[float], sign: torch.Tensor) -> torch.Tensor:
    """sum_{i: sign(w_i t_i) = s} w_i t_i / sum_{same i} w_i (0 where none agrees), for elected signs ``sign``.

    Computed without boolean masks where all weights are positive: c_i = max(w_i t_i s, 0) is |w_i t_i| where
    it agrees and 0 elsewhere, sign(c_i) its indicator; s * sum_i c_i / den equals the masked sum over den
    bit for bit (IEEE addition and division are symmetric in sign); ``+ 0.0`` turns -0 into +0 as the masked
    form gives.
    """
    if all(w > 0.0 for w in weight):
        num = torch.zeros_like(sign)
        den = torch.zeros_like(sign)
        for t, w in zip(weighted, weight, strict=True):
            c = (t * sign).clamp_(min=0.0)
            num.add_(c)
            den.add_(torch.sign(c), alpha=w)
        # den = 0 exactly where nothing agrees (then num = 0): divide by 1 there
        den.add_(torch.sign(den).neg_().add_(1.0))
        return num.div_(den).mul_(sign).add_(0.0)
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for t, w in zip(weighted, weight, strict=True):
        agree = (t * sign) > 0
        num.add_(torch.where(agree, t, 0.0))
        den.add_(agree.to(den.dtype), alpha=w)
    return num.div_(den.masked_fill_(den == 0, 1.0))


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


# --- block-wise TIES / DARE-TIES (the engine streams a tensor in blocks) --------------------------------------------

#: tensors smaller than this are merged whole (the block machinery would not pay off)
BLOCKWISE_MIN_NUMEL = 1 << 18
_SAMPLE = 1 << 16


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


@dataclass
class _Bracket:
    """One expert's search for its k-th smallest |tau| over the streamed blocks."""

    lo: float | None
    hi: float | None
    le_lo: int = 0
    lt_lo: int = 0
    lt_hi: int = 0
    le_hi: int = 0
    inside: list[np.ndarray] = field(default_factory=list)
    collect_all: bool = False  # the sample's bracket missed: gather every magnitude in the next sweep


@dataclass
class TiesBlockState:
    ctx: TensorContext
    numel: int
    density: float
    weight: tuple[float, ...]
    scaling: float
    drop_rate: float
    k: int
    thresholds: list[float | None]
    majority: float | None
    brackets: list[_Bracket | None]
    seed: int = 0  # DARE's seed parameter (the masks' key)
    signsum: int = 0
    # the majority sign predicted from the sample, then from the sign sum so far: undecided entries are merged
    # with it as they stream, and amended afterwards only where it differs from the tensor's majority
    guess: float = 0.0
    fix_idx: list[np.ndarray] = field(default_factory=list)
    fix_guess: list[float] = field(default_factory=list)  # the guess each group of fix_idx was merged with
    fix_pos: list[torch.Tensor | None] = field(default_factory=list)
    fix_neg: list[torch.Tensor | None] = field(default_factory=list)

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


class TiesBlockwise:
    """TIES / DARE-TIES over a tensor streamed in blocks, bit-identical to the whole-tensor computation.

    Protocol (driven by the engine, see ``MergeRun._merge_job_blockwise``): ``begin`` (with a sampler that returns
    the task vectors at given flat positions), then while ``wants_sweep``: ``sweep`` over every block in order and
    ``end_sweep``; then ``merge`` of every block in order (returns the delta block); finally ``fixups``: the flat
    indices and delta values of the entries that could only be decided once the whole tensor was seen.

    Thresholds (``granularity: tensor``): a strided sample of 65,536 magnitudes brackets the k-th smallest
    [lo, hi] with a margin of 8 standard deviations of the sample quantile; one counting sweep counts the
    entries at or below lo and below hi and gathers those strictly inside (a few percent), which places the k-th
    value exactly. A missed bracket (NaN-free inputs make it vanishingly rare) costs one more sweep that gathers
    all magnitudes of that expert. Majority sign: entries whose elected sign is 0 while some trimmed entry is
    non-zero are merged with the majority sign guessed from the sample, then from the sign sum so far; their
    values for the other sign are kept, and once the tensor's sign sum is known the entries merged with a wrong
    guess are amended (``fixups``).
    """

    def begin(
        self,
        ctx: TensorContext,
        numel: int,
        params: Mapping[str, Any],
        sample: Callable[[np.ndarray], list[torch.Tensor]],
    ) -> TiesBlockState:
        drop = float(params.get("drop_rate", 0.0) or 0.0)
        weight = tuple(float(w) for w in params["weight"])
        T = len(weight)
        st = TiesBlockState(ctx, numel, float(params["density"]), weight, float(params["scaling"]), drop,
                            trim_count(numel, float(params["density"])), [None] * T, None, [None] * T,
                            seed=int(params.get("seed") or 0))
        if params.get("granularity") == "global":
            st.thresholds = list(ctx.stats["threshold"])
            st.majority = float(ctx.stats["majority"])
            return st
        if st.k <= 0:  # no thresholds to find: no sample (undecided entries stay 0 until the count is known)
            return st
        step = max(1, numel // _SAMPLE)
        pos = np.arange(0, numel, step, dtype=np.int64)
        tvs = sample(pos)
        m = pos.size
        q = st.k / numel
        margin = 8.0 * (m * q * (1.0 - q)) ** 0.5 + 0.005 * m + 16
        lo_i, hi_i = int(q * m - margin), int(q * m + margin) + 1
        for i, tv in enumerate(tvs):
            if drop > 0.0:
                dare_(tv, drop, ctx, i, positions=pos, seed=st.seed)
            srt = np.sort(np.abs(_np(tv)))
            st.brackets[i] = _Bracket(float(srt[lo_i]) if lo_i >= 0 else None,
                                      float(srt[hi_i]) if hi_i < m else None)
            trim_(tv, float(srt[min(m - 1, int(q * m))]))  # the sample's own threshold, for the guess below
        # the tensor's majority sign predicted from the sample: undecided entries are merged with it as they
        # stream, and only if the full count disagrees are they amended in the output (see fixups)
        total = weighted_sum([t * w for t, w in zip(tvs, weight, strict=True)], [1.0] * T)
        ssum = float(torch.sign(total).sum())
        st.guess = float((ssum > 0) - (ssum < 0))
        return st

    def wants_sweep(self, st: TiesBlockState) -> bool:
        return any(b is not None for b in st.brackets)

    def _prepare(self, st: TiesBlockState, start: int, tvs: list[torch.Tensor]) -> list[torch.Tensor]:
        if st.drop_rate > 0.0:
            for i, tv in enumerate(tvs):
                dare_(tv, st.drop_rate, st.ctx, i, start, seed=st.seed)
        return tvs

    def sweep(self, st: TiesBlockState, start: int, tvs: list[torch.Tensor]) -> None:
        self._prepare(st, start, tvs)
        for tv, b in zip(tvs, st.brackets, strict=True):
            if b is None:
                continue
            a = np.abs(_np(tv))
            if b.collect_all:
                b.inside.append(a)
                continue
            lo, hi = b.lo, b.hi
            inside = None
            if lo is not None:
                flo = np.float32(lo)
                b.le_lo += int(np.count_nonzero(a <= flo))
                b.lt_lo += int(np.count_nonzero(a < flo))
                inside = a > flo
            if hi is not None:
                fhi = np.float32(hi)
                below = a < fhi
                b.lt_hi += int(np.count_nonzero(below))
                b.le_hi += int(np.count_nonzero(a <= fhi))
                inside = below if inside is None else np.logical_and(inside, below, out=inside)
            b.inside.append(a[inside] if inside is not None else a.copy())

    def end_sweep(self, st: TiesBlockState) -> None:
        for i, b in enumerate(st.brackets):
            if b is None:
                continue
            k = st.k
            vals = np.concatenate(b.inside) if b.inside else np.empty(0, np.float32)
            b.inside = []
            th: float | None = None
            if b.collect_all:
                th = float(np.partition(vals, k - 1)[k - 1])
            elif b.lo is not None and k <= b.le_lo:
                th = b.lo if k > b.lt_lo else None
            elif b.hi is not None and k > b.lt_hi:
                th = b.hi if k <= b.le_hi else None
            else:
                r = k - (b.le_lo if b.lo is not None else 0)
                th = float(np.partition(vals, r - 1)[r - 1]) if 0 < r <= vals.size else None
            if th is None:  # the sample's bracket missed: one more sweep gathering everything
                st.brackets[i] = _Bracket(None, None, collect_all=True)
                continue
            st.thresholds[i] = th
            st.brackets[i] = None

    def merge(self, st: TiesBlockState, start: int, tvs: list[torch.Tensor]) -> torch.Tensor:
        self._prepare(st, start, tvs)
        trimmed = [trim_(tv, th) for tv, th in zip(tvs, st.thresholds, strict=True)]
        weighted = [t if w == 1.0 else t.mul_(w) for t, w in zip(trimmed, st.weight, strict=True)]
        total = weighted_sum(weighted, [1.0] * len(weighted))
        sign = torch.sign(total)
        del total
        if st.majority is not None:
            if st.majority != 0.0:  # s = 0 -> majority: s + (1 - |s|) * maj (exact on {-1, 0, 1})
                sign.add_(sign.abs().neg_().add_(1.0).mul_(st.majority))
        else:
            block_sum = int(sign.sum())
            recorded: tuple[Any, Any, Any] = (None, None, None)
            s_np = _np(sign)
            amb = s_np == 0
            any_zero = bool(amb.any())
            if any_zero:
                live = weighted[0].abs()
                for t in weighted[1:]:
                    live.add_(t.abs())
                np.logical_and(amb, _np(live) > 0, out=amb)
                idx = np.flatnonzero(amb)
                if idx.size:
                    ti = torch.from_numpy(idx)
                    sub = [t.reshape(-1)[ti] for t in weighted]
                    one = torch.ones(idx.size, dtype=sign.dtype)
                    recorded = (idx + start, _disjoint_mean(sub, st.weight, one).mul_(st.scaling),
                                _disjoint_mean(sub, st.weight, one.neg()).mul_(st.scaling))
                if st.guess != 0.0:
                    sign.add_(sign.abs().neg_().add_(1.0).mul_(st.guess))
            st.record(block_sum, *recorded)
        return _disjoint_mean(weighted, st.weight, sign).mul_(st.scaling)

    def fixups(self, st: TiesBlockState) -> tuple[np.ndarray, torch.Tensor] | None:
        """(flat indices, delta values) of the entries whose elected sign was 0, if the tensor's majority sign
        (now known) differs from the guess they were merged with; None when nothing needs amending."""
        if st.majority is not None or not st.fix_idx:
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


_BLOCKWISE = TiesBlockwise()
#: TIES and DARE-TIES stream block by block (TiesBlockwise), whose sweeps and merge also run compiled
#: (omnimerge.kernels.TiesBlocks: the same float32 operations)
_TIES_STREAMED = Capabilities(blockwise=_BLOCKWISE, blockwise_min_numel=BLOCKWISE_MIN_NUMEL, compiled="ties")


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
    capabilities=_TIES_STREAMED,
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
    (seed, tensor name, i): see the module docstring); W = W0 + lambda sum_i w_i tau_i'. Paper default p = 0.2
    (MLLMerging ``weight_mask_rate``). With p = 0 it equals task arithmetic exactly.
    """
    dropped = [dare_(tv, drop_rate, ctx, i, ctx.offset, seed=seed) for i, tv in enumerate(task_vectors)]
    return weighted_sum(dropped, weight, inplace=True).mul_(scaling)


@merge_method(
    "dare_ties",
    params=[scaling_param(0.3), DROP_RATE, DENSITY, GRANULARITY, SEED, WEIGHT],
    summary="DARE + TIES: random drop and rescale, then TIES trimming, sign election and disjoint mean.",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    url="https://arxiv.org/abs/2311.03099",
    global_pass=_GLOBAL_TIES,
    capabilities=_TIES_STREAMED,
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
    dropped = [dare_(tv, drop_rate, ctx, i, seed=seed) for i, tv in enumerate(task_vectors)]
    merged = _ties(dropped, ctx, density, granularity, weight)
    return merged.mul_(scaling)
