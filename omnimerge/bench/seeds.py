"""Results over several zoo seeds: ``omnimerge bench --seeds 0,1,2`` (both suites).

Each seed has its own zoo (trained from that seed, cached) and its own single-seed run in ``OUT/seed-<s>/``. This
module aggregates them: every method as mean ± standard deviation over seeds (sample s.d., ``ddof = 1``) next
to each seed's binomial standard error, the spread (min / mean / max) of every zoo calibration figure, and which
orderings hold on every seed:

* mini suite: for each pair of methods, on how many seeds the first has the higher mean (a pair that keeps its
  order on every seed is *consistent*); the best merge and the methods that beat the base on each seed;
* modality suite: per merge, ``joint − best single-modality expert`` on each seed, and whether it has the same
  sign on every seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnimerge.bench import TASKS


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; ``"0-4"`` -> [0, 1, 2, 3, 4]. Raises ValueError on anything else."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo.strip().isdigit() and hi.strip().isdigit():
            seeds += list(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"--seeds: {part!r} is not a seed (non-negative integers, e.g. 0,1,2 or 0-2)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "min": float(v.min()), "max": float(v.max()),
            "per_seed": [float(x) for x in v]}


def _pct(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


# ---------------------------------------------------------------------------------------------------------------
# mini suite


def calibration_spread(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """min / mean / max over seeds of every zoo calibration figure: each model's test score on each task, each
    expert's gain over the base on its own task and its margin over the best other expert there."""
    names = list(per_seed[0]["zoo_scores"])
    scores = {n: {t: _stats([r["zoo_scores"][n][t]["score"] for r in per_seed]) for t in TASKS} for n in names}
    gains: dict[str, Any] = {}
    for fam in ("full", "lora"):
        for t in TASKS:
            name = f"{fam}/{t}"
            if name not in names:
                continue
            g, m = [], []
            for r in per_seed:
                sc = r["zoo_scores"]
                own = sc[name][t]["score"]
                g.append(own - sc["base"][t]["score"])
                m.append(own - max(sc[f"{fam}/{o}"][t]["score"] for o in TASKS if o != t))
            gains[name] = {"gain_over_base": _stats(g), "margin_over_other_experts": _stats(m)}
    ok = [bool(r["zoo_calibration"]["ok"]) for r in per_seed]
    return {"scores": scores, "gains": gains, "ok_per_seed": ok,
            "failures_per_seed": [r["zoo_calibration"]["failures"] for r in per_seed]}


