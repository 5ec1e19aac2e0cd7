"""One command: generate synthetic Qwen2-shaped checkpoints, time omnimerge (and, with ``--with-mergekit``,
mergekit 0.1.5 in its own virtual environment) on the same merges, time ``cat`` of the inputs (the page-cache
read limit), compare the outputs, and write docs/performance.md with tables and plots.

    python -m benchmarks.perf.run --with-mergekit          # the full report (~1 h on 2 cores, mostly mergekit)
    python -m benchmarks.perf.run --quick                  # smoke test: a tiny model, 1 repeat
    python -m benchmarks.perf.run --report-only            # re-render docs from the saved results

Run from the repository root with the omnimerge environment's python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.perf import synth
from benchmarks.perf.measure import loadavg, run_measured

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "perf" / "results"
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
# (model, number of experts); the first group is the headline, the rest show scaling in T
FULL_CASES = [("qwen2-0.5b", 3), ("qwen2-1.5b", 3), ("qwen2-0.5b", 2), ("qwen2-0.5b", 5)]
QUICK_CASES = [("qwen2-tiny", 3)]
SLOW_MK = {"ties", "dare_ties"}  # mergekit takes minutes: one repeat (omnimerge too, unless --repeats-slow)
SCALING_METHODS = ["task_arithmetic", "ties"]  # methods timed on the T=2 / T=5 cases

# Equal parameters. omnimerge merges every tensor (select: include ['.*']), like mergekit.
OMNI = {
    "linear": ("weight_average", {}),
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.3}),
    "ties": ("ties", {"scaling": 1.0, "density": 0.2}),
    "dare_ties": ("dare_ties", {"scaling": 1.0, "drop_rate": 0.5, "density": 1.0, "seed": 0}),
}
# The field's methods (issue 14), omnimerge and, where mergekit has the method, mergekit, with equal parameters;
# run them with --methods (e.g. --methods breadcrumbs,slerp,model_stock); mergekit-less ones time omnimerge only.
OMNI.update({
    "breadcrumbs": ("breadcrumbs", {"scaling": 1.0, "density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"scaling": 1.0, "density": 0.9, "gamma": 0.01}),
    "della": ("della", {"scaling": 1.0, "density": 0.5, "epsilon": 0.15, "seed": 0}),
    "della_linear": ("della_linear", {"scaling": 1.0, "density": 0.5, "epsilon": 0.15, "seed": 0}),
    "sce": ("sce", {"select_topk": 0.3}),
    "ram": ("ram", {}),
    "ramplus_tl": ("ramplus_tl", {}),
    "nearswap": ("nearswap", {"t": 1e-3}),
    "arcee_fusion": ("arcee_fusion", {}),
    "slerp": ("slerp", {"t": 0.3}),
    "nuslerp": ("nuslerp", {}),
    "multislerp": ("multislerp", {}),
    "karcher": ("karcher", {}),
    "model_stock": ("model_stock", {}),
    "magmax": ("magmax", {"scaling": 1.0}),
    "emr": ("emr", {"scaling": 1.0}),
    "consensus": ("consensus", {"scaling": 1.0}),
    "lines": ("lines", {}),
    "cart": ("cart", {}),
    "svc": ("svc", {}),
    "pcb": ("pcb", {}),
})
#: methods of the base and fewer experts than the case has: they merge the first ones
N_EXPERTS = {"nearswap": 1, "arcee_fusion": 1, "slerp": 1, "nuslerp": 2}
#: random methods: their outputs are compared by statistics, not entry by entry
RANDOM = {"dare_ties", "della", "della_linear"}
MK = {
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({"lambda": 0.3}, {"weight": 1.0}),
    "ties": ({"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2}),
    "dare_ties": ({"lambda": 1.0, "normalize": True, "rescale": True}, {"weight": 1.0, "density": 0.5}),
    "breadcrumbs": ({"lambda": 1.0, "normalize": False}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": ({"lambda": 1.0, "normalize": False}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "della": ({"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15}),
    "della_linear": ({"lambda": 1.0, "normalize": False}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15}),
    "sce": ({"select_topk": 0.3}, {"weight": 1.0}),
    "ram": ({}, {}),
    "ramplus_tl": ({}, {}),
    "nearswap": ({"t": 1e-3}, {}),
    "arcee_fusion": ({}, {}),
    "slerp": ({"t": 0.3}, {}),
    "nuslerp": ({}, {"weight": 1.0}),
    "multislerp": ({}, {"weight": 1.0}),
    "karcher": ({}, {}),
    "model_stock": ({}, {}),
}


def omni_recipe(method: str, base: Path, experts: list[Path]) -> dict:
    name, params = OMNI[method]
    return {
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "merge_method": name,
        "parameters": dict(params),
        "select": {"include": [".*"]},
        "dtype": "float32",
        "shard_size": "1GB",
    }


def mk_config(method: str, base: Path, experts: list[Path]) -> dict:
    top, per = MK[method]
    models = [{"model": str(e), **({"parameters": dict(per)} if per else {})} for e in experts]
    cfg: dict = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method not in ("linear", "karcher"):  # karcher: as omnimerge, the experts only (see the golden README)
        cfg["base_model"] = str(base)
    if top:
        cfg["parameters"] = dict(top)
    return cfg


def ensure_mergekit(venv: Path, log) -> Path:  # type: ignore[no-untyped-def]
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    log(f"installing mergekit 0.1.5 into {venv} (torch 2.13.0 CPU first; ~1.5 min)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    return exe


def time_cat(files: list[Path], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


#: the compiled kernels' cache of the timed runs (warm after a method's first run); a cold run gets an empty one
NUMBA_CACHE: Path | None = None


def run_omni(recipe: Path, out: Path, workers: int, hash_inputs: bool = True, sync: bool = True,
             cold: bool = False) -> dict:
    """One omnimerge merge in a child process. ``cold``: with an empty kernel cache (numba compiles the kernels
    the merge uses, as on the first merge after installation)."""
    import tempfile

    shutil.rmtree(out, ignore_errors=True)  # not timed: replacing an old output would cost its deletion
    cache = out.with_name(out.name + "-digest-cache")  # empty: every run hashes its inputs (no cache hits)
    shutil.rmtree(cache, ignore_errors=True)
    os.sync()  # not timed: no run pays for the writeback of an earlier run's unsynced output
    kcache = Path(tempfile.mkdtemp(prefix="numba-cold-")) if cold else NUMBA_CACHE
    kenv = {"NUMBA_CACHE_DIR": str(kcache)} if kcache is not None else {}
    m = run_measured([sys.executable, "-m", "benchmarks.perf.omni_child", str(recipe), str(out), str(workers),
                      "xxh3" if hash_inputs else "none", "sync" if sync else "nosync"],
                     env={**env(), "OMNIMERGE_CACHE": str(cache), **kenv},
                     cwd=str(REPO))
    shutil.rmtree(cache, ignore_errors=True)
    if cold:
        shutil.rmtree(kcache, ignore_errors=True)  # type: ignore[arg-type]
    if m.returncode != 0:
        raise RuntimeError(f"omnimerge failed ({m.returncode}):\n{m.stderr[-3000:]}")
    rep = json.loads(m.stdout.strip().splitlines()[-1])
    return {"wall": m.wall, "merge_s": rep["seconds"], "import_s": rep["import_seconds"], "max_rss": m.max_rss,
            "peak_anon": m.peak_anon, "cpu": m.cpu, "merged": rep["merged"], "copied": rep["copied"]}


def run_mk(exe: Path, cfg: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # not timed (see run_omni)
    m = run_measured([str(exe), str(cfg), str(out), "--no-copy-tokenizer", "--random-seed", "0",
                      "--out-shard-size", "1B"], env=env())
    if m.returncode != 0:
        raise RuntimeError(f"mergekit failed ({m.returncode}):\n{m.stderr[-3000:]}")
    return {"wall": m.wall, "max_rss": m.max_rss, "peak_anon": m.peak_anon, "cpu": m.cpu}


def best_of(runs: list[dict]) -> dict:
    best = dict(min(runs, key=lambda r: r["wall"]))
    best["walls"] = [round(r["wall"], 3) for r in runs]
    best["max_rss"] = max(r["max_rss"] for r in runs)
    best["peak_anon"] = max(r["peak_anon"] for r in runs)
    best["loadavg"] = [r.get("loadavg") for r in runs]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--with-mergekit", action="store_true", help="also time mergekit 0.1.5 (own venv)")
    ap.add_argument("--mergekit-venv", type=Path, default=None,
                    help="mergekit's virtual environment (created if missing; default DATA_DIR/mergekit-venv)")
    ap.add_argument("--mergekit-scaling", action="store_true",
                    help="also run mergekit on the scaling cases (T=2 and T=5), not only T=3")
    ap.add_argument("--quick", action="store_true", help="smoke test: a tiny model, T=3, one repeat")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("OMNIMERGE_PERF_DIR",
                                                                           "/tmp/omnimerge-perf")))
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (best wall time is kept)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--cases", default=None, help="e.g. qwen2-0.5b:3,qwen2-1.5b:3")
    ap.add_argument("--workers", type=int, default=0, help="omnimerge workers (0: its default)")
    ap.add_argument("--results", type=Path, default=None, help="results JSON (default results/latest.json)")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    ap.add_argument("--report-only", action="store_true", help="only re-render the report from the results")
    ap.add_argument("--spectral", action="store_true",
                    help="also run the spectral methods' per-layer benchmark (benchmarks/bench_spectral.py)")
    ap.add_argument("--spectral-args", default="--quick",
                    help="arguments for benchmarks/bench_spectral.py (default: --quick; '' for its full run)")
    ap.add_argument("--mergekit-from", type=Path, default=None,
                    help="reuse mergekit's timings from an earlier results JSON (its outputs, kept under "
                         "DATA_DIR/runs, are still compared); mergekit runs only for cases missing there")
    ap.add_argument("--repeats-slow", type=int, default=1, help="runs for TIES / DARE-TIES (default 1)")
    ap.add_argument("--all-methods-scaling", action="store_true",
                    help="time every method on the T=2/T=5 cases (default: task arithmetic and TIES)")
    ap.add_argument("--no-like-for-like", action="store_true",
                    help="skip the like-for-like omnimerge runs (--no-sync --hash none: no fsync of the output and no "
                         "input digests, as mergekit)")
    ap.add_argument("--skip-omnimerge", action="store_true", help="time only mergekit (and cat)")
    ap.add_argument("--cold", action="store_true",
                    help="also time each method once with an empty kernel cache (the first merge after "
                         "installation pays numba's compilation); the other runs use a kept cache (warm)")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results_path = a.results or RESULTS / ("quick.json" if a.quick else "latest.json")
    global NUMBA_CACHE
    NUMBA_CACHE = a.data_dir / "numba-cache"

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if a.report_only:
        from benchmarks.perf.report import write_report

        res = json.loads(results_path.read_text())
        if a.spectral:
            from benchmarks.perf.spectral import per_layer

            res["spectral"] = per_layer(a.spectral_args.split(), log=log)
            results_path.write_text(json.dumps(res, indent=1))
        write_report(res, a.doc)
        log(f"wrote {a.doc}")
        return 0

    if a.quick:
        cases, repeats = QUICK_CASES, 1
    else:
        cases, repeats = FULL_CASES, a.repeats
    if a.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cases.split(",")]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    prev: dict = {}

    def load_prev() -> None:  # re-read: the file may be filled by a mergekit run still going on
        if a.mergekit_from and a.mergekit_from.is_file():
            for c in json.loads(a.mergekit_from.read_text())["cases"]:
                for meth, e in c["methods"].items():
                    if e.get("mergekit"):
                        prev[(c["model"], c["T"], meth)] = e["mergekit"]

    load_prev()
    mk_exe = ensure_mergekit(a.mergekit_venv or a.data_dir / "mergekit-venv", log) if a.with_mergekit else None
    mk_version = None
    if mk_exe:
        mk_version = subprocess.run([str(mk_exe.parent / "python"), "-c",
                                     "import importlib.metadata as m; print(m.version('mergekit'))"],
                                    capture_output=True, text=True).stdout.strip()
    import torch

    res: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "mem_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9},
        "mergekit_version": mk_version,
        "repeats": repeats,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip(),
        "quick": a.quick,
        "cases": [],
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    work = a.data_dir / "runs"
    for model, T in cases:
        base, experts = synth.ensure_models(a.data_dir, model, T, log=log)
        experts = experts[:T]
        files = synth.weight_files(base) + [f for e in experts for f in synth.weight_files(e)]
        in_bytes = sum(f.stat().st_size for f in files)
        time_cat(files, 1)  # bring into the page cache
        cat_s = time_cat(files, max(3, repeats))
        log(f"{model} T={T}: {in_bytes / 1e9:.2f} GB of input, cat {cat_s:.2f} s "
            f"({in_bytes / 1e9 / cat_s:.1f} GB/s), load {loadavg():.2f}")
        case = {"model": model, "T": T, "params": synth.num_params(model), "input_bytes": in_bytes,
                "cat_s": cat_s, "methods": {}}
        res["cases"].append(case)
        run_mk_here = mk_exe is not None and (T == 3 or a.mergekit_scaling or a.quick)
        cdir = work / f"{model}-T{T}"
        cdir.mkdir(parents=True, exist_ok=True)
        all_experts = experts
        for method in methods:
            if not (a.quick or T == 3 or a.all_methods_scaling or a.cases or method in SCALING_METHODS):
                continue
            experts = all_experts[:N_EXPERTS.get(method, T)]
            entry: dict = {"experts": len(experts)}
            rp = cdir / f"omni-{method}.yaml"
            rp.write_text(yaml.safe_dump(omni_recipe(method, base, experts), sort_keys=False))
            omni_out = cdir / f"out-omni-{method}"
            runs = []
            n_omni = min(repeats, a.repeats_slow) if method in SLOW_MK else repeats
            if a.cold and not a.skip_omnimerge:
                time_cat(files, 1)
                la = loadavg()
                r = run_omni(rp, omni_out, a.workers, cold=True)
                r["loadavg"] = la
                entry["omnimerge_cold"] = r
                log(f"  omnimerge {method} (cold kernel cache): wall {r['wall']:.2f} s (merge {r['merge_s']:.2f} s), "
                    f"max RSS {r['max_rss'] / 1e9:.2f} GB, load {la:.2f}")
                run_omni(rp, omni_out, a.workers)  # not timed: warms the kept kernel cache for the runs below
            for _ in range(0 if a.skip_omnimerge else n_omni):
                time_cat(files, 1)
                la = loadavg()
                r = run_omni(rp, omni_out, a.workers)
                r["loadavg"] = la
                runs.append(r)
                log(f"  omnimerge {method}: wall {r['wall']:.2f} s (merge {r['merge_s']:.2f} s), "
                    f"max RSS {r['max_rss'] / 1e9:.2f} GB, anon {r['peak_anon'] / 1e9:.2f} GB, load {la:.2f}")
            if runs:
                entry["omnimerge"] = best_of(runs)
            runs = []
            for _ in range(0 if a.skip_omnimerge or a.no_like_for_like else n_omni):
                time_cat(files, 1)
                la = loadavg()
                r = run_omni(rp, omni_out, a.workers, hash_inputs=False, sync=False)  # mergekit's work
                r["loadavg"] = la
                runs.append(r)
                log(f"  omnimerge {method} (--no-sync --hash none): wall {r['wall']:.2f} s (merge {r['merge_s']:.2f} s), "
                    f"max RSS {r['max_rss'] / 1e9:.2f} GB, anon {r['peak_anon'] / 1e9:.2f} GB, load {la:.2f}")
            if runs:
                entry["omnimerge_like"] = best_of(runs)
            if run_mk_here and method in MK:
                assert mk_exe is not None
                cp = cdir / f"mk-{method}.yaml"
                cp.write_text(yaml.safe_dump(mk_config(method, base, experts), sort_keys=False))
                mk_out = cdir / f"out-mk-{method}"
                runs = []
                load_prev()
                old = prev.get((model, T, method)) if method in SLOW_MK else None  # fast ones: rerun
                if old is not None and (mk_out / "config.json").is_file():
                    runs = [old]
                    log(f"  mergekit  {method}: reusing wall {old['wall']:.2f} s from {a.mergekit_from}")
                for _ in range(0 if runs else (1 if method in SLOW_MK else repeats)):
                    time_cat(files, 1)
                    la = loadavg()
                    r = run_mk(mk_exe, cp, mk_out)
                    r["loadavg"] = la
                    runs.append(r)
                    log(f"  mergekit  {method}: wall {r['wall']:.2f} s, max RSS {r['max_rss'] / 1e9:.2f} GB, "
                        f"anon {r['peak_anon'] / 1e9:.2f} GB, load {la:.2f}")
                entry["mergekit"] = runs[0] if old is not None and runs == [old] else best_of(runs)
                from benchmarks.perf.compare import compare_exact, delta_stats

                if not runs or "omnimerge" not in entry:
                    pass
                elif method in RANDOM:
                    entry["agreement"] = {"omnimerge": delta_stats(omni_out, base),
                                          "mergekit": delta_stats(mk_out, base)}
                else:
                    entry["agreement"] = compare_exact(omni_out, mk_out, base)
                log(f"  agreement: {entry.get('agreement')}")
                # mergekit's output is kept (the reference for later runs with --mergekit-from)
            shutil.rmtree(omni_out, ignore_errors=True)
            case["methods"][method] = entry
            results_path.write_text(json.dumps(res, indent=1))
    if a.spectral:
        from benchmarks.perf.spectral import per_layer

        res["spectral"] = per_layer(a.spectral_args.split(), log=log)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results_path.write_text(json.dumps(res, indent=1))
    log(f"results: {results_path}")
    if not a.no_doc and not a.quick:
        from benchmarks.perf.report import write_report

        write_report(res, a.doc)
        log(f"wrote {a.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
