"""Bench reports: results.csv, results.md (tables shaped like the paper's), PNG plots and the terminal summary."""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from omnimerge.bench import TASKS
from omnimerge.bench.data import TASK_TITLES

FAMILY_TITLES = {"full": "Full fine-tuning experts", "lora": "LoRA experts"}


def _pct(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _scored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "mean" in r]


def write_csv(results: dict[str, Any], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["family", "method", "kind", "scaling", *[f"{t}" for t in TASKS], *[f"{t}_se" for t in TASKS],
                    "avg", "avg_se", "normalized", "n_test"])
        for fam, fr in results["families"].items():
            for r in _scored(fr["rows"]):
                sc = r["scores"]
                w.writerow([fam, r["name"], r["kind"], "" if r.get("scaling") is None else r["scaling"],
                            *[f"{sc[t]['score']:.4f}" for t in TASKS], *[f"{sc[t]['se']:.4f}" for t in TASKS],
                            f"{r['mean']:.4f}", f"{r['mean_se']:.4f}", f"{r['normalized']:.4f}",
                            sc[TASKS[0]]["n"]])


def markdown_table(fam_res: dict[str, Any]) -> str:
    """One family's table: a row per method, a column per task, average and normalised accuracy (%)."""
    head = "| Method | λ | " + " | ".join(TASK_TITLES[t] for t in TASKS) + " | Avg. | Norm. |"
    sep = "|---|---|" + "---:|" * len(TASKS) + "---:|---:|"
    lines = [head, sep]
    for r in fam_res["rows"]:
        if "mean" not in r:
            lines.append(f"| {r['name']} | | **failed**: {r.get('failed', '?')[:120]} |" + " |" * (len(TASKS) + 1))
            continue
        lam = "" if r.get("scaling") is None else f"{r['scaling']:g}"
        cells = [f"{_pct(r['scores'][t]['score'])} ± {_pct(r['scores'][t]['se'])}" for t in TASKS]
        name = f"**{r['name']}**" if r["kind"] == "reference" else r["name"]
        lines.append(f"| {name} | {lam} | " + " | ".join(cells)
                     + f" | {_pct(r['mean'])} ± {_pct(r['mean_se'])} | {_pct(r['normalized'])} |")
    return "\n".join(lines)


