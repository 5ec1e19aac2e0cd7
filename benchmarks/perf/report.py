"""Render the benchmark results (results/latest.json) as docs/performance.md plus plots."""

from __future__ import annotations

from pathlib import Path

LABEL = {"linear": "linear (weight average)", "task_arithmetic": "task arithmetic", "ties": "TIES",
         "dare_ties": "DARE-TIES"}
SIZE = {"qwen2-0.5b": "0.5B", "qwen2-1.5b": "1.5B", "qwen2-tiny": "tiny"}


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def _agree(method: str, ag: dict | None) -> str:
    if not ag:
        return "—"
    if method == "dare_ties":
        o, m = ag["omnimerge"], ag["mergekit"]
        return (f"changed {o['changed_frac']:.1%} vs {m['changed_frac']:.1%}; "
                f"‖Δ‖/‖W0‖ {o['rel_delta_norm']:.2e} vs {m['rel_delta_norm']:.2e}")
    rel = ag.get("rel_diff_vs_delta")
    rel_s = f"; ‖Δo−Δm‖/‖Δo‖ {rel:.1e}" if rel is not None else ""
    return f"{ag['equal_frac']:.1%} equal, {ag['within_1ulp_frac']:.2%} ≤1 ulp{rel_s}"


def rows(res: dict) -> list[dict]:
    out = []
    for c in res["cases"]:
        for method, e in c["methods"].items():
            o, m = e.get("omnimerge"), e.get("mergekit")
            r = {"model": c["model"], "T": c["T"], "method": method, "in": c["input_bytes"], "cat": c["cat_s"],
                 "o": o, "m": m, "ag": e.get("agreement"), "ns": e.get("omnimerge_like")}
            out.append(r)
    return out


