#!/usr/bin/env python
"""Benchmark of the spectral / optimisation merge methods against their reference formulations.

One 7B-shaped layer set (Qwen2-7B widths: 3584 x 3584 q/o, 512 x 3584 k/v, 18944 x 3584 gate/up,
3584 x 18944 down), T experts (default 5), float32, dense random task vectors with a realistic spectrum
(a rank-64 part with decaying singular values plus full-rank noise carrying ~30% of the energy).

For each method it times omnimerge's implementation ("ours") and the reference formulation ("ref": the code
behind the published numbers, re-stated here: m x m products, ``full_matrices=True`` SVDs, autograd loops,
stacked n x n Grams), reports seconds per layer set, the peak resident memory of each measurement (VmHWM of
a fresh subprocess, reset after the inputs are built, minus the resident size at that point), the speed-up,
the relative difference ours-vs-ref (same number of steps), and for ``svd: randomized`` its time and error
relative to the exact path.

The iterative methods (wudi, optmerge-*) are timed for ``--measure-steps`` optimisation steps and
extrapolated linearly to ``--steps`` (setup + loop x steps / measure-steps); the output says so. An exact
3584 x 18944 SVD alone takes ~40-70 s on a 2-core CPU, so use ``--quick`` (every dimension / 8) to check the
script; references whose estimated memory exceeds the available RAM are skipped.

    python benchmarks/bench_spectral.py --quick
    python benchmarks/bench_spectral.py --methods wudi,optmerge-lora --measure-steps 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FULL_SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)]
METHODS = ["tsv", "iso_c", "iso_cts", "wudi", "optmerge-lora", "optmerge-full", "swudi", "aswudi"]
ITERATIVE = {"wudi", "optmerge-lora", "optmerge-full"}
RANDOMIZABLE = {"tsv", "iso_cts", "optmerge-lora", "optmerge-full"}
LAYER_NAME = "model.language_model.layers.0.mlp.up_proj.weight"


# --- measurement helpers (worker side) --------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        m = re.search(rf"{field}:\s+(\d+)\s+kB", fh.read())
    return int(m.group(1)) if m else 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_task_vectors(shape: tuple[int, int], T: int, seed: int) -> list[Any]:
    """Low-rank-ish + noise: tau = A diag(s) B / ... with s_j ~ j^-0.5 (rank 64) plus Gaussian noise."""
    import torch

    m, n = shape
    g = torch.Generator().manual_seed(seed)
    out = []
    r = 64
    s = torch.arange(1, r + 1, dtype=torch.float32).pow(-0.5)
    for _ in range(T):
        A = torch.randn(m, r, generator=g) / math.sqrt(m)
        B = torch.randn(r, n, generator=g) / math.sqrt(n)
        signal = (A * s) @ B
        noise = torch.randn(m, n, generator=g) * (0.65 * float(signal.norm()) / math.sqrt(m * n))
        out.append((signal + noise).mul_(1e-2))
    return out


# --- omnimerge ----------------------------------------------------------------------------------------------


def run_ours(method: str, tvs: list[Any], steps: int, svd: str = "exact") -> tuple[Any, float, float]:
    """(unscaled merged task vector, setup seconds, loop seconds)."""
    from omnimerge.methods import TensorContext, get_method
    from omnimerge.methods.spectral import SvdOptions
    from omnimerge.methods.wudi import (
        VARIANT_DEFAULTS,
        _sq_norms,
        _sum,
        mean_of,
        optimise,
        optmerge_problem,
        problem_from_task_vectors,
    )

    ctx = TensorContext(name=LAYER_NAME, component="language_model", num_models=len(tvs))
    t0 = time.perf_counter()
    if method == "wudi":
        problem = problem_from_task_vectors(tvs, _sq_norms(tvs))
        M = _sum(tvs)
        t1 = time.perf_counter()
        optimise(M, problem, optimizer="adam", lr=1e-5, steps=steps)
        return M, t1 - t0, time.perf_counter() - t1
    if method.startswith("optmerge"):
        variant = method.split("-")[1]
        d = VARIANT_DEFAULTS[variant]
        opts = SvdOptions(svd, 10, 2)
        problem, _, _, _ = optmerge_problem(tvs, ctx, variant, opts)
        M = mean_of(tvs) if d["init"] == "mean" else _sum(tvs)
        t1 = time.perf_counter()
        optimise(M, problem, optimizer=d["optimizer"], lr=d["lr"], steps=steps)
        return M, t1 - t0, time.perf_counter() - t1
    meth = get_method(method)
    params: dict[str, Any] = {"scaling": 1.0}
    if method in RANDOMIZABLE:
        params["svd"] = svd
    kw = meth.resolve(params, [{}] * len(tvs))
    out = meth.fn(tvs[0].new_zeros(tvs[0].shape), tvs, ctx, **kw)
    return out, time.perf_counter() - t0, 0.0


# --- reference formulations (re-stated from the public code; float32) -------------------------------------


def run_ref(method: str, tvs: list[Any], steps: int) -> tuple[Any, float, float]:
    import torch

    T = len(tvs)
    t0 = time.perf_counter()
    if method == "tsv":  # MLLMerging baseline_merging.py:svd_merging (fixed)
        sum_u = sum_s = sum_v = None
        for i, d in enumerate(tvs):
            u, s, v = torch.linalg.svd(d, full_matrices=False)
            r = int(s.shape[0] * (1.0 / T))
            if i == 0:
                sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
            sum_u[:, i * r : (i + 1) * r] = u[:, :r]
            sum_s[i * r : (i + 1) * r] = s[:r]
            sum_v[i * r : (i + 1) * r, :] = v[:r, :]
        u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
        u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
        out = torch.linalg.multi_dot([u_u, v_u, torch.diag(sum_s), u_v, v_v])
        return out, time.perf_counter() - t0, 0.0
    if method == "iso_c":  # baseline_merging.py:iso_merging
        x = sum(tvs)
        u, s, v = torch.linalg.svd(x, full_matrices=False)
        out = torch.linalg.multi_dot([u, torch.diag(torch.full_like(s, float(s.mean()))), v])
        return out, time.perf_counter() - t0, 0.0
    if method == "iso_cts":  # FusionBench iso_utils.py:iso_cts
        shape_ = tvs[0].shape
        combined_w = sum(tvs)
        kc = int(min(shape_) * 0.8)
        ts_total = round((min(shape_) - kc) / T) * T
        kc = min(shape_) - ts_total
        u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
        cu, cs, cv = u[:, :kc], s[:kc], v[:kc, :]
        nd = int((min(shape_) - kc) / T)
        for i, w in enumerate(tvs):
            w_ts = w - cu @ cu.T @ w
            u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
            if i == 0:
                U, S, V = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
            U[:, i * nd : (i + 1) * nd] = u_ts[:, :nd]
            S[i * nd : (i + 1) * nd] = s_ts[:nd]
            V[i * nd : (i + 1) * nd, :] = v_ts[:nd, :]
        U[:, T * nd : T * nd + kc] = cu
        S[T * nd : T * nd + kc] = cs
        V[T * nd : T * nd + kc, :] = cv
        a, _, b = torch.linalg.svd(U, full_matrices=False)
        c, _, d = torch.linalg.svd(V, full_matrices=False)
        S = torch.ones_like(S) * S.mean()
        out = torch.linalg.multi_dot((a @ b, torch.diag(S), c @ d))
        return out, time.perf_counter() - t0, 0.0
    if method == "wudi":  # baseline_merging.py:wudi_merging (num_chunks = 2)
        vectors = torch.stack(tvs)
        per = (T + 1) // 2
        M = torch.nn.Parameter(vectors.sum(0))
        opt = torch.optim.Adam([M], lr=1e-5)
        norms = vectors.reshape(T, -1).norm(dim=-1).square()
        t1 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            total = 0.0
            for c in range(2):
                a, b = c * per, min((c + 1) * per, T)
                inner = torch.matmul(M.unsqueeze(0) - vectors[a:b], vectors[a:b].transpose(1, 2))
                total = total + (inner.square() / norms[a:b, None, None]).sum()
            total.backward()
            opt.step()
        return M.detach(), t1 - t0, time.perf_counter() - t1
    if method.startswith("optmerge"):  # run_merge_wudi2.py (lora) / functional.py:wudi_merge_v2 (full)
        variant = method.split("-")[1]
        vectors = torch.stack(tvs)
        N, m, n = vectors.shape
        k = min(m, n)
        r = int(k / N) if variant == "lora" else max(1, k // N)
        avg = vectors.mean(0)
        lows, tgts = [], []
        for i in range(N):
            v = vectors[i]
            _, s, vh = torch.linalg.svd(v, full_matrices=True)
            u2, s2, v2 = torch.linalg.svd(v if variant == "lora" else v - avg, full_matrices=False)
            s_mask = torch.zeros_like(s)
            s_mask[:r] = 1
            v_mask = torch.zeros_like(vh)
            v_mask[:r, :] = 1
            S = torch.zeros(m, n)
            S[:k, :k] = torch.diag_embed(s * s_mask)
            lows.append(S @ (vh * v_mask))
            t = u2[:, :r] @ torch.diag_embed(s2[:r]) @ v2[:r, :]
            tgts.append(t if variant == "lora" else t + avg)
            del s, vh, u2, s2, v2, S
        low, tgt = torch.stack(lows), torch.stack(tgts)
        del lows, tgts
        M = torch.nn.Parameter(avg.clone() if variant == "lora" else vectors.sum(0))
        opt = (
            torch.optim.SGD([M], lr=1e-4, momentum=0.9)
            if variant == "lora"
            else torch.optim.Adam([M], lr=1e-5)
        )
        norms = vectors.reshape(N, -1).norm(dim=-1).square()
        del vectors
        t1 = time.perf_counter()
        for _ in range(steps):
            inner = torch.matmul(M.unsqueeze(0) - tgt, low.transpose(1, 2))
            loss = (inner.square() / norms[:, None, None]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return M.detach(), t1 - t0, time.perf_counter() - t1
    if method in ("swudi", "aswudi"):  # swudi_aswudi.py:_solve (einsum over stacked Grams)
        v = torch.stack(tvs)
        N, D1, D2 = v.shape
        inv = 1.0 / v.reshape(N, -1).norm(dim=-1).square().clamp(min=1e-12)
        B = torch.einsum("nab,nac->nbc", v, v)
        C = torch.einsum("n,nbc->bc", inv, B)
        vB = torch.einsum("nab,nbc->nac", v, B)
        D = torch.einsum("n,nac->ac", inv, vB)
        del B, vB
        lam, V = torch.linalg.eigh(C)
        lam = lam.clamp(min=1e-8)
        if method == "swudi":
            f = 1.0 - torch.exp(-lam * 300.0)
            K = max(1, int((D2 * 0.65 + 0.999) // 1))
            f[: D2 - K] = 0.0
        else:
            y = lam.flip(0).sqrt()
            K = max(1, min(int(torch.ceil(y.sum() ** 2 / (y * y).sum()).item()), D2))
            f = torch.zeros_like(lam)
            f[D2 - K :] = 1.0
        theta0 = v.sum(0)
        out = theta0 - ((theta0 @ V) * f) @ V.T + ((D @ V) * (f / lam)) @ V.T
        return out, time.perf_counter() - t0, 0.0
    raise ValueError(method)


def ref_bytes(method: str, shape: tuple[int, int], T: int) -> int:
    """Rough peak-memory estimate of the reference formulation (float32), to skip what cannot fit."""
    m, n = shape
    mn = m * n * 4
    if method in ("tsv", "iso_c", "iso_cts"):
        return (T + 6) * mn
    if method == "wudi":
        return (T + 5) * mn + 3 * ((T + 1) // 2) * m * m * 4
    if method.startswith("optmerge"):
        return (3 * T + 6) * mn + (m * m + n * n) * 4 + 3 * T * m * m * 4
    return (2 * T + 4) * mn + (T + 2) * n * n * 4


# --- worker / driver ----------------------------------------------------------------------------------------


def _warmup() -> None:
    """First calls of torch.optim / linalg pay one-off lazy imports and initialisation (seconds): pay them
    before timing, for both implementations."""
    import torch

    import omnimerge.methods  # noqa: F401

    x = torch.randn(8, 6)
    torch.linalg.svd(x, full_matrices=False)
    torch.linalg.svd(x, full_matrices=True)
    torch.linalg.eigh(x.T @ x)
    torch.linalg.qr(x)
    for make in (
        lambda p: torch.optim.Adam([p], lr=1e-3),
        lambda p: torch.optim.SGD([p], lr=1e-3, momentum=0.9),
    ):
        p = torch.nn.Parameter(x.clone())
        opt = make(p)
        (p.square().sum()).backward()
        opt.step()


def worker(a: argparse.Namespace) -> None:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    _warmup()
    shape = (a.m, a.n)
    tvs = make_task_vectors(shape, a.T, seed=a.m * 7 + a.n)
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS")
    steps = a.measure_steps if a.method in ITERATIVE else 0
    if a.impl == "ref":
        out, setup, loop = run_ref(a.method, tvs, steps)
    else:
        out, setup, loop = run_ours(a.method, tvs, steps, "randomized" if a.impl == "rand" else "exact")
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024 if reset else float("nan")
    res: dict[str, Any] = {"setup": setup, "loop": loop, "peak_mb": peak_mb}
    path = Path(a.outdir) / f"{a.method}-{a.m}x{a.n}.pt"
    if a.impl == "ours":
        torch.save(out.contiguous(), path)
    elif path.exists():
        ours = torch.load(path)
        res["err"] = float((out - ours).norm() / ours.norm())
        res["norm_ratio"] = float(out.norm() / ours.norm())
    print("RESULT " + json.dumps(res), flush=True)


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            m = re.search(r"MemAvailable:\s+(\d+)\s+kB", fh.read())
        return int(m.group(1)) * 1024 if m else 1 << 60
    except OSError:
        return 1 << 60


def measure(
    a: argparse.Namespace, method: str, impl: str, shape: tuple[int, int], outdir: str
) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--worker", "--method", method, "--impl", impl, "--m", str(shape[0]),
        "--n", str(shape[1]), "--T", str(a.T), "--measure-steps", str(a.measure_steps), "--outdir", outdir,
    ]  # fmt: skip
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["killed"]}


def _fmt(impls: list[str], missing: dict[str, bool], impl: str, v: float, spec: str) -> str:
    if impl not in impls or missing[impl]:
        return "-"
    return format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every dimension / 8 (448, 64, 2368)")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    p.add_argument("--T", type=int, default=5, help="number of experts")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps the totals are given for")
    p.add_argument(
        "--measure-steps",
        type=int,
        default=10,
        help="steps actually run (then extrapolated linearly to --steps)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-reference", action="store_true", help="time omnimerge only")
    p.add_argument("--no-randomized", action="store_true", help="skip the svd: randomized runs")
    p.add_argument("--per-shape", action="store_true", help="also print each shape's setup/loop/peak")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--m", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--outdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    methods = [x.strip() for x in a.methods.split(",") if x.strip()]
    bad = [x for x in methods if x not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {METHODS}")
    shapes = [(m // 8, n // 8) for m, n in FULL_SHAPES] if a.quick else FULL_SHAPES
    a.measure_steps = min(a.measure_steps, a.steps)
    factor = a.steps / a.measure_steps if a.measure_steps else 0.0
    avail = mem_available_bytes()
    print(f"layer set: {shapes}, T = {a.T}, float32, threads = {a.threads or 'torch default'}")
    print(
        f"iterative methods: {a.measure_steps} steps measured, totals extrapolated linearly to {a.steps} steps "
        "(setup + loop x steps / measured steps), for ours and the reference alike"
    )
    print("peak MB = VmHWM - VmRSS of a fresh subprocess, measured from after its inputs are built")
    header = (
        f"{'method':14s} {'ours s':>9s} {'ref s':>9s} {'speed-up':>9s} {'ours MB':>8s} {'ref MB':>8s} "
        f"{'ours~ref':>9s} {'rand s':>8s} {'rand err':>9s} {'rand |x|':>13s}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="bench_spectral_") as outdir:
        for method in methods:
            tot: dict[str, float] = {"ours": 0.0, "ref": 0.0, "rand": 0.0}
            peak: dict[str, float] = {"ours": 0.0, "ref": 0.0, "rand": 0.0}
            err: dict[str, float] = {"ref": 0.0, "rand": 0.0}
            ratio = [math.inf, -math.inf]
            notes: list[str] = []
            per_shape: list[str] = []
            by_shape: dict[tuple[str, tuple[int, int]], float] = {}
            impls = ["ours"]
            if not a.no_reference:
                impls.append("ref")
            if not a.no_randomized and method in RANDOMIZABLE:
                impls.append("rand")
            missing = {i: False for i in impls}
            for shape in shapes:
                for impl in impls:
                    if impl == "ref" and ref_bytes(method, shape, a.T) > 0.85 * avail:
                        missing[impl] = True
                        notes.append(
                            f"ref skipped at {shape} (needs ~{ref_bytes(method, shape, a.T) / 2**30:.0f} GB)"
                        )
                        continue
                    r = measure(a, method, impl, shape, outdir)
                    if "error" in r:
                        missing[impl] = True
                        notes.append(f"{impl} failed at {shape}: {r['error']}")
                        continue
                    loop = r["loop"] * factor if method in ITERATIVE else 0.0
                    tot[impl] += r["setup"] + loop
                    by_shape[(impl, shape)] = r["setup"] + loop
                    per_shape.append(
                        f"{impl:4s} {shape}: setup {r['setup']:.2f} s, loop {loop:.2f} s, peak {r['peak_mb']:.0f} MB"
                    )
                    peak[impl] = max(peak[impl], r["peak_mb"])
                    if "err" in r:
                        err[impl] = max(err[impl], r["err"])
                    if impl == "rand" and "norm_ratio" in r:
                        ratio = [min(ratio[0], r["norm_ratio"]), max(ratio[1], r["norm_ratio"])]
                for f in Path(outdir).glob(f"{method}-*.pt"):
                    f.unlink()

            def cell(impl: str, v: float, spec: str, impls: list[str] = impls, miss: dict = missing) -> str:
                return "-" if impl not in impls or miss[impl] else format(v, spec)

            both = [sh for sh in shapes if ("ref", sh) in by_shape and ("ours", sh) in by_shape]
            ours_common = sum(by_shape[("ours", sh)] for sh in both)
            speed = (
                f"{sum(by_shape[('ref', sh)] for sh in both) / ours_common:.1f}x" if ours_common > 0 else "-"
            )
            if both and len(both) < len(shapes):
                speed += "*"
                notes.append(f"* speed-up over the shapes the reference ran: {both}")
            rng = f"{ratio[0]:.3f}-{ratio[1]:.3f}" if math.isfinite(ratio[0]) else "-"
            print(
                f"{method:14s} {cell('ours', tot['ours'], '.2f'):>9s} {cell('ref', tot['ref'], '.2f'):>9s} "
                f"{speed:>9s} {cell('ours', peak['ours'], '.0f'):>8s} {cell('ref', peak['ref'], '.0f'):>8s} "
                f"{cell('ref', err['ref'], '.1e'):>9s} {cell('rand', tot['rand'], '.2f'):>8s} "
                f"{cell('rand', err['rand'], '.1e'):>9s} {rng:>13s}",
                flush=True,
            )
            if a.per_shape:
                for line in per_shape:
                    print(f"    {line}")
            for note in notes:
                print(f"    note: {note}")
    print(
        "columns: seconds per layer set (sum over the 4 shapes); peak MB = max over shapes; ours~ref = max over "
        "shapes of ||ours - ref||_F / ||ours||_F after the same number of steps; rand = svd: randomized "
        "(oversample 10, 2 power iterations): seconds, max relative difference to the exact path, and the range "
        "of ||rand|| / ||exact|| over shapes (for TSV the ratio of kept singular-value energy: where the "
        "spectrum is flat at the cut the chosen directions differ while the energy kept is the same)."
    )


if __name__ == "__main__":
    main()