def calibration_markdown(scores: dict[str, Any], family: str) -> str:
    """The zoo's expert x task matrix of one family (test, %), with the base and the mixture model."""
    head = "| model | " + " | ".join(TASK_TITLES[t] for t in TASKS) + " |"
    lines = [head, "|---|" + "---:|" * len(TASKS)]
    base = scores["base"]
    names = ["base", *[f"{family}/{t}" for t in TASKS], "mixture"]
    for name in names:
        cells = []
        for t in TASKS:
            v = scores[name][t]["score"]
            c = f"{100 * v:.1f}"
            if name == f"{family}/{t}":
                c = f"**{c}** ({100 * (v - base[t]['score']):+.1f})"
            cells.append(c)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: str | Path, img_prefix: str = "") -> None:
    cfg = results["config"]
    out = ["# omnimerge bench results", ""]
    out.append(f"Zoo `{cfg['zoo_key']}`{' (quick mode: calibration not enforced)' if cfg['quick'] else ''}; "
               f"test split {cfg['n_test']} examples per task, λ chosen on the validation split "
               f"({cfg['n_val']} per task) from {{{', '.join(f'{x:g}' for x in cfg['lambda_grid'])}}}; "
               f"merge engine: {results['merge_engine']}; merged components: "
               f"{', '.join(cfg['select']['include'])}. Scores are % ± binomial standard error; "
               "Norm. = mean over tasks of merged / individual expert.")
    out.append("")
    cal = results.get("zoo_calibration", {})
    if cal and not cal.get("ok"):
        out.append("> **Zoo calibration shortfall** — " + "; ".join(cal.get("failures", [])) + ". Every method was "
                   "still merged and scored, but on these tasks the expert is weaker than the benchmark's design "
                   "requires: merges there are measured against a smaller expert gain and their normalised accuracy "
                   "is inflated. Compare methods on this zoo with each other, not with published numbers.")
        out.append("")
    if results.get("failed_methods"):
        out.append("> **Failed methods** — " + "; ".join(results["failed_methods"]))
        out.append("")
    if results.get("methods_not_run"):
        out.append("> **Not run** (they cannot merge these experts with their default parameters) — "
                   + "; ".join(f"{k}: {v}" for k, v in results["methods_not_run"].items()))
        out.append("")
    if "zoo_scores" in results:
        out.append("## Zoo calibration (test split; bold: expert on its own task, gain over the base)")
        out.append("")
        for fam in results["families"]:
            out.append(f"{FAMILY_TITLES.get(fam, fam)}:")
            out.append("")
            out.append(calibration_markdown(results["zoo_scores"], fam))
            out.append("")
        out.append(f"Calibration: {'ok' if cal.get('ok') else 'SHORTFALL: ' + '; '.join(cal.get('failures', []))}")
        out.append("")
    for fam, fr in results["families"].items():
        out.append(f"## {FAMILY_TITLES.get(fam, fam)}")
        if fam == "lora":
            out.append("")
            out.append(f"LoRA merge inputs: {fr['lora_input']}.")
        out.append("")
        out.append(markdown_table(fr))
        out.append("")
        out.append(f"![{fam} per task]({img_prefix}bars_{fam}.png)")
        out.append(f"![{fam} radar]({img_prefix}radar_{fam}.png)")
        out.append("")
    chk = results.get("checks", {})
    if chk:
        out.append("## Checks")
        out.append("")
        for fam, s in chk.get("summary", {}).items():
            out.append(f"- {fam}: best merge **{s['best']}**, {100 * s['gain_over_base']:+.1f} points over the base "
                       f"(s.e. of the gain {100 * s['se_of_gain']:.1f}; largest s.e. of a merged mean "
                       f"{100 * s['max_mean_se']:.1f})")
        out.append(f"- discrimination: {'ok' if chk['ok'] else 'FAILED: ' + '; '.join(chk['failures'])}")
        out.append("")
    tm = results.get("timings", {})
    if tm:
        out.append(f"Times: zoo {tm.get('zoo', 0):.0f} s (0 when reused from the cache), bench {tm.get('bench', 0):.0f} s.")
    Path(path).write_text("\n".join(out) + "\n")


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (a private config folder when none is set)."""
    if "MPLCONFIGDIR" not in os.environ:
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="omnimerge-mpl-")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(fam_res: dict[str, Any], path: str | Path, title: str) -> None:
    """Grouped bars: one group per task (and the average), one bar per model/method, with s.e. error bars."""
    import numpy as np

    plt = pyplot()
    rows = _scored(fam_res["rows"])
    labels = [TASK_TITLES[t] for t in TASKS] + ["Avg."]
    x = np.arange(len(labels))
    width = 0.85 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(labels) + 0.35 * len(rows)), 4.2))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        vals = [100 * r["scores"][t]["score"] for t in TASKS] + [100 * r["mean"]]
        errs = [100 * r["scores"][t]["se"] for t in TASKS] + [100 * r["mean_se"]]
        ax.bar(x - 0.425 + width * (i + 0.5), vals, width, yerr=errs, label=r["name"], color=cmap(i % 20),
               error_kw={"elinewidth": 0.6, "capsize": 1})
    ax.set_xticks(x, labels)
    ax.set_ylabel("test score (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_radar(fam_res: dict[str, Any], path: str | Path, title: str) -> None:
    """One small radar chart per method: the merge vs the individual experts and the base (per task, %)."""
    import numpy as np

    plt = pyplot()
    rows = _scored(fam_res["rows"])
    ref = {r["name"]: r for r in rows if r["kind"] == "reference"}
    meth = [r for r in rows if r["kind"] == "method"] or rows
    n = len(meth)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    ang = np.linspace(0, 2 * np.pi, len(TASKS), endpoint=False).tolist()
    ang += ang[:1]
    fig, axes = plt.subplots(nrows, cols, subplot_kw={"projection": "polar"}, figsize=(3.1 * cols, 3.1 * nrows),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, meth, strict=False):
        for name, style in (("Individual experts", ":"), ("Base", "--")):
            if name in ref:
                v = [100 * ref[name]["scores"][t]["score"] for t in TASKS]
                ax.plot(ang, v + v[:1], style, color="grey", linewidth=1, label=name)
        v = [100 * r["scores"][t]["score"] for t in TASKS]
        ax.plot(ang, v + v[:1], color="tab:blue", linewidth=1.5, label=r["name"])
        ax.fill(ang, v + v[:1], color="tab:blue", alpha=0.2)
        ax.set_xticks(ang[:-1], [TASK_TITLES[t] for t in TASKS], fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_yticks([25, 50, 75], ["", "", ""])
        lam = "" if r.get("scaling") is None else f" (λ={r['scaling']:g})"
        ax.set_title(f"{r['name']}{lam}: {100 * r['mean']:.1f}", fontsize=9)
    fig.suptitle(title + "  (grey: individual experts dotted, base dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def calibration_note(results: dict[str, Any]) -> str:
    """The plot-title suffix that carries the zoo's calibration status."""
    cal = results.get("zoo_calibration", {})
    if not cal or cal.get("ok"):
        return "zoo calibration ok"
    return f"ZOO CALIBRATION SHORTFALL ({len(cal.get('failures', []))}: see results.md)"


