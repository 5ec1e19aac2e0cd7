"""The numba-compiled loops behind :mod:`omnimerge.kernels` (imported on first use: ``import numba`` alone costs
~0.25 s). Module-level functions, so that numba caches their machine code on disk between runs."""

from __future__ import annotations

from typing import Any

import llvmlite.ir as ir
import numba as nb
import numpy as np
from numba.core import types
from numba.extending import intrinsic, overload

_OPTS = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}
#: loops called only from other kernels: inlined into their callers (numba IR), so that they are not compiled
#: and optimised once on their own and again inside each caller (a third of the TIES sweep's compilation)
_INLINE = {**_OPTS, "inline": "always"}
#: entries per sub-block inside a kernel call (the float32 working rows stay in a core's L2 cache)
SUB = 1 << 16
_I32 = ir.IntType(32)


@intrinsic
def _f32(typingctx: Any, x: Any) -> Any:
    """An input entry as float32: bfloat16 bits (uint16) widened exactly (<< 16, reinterpreted), float32 as is."""
    if x == types.uint16:
        def widen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            w = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(w, ir.FloatType())
        return types.float32(x), widen
    if x == types.float32:
        return types.float32(x), lambda context, builder, signature, args: args[0]
    return None


@intrinsic
def _bits(typingctx: Any, x: Any) -> Any:
    """The bits of a float32 (reinterpreted as uint32)."""
    return types.uint32(types.float32), lambda context, builder, signature, args: builder.bitcast(args[0], _I32)


