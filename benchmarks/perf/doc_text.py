"""The text of docs/performance.md around the generated tables."""

from __future__ import annotations


def _targets(res: dict) -> str:
    lines = []
    for c in res["cases"]:
        for method, e in c["methods"].items():
            o, m, nh = e.get("omnimerge"), e.get("mergekit"), e.get("omnimerge_nohash")
            if not (o and m):
                continue
            sp = m["wall"] / o["wall"]
            sp_merge = m["wall"] / nh["wall"] if nh else None
            want = 3.0 if method in ("task_arithmetic", "linear") else 10.0
            lim = o["wall"] / c["cat_s"]
            lim_merge = (nh["merge_s"] / c["cat_s"]) if nh else None
            lines.append(
                f"| {c['model']} T={c['T']} | {method} | {sp:.1f}× (≥ {want:g}×: {'met' if sp >= want else 'not met'})"
                + (f"; {sp_merge:.1f}× without input hashing" if sp_merge else "")
                + f" | {lim:.0f}× the cat time"
                + (f" ({lim_merge:.0f}× for the merge alone, no hashing)" if lim_merge else "")
                + (" (target ≤ 4×: " + ("met" if lim <= 4 else "not met") + ")" if method == "task_arithmetic" else "")
                + f" | {o['max_rss'] / 1e9:.2f} vs {m['max_rss'] / 1e9:.2f} GB: "
                + ("met" if o["max_rss"] <= m["max_rss"] else "not met")
                + " |"
            )
    return "\n".join(["| case | method | speed-up vs mergekit | wall ÷ cat | peak RSS omnimerge vs mergekit |",
                      "|---|---|---|---|---|"] + lines)