def write_all(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write results.csv, results.md and the PNG plots (results.json is written by the runner)."""
    out = Path(out)
    write_csv(results, out / "results.csv")
    write_markdown(results, out / "results.md")
    paths = [out / "results.csv", out / "results.md"]
    for fam, fr in results["families"].items():
        title = f"{FAMILY_TITLES.get(fam, fam)} (seed {results['config'].get('seed', 0)}; {calibration_note(results)})"
        plot_bars(fr, out / f"bars_{fam}.png", title)
        plot_radar(fr, out / f"radar_{fam}.png", title)
        paths += [out / f"bars_{fam}.png", out / f"radar_{fam}.png"]
    return paths


def print_summary(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for fam, fr in results["families"].items():
        tab = Table(title=f"{FAMILY_TITLES.get(fam, fam)} (test, % ± s.e.)")
        for col in ("method", "λ", *[TASK_TITLES[t] for t in TASKS], "Avg.", "Norm."):
            tab.add_column(col, justify="left" if col == "method" else "right")
        for r in fr["rows"]:
            if "mean" not in r:
                tab.add_row(r["name"], "", *["FAILED"] * len(TASKS), "", "", style="red")
                continue
            lam = "" if r.get("scaling") is None else f"{r['scaling']:g}"
            style = "bold" if r["kind"] == "reference" else None
            tab.add_row(r["name"], lam,
                        *[f"{_pct(r['scores'][t]['score'])}±{_pct(r['scores'][t]['se'])}" for t in TASKS],
                        f"{_pct(r['mean'])}±{_pct(r['mean_se'])}", _pct(r["normalized"]), style=style)
        console.print(tab)
    chk = results.get("checks", {})
    for fam, s in chk.get("summary", {}).items():
        console.print(f"{fam}: best merge [bold]{s['best']}[/bold] {100 * s['gain_over_base']:+.1f} points over "
                      f"the base (s.e. {100 * s['se_of_gain']:.1f})")
    tm = results.get("timings", {})
    console.print(f"times: zoo {tm.get('zoo', 0):.0f} s, bench {tm.get('bench', 0):.0f} s")


def task_gallery(path: str | Path, per_task: int = 4, seed: int = 0) -> Path:
    """A PNG with example test images of every task, each titled with its question and answer (for the docs)."""
    from omnimerge.bench.data import make_split

    plt = pyplot()
    fig, axes = plt.subplots(len(TASKS), per_task, figsize=(2.6 * per_task, 2.5 * len(TASKS)))
    for i, t in enumerate(TASKS):
        exs = make_split(t, "test", per_task * 3, seed)
        seen: list[str] = []
        picked = []
        for e in exs:  # prefer different question types
            qt = str(e.meta.get("qtype"))
            if qt not in seen or len(picked) + (len(exs) - exs.index(e)) <= per_task:
                picked.append(e)
                seen.append(qt)
            if len(picked) == per_task:
                break
        for j, e in enumerate(picked):
            ax = axes[i][j]
            ax.imshow(e.image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{e.question}\n→ {e.answer}", fontsize=7)
            if j == 0:
                ax.set_ylabel(TASK_TITLES[t], fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
