"""The text of docs/performance.md around the generated tables."""

from __future__ import annotations


def _targets(res: dict) -> str:
    lines = []
    for c in res["cases"]:
        for method, e in c["methods"].items():
            o, m, ns = e.get("omnimerge"), e.get("mergekit"), e.get("omnimerge_like")
            if not (o and m):
                continue
            sp = m["wall"] / o["wall"]
            sp_ns = m["wall"] / ns["wall"] if ns else None
            want = 3.0 if method in ("task_arithmetic", "linear") else 10.0
            lim = o["wall"] / c["cat_s"]
            lim_merge = (ns or o)["merge_s"] / c["cat_s"]
            verdict = "met" if sp >= want else ("met like-for-like" if sp_ns and sp_ns >= want else "not met")
            lines.append(
                f"| {c['model']} T={c['T']} | {method} | {sp:.1f}×"
                + (f" / {sp_ns:.1f}× like-for-like" if sp_ns else "")
                + f" (≥ {want:g}×: {verdict})"
                + f" | {lim:.0f}× the cat time; merge alone {lim_merge:.1f}×"
                + (" (target ≤ 4×: " + ("met" if lim <= 4 else ("merge alone met" if lim_merge <= 4 else "not met"))
                   + ")" if method == "task_arithmetic" else "")
                + f" | {o['max_rss'] / 1e9:.2f} vs {m['max_rss'] / 1e9:.2f} GB: "
                + ("met" if o["max_rss"] <= m["max_rss"] else "not met")
                + " |"
            )
    return "\n".join(["| case | method | speed-up vs mergekit (default / like-for-like) | wall ÷ cat | "
                      "peak RSS omnimerge vs mergekit |", "|---|---|---|---|---|"] + lines)


def _sync(res: dict) -> str:
    rows = ["| model | T | method | wall s, default (fsync, digests) | wall s, like-for-like | merge s default / "
            "like-for-like | CPU s default / like-for-like | import s |", "|---|---|---|---|---|---|---|---|"]
    for c in res["cases"]:
        for method, e in c["methods"].items():
            o, ns = e.get("omnimerge"), e.get("omnimerge_like")
            if o and ns:
                rows.append(f"| {c['model']} | {c['T']} | {method} | {o['wall']:.2f} | {ns['wall']:.2f} | "
                            f"{o['merge_s']:.2f} / {ns['merge_s']:.2f} | {o['cpu']:.1f} / {ns['cpu']:.1f} | "
                            f"{o.get('import_s', 0):.2f} |")
    return "\n".join(rows)


def _scaling(res: dict) -> str:
    def wall(model: str, T: int, method: str, key: str) -> float | None:
        for c in res["cases"]:
            if c["model"] == model and c["T"] == T and method in c["methods"]:
                o = c["methods"][method].get(key)
                return o["wall"] if o else None
        return None

    out = []
    for key, what in (("omnimerge", "default"), ("omnimerge_like", "like-for-like")):
        for method in ("task_arithmetic", "ties"):
            ts = [(T, wall("qwen2-0.5b", T, method, key)) for T in (2, 3, 5)]
            ts = [(T, w) for T, w in ts if w]
            if len(ts) >= 2:
                per = ", ".join(f"T = {T}: {w:.1f} s" for T, w in ts)
                out.append(f"{method} on 0.5B ({what}), wall: {per}")
            a, b = wall("qwen2-0.5b", 3, method, key), wall("qwen2-1.5b", 3, method, key)
            if a and b:
                out.append(f"{method} 0.5B → 1.5B (3.1× the bytes, {what}), T = 3: {a:.1f} s → {b:.1f} s "
                           f"({b / a:.1f}×)")
    return "; ".join(out)