def table(res: dict, only_mk: bool) -> str:
    hdr = ("| model | T | input GB | method | omnimerge wall s (merge s) | omnimerge like-for-like wall s (merge s) | "
           "omnimerge GB/s | mergekit wall s | mergekit GB/s | speed-up vs mergekit (default / like-for-like) | "
           "cat s (GB/s) | omnimerge ÷ cat | mergekit ÷ cat | "
           "peak RSS omnimerge / mergekit GB (anon) | outputs agree | load avg omnimerge / mergekit |")
    lines = [hdr, "|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|"]
    for r in rows(res):
        if only_mk != bool(r["m"]):
            continue
        o, m, inb = r["o"], r["m"], r["in"]
        cat = r["cat"]
        o_gbs = inb / 1e9 / o["wall"]
        ns = r["ns"]
        cells = [SIZE.get(r["model"], r["model"]), str(r["T"]), _gb(inb), LABEL[r["method"]],
                 f"{o['wall']:.2f} ({o['merge_s']:.2f})", f"{ns['wall']:.2f} ({ns['merge_s']:.2f})" if ns else "—",
                 f"{o_gbs:.2f}"]
        if m:
            cells += [f"{m['wall']:.1f}", f"{inb / 1e9 / m['wall']:.2f}",
                      f"**{m['wall'] / o['wall']:.1f}×**" + (f" / {m['wall'] / ns['wall']:.1f}×" if ns else "")]
        else:
            cells += ["—", "—", "—"]
        cells += [f"{cat:.2f} ({inb / 1e9 / cat:.1f})", f"{o['wall'] / cat:.1f}×",
                  f"{m['wall'] / cat:.0f}×" if m else "—"]
        rss = f"{_gb(o['max_rss'])} ({_gb(o['peak_anon'])})"
        rss += f" / {_gb(m['max_rss'])} ({_gb(m['peak_anon'])})" if m else ""
        def la(x: dict | None) -> str:
            v = [v for v in (x or {}).get("loadavg") or [] if v is not None]
            return f"{max(v):.1f}" if v else "—"

        cells += [rss, _agree(r["method"], r["ag"]), f"{la(o)} / {la(m)}" if m else la(o)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cold_table(res: dict) -> str:
    """The first merge after installation (empty kernel cache: numba compiles what the merge uses) against a
    warm one; empty if the run had no --cold."""
    lines = []
    for c in res["cases"]:
        for method, e in c["methods"].items():
            cold, warm = e.get("omnimerge_cold"), e.get("omnimerge")
            if cold and warm:
                lines.append(f"| {SIZE.get(c['model'], c['model'])} | {c['T']} | {LABEL.get(method, method)} | "
                             f"{cold['wall']:.2f} ({cold['merge_s']:.2f}) | {warm['wall']:.2f} ({warm['merge_s']:.2f}) | "
                             f"{cold['wall'] - warm['wall']:+.2f} |")
    if not lines:
        return ""
    return ("| model | T | method | cold kernel cache: wall s (merge s) | warm: wall s (merge s) | first-run cost s |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines))


def plot(res: dict, doc_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = doc_dir / "img"
    img.mkdir(parents=True, exist_ok=True)
    rs = rows(res)
    names = []
    # time against model size (T = 3)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in LABEL:
        pts = sorted((r["in"] / (r["T"] + 1) / 1e9, r["o"]["merge_s"], r["o"]["wall"]) for r in rs
                     if r["method"] == method and r["T"] == 3)
        if len(pts) >= 1:
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"omnimerge {LABEL[method]}")
        mpts = sorted((r["in"] / (r["T"] + 1) / 1e9, r["m"]["wall"]) for r in rs
                      if r["method"] == method and r["T"] == 3 and r["m"])
        if mpts:
            ax.plot([p[0] for p in mpts], [p[1] for p in mpts], "s--", alpha=0.7, label=f"mergekit {LABEL[method]}")
    cats = sorted({(r["in"] / (r["T"] + 1) / 1e9, r["cat"]) for r in rs if r["T"] == 3})
    ax.plot([c[0] for c in cats], [c[1] for c in cats], "k:", label="cat of the inputs")
    ax.set_xlabel("model size (GB, bf16), T = 3 experts + base")
    ax.set_ylabel("wall time (s, log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(img / "perf_model_size.png", dpi=120)
    plt.close(fig)
    names.append("img/perf_model_size.png")
    # time against the number of experts (0.5B)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in LABEL:
        pts = sorted((r["T"], r["o"]["wall"]) for r in rs if r["method"] == method and r["model"] == "qwen2-0.5b")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"omnimerge {LABEL[method]}")
        mpts = sorted((r["T"], r["m"]["wall"]) for r in rs
                      if r["method"] == method and r["model"] == "qwen2-0.5b" and r["m"])
        if len(mpts) > 1:
            ax.plot([p[0] for p in mpts], [p[1] for p in mpts], "s--", alpha=0.7, label=f"mergekit {LABEL[method]}")
    cats = sorted({(r["T"], r["cat"]) for r in rs if r["model"] == "qwen2-0.5b"})
    ax.plot([c[0] for c in cats], [c[1] for c in cats], "k:", label="cat of the inputs")
    ax.set_xlabel("number of experts T (Qwen2-0.5B-like, + base)")
    ax.set_ylabel("wall time (s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "perf_experts.png", dpi=120)
    plt.close(fig)
    names.append("img/perf_experts.png")
    return names


def write_report(res: dict, doc: Path, extra: str = "") -> None:
    from benchmarks.perf.doc_text import render

    imgs = plot(res, doc.parent)
    ct = cold_table(res)
    if ct:
        extra += ("\n## The first merge after installation\n\nWith `--cold`, each method also runs once with an "
                  "empty kernel cache (numba compiles the kernels that merge uses, in the background while the merge "
                  "starts on the torch path), against the best warm run:\n\n" + ct + "\n")
    doc.write_text(render(res, table(res, True), table(res, False), imgs, extra))