def _nohash(res: dict) -> str:
    rows = ["| model | T | method | wall s, default | wall s, no input hashing | merge s (in-process), default / no hashing | CPU s default / no hashing |",
            "|---|---|---|---|---|---|---|"]
    for c in res["cases"]:
        for method, e in c["methods"].items():
            o, nh = e.get("omnimerge"), e.get("omnimerge_nohash")
            if o and nh:
                rows.append(f"| {c['model']} | {c['T']} | {method} | {o['wall']:.2f} | {nh['wall']:.2f} | "
                            f"{o['merge_s']:.2f} / {nh['merge_s']:.2f} | {o['cpu']:.1f} / {nh['cpu']:.1f} |")
    return "\n".join(rows)


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
python -m benchmarks.perf.run --with-mergekit          # everything below (about 45 min on 2 cores, mostly mergekit)
python -m benchmarks.perf.run --quick                  # smoke test: a tiny model, one repeat
python -m benchmarks.perf.run --report-only            # re-render this page from benchmarks/perf/results/latest.json
python benchmarks/bench_merge.py                       # 3 experts of a ~1.5 GB checkpoint: wall, MB/s, peak RSS
```

`--with-mergekit` installs mergekit 0.1.5 into its own virtual environment (`DATA_DIR/mergekit-venv`,
torch 2.13.0 CPU first) unless `--mergekit-venv` points at one. mergekit's TIES and DARE-TIES take minutes
per case, so they run once; `--mergekit-from results.json` reuses their timings (and their outputs, kept
under `DATA_DIR/runs`) from an earlier run. This page was produced with the mergekit TIES/DARE-TIES timings
from such an earlier run (`benchmarks/perf/results/mergekit.json`); the other numbers are from this run.

## Set-up

- **Machine**: {m['cpus']} CPU cores (AMD EPYC, shared with other users: the 1-min load average while
  timing ranged over {loads[0] if loads else '?'}–{loads[-1] if loads else '?'}, recorded per run in the results JSON),
  {m['mem_gb']:.0f} GB RAM, no GPU; Python {m['python']}, torch {m['torch']}; mergekit {res.get('mergekit_version') or '—'}.
  Started {res['started']}, git {res['git']} plus the working tree.
- **Inputs**: synthetic sharded bf16 safetensors checkpoints with the real Qwen2-0.5B and Qwen2-1.5B shapes
  (tied embeddings, q/k/v biases, `config.json` with `Qwen2ForCausalLM`), generated from a seed by
  `benchmarks/perf/synth.py`: base ~ N(0, 0.02²), experts = base + N(0, (0.01·std)²) + a rank-8 part of the same
  size (fine-tuning-sized deltas: a few bf16 ulps). 1 GB shards.
- **Page cache**: the inputs are read with `cat` before every run, so all numbers are warm-cache. The
  **read limit** is the best of 3 `cat <all input shards> > /dev/null`.
- **Equal work**: omnimerge's recipe has `select: {{include: ['.*']}}` (every tensor merged, like mergekit),
  `dtype: float32` (its default compute dtype), bf16 output, 1 GB output shards; mergekit gets `dtype: bfloat16`
  (its behaviour for bf16 inputs), `--out-shard-size 1B --no-copy-tokenizer --random-seed 0`.
  Parameters: linear = weight average, weights 1 (mergekit `linear`, omnimerge `weight_average`);
  task arithmetic λ = 0.3 (`lambda` / `scaling`), weights 1; TIES density 0.2, λ = 1, weights 1 (mergekit
  `normalize: true`; omnimerge's disjoint mean is the same normalisation); DARE-TIES drop rate 0.5
  (mergekit `density: 0.5`, omnimerge `drop_rate: 0.5, density: 1.0`), λ = 1.
- **Times**: *wall* is measured by the parent around the child process, **process start and imports
  included** (about 2 s for torch alone); *merge s* is omnimerge's own `MergeReport.seconds` (open, plan,
  merge, write, fsync, model card). Best of {res['repeats']} runs for linear and task arithmetic; TIES and
  DARE-TIES once. **Input GB/s** = bytes of the base and expert shards ÷ wall (mergekit's `linear` does not
  read the base, so its true rate is T/(T+1) of the figure shown).
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
- **omnimerge's model card** records the sha256 of every input file, hashed on a background thread during the
  merge. On this machine sha256 runs at ~0.55 GB/s (OpenSSL without SHA extensions in this VM), so hashing
  costs ~1.8 CPU-s per GB of input: on 2 cores it is a large part of the cheap merges. The runs "without input
  hashing" (`omnimerge.merge(..., hash_inputs=False)`) show the merge itself.

## omnimerge vs mergekit vs the read limit

{table_mk}

## Scaling in model size and number of experts (omnimerge)

{table_scaling}

![time against model size]({imgs[0]})

![time against the number of experts]({imgs[1]})

## Cost of the input hashing (model card sha256)

{_nohash(res)}

## Targets

{_targets(res)}

Time against size and T (the scaling table and plots): every tensor is read once per input and the
per-element work is a fixed number of passes per input, so task arithmetic is linear (0.5B: 5.8 / 9.1 / 11.7 s
wall for T = 2 / 3 / 5, including ~2 s of process start; 0.5B → 1.5B, 3.1× the bytes: 2.8× the time). TIES grows
somewhat faster than linearly (0.5B: 12 / 15 / 19 s per expert for T = 2 / 3 / 5; 1.5B: 3.5× the 0.5B time),
because its whole-tensor float32 working set, (T + ~5) × the largest tensor, grows with T and the model.

## What was done for speed (and what bounds it now)

- **Fused, cache-blocked elementwise merges** (`engine._merge_job_fused`, used by task arithmetic and weight
  average): each tensor is streamed in 64K-element blocks straight from the memory-mapped inputs: convert the
  bf16 block, subtract, merge, add to the base, convert, `pwrite` the block at its planned offset
  (`ShardedWriter.write_part`). No full-size float32 copies of the base and the T task vectors; every element
  goes through the same operations as the whole-tensor path, so the output is **bit-identical** (checked file by
  file against the previous code on the 0.5B model, for linear, task arithmetic, TIES and DARE-TIES, and on a
  tiny model with non-uniform weights). Worker threads run one tensor each with one intra-op thread each (the
  OpenMP thread count is per thread), so both cores work on independent tensors.
- **Finiteness check by a sum**: the check that no task vector holds NaN/Inf was `isfinite(tv).all()` per expert
  and tensor: over half of the merge time. A sum propagates NaN/Inf and costs a fraction of it; only a
  non-finite sum falls back to the exact test, so the errors are unchanged.
- **Selection instead of sorting for TIES** (`ties.kth_smallest`): the trim threshold is the exact
  `kthvalue`, found by bracketing it with a strided sample of 64K entries, counting, and sorting only the few
  percent of entries strictly inside the bracket (ties at the bracket ends settle it outright). Exact (verified,
  with a fallback to `kthvalue`), about 4–6× faster than `kthvalue` on real task vectors, and it avoids
  `kthvalue`'s quadratic worst case on sorted inputs.
- **Small resident set**: input pages are unmapped from the process as soon as they are merged
  (`MADV_DONTNEED` on the private read-only mapping: the page cache keeps them), every 2 M elements in the fused
  path and after each tensor otherwise; the next jobs' inputs are prefetched (`MADV_WILLNEED`), so with a cold
  page cache disk reads overlap with compute. Copied tensors still go through `copy_file_range`.
- **What bounds it now**: process start (~2–3 s of imports: torch), the sha256 of the inputs for the model card
  (~1.8 CPU-s/GB here), the fsync of the output (the data must reach the disk: ~1 GB/s), and for TIES the
  elementwise passes of the sign election and disjoint mean over float32 tensors (about 15 full passes per
  expert); for DARE the Bernoulli masks (torch's CPU generator). mergekit's TIES sorts every task vector
  (`argsort`) and computes in bf16; its DARE draws the same number of random numbers.

## `benchmarks/bench_merge.py` (three experts of a ~1.5 GB checkpoint)

A Qwen2-shaped model of 748M parameters (1.5 GB in bf16), base + 3 experts (5.98 GB), task arithmetic with the
recipe's default selection (the language model's linear weights merged, the rest copied), through
`omnimerge merge`. One run on the shared machine (load 4.6):

```
done task_arithmetic: merged 84 tensors, copied 62 from the base, 8.39 s (713 MB/s of input)
wall time        10.39 s   (process start included; CPU 9.8 s; load 4.58)
input throughput 576 MB/s
peak RSS         320 MB   (anonymous 183 MB)
```

Peak RSS stays far under the 1 GB bound (the script exits 1 above `--rss-limit-gb`, default 1).

## Before and after (omnimerge alone, same inputs, back to back)

In-process `MergeReport.seconds` of the previous engine (git HEAD before these changes) and of this one, on the
0.5B model with T = 3, every tensor merged, 2 workers, input hashing on (the load average of the shared machine
in brackets; both runs of a pair under the same load). The outputs of each pair are **byte-identical** (`cmp`
of the output shards).

| method | before | after |
|---|---|---|
| task arithmetic | 53.5 s (load ~6); 8.76 s (load ~2) | 21.8 s (load ~6); 4.27 s (load ~2) |
| TIES | 200.2 s (load ~7) | 108.9 s (load ~7) |
| DARE-TIES | 95.0 s (load ~7) | 59.8 s (load ~7) |

## Spectral methods: per-layer benchmark

{spec_txt}
{extra}"""
