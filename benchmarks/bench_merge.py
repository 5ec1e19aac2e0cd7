"""Merge three experts of a synthetic ~1.5 GB (bf16) checkpoint; print wall time, input MB/s and peak RSS.

    python benchmarks/bench_merge.py                      # task arithmetic, T = 3, ~6 GB of input
    python benchmarks/bench_merge.py --method ties --experts 3 --data-dir /tmp/omnimerge-perf

The checkpoints (a Qwen2-shaped model with 748M parameters: base + experts = base + fine-tuning-sized noise)
are generated once under --data-dir and reused. The merge runs as ``omnimerge merge`` in a child process:
wall time is measured from this process (process start included), peak RSS is the child's ``ru_maxrss``
(anonymous memory plus the memory-mapped input pages it had resident at once). Inputs are read once with
``cat`` first, so the numbers are for a warm page cache. The full comparison with mergekit is
``python -m benchmarks.perf.run`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.perf import synth  # noqa: E402
from benchmarks.perf.measure import loadavg, run_measured  # noqa: E402
from benchmarks.perf.run import OMNI  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="task_arithmetic", choices=sorted(OMNI))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--model", default="qwen2-0.75b", choices=sorted(synth.MODELS))
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("OMNIMERGE_PERF_DIR", "/tmp/omnimerge-perf")))
    ap.add_argument("--all-tensors", action="store_true",
                    help="merge every tensor (default: the recipe's default selection, the LM's linear weights)")
    ap.add_argument("--rss-limit-gb", type=float, default=1.0, help="exit 1 if peak RSS exceeds this")
    a = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    base, experts = synth.ensure_models(a.data_dir, a.model, a.experts)
    experts = experts[: a.experts]
    files = synth.weight_files(base) + [f for e in experts for f in synth.weight_files(e)]
    in_bytes = sum(f.stat().st_size for f in files)
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    name, params = OMNI[a.method]
    import yaml

    recipe = {"base_model": str(base), "models": [{"model": str(e)} for e in experts], "merge_method": name,
              "parameters": params}
    if a.all_tensors:
        recipe["select"] = {"include": [".*"]}
    work = a.data_dir / "bench_merge"
    work.mkdir(parents=True, exist_ok=True)
    rp = work / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    exe = Path(sys.executable).with_name("omnimerge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "omnimerge.cli"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    la = loadavg()
    m = run_measured(cmd + ["merge", str(rp), "-o", str(work / "out"), "-q", "--overwrite"], env=env)
    if m.returncode != 0:
        print(m.stderr[-3000:], file=sys.stderr)
        return m.returncode
    print(" ".join(m.stdout.split()))  # omnimerge's own summary (its in-process merge time)
    print(f"{a.method}: {a.experts} experts + base of {a.model} ({synth.num_params(a.model) / 1e6:.0f}M params, "
          f"{in_bytes / 1e9:.2f} GB of input)")
    print(f"wall time        {m.wall:.2f} s   (process start included; CPU {m.cpu:.1f} s; load {la:.2f})")
    print(f"input throughput {in_bytes / 1e6 / m.wall:.0f} MB/s")
    print(f"peak RSS         {m.max_rss / 1e6:.0f} MB   (anonymous {m.peak_anon / 1e6:.0f} MB)")
    import shutil

    shutil.rmtree(work / "out", ignore_errors=True)
    if m.max_rss > a.rss_limit_gb * 1e9:
        print(f"peak RSS above {a.rss_limit_gb} GB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