def aggregate_mini(per_seed: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """The multi-seed results of the mini suite (see the module docstring)."""
    fams: dict[str, Any] = {}
    for fam in per_seed[0]["families"]:
        order = [r["name"] for r in per_seed[0]["families"][fam]["rows"]]
        rows = []
        for name in order:
            per = [next((r for r in res["families"][fam]["rows"] if r["name"] == name), None) for res in per_seed]
            row: dict[str, Any] = {"name": name, "kind": per[0]["kind"] if per[0] else "method"}
            failed = [f"seed {s}: {r.get('failed', 'missing')}" for s, r in zip(seeds, per, strict=True)
                      if r is None or "mean" not in r]
            if failed:
                row["failed"] = "; ".join(failed)
                rows.append(row)
                continue
            row["mean"] = _stats([r["mean"] for r in per])
            row["mean_se_per_seed"] = [r["mean_se"] for r in per]
            row["normalized"] = _stats([r["normalized"] for r in per])
            row["tasks"] = {t: _stats([r["scores"][t]["score"] for r in per]) for t in TASKS}
            row["scaling_per_seed"] = [r.get("scaling") for r in per]
            rows.append(row)
        fams[fam] = {"rows": rows, "orderings": orderings(rows, len(seeds))}
    return {"suite": "mini", "seeds": list(seeds), "families": fams, "calibration": calibration_spread(per_seed),
            "per_seed_calibration_ok": [r["calibration_status"] == "ok" for r in per_seed],
            "failed_methods": [f"seed {s}: {f}" for s, r in zip(seeds, per_seed, strict=True)
                               for f in r.get("failed_methods", [])],
            "timings": [r.get("timings", {}) for r in per_seed]}


def orderings(rows: Sequence[dict[str, Any]], n_seeds: int) -> dict[str, Any]:
    """Which pairwise orderings of the merge methods hold on every seed; best merge and beats-the-base per seed."""
    meth = [r for r in rows if r["kind"] == "method" and "mean" in r]
    base = next((r for r in rows if r["name"] == "Base" and "mean" in r), None)
    wins: dict[str, dict[str, int]] = {}
    consistent, total = 0, 0
    for a in meth:
        wins[a["name"]] = {}
        for b in meth:
            if a is b:
                continue
            pa, pb = a["mean"]["per_seed"], b["mean"]["per_seed"]
            wins[a["name"]][b["name"]] = int(sum(x > y for x, y in zip(pa, pb, strict=True)))
    names = [r["name"] for r in meth]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            total += 1
            consistent += wins[a][b] in (0, n_seeds) and wins[b][a] in (0, n_seeds)
    best = [max(meth, key=lambda r, k=k: r["mean"]["per_seed"][k])["name"] for k in range(n_seeds)] if meth else []
    beats_base = {r["name"]: int(sum(x > y for x, y in zip(r["mean"]["per_seed"], base["mean"]["per_seed"],
                                                             strict=True)))
                  for r in meth} if base else {}
    ranks = []
    for k in range(n_seeds):
        srt = sorted(meth, key=lambda r, k=k: -r["mean"]["per_seed"][k])
        ranks.append({r["name"]: i + 1 for i, r in enumerate(srt)})
    return {"wins": wins, "consistent_pairs": consistent, "pairs": total, "best_per_seed": best,
            "beats_base_seeds": beats_base, "ranks_per_seed": ranks}


def mini_markdown(agg: dict[str, Any]) -> str:
    from omnimerge.bench.data import TASK_TITLES
    from omnimerge.bench.report import FAMILY_TITLES

    seeds = agg["seeds"]
    n = len(seeds)
    out = [f"# omnimerge bench over {n} seeds ({', '.join(map(str, seeds))})", "",
           "Each seed trains its own zoo (base, experts, mixture) and draws its own data; λ is chosen on each "
           "seed's validation split. Cells: mean ± standard deviation over seeds (%); *per seed* lists each "
           "seed's mean over the five tasks with its binomial standard error.", ""]
    bad = [s for s, ok in zip(seeds, agg["per_seed_calibration_ok"], strict=True) if not ok]
    if bad:
        out += [f"> **Zoo calibration shortfall on seed(s) {', '.join(map(str, bad))}**: "
                + " | ".join(f"seed {s}: " + "; ".join(f) for s, f in
                             zip(seeds, agg["calibration"]["failures_per_seed"], strict=True) if f), ""]
    if agg["failed_methods"]:
        out += ["> **Failed methods**: " + "; ".join(agg["failed_methods"]), ""]
    for fam, fr in agg["families"].items():
        out += [f"## {FAMILY_TITLES.get(fam, fam)}", ""]
        out.append("| Method | " + " | ".join(TASK_TITLES[t] for t in TASKS) + " | Avg. | Norm. | per seed (avg ± s.e.) "
                   "| rank per seed |")
        out.append("|---|" + "---:|" * (len(TASKS) + 2) + "---|---|")
        ranks = fr["orderings"]["ranks_per_seed"]
        for r in fr["rows"]:
            if "failed" in r:
                out.append(f"| {r['name']} | **failed**: {r['failed'][:150]} |" + " |" * (len(TASKS) + 3))
                continue
            cells = [f"{_pct(r['tasks'][t]['mean'])} ± {_pct(r['tasks'][t]['sd'])}" for t in TASKS]
            per = ", ".join(f"{_pct(m)} ± {_pct(se)}" for m, se in zip(r["mean"]["per_seed"], r["mean_se_per_seed"],
                                                                       strict=True))
            rk = ", ".join(str(rs.get(r["name"], "")) for rs in ranks) if r["kind"] == "method" else ""
            name = f"**{r['name']}**" if r["kind"] == "reference" else r["name"]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(r['mean']['mean'])} ± {_pct(r['mean']['sd'])} "
                       f"| {_pct(r['normalized']['mean'])} | {per} | {rk} |")
        o = fr["orderings"]
        out += ["", f"Orderings ({FAMILY_TITLES.get(fam, fam)}): best merge per seed: "
                + ", ".join(f"seed {s} **{b}**" for s, b in zip(seeds, o["best_per_seed"], strict=True))
                + f". {o['consistent_pairs']} of {o['pairs']} method pairs keep their order on every seed. "
                "Beat the base on every seed: "
                + (", ".join(k for k, v in o["beats_base_seeds"].items() if v == n) or "none")
                + "; not on every seed: "
                + (", ".join(f"{k} ({v}/{n})" for k, v in o["beats_base_seeds"].items() if v != n) or "none") + ".",
                "", "Pairwise: the cell is the number of seeds on which the row's method has a higher mean than the "
                f"column's ({n} or 0: the order holds on every seed).", ""]
        names = list(o["wins"])
        out.append("| | " + " | ".join(f"{i + 1}" for i in range(len(names))) + " |")
        out.append("|---|" + "---:|" * len(names))
        for i, a in enumerate(names):
            cells = ["·" if a == b else str(o["wins"][a][b]) for b in names]
            out.append(f"| {i + 1} {a} | " + " | ".join(cells) + " |")
        out.append("")
    out += calibration_spread_markdown(agg["calibration"], seeds)
    return "\n".join(out) + "\n"