def render(res: dict, table_mk: str, table_scaling: str, imgs: list[str], extra: str = "") -> str:
    m = res["machine"]
    loads = sorted({round(la, 1) for c in res["cases"] for e in c["methods"].values()
                    for k in ("omnimerge", "mergekit") if e.get(k) for la in (e[k].get("loadavg") or []) if la})
    spectral = res.get("spectral")
    spec_txt = ""
    if spectral and spectral.get("output"):
        spec_txt = (f"Command: `{spectral['command']}` ({spectral['seconds']:.0f} s).\n\n```\n{spectral['output']}\n```\n")
    elif spectral:
        spec_txt = f"Not run: {spectral.get('skipped') or spectral.get('stderr_tail')}\n"
    else:
        spec_txt = ("Not part of this run; `python -m benchmarks.perf.run --report-only --spectral` adds it "
                    "(it runs `benchmarks/bench_spectral.py --quick`; `--spectral-args ''` for its full run).\n")
    return f"""# Performance

Measured with one command (from the repository root, in omnimerge's environment):

```
python -m benchmarks.perf.run --with-mergekit          # everything below (about 30 min on 2 cores, mostly mergekit)
python -m benchmarks.perf.run --quick                  # smoke test: a tiny model, one repeat
python -m benchmarks.perf.run --report-only            # re-render this page from benchmarks/perf/results/latest.json
python benchmarks/bench_merge.py                       # 3 experts of a ~1.5 GB checkpoint: wall, MB/s, peak RSS
```

`--with-mergekit` installs mergekit 0.1.5 into its own virtual environment (`DATA_DIR/mergekit-venv`,
torch 2.13.0 CPU first) unless `--mergekit-venv` points at one. mergekit's TIES and DARE-TIES take minutes
per case, so they run once; `--mergekit-from results.json` reuses their timings (and their outputs, kept
under `DATA_DIR/runs`) from an earlier run. This page was produced with mergekit's TIES and DARE-TIES timings
from the previous round's run on the same machine, quiet then too (`--mergekit-from`; mergekit has not changed);
everything else, mergekit's linear and task arithmetic runs included, is from this run.{(" " + res["note"] + ".") if res.get("note") else ""}

## Set-up

- **Machine**: {m['cpus']} CPU cores (AMD EPYC, shared with other users: the 1-min load average while
  timing ranged over {loads[0] if loads else '?'}–{loads[-1] if loads else '?'}, recorded per run in the results JSON),
  {m['mem_gb']:.0f} GB RAM, no GPU; Python {m['python']}, torch {m['torch']}; mergekit {res.get('mergekit_version') or '—'}.
  Started {res['started']}, git {res['git']} plus the working tree.
- **Inputs**: synthetic sharded bf16 safetensors checkpoints with the real Qwen2-0.5B and Qwen2-1.5B shapes
  (tied embeddings, q/k/v biases, `config.json` with `Qwen2ForCausalLM`), generated from a seed by
  `benchmarks/perf/synth.py`: base ~ N(0, 0.02²), experts = base + N(0, (0.01·std)²) + a rank-8 part of the same
  size (fine-tuning-sized deltas: a few bf16 ulps). 1 GB shards.
- **Page cache**: the inputs are read with `cat` before every run, so all numbers are warm-cache, and dirty
  pages are flushed (`sync`, not timed) before every run, so that no run pays for the writeback of an earlier
  run's unsynced output (mergekit's, or omnimerge's with `--no-sync`): on 2 cores that writeback had cost the
  runs after it up to a second. The **read limit** is the best of 3 `cat <all input shards> > /dev/null`.
- **Equal work**: omnimerge's recipe has `select: {{include: ['.*']}}` (every tensor merged, like mergekit),
  `dtype: float32` (its default compute dtype), bf16 output, 1 GB output shards; mergekit gets `dtype: bfloat16`
  (its behaviour for bf16 inputs), `--out-shard-size 1B --no-copy-tokenizer --random-seed 0`.
  Parameters: linear = weight average, weights 1 (mergekit `linear`, omnimerge `weight_average`; neither reads
  the base: both sum the experts' weights, as the OptMerge reference does);
  task arithmetic λ = 0.3 (`lambda` / `scaling`), weights 1; TIES density 0.2, λ = 1, weights 1 (mergekit
  `normalize: true`; omnimerge's disjoint mean is the same normalisation); DARE-TIES drop rate 0.5
  (mergekit `density: 0.5`, omnimerge `drop_rate: 0.5, density: 1.0`), λ = 1.
- **Times**: *wall* is measured by the parent around the child process, **process start and imports
  included** (about 2 s for torch alone); *merge s* is omnimerge's own `MergeReport.seconds` (open, plan,
  merge, write, fsync, model card). Best of {res['repeats']} runs for linear and task arithmetic; TIES and
  DARE-TIES once or twice. **Input GB/s** = bytes of the base and expert shards ÷ wall (for linear neither
  tool reads the base, so the bytes actually read are T/(T+1) of the figure shown).
- **Peak RSS**: the child's `ru_maxrss` from `wait4` (anonymous memory **plus** resident memory-mapped input
  pages), with the peak anonymous RSS (sampled every 50 ms) in parentheses.
- **Agreement**: tensor by tensor over the bf16 outputs: the fraction of elements bit-equal, within 1 bf16 ulp,
  and the difference relative to the merged delta, ‖out_omnimerge − out_mergekit‖ / ‖out_omnimerge − W0‖.
  mergekit computes task vectors in bf16 (one rounding more) and TIES breaks ties at the trim threshold and
  zero-sum signs differently (omnimerge keeps |τ| ≥ the k-th smallest, zero-sum entries take the tensor's
  majority sign), so small differences are expected. For TIES they are not small on these inputs: the
  synthetic deltas are a few bf16 ulps, so magnitudes tie massively (in `layers.11.mlp.gate_proj` 8,259
  distinct values among 4.4M entries; 7% of the entries share the threshold magnitude): omnimerge keeps every
  entry with |τ| ≥ the k-th smallest magnitude (the OptMerge/MergeLM definition: 23.3% kept at density 0.2),
  mergekit exactly int(density·N) of them by sorting (20%), so the merged deltas differ by ~30% in norm
  while the 92% of elements away from the threshold are bit-identical. DARE's masks differ by construction (and mergekit
  rescales to keep the L1 norm, omnimerge by 1/(1−p)): compared by the fraction of entries changed from the
  base and the relative delta norm.
- **Durability**: by default omnimerge flushes the output to disk (`fsync`) before it renames it into place, so
  a merge that returned is on disk; mergekit (like `save_pretrained`) leaves its output in the page cache. On this
  VM the disk writes ~0.4–0.9 GB/s, so the fsync of the 1–3 GB outputs is a floor of its own.
- **Like-for-like**: the runs with `--no-sync --hash none` (`omnimerge.merge(..., sync=False,
  hash_inputs=False)`) do the work mergekit does: no fsync of the output, no input digests. Both columns are
  shown; the default is what `omnimerge merge` does out of the box.
- **Input digests**: omnimerge's model card records an XXH3-128 digest of every input file (`--hash sha256` for
  sha256, `--hash none` for none), hashed on a background thread through memory-mapped windows at ~16 GB/s:
  ~0.06 CPU-s per GB. Every timed default run hashes its inputs (an empty digest cache each time, the worst
  case: a later merge of the same files takes their digests from the cache): on the 1.5B case, 12.35 GB of
  input, that is ~0.8 CPU-s on a machine whose 2 cores the merge keeps busy.
- **Startup**: wall times include the interpreter and imports (torch: ~1.2 s; numba and the cached kernels:
  ~0.45 s more, loaded on a background thread while the first chunks merge on the torch path; numba's first
  call imports scipy when it is installed, +0.2 s: omnimerge does not depend on scipy and the environment
  measured here, like a fresh `pip install`, has none).

## omnimerge vs mergekit vs the read limit

{table_mk}

## Scaling in model size and number of experts (omnimerge)

{table_scaling}

![time against model size]({imgs[0]})

![time against the number of experts]({imgs[1]})

## Default (fsync, digests) and like-for-like (--no-sync --hash none) runs

{_sync(res)}

## Targets

{_targets(res)}

Time against size and T (the scaling table and plots): {_scaling(res)}. Every tensor is read once per input
per sweep and the per-element work is a fixed number of operations per input, so time is linear in the bytes
merged (plus the fixed startup of ~1.5–2 s); TIES adds one counting sweep for its thresholds. The default runs
also wait for the disk (fsync) and hash every input; the like-for-like column shows the merge's own scaling.

## What was done for speed (and what bounds it now)

- **Compiled fused kernels** (`omnimerge/kernels.py`, numba, machine code cached on disk): task arithmetic and
  weight average run one single-pass loop per 1M-element chunk that reads every input once and writes the output
  once (generated for 1–4 experts per pass by `tools/gen_kernels.py`; more experts carry the running sum between
  passes): ~0.5 ns per element for three bf16 experts on one core, against ~3 ns for the same operations as
  torch kernel calls on 64K blocks. TIES and DARE-TIES merge in one vectorised pass per entry for up to 8
  experts (per-entry sign, finiteness and undecided flags go to byte arrays that a second loop reduces: with the
  reductions inside, LLVM did not vectorise the pass and it cost 4–11 ns per entry; now ~2.4 ns for TIES and
  ~3.3 ns for DARE-TIES on one core, three experts); more experts, and the counting sweep, use compiled row-wise
  kernels on cache-sized sub-blocks. Undecided entries (elected sign 0: 3% of the entries of these inputs under
  DARE) are merged with the majority sign guessed from the sample and then from the running sign sum; the fused
  loop also stores each entry's delta for the other sign, so that those merged with a wrong guess can be patched
  afterwards without recomputing them. The kernels perform the same IEEE float32 operations in the same order
  as the torch path, so the outputs are **bit-identical** (tests compare both paths on every method, dtype and
  expert count, including the ambiguous-sign fix-ups). They load in the background; until then chunks take the
  torch path (same bits).
- **Block-wise TIES / DARE-TIES** (`methods/ties.py: TiesBlockwise`): the per-tensor trim threshold is found
  exactly without holding the tensor: a strided sample brackets the k-th magnitude, one counting sweep places it
  (entries strictly inside the bracket, a few percent, are kept and partially sorted); the merge sweep streams;
  entries whose elected sign is 0 are amended in the output once the tensor's majority sign is known. Working
  memory is a few blocks per worker instead of (T + 5) float32 copies of the largest tensor: peak RSS fell from
  ~6 GB (0.5B) / ~10 GB (1.5B) to the numbers above.
- **Counter-based DARE masks**: entry j of expert i is kept iff a 32-bit hash of (j, key(seed, tensor, i)) ≥ p·2³²
  (cheaper than torch's CPU generator, and the same for any block size, worker count, merge order or device).
  The compiled loops compute the hash in 32-bit arithmetic (an LLVM intrinsic: numba's integers are 64-bit, and
  64-bit multiplies do not vectorise on AVX2): the same masks at 0.4 instead of 0.9 ns per hash.
- **Weight average without the base**: from full checkpoints, weight averaging sums the experts' weights and
  divides (the method's `from_weights` form; the reference's own computation, which the golden cases now match
  bit for bit) instead of W0 + mean(W_i − W0): T inputs read instead of T + 1.
- **Parallel workers that really run in parallel**: streamed jobs are budgeted by their block memory; the budget
  had been the largest whole-tensor cost, which let a large streamed tensor run only alone. Kernel calls release
  the GIL and do ~1 ms of work each.
- **Output**: shards are written in place (`pwrite`) as chunks finish and flushed by a background thread every
  64 MB, so the final fsync waits only for the tail (1.2 s → ~0.2 s for 1 GB). `--no-sync` skips it.
- **Model card digests**: XXH3-128 through mmap windows (sha256 had cost ~1.8 CPU-s per GB here).
- **Interpreter**: cyclic GC paused during the stream and the torch import and frozen after it (~0.35 s).
- **What bounds it now**: process start (~1.3 s, torch) plus kernel loading (~0.45 s, barely overlapped: numba's
  initialisation holds the GIL), the disk for durable output (the default runs' fsync), and writing the output
  into the page cache (~0.7–1.3 CPU-s per GB on this VM, under memory pressure from the cached inputs) for the
  cheap merges; mergekit's TIES fully sorts every task vector (`argsort`) and works in bf16.

## `benchmarks/bench_merge.py` (three experts of a ~1.5 GB checkpoint)

A Qwen2-shaped model of 748M parameters (1.5 GB in bf16), base + 3 experts (5.98 GB), task arithmetic with the
recipe's default selection (the language model's linear weights merged, the rest copied), through
`omnimerge merge`. One run on the quiet machine (load 1.3):

```
done task_arithmetic: merged 84 tensors, copied 62 from the base, 2.40 s (2497 MB/s of input)
wall time        3.93 s   (process start included; CPU 4.5 s; load 1.34)
input throughput 1521 MB/s
peak RSS         502 MB   (anonymous 242 MB)
```

(The previous round: 10.39 s wall, 576 MB/s, 320 MB, under load 4.6.)

Peak RSS stays far under the 1 GB bound (the script exits 1 above `--rss-limit-gb`, default 1).

## Before and after (omnimerge alone, same inputs, back to back)

This round against the previous one (git `e2168e4`), on the 0.5B model with T = 3, every tensor merged, defaults
(2 workers, XXH3 digests, fsync), alternating old and new, two runs each after a warm-up run of each (the old
engine from a `git worktree`, the same virtual environment). In-process `MergeReport.seconds` / wall time
(best of 2) / peak RSS:

| method | before (e2168e4): merge s / wall s / RSS GB | after: merge s / wall s / RSS GB | outputs |
|---|---|---|---|
| weight average | 1.53 / 2.99 / 0.41 | 1.51 / 2.97 / 0.41 | 100% of the bf16 entries bit-equal (the float32 sums differ below bf16 rounding) |
| task arithmetic | 1.51 / 2.96 / 0.42 | 1.59 / 3.05 / 0.42 | same operations (three more alternating runs: 2.00 / 1.85 / 1.54 s before, 1.91 / 1.72 / 1.57 s after) |
| TIES | 3.88 / 5.34 / 1.47 | 3.87 / 5.35 / 1.47 | **byte-identical** (`cmp`) |
| DARE-TIES | 3.62 / 5.13 / 0.61 | 3.11 / 4.57 / 0.61 | **byte-identical** (`cmp`): the same masks from the 32-bit hash |

DARE-TIES gained 0.5 s (merge 3.6 → 3.1 s) from the 32-bit hash and from keeping the undecided entries' other
candidate in the fused loop (the separate candidate pass had cost ~1 s of CPU: 15M undecided entries, 3% of the
model). Weight average reads one input less, which these warm-cache runs hardly show (one run with
`--no-sync --hash none`: 1.44 → 1.20 s merge); its point is the reference's exact arithmetic. Task arithmetic and TIES did not
change.

The round before (git `0678309` → `e2168e4`, same protocol, the old engine hashing with sha256): task arithmetic
4.58 / 6.31 / 0.30 → 2.43 / 3.93 / 0.47; TIES 22.52 / 24.32 / 5.83 → 4.74 / 6.29 / 1.50 (byte-identical);
DARE-TIES 22.35 / 24.12 / 5.83 → 3.91 / 5.43 / 0.64.

## Spectral methods: per-layer benchmark

{spec_txt}
{extra}"""