@intrinsic
def _bf16(typingctx: Any, x: Any) -> Any:
    """float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (as torch rounds)."""
    def rnd(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        u = builder.bitcast(args[0], _I32)
        nan = builder.icmp_unsigned(">", builder.and_(u, ir.Constant(_I32, 0x7FFFFFFF)), ir.Constant(_I32, 0x7F800000))
        lsb = builder.and_(builder.lshr(u, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        r = builder.lshr(builder.add(builder.add(u, ir.Constant(_I32, 0x7FFF)), lsb), ir.Constant(_I32, 16))
        return builder.trunc(builder.select(nan, ir.Constant(_I32, 0x7FC0), r), ir.IntType(16))
    return types.uint16(types.float32), rnd


def _lowbias32(builder: Any, x: Any) -> Any:
    """lowbias32 (Wellons) on an i32 value: the mixing rounds of ties._mix32_."""
    def c(v: int) -> Any:
        return ir.Constant(_I32, v)
    x = builder.xor(x, builder.lshr(x, c(16)))
    x = builder.mul(x, c(0x7FEB352D))
    x = builder.xor(x, builder.lshr(x, c(15)))
    x = builder.mul(x, c(0x846CA68B))
    return builder.xor(x, builder.lshr(x, c(16)))


@intrinsic
def _mix32(typingctx: Any, x: Any) -> Any:
    """lowbias32 of the low 32 bits of an integer, as uint32 (ties._mix32_)."""
    if not isinstance(x, types.Integer):
        return None
    return types.uint32(x), lambda context, builder, signature, args: _lowbias32(builder, builder.trunc(args[0], _I32))


@intrinsic
def _dare_keep(typingctx: Any, pos: Any, a: Any, b: Any, thr: Any) -> Any:
    """Whether DARE keeps flat entry ``pos`` (< 2^32): lowbias32(low32(pos * a + b)) >= thr, as ties._dare_hash.

    In 32-bit arithmetic throughout (the low 32 bits of the product are the same), so that a loop over entries
    vectorises with 32-bit multiplies: twice as fast as the same hash spelled in numba's 64-bit integers. The
    caller keeps ``thr`` <= 2^32 - 1 (drop rates that round to 2^32 drop everything by a zero scale instead).
    """
    def gen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        p, ka, kb, t = (builder.trunc(v, _I32) for v in args)
        x = _lowbias32(builder, builder.add(builder.mul(p, ka), kb))
        return builder.icmp_unsigned(">=", x, t)
    if not all(isinstance(v, types.Integer) for v in (pos, a, b, thr)):
        return None
    return types.boolean(pos, a, b, thr), gen


def _put(out: Any, j: Any, v: Any) -> None:
    """out[j] = v in the output's dtype (bfloat16 bits for a uint16 array). Resolved at compile time."""


@overload(_put, inline="always")
def _put_ov(out: Any, j: Any, v: Any) -> Any:
    if out.dtype == types.uint16:
        def put_bf16(out: Any, j: Any, v: Any) -> None:
            out[j] = _bf16(v)
        return put_bf16

    def put(out: Any, j: Any, v: Any) -> None:
        out[j] = v
    return put


@nb.njit(**_OPTS)
def linear(base: Any, experts: Any, sm: Any, sd: Any, out: Any) -> bool:
    """out = W0 + ((sum_i (W_i - W0)) * sm) / sd in the output's dtype, one pass over the inputs for any number
    of experts (a tuple of same-typed 1-D arrays: one specialisation per count, compiled when first used). The
    sum runs left to right over the experts, as the torch path's. False: a non-finite delta."""
    bad = np.uint32(0)
    e0 = experts[0]
    for j in range(base.size):
        b = _f32(base[j])
        a = _f32(e0[j]) - b
        for i in range(1, len(experts)):
            a = a + (_f32(experts[i][j]) - b)
        a = (a * sm) / sd
        bad |= (_bits(a) & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
        _put(out, j, b + a)
    return bad == 0


@nb.njit(**_OPTS)
def average(experts: Any, sm: Any, sd: Any, out: Any) -> bool:
    """out = ((sum_i W_i) * sm) / sd from the experts' weights alone (weight averaging as the reference computes
    it: no base, no subtraction); as :func:`linear` otherwise. False: a non-finite result."""
    bad = np.uint32(0)
    e0 = experts[0]
    for j in range(e0.size):
        a = _f32(e0[j])
        for i in range(1, len(experts)):
            a = a + _f32(experts[i][j])
        a = (a * sm) / sd
        bad |= (_bits(a) & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
        _put(out, j, a)
    return bad == 0


@nb.njit(**_INLINE)
def _store(res: Any, m: int, out: Any, s0: int) -> None:
    """res[:m] (float32) into out[s0:s0+m] in the output's dtype (see _put)."""
    for j in range(m):
        _put(out, s0 + j, res[j])


@nb.njit(**_INLINE)
def _load(base: Any, experts: Any, s0: int, m: int, bf: Any, tv: Any) -> None:
    """Entries [s0, s0 + m) of the inputs: the base as float32 into bf, the task vectors W_i - W0 into tv."""
    for j in range(m):
        bf[j] = _f32(base[s0 + j])
    for i in range(len(experts)):
        e = experts[i]
        row = tv[i]
        for j in range(m):
            row[j] = _f32(e[s0 + j]) - bf[j]


@nb.njit(**_INLINE)
def prepare(tv: Any, n: int, start: int, keys: Any, dthr: int, dscale: float, use_drop: bool) -> bool:
    """Finiteness of the task vectors, then DARE (as ties.dare_: counter-based masks) in place."""
    finite = True
    s = np.float32(dscale)
    zero = np.float32(0.0)
    for i in range(tv.shape[0]):
        row = tv[i]
        for j in range(n):
            if not np.isfinite(row[j]):
                finite = False
        if use_drop:
            a = np.uint64(keys[i, 0])
            b = np.uint64(keys[i, 1])
            c = np.uint64(keys[i, 2])
            m32 = np.uint64(0xFFFFFFFF)
            thr = np.uint64(dthr)
            if start + n - 1 <= 0xFFFFFFFF:  # (the usual case: a branch-free loop the compiler vectorises)
                for j in range(n):
                    row[j] = row[j] * (s if _dare_keep(start + j, a, b, thr) else zero)
            else:
                for j in range(n):
                    pos = np.uint64(start + j)
                    x = np.uint64(_mix32(pos * a + b))
                    if pos > m32:  # positions past 2^32: the high word keyed in (ties._dare_hash)
                        x = np.uint64(_mix32(x ^ ((pos >> np.uint64(32)) * c)))
                    row[j] = row[j] * (s if x >= thr else zero)
    return finite

@nb.njit(**_INLINE)
def _count4(row: Any, n: int, flo: Any, fhi: Any) -> Any:
    le_lo = 0
    lt_lo = 0
    lt_hi = 0
    le_hi = 0
    for j in range(n):
        a = abs(row[j])
        le_lo += a <= flo
        lt_lo += a < flo
        lt_hi += a < fhi
        le_hi += a <= fhi
    return le_lo, lt_lo, lt_hi, le_hi


@nb.njit(**_INLINE)
def _gather(row: Any, n: int, flo: Any, fhi: Any, inside: Any) -> int:
    k = 0
    for j in range(n):
        a = abs(row[j])
        if (a > flo) & (a < fhi):  # one predictable branch (inside is rare), no short-circuit branch
            inside[k] = a
            k += 1
    return k


@nb.njit(**_INLINE)
def count(row: Any, n: int, lo: float, hi: float, has_lo: bool, has_hi: bool, inside: Any) -> Any:
    """Counts of |x| <= lo, < lo, < hi, <= hi; the magnitudes strictly inside (lo, hi) go to ``inside``
    (a missing bound is -inf / +inf; its counts are then meaningless and unused)."""
    flo = np.float32(lo) if has_lo else np.float32(-np.inf)
    fhi = np.float32(hi) if has_hi else np.float32(np.inf)
    le_lo, lt_lo, lt_hi, le_hi = _count4(row, n, flo, fhi)
    k = _gather(row, n, flo, fhi, inside) if lt_hi - le_lo > 0 else 0  # lt_hi - le_lo entries are inside
    return le_lo, lt_lo, lt_hi, le_hi, k


@nb.njit(**_INLINE)
def ties_merge(tv: Any, bf: Any, n: int, start: int, thr: Any, use_thr: Any, w: Any, scaling: float,
               maj: float, maj_known: bool, tot: Any, acc: Any, out: Any, flag: Any, amb_idx: Any, amb_pos: Any,
               amb_neg: Any) -> Any:
    """TIES on prepared (DARE-masked) task vectors ``tv[:, :n]``: trim, weight, elect, disjoint mean, scale,
    add the base (into ``out``); the same float32 operations as operators.SparseBlockwise.merge. Returns (finite,
    sum of elected signs, number of undecided entries, recorded in amb_*).

    The disjoint mean for an elected sign s sums c_i = max(t_i s, 0): for s = +1 that is max(t_i, 0), for
    s = -1 max(-t_i, 0). Both sums (and their weight sums) are accumulated for every entry, and each entry
    takes the pair of its sign: the same operations as computing with s directly, and for the entries whose
    sign is undecided (0, with some non-zero t_i) both candidates are at hand."""
    T = tv.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for i in range(T):
        row = tv[i]
        if use_thr[i]:
            t = np.float32(thr[i])
            for j in range(n):
                row[j] = row[j] * (one if abs(row[j]) >= t else zero)
        wi = np.float32(w[i])
        if wi != one:
            for j in range(n):
                row[j] = row[j] * wi
    for j in range(n):
        tot[j] = tv[0, j]
    for i in range(1, T):
        row = tv[i]
        for j in range(n):
            tot[j] = tot[j] + row[j]
    signsum = 0
    for j in range(n):  # tot becomes the elected sign
        x = tot[j]
        tot[j] = one if x > zero else (-one if x < zero else zero)
    if not maj_known:
        for j in range(n):
            signsum += np.int64(tot[j])
    pn = acc[0]
    pd = acc[1]
    nn = acc[2]
    nd = acc[3]
    for j in range(n):
        pn[j] = zero
        pd[j] = zero
        nn[j] = zero
        nd[j] = zero
    for i in range(T):
        row = tv[i]
        wi = np.float32(w[i])
        for j in range(n):
            t = row[j]
            cp = t if t > zero else zero
            cn = -t if -t > zero else zero
            pn[j] = pn[j] + cp
            pd[j] = pd[j] + wi * (one if cp > zero else zero)
            nn[j] = nn[j] + cn
            nd[j] = nd[j] + wi * (one if cn > zero else zero)
    sc = np.float32(scaling)
    namb = 0
    if not maj_known:
        cnt = 0
        for j in range(n):  # undecided: sign 0 with some non-zero entry (a flag pass, then the sparse gather)
            f = (tot[j] == zero) & ((pn[j] + nn[j]) > zero)
            flag[j] = f
            cnt += f
        for j in range(n if cnt else 0):
            if flag[j]:
                de = pd[j] + (one - (one if pd[j] > zero else zero))
                amb_pos[namb] = ((pn[j] / de) * one + zero) * sc
                de = nd[j] + (one - (one if nd[j] > zero else zero))
                amb_neg[namb] = ((nn[j] / de) * -one + zero) * sc
                amb_idx[namb] = start + j
                namb += 1
    m = np.float32(maj)  # the majority (known), or its guess: sign 0 -> m
    if m != zero:
        for j in range(n):
            x = tot[j]
            tot[j] = m if x == zero else x
    finite = True
    for j in range(n):
        s = tot[j]
        p = pn[j]  # every operand loaded first: the choices below are selects, not branches
        q = nn[j]
        dp = pd[j]
        dq = nd[j]
        nu = p if s > zero else q
        nu = nu if s != zero else zero
        de = dp if s > zero else dq
        de = de if s != zero else zero
        de = de + (one - (one if de > zero else zero))
        v = ((nu / de) * s + zero) * sc
        finite &= np.isfinite(v)
        out[j] = bf[j] + v
    return finite, signsum, namb


@nb.njit(**_OPTS)
def ties_sweep_chunk(base: Any, experts: Any, bf: Any, tv: Any, start: int, keys: Any, dthr: int, dscale: float, use_drop: bool, active: Any, lo: Any, hi: Any, has_lo: Any,
                     has_hi: Any, counts: Any, inside: Any, ninside: Any) -> bool:
    """A chunk of a statistics sweep: per active expert, the four counts (added to ``counts[i]``) and the
    magnitudes inside its bracket (appended to ``inside[i]`` from ``ninside[i]`` on). False: non-finite input."""
    n = base.size
    finite = True
    for s0 in range(0, n, SUB):
        m = min(SUB, n - s0)
        _load(base, experts, s0, m, bf, tv)
        finite &= prepare(tv, m, start + s0, keys, dthr, dscale, use_drop)
        for i in range(tv.shape[0]):
            if active[i]:
                a, b, c, d, k = count(tv[i], m, lo[i], hi[i], has_lo[i], has_hi[i], inside[i, ninside[i]:])
                counts[i, 0] += a
                counts[i, 1] += b
                counts[i, 2] += c
                counts[i, 3] += d
                ninside[i] += k
    return finite


@nb.njit(**_OPTS)
def ties_merge_chunk(base: Any, experts: Any, bf: Any, tv: Any, start: int, keys: Any, dthr: int, dscale: float, use_drop: bool, thr: Any, use_thr: Any, w: Any, scaling: float,
                     maj: float, maj_known: bool, tot: Any, acc: Any, res: Any, flag: Any, amb_idx: Any,
                     amb_pos: Any, amb_neg: Any, out: Any) -> Any:
    """A chunk of the merge sweep, in sub-blocks: load, DARE, TIES, store to ``out`` (bfloat16 bits or float32).
    Returns (finite, sum of elected signs, undecided entries recorded in amb_*)."""
    n = base.size
    finite = True
    signsum = 0
    namb = 0
    for s0 in range(0, n, SUB):
        m = min(SUB, n - s0)
        _load(base, experts, s0, m, bf, tv)
        finite &= prepare(tv, m, start + s0, keys, dthr, dscale, use_drop)
        ok, ss, na = ties_merge(tv, bf, m, start + s0, thr, use_thr, w, scaling, maj, maj_known,
                                tot, acc, res, flag, amb_idx[namb:], amb_pos[namb:], amb_neg[namb:])
        finite &= ok
        signsum += ss
        namb += na
        _store(res, m, out, s0)
    return finite, signsum, namb


@nb.njit(**_OPTS)
def reduce_flags(bad: Any, sgn: Any, flag: Any) -> Any:
    """(any non-finite, sum of signs, number of flagged) over per-entry byte arrays (the fused loops' outputs)."""
    b = 0
    s = 0
    f = 0
    for j in range(bad.size):
        b |= bad[j]
        s += sgn[j]
        f += flag[j]
    return b != 0, s, f


@nb.njit(**_OPTS)
def compact_flags(flag: Any, words: Any, idx: Any) -> int:
    """The positions of the non-zero bytes of ``flag``, in order, into ``idx``; returns their number. Skips
    eight zero bytes at a time through ``words``, the first ``8 * words.size`` bytes of ``flag`` viewed as
    uint64 by the caller (a view taken inside the kernel costs a third of a second of compilation); the flagged
    entries are a few percent."""
    n = flag.size
    head = 8 * words.size
    c = 0
    for q in range(words.size):
        if words[q] != 0:
            for j in range(8 * q, 8 * q + 8):
                idx[c] = j
                c += flag[j] != 0
    for j in range(head, n):
        idx[c] = j
        c += flag[j] != 0
    return c


KERNELS = {"linear": linear, "average": average, "prepare": prepare, "reduce_flags": reduce_flags, "compact_flags": compact_flags, "load": _load,
           "ties_sweep_chunk": ties_sweep_chunk, "ties_merge_chunk": ties_merge_chunk}