def calibration_spread_markdown(cal: dict[str, Any], seeds: Sequence[int]) -> list[str]:
    from omnimerge.bench.data import TASK_TITLES

    out = [f"## Zoo calibration over seeds {', '.join(map(str, seeds))} (test, %, min / mean / max)", ""]
    out.append("| expert | own task | score | gain over base | margin over the best other expert |")
    out.append("|---|---|---:|---:|---:|")

    def mmm(s: dict[str, Any], sign: bool = False) -> str:
        f = (lambda v: f"{100 * v:+.1f}") if sign else (lambda v: f"{100 * v:.1f}")
        return f"{f(s['min'])} / {f(s['mean'])} / {f(s['max'])}"

    for name, g in cal["gains"].items():
        t = name.split("/", 1)[1]
        out.append(f"| {name} | {TASK_TITLES[t]} | {mmm(cal['scores'][name][t])} | {mmm(g['gain_over_base'], True)} "
                   f"| {mmm(g['margin_over_other_experts'], True)} |")
    out += ["", "Every model on every task (min / mean / max):", "",
            "| model | " + " | ".join(TASK_TITLES[t] for t in TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    for name, per in cal["scores"].items():
        out.append(f"| {name} | " + " | ".join(mmm(per[t]) for t in TASKS) + " |")
    out.append("")
    return out


def write_mini(agg: dict[str, Any], out: Path) -> list[Path]:
    """results.json, results.md and bars_<family>.png (mean ± s.d. over seeds) of a multi-seed run."""
    from omnimerge.bench.report import FAMILY_TITLES, pyplot

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(agg, indent=1))
    paths[1].write_text(mini_markdown(agg))
    plt = pyplot()
    for fam, fr in agg["families"].items():
        rows = [r for r in fr["rows"] if "mean" in r]
        fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows) + 2), 4))
        x = np.arange(len(rows))
        ax.bar(x, [100 * r["mean"]["mean"] for r in rows], yerr=[100 * r["mean"]["sd"] for r in rows], capsize=3,
               color=["tab:grey" if r["kind"] == "reference" else "tab:blue" for r in rows])
        for k in range(len(agg["seeds"])):
            ax.plot(x, [100 * r["mean"]["per_seed"][k] for r in rows], ".", color="k", ms=4)
        ax.set_xticks(x, [r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("test mean over tasks (%)")
        ok = all(agg["per_seed_calibration_ok"])
        ax.set_title(f"{FAMILY_TITLES.get(fam, fam)}: mean ± s.d. over seeds {agg['seeds']} (dots: seeds; zoo "
                     f"calibration {'ok on every seed' if ok else 'SHORTFALL on some seed'})", fontsize=9)
        fig.tight_layout()
        path = out / f"bars_{fam}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def print_mini(agg: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    from omnimerge.bench.data import TASK_TITLES
    from omnimerge.bench.report import FAMILY_TITLES

    for fam, fr in agg["families"].items():
        tab = Table(title=f"{FAMILY_TITLES.get(fam, fam)} over seeds {agg['seeds']} (test, mean ± s.d. %)")
        for col in ("method", *[TASK_TITLES[t] for t in TASKS], "Avg.", "per seed"):
            tab.add_column(col, justify="left" if col == "method" else "right")
        for r in fr["rows"]:
            if "failed" in r:
                tab.add_row(r["name"], *["FAILED"] * len(TASKS), "", "", style="red")
                continue
            tab.add_row(r["name"], *[f"{_pct(r['tasks'][t]['mean'])}±{_pct(r['tasks'][t]['sd'])}" for t in TASKS],
                        f"{_pct(r['mean']['mean'])}±{_pct(r['mean']['sd'])}",
                        " ".join(_pct(v) for v in r["mean"]["per_seed"]),
                        style="bold" if r["kind"] == "reference" else None)
        console.print(tab)
        o = fr["orderings"]
        console.print(f"{fam}: best merge per seed {o['best_per_seed']}; {o['consistent_pairs']}/{o['pairs']} method "
                      "pairs keep their order on every seed")


def run_mini_seeds(out: str | Path, seeds: Sequence[int], console: Any, **kw: Any) -> dict[str, Any]:
    """One single-seed bench per seed into ``out/seed-<s>``, then the aggregate into ``out``."""
    from omnimerge.bench.runner import run_bench

    out = Path(out)
    per = []
    for s in seeds:
        console.rule(f"seed {s}")
        per.append(run_bench(out / f"seed-{s}", seed=s, console=console, **kw))
    agg = aggregate_mini(per, seeds)
    write_mini(agg, out)
    print_mini(agg, console)
    return agg


# ---------------------------------------------------------------------------------------------------------------
# modality suite


def aggregate_modality(per_seed: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    from omnimerge.bench.modality import COLUMNS

    rows = []
    for name in [r["name"] for r in per_seed[0]["rows"]]:
        per = [next((r for r in res["rows"] if r["name"] == name), None) for res in per_seed]
        row: dict[str, Any] = {"name": name, "kind": per[0]["kind"] if per[0] else "method"}
        if any(r is None or "error" in r for r in per):
            row["error"] = "; ".join(f"seed {s}: {r.get('error', 'missing') if r else 'missing'}"
                                     for s, r in zip(seeds, per, strict=True) if r is None or "error" in r)
            rows.append(row)
            continue
        row["columns"] = {c: _stats([r["columns"][c]["score"] for r in per]) for c in COLUMNS}
        row["se_per_seed"] = {c: [r["columns"][c]["se"] for r in per] for c in COLUMNS}
        gains = [r["columns"]["joint"]["score"] - res["best_single"]["joint"]
                 for r, res in zip(per, per_seed, strict=True)]
        row["joint_minus_best_single"] = _stats(gains)
        row["beats_best_single_seeds"] = int(sum(g > 0 for g in gains))
        row["lambda_per_seed"] = [r.get("lambda") for r in per]
        rows.append(row)
    best = {c: _stats([res["best_single"][c] for res in per_seed]) for c in COLUMNS}
    return {"suite": "modality", "seeds": list(seeds), "rows": rows, "best_single": best,
            "seconds": [res["seconds"] for res in per_seed]}


def modality_markdown(agg: dict[str, Any]) -> str:
    from omnimerge.bench.modality import COLUMNS, TITLES

    seeds = agg["seeds"]
    n = len(seeds)
    out = [f"# Modality suite over {n} seeds ({', '.join(map(str, seeds))})", "",
           "Mean ± standard deviation over seeds (accuracy %); *joint − best single* per seed: the row's joint "
           "score minus that seed's best single-modality expert on the joint tasks.", "",
           "| model | " + " | ".join(TITLES[c] for c in COLUMNS) + " | joint per seed (± s.e.) | joint − best single "
           "(per seed) | beats best single on | λ per seed |", "|" + "---|" * (len(COLUMNS) + 5)]
    out.append("| best single-modality expert | " + " | ".join(
        f"{_pct(agg['best_single'][c]['mean'])} ± {_pct(agg['best_single'][c]['sd'])}" for c in COLUMNS)
        + " | " + ", ".join(_pct(v) for v in agg["best_single"]["joint"]["per_seed"]) + " | | | |")
    for r in agg["rows"]:
        if "error" in r:
            out.append(f"| {r['name']} | **failed**: {r['error'][:100]} |" + " |" * (len(COLUMNS) + 3))
            continue
        g = r["joint_minus_best_single"]
        cells = [f"{_pct(r['columns'][c]['mean'])} ± {_pct(r['columns'][c]['sd'])}" for c in COLUMNS]
        lams = r["lambda_per_seed"]
        lam = "–" if all(x is None for x in lams) else ", ".join("–" if x is None else f"{x:g}" for x in lams)
        per = ", ".join(f"{_pct(m)} ± {_pct(se)}" for m, se in zip(r["columns"]["joint"]["per_seed"],
                                                                   r["se_per_seed"]["joint"], strict=True))
        out.append(f"| {r['name']} | " + " | ".join(cells) + f" | {per} | {100 * g['mean']:+.1f} ± {100 * g['sd']:.1f} ("
                   + ", ".join(f"{100 * v:+.1f}" for v in g["per_seed"]) + f") | {r['beats_best_single_seeds']}/{n} "
                   f"| {lam} |")
    merges = [r for r in agg["rows"] if r["kind"] in ("method", "online") and "error" not in r]
    always = [r["name"] for r in merges if r["beats_best_single_seeds"] == n]
    never = [r["name"] for r in merges if r["beats_best_single_seeds"] == 0]
    mixed = [f"{r['name']} ({r['beats_best_single_seeds']}/{n})" for r in merges if 0 < r["beats_best_single_seeds"] < n]
    out += ["", f"Merges above the best single-modality expert on the joint tasks on every seed: "
            f"{', '.join(always) or 'none'}; on no seed: {', '.join(never) or 'none'}; on some seeds only: "
            f"{', '.join(mixed) or 'none'}.", ""]
    return "\n".join(out) + "\n"


def run_modality_seeds(out: str | Path, seeds: Sequence[int], log: Any, **kw: Any) -> dict[str, Any]:
    from omnimerge.bench.modality import run_modality_bench

    out = Path(out)
    per = []
    for s in seeds:
        log(f"--- seed {s} ---")
        per.append(run_modality_bench(out / f"seed-{s}", seed=s, log=log, **kw))
    agg = aggregate_modality(per, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(agg, indent=1))
    (out / "results.md").write_text(modality_markdown(agg))
    return agg
