"""Repeated merges in memory (what a coefficient search does): time per merge and peak RSS.

    python benchmarks/bench_memory_merge.py                         # task arithmetic, qwen2-0.5b shapes, T = 3
    python benchmarks/bench_memory_merge.py --method ties --merges 4 --model qwen2-tiny

Synthetic Qwen2-shaped checkpoints (base + 3 experts, bf16; generated once under --data-dir, shared with
``python -m benchmarks.perf.run``) are merged with the recipe's default selection (the language model's linear
weights) with a different ``scaling`` each time:

* ``disk``: ``omnimerge.merge`` into a folder (written, not synced, no input digests), per merge;
* ``memory``: ``Merger.state_dict(only_merged=True)``, the inputs read from the memory-mapped checkpoints each
  merge;
* ``kept``: ``Merger(keep_inputs=True)``: the first merge reads and keeps the inputs (float32), the later ones
  read no checkpoint.

Each mode runs in its own child process so that its peak RSS (``ru_maxrss``) is its own. Inputs are read once
with ``cat`` first (warm page cache). Every mode's last merge is checked bit for bit against the disk result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.perf import synth  # noqa: E402

PARAMS = {"task_arithmetic": {}, "ties": {"density": 0.2}, "dare_ties": {"density": 1.0, "drop_rate": 0.5},
          "weight_average": {}, "tsv": {}}


def _child(mode: str, recipe: dict, scalings: list[float], out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    import omnimerge

    times: list[float] = []
    last: dict[str, torch.Tensor] = {}
    if mode == "disk":
        for i, lam in enumerate(scalings):
            r = dict(recipe, parameters={**recipe["parameters"], **({"scaling": lam} if lam is not None else {})})
            t = time.perf_counter()
            omnimerge.merge(r, out / f"m{i}", overwrite=True, hash_inputs=False, sync=False)
            times.append(time.perf_counter() - t)
    else:
        with omnimerge.Merger(recipe, keep_inputs=(mode == "kept")) as m:
            for lam in scalings:
                t = time.perf_counter()
                last = m.state_dict({"scaling": lam} if lam is not None else None, only_merged=True)
                times.append(time.perf_counter() - t)
        save_file({k: v.contiguous() for k, v in last.items()}, str(out / f"{mode}.safetensors"))
    return {"times": times, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="task_arithmetic", choices=sorted(PARAMS))
    ap.add_argument("--model", default="qwen2-0.5b", choices=sorted(synth.MODELS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--merges", type=int, default=4)
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("OMNIMERGE_PERF_DIR", "/tmp/omnimerge-perf")))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(_child(spec["mode"], spec["recipe"], spec["scalings"], Path(spec["out"]))))
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    base, experts = synth.ensure_models(a.data_dir, a.model, a.experts)
    for d in [base, *experts]:
        subprocess.run(["cat", *map(str, synth.weight_files(d))], stdout=subprocess.DEVNULL, check=True)
    has_scaling = a.method != "weight_average"
    scalings = [round(0.2 + 0.1 * i, 2) if has_scaling else None for i in range(a.merges)]
    recipe = {"base_model": str(base), "models": [{"model": str(e)} for e in experts], "merge_method": a.method,
              "parameters": dict(PARAMS[a.method])}
    print(f"{a.method}, {a.model}, T = {a.experts}, {a.merges} merges (scaling {scalings}); "
          f"load {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=a.data_dir) as tmp:
        out = Path(tmp)
        res = {}
        for mode in ("disk", "memory", "kept"):
            spec = json.dumps({"mode": mode, "recipe": recipe, "scalings": scalings, "out": str(out)})
            p = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=True)
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        import torch
        from safetensors.torch import load_file

        def raw(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1).view(torch.uint8)

        disk = load_file(str(out / f"m{a.merges - 1}" / "model.safetensors"))
        for mode in ("memory", "kept"):
            got = load_file(str(out / f"{mode}.safetensors"))
            res[mode]["same_bits"] = bool(got) and all(
                k in disk and disk[k].dtype == v.dtype and torch.equal(raw(disk[k]), raw(v)) for k, v in got.items())
    print(f"{'mode':8} {'first merge s':>14} {'later merges s (mean)':>22} {'peak RSS GB':>12}  same bits as disk")
    for mode, r in res.items():
        later = r["times"][1:] or r["times"]
        print(f"{mode:8} {r['times'][0]:14.2f} {sum(later) / len(later):22.2f} {r['rss_gb']:12.2f}  "
              f"{r.get('same_bits', '-')}")
    return 0 if all(r.get("same_bits", True) for r in res.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
