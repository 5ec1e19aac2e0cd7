"""Fused elementwise kernels for the engine's streaming path (numba: compiled on first use, cached on disk).

A linear merge (task arithmetic, weight average) costs per element T + 1 loads and conversions, T subtractions,
T - 1 additions, one scaling, one addition and one rounding to the output dtype. With torch each of these is a
kernel call per 64K-element block (a few microseconds of dispatch each, and a pass over the block); the
kernels here do all of them in one compiled call per block: one loop over a tuple of the experts (any number,
one pass over the inputs) for the linear methods, and generated loops (``omnimerge/_generated``) for TIES. They perform the same IEEE float32 operations in the
same order as the torch path (``weighted_sum`` with unit weights, then the method's scaling, then ``W0 + delta``
rounded to the output dtype with round-to-nearest-even), so the output is bit-identical; tests compare the two.
Weight averaging from full checkpoints sums the experts' weights themselves (no base, no subtraction), as the
method's ``from_weights`` form does.

Used when numba is installed and the inputs are all bfloat16 or all float32, the output bfloat16 or float32,
and the weights are 1 (torch's ``add(alpha=w)`` may fuse a multiply-add, which a plain kernel would not
reproduce bit for bit). Anything else takes the torch path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

_lock = threading.Lock()
_compiled: dict[str, Any] | None = None
_failed = False


def _build() -> dict[str, Any] | None:
    from omnimerge._kernels_nb import KERNELS

    return KERNELS


_warm = threading.Event()  # the background load has finished (everything it compiles)
_warm_thread: threading.Thread | None = None
#: the kernels the background load has made callable without waiting: "linear", "ties_sweep", "ties_merge"
_ready: set[str] = set()


def preload(in_dtype: torch.dtype, out_dtype: torch.dtype, experts: int, ties: bool = False,
            drop: bool = False, direct: bool | None = None) -> None:
    """Load the compiled kernels for this dtype combination on a background thread (``import numba`` and loading
    the cached machine code take ~0.25 s; compiling them, on the first merge after installation, ~0.3 s for the
    linear loop and ~1 s for TIES's): merging starts at once on the torch path and switches to the kernels,
    chunk by chunk, as soon as :func:`ready` says so. Both give the same bits. ``ties``: the TIES loops (with
    DARE masks if ``drop``) instead of the linear ones; ``direct``: only the loop over the experts' weights
    (True) or over task vectors (False), None both. Only what the merge calls is compiled; TIES's loop for entries
    without a majority guess (rare) compiles on the worker that first needs it."""
    global _warm_thread
    if _warm_thread is not None:
        return
    _warm.clear()
    _ready.clear()

    def work() -> None:
        try:
            if _kernels() is None:
                return
            n = 64
            base = torch.zeros(n, dtype=in_dtype)
            if ties:
                from omnimerge.methods.base import TensorContext
                from omnimerge.methods.operators import (
                    MagnitudeTopK,
                    RandomDrop,
                    SignConsensus,
                    SparsePlan,
                    SparseState,
                )

                # +1 and -1 entries: undecided (elected sign 0) entries, so that every loop of a merge loads here
                pm = [torch.ones(n, dtype=in_dtype), -torch.ones(n, dtype=in_dtype)]
                sp = ((RandomDrop(0.5, 0),) if drop else ()) + (MagnitudeTopK(1.0, n),)
                plan = SparsePlan(sp, (1.0,) * experts, 1.0, SignConsensus("majority"))
                es = (pm * experts)[:experts]
                if experts % 2:
                    es[-1] = base
                from omnimerge.methods.operators import RankBracket

                def state(guess: float) -> SparseState:
                    st = SparseState(TensorContext(name="warm-up"), n, plan, [[] for _ in range(experts)], [], [])
                    st.guess = guess
                    return st

                # the statistics sweep first (a TIES job starts with it), then the merge loop
                st = state(0.0)
                st.brackets = [RankBracket(0.0, 1.0, 1) for _ in range(experts)]
                TiesBlocks(st, out_dtype, n).sweep(st, 0, base, es)
                _ready.add("ties_sweep")
                st = state(1.0)  # with a guessed majority sign: the main loop and the flag reductions
                TiesBlocks(st, out_dtype, n).merge(st, 0, base, es)
                _ready.add("ties_merge")
                # (the loop for entries without a majority guess compiles where a merge first needs it: rarely)
            else:
                for d in (False, True) if direct is None else (direct,):
                    LinearBlocks(out_dtype, n, 1.0, "mul", d)(base, [base] * experts)
                _ready.add("linear")
        except Exception:  # noqa: BLE001 - kernels that do not compile here are not used: the torch path runs
            global _compiled, _failed
            _compiled, _failed = None, True
        finally:
            _warm.set()

    _warm_thread = threading.Thread(target=work, name="omnimerge-kernels", daemon=True)
    _warm_thread.start()


def wait() -> None:
    """Block until a :func:`preload` in progress has finished (tests use it to make the kernel path certain)."""
    if _warm_thread is not None:
        _warm_thread.join()


def ready(kind: str) -> bool:
    """Whether the kernels of ``kind`` ("linear", "ties_sweep", "ties_merge") may be called without waiting for
    them to load or compile (see :func:`preload`): each becomes ready as soon as it has compiled."""
    if _warm_thread is None:
        return _kernels() is not None
    return _compiled is not None and (kind in _ready or _warm.is_set())


def available() -> bool:
    """Whether the compiled kernels can be used (numba importable and compiling)."""
    return _kernels() is not None


def _kernels() -> dict[str, Any] | None:
    global _compiled, _failed
    if _compiled is not None or _failed:
        return _compiled
    with _lock:
        if _compiled is None and not _failed:
            try:
                _compiled = _build()
            except Exception:  # noqa: BLE001 - no numba, or it cannot compile here: the torch path is used
                _failed = True
    return _compiled


def _words(flag: np.ndarray) -> np.ndarray:
    """The whole 8-byte words at the start of a byte array, as uint64 (for compact_flags)."""
    return flag[: flag.size - flag.size % 8].view(np.uint64)


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


#: entries per kernel call: large enough that the Python around a call (which holds the GIL) is a few percent of
#: the call (which releases it), so that worker threads really run in parallel; kernels work in 64K sub-blocks
CHUNK = 1 << 20
SUB = 1 << 16


class LinearBlocks:
    """Merges chunks of one tensor: ``W0 + op(sum_i (W_i - W0))`` (op: scale by ``scale`` or divide by it), or
    with ``direct`` ``op(sum_i W_i)`` from the experts alone (no base), rounded to the output dtype. ``supports``
    says whether a dtype combination is handled."""

    def __init__(self, out_dtype: torch.dtype, chunk: int, scale: float, mode: str, direct: bool = False) -> None:
        k = _kernels()
        assert k is not None
        self.loop = k["average" if direct else "linear"]
        self.direct = direct
        # delta = (sum * sm) / sd: x * 1 and x / 1 are exact, so one loop serves all three modes
        s = np.float32(scale)
        one = np.float32(1.0)
        self.sm, self.sd = {"none": (one, one), "mul": (s, one), "div": (one, s)}[mode]
        self.out = torch.empty(chunk, dtype=out_dtype)

    @staticmethod
    def supports(in_dtypes: Sequence[torch.dtype], out_dtype: torch.dtype, compute: torch.dtype) -> bool:
        if compute != torch.float32 or out_dtype not in (torch.bfloat16, torch.float32):
            return False
        if len(set(in_dtypes)) != 1 or in_dtypes[0] not in (torch.bfloat16, torch.float32):
            return False
        return _kernels() is not None

    def __call__(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The merged chunk in the output dtype (a view of a reused buffer), or None if the delta (``direct``: the
        result) is not finite: one compiled pass over all the inputs (:func:`omnimerge._kernels_nb.linear`).
        ``base`` is None with ``direct``."""
        n = experts[0].numel()
        out = self.out[:n]
        es = tuple(np.ascontiguousarray(_np(e)) for e in experts)  # one array type: a homogeneous tuple
        if self.direct:
            ok = self.loop(es, self.sm, self.sd, _np(out))
        else:
            ok = self.loop(np.ascontiguousarray(_np(base)), es, self.sm, self.sd, _np(out))  # type: ignore[arg-type]
        return out if ok else None


class TiesBlocks:
    """Compiled TIES / DARE-TIES over raw (bfloat16 or float32) input chunks, for the engine's block-wise path:
    ``sweep`` and ``merge`` do what :class:`omnimerge.methods.operators.SparseBlockwise` does on torch task vectors, with
    the same float32 operations (tests check the outputs bit for bit), one compiled call per chunk."""

    def __init__(self, st: Any, out_dtype: torch.dtype, chunk: int) -> None:
        from omnimerge.methods.operators import dare_key

        k = _kernels()
        assert k is not None
        self.k = k
        T = len(st.weight)
        self.tv = np.empty((T, SUB), np.float32)
        self.bf = np.empty(SUB, np.float32)
        self.tot = np.empty(SUB, np.float32)
        self.acc = np.empty((4, SUB), np.float32)
        self.res = np.empty(SUB, np.float32)
        self.flag = np.empty(SUB, np.bool_)
        self.amb_idx = np.empty(chunk, np.int64)
        self.amb_pos = np.empty(chunk, np.float32)
        self.amb_neg = np.empty(chunk, np.float32)
        self.chunk = chunk
        self.inside: np.ndarray | None = None
        self.flags: np.ndarray | None = None
        self.alt: np.ndarray | None = None
        self.use_drop = st.drop_rate > 0.0
        self.keys = np.array([dare_key(st.ctx, i, st.seed) for i in range(T)] if self.use_drop else [(0, 0, 0)] * T,
                             dtype=np.int64)
        self.dthr = round(st.drop_rate * 2.0**32)
        self.dscale = float(np.float32(1.0 / (1.0 - st.drop_rate))) if self.use_drop else 1.0
        if self.dthr > 0xFFFFFFFF:  # p rounds to 1: every entry dropped. The kernels compare 32-bit hashes, so
            self.dthr, self.dscale = 0, 0.0  # keep all and scale by 0: x * 0, the bits of a dropped entry
        self.w = np.array(st.weight, dtype=np.float32)
        self.out = torch.empty(chunk, dtype=out_dtype)

    @staticmethod
    def supports(st: Any, in_dtypes: Sequence[torch.dtype], out_dtype: torch.dtype, compute: torch.dtype) -> bool:
        if not LinearBlocks.supports(in_dtypes, out_dtype, compute):
            return False
        # the plans the kernels compute ([DARE], top-k, majority sign, normalised), with the mask-free disjoint mean
        # (all weights positive: see operators.disjoint_mean)
        return st.plan.ties_shaped and all(w > 0.0 for w in st.weight)

    def _drop(self) -> tuple[Any, ...]:
        return self.keys, self.dthr, self.dscale, self.use_drop

    def sweep(self, st: Any, start: int, base: torch.Tensor, raws: Sequence[torch.Tensor]) -> bool:
        """One chunk of a statistics sweep (the brackets of the k-th magnitudes). False: a non-finite input."""
        T = len(st.brackets)
        if any(b is not None and b.collect_all for b in st.brackets):
            return self._sweep_collect(st, start, base, raws)
        if self.inside is None:
            self.inside = np.empty((T, self.chunk), np.float32)
        active = np.array([b is not None for b in st.brackets], dtype=np.bool_)
        lo = np.array([b.lo if b is not None and b.lo is not None else 0.0 for b in st.brackets], np.float64)
        hi = np.array([b.hi if b is not None and b.hi is not None else 0.0 for b in st.brackets], np.float64)
        has_lo = np.array([b is not None and b.lo is not None for b in st.brackets], dtype=np.bool_)
        has_hi = np.array([b is not None and b.hi is not None for b in st.brackets], dtype=np.bool_)
        counts = np.zeros((T, 4), np.int64)
        ninside = np.zeros(T, np.int64)
        ok = self.k["ties_sweep_chunk"](_np(base), tuple(_np(r) for r in raws), self.bf, self.tv, start, *self._drop(), active, lo, hi, has_lo, has_hi, counts,
                                        self.inside, ninside)
        if not ok:
            return False
        for i, b in enumerate(st.brackets):
            if b is None:
                continue
            b.le_lo += int(counts[i, 0])
            b.lt_lo += int(counts[i, 1])
            b.lt_hi += int(counts[i, 2])
            b.le_hi += int(counts[i, 3])
            b.inside.append(self.inside[i, : ninside[i]].copy())
        return True

    def _sweep_collect(self, st: Any, start: int, base: torch.Tensor, raws: Sequence[torch.Tensor]) -> bool:
        """The rare sweep after a missed bracket: every magnitude of the experts concerned is kept."""
        n = base.numel()
        b_np, r_np = _np(base), tuple(_np(r) for r in raws)
        for s0 in range(0, n, SUB):
            m = min(SUB, n - s0)
            self.k["load"](b_np, r_np, s0, m, self.bf, self.tv)
            if not self.k["prepare"](self.tv, m, start + s0, *self._drop()):
                return False
            for i, b in enumerate(st.brackets):
                if b is not None and b.collect_all:
                    b.inside.append(np.abs(self.tv[i, :m]))
        return True

    def merge(self, st: Any, start: int, base: torch.Tensor, raws: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The merged chunk in the output dtype (a reused buffer), or None for a non-finite input or delta."""
        n = base.numel()
        out = self.out[:n]
        thr = np.array([t if t is not None else 0.0 for t in st.thresholds], dtype=np.float32)
        maj = st.majority if st.majority is not None else st.guess
        from omnimerge._generated.ties_fused import TIES, TIES_MAX

        if len(raws) <= TIES_MAX and start + n - 1 <= 0xFFFFFFFF:  # one vectorised pass per chunk (the generated loops)
            if self.flags is None:
                self.flags = np.empty((3, self.chunk), np.uint8)
                self.alt = np.empty(self.chunk, np.float32)
            loop, cands = TIES[(len(raws), self.use_drop)]
            es = [_np(r) for r in raws]
            args = (_np(base), *(es + [es[0]] * (TIES_MAX - len(es))), start, self.keys, np.uint64(self.dthr),
                    np.float32(self.dscale), thr, self.w, np.float32(st.scaling), np.float32(maj))
            bad, sgn, flag = self.flags[0, :n], self.flags[1, :n].view(np.int8), self.flags[2, :n]
            loop(*args, _np(out), bad, sgn, flag, self.alt[:n])
            anybad, signsum, nflag = self.k["reduce_flags"](bad, sgn, flag)
            if anybad or not nflag or st.majority is not None:
                return self._merged(st, out, not anybad, signsum, 0)
            namb = self.k["compact_flags"](flag, _words(flag), self.amb_idx)
            if maj == 0.0:  # no guess: both candidates, recomputed at the undecided entries
                cands(*args, namb, self.amb_idx, self.amb_pos, self.amb_neg)
                return self._merged(st, out, True, signsum, namb)
            # the undecided entries were merged with the guessed sign: keep their deltas for the other sign
            # (the only ones a fix-up can need: see SparseBlockwise.fixups)
            idx = self.amb_idx[:namb]
            other = torch.from_numpy(self.alt[idx])
            st.record(int(signsum), idx + start, None if maj > 0 else other, other if maj > 0 else None)
            return out
        use_thr = np.array([t is not None for t in st.thresholds], dtype=np.bool_)
        finite, signsum, namb = self.k["ties_merge_chunk"](
            _np(base), tuple(_np(r) for r in raws), self.bf, self.tv, start, *self._drop(),
            thr, use_thr, self.w, st.scaling, maj,
            st.majority is not None, self.tot, self.acc, self.res, self.flag, self.amb_idx, self.amb_pos,
            self.amb_neg, _np(out))
        return self._merged(st, out, finite, signsum, namb)

    def _merged(self, st: Any, out: torch.Tensor, finite: bool, signsum: int, namb: int) -> torch.Tensor | None:
        if not finite:
            return None
        if st.majority is None:
            st.record(int(signsum), self.amb_idx[:namb].copy(), torch.from_numpy(self.amb_pos[:namb].copy()),
                      torch.from_numpy(self.amb_neg[:namb].copy()))
        return out
