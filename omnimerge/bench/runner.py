"""``omnimerge bench``: merge the zoo's experts with every registered method and score the merges.

For each family (``full``, ``lora``) the bench evaluates the base, the experts and the mixture model (their test
scores come from the zoo build, which evaluated them on the same test split), then for every registered method:

1. merges the five experts through ``omnimerge.merge`` (with ``scaling = 1`` if the method has a lambda);
2. for methods with a ``scaling`` parameter, forms ``W0 + lambda (W1 - W0)`` in memory for every lambda of the
   paper's grid {0.1, 0.3, 0.5, 0.7, 1.0, 1.5} and keeps the lambda with the best mean on the *validation*
   split;
3. reports the *test* scores at that lambda, with binomial standard errors, and the normalised accuracy
   (merged / individual expert, averaged over tasks).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnimerge.bench import TASKS
from omnimerge.bench.zoo import Zoo, ZooConfig, ZooError, build_zoo
from omnimerge.errors import OmniMergeError

FAMILIES = ("full", "lora")


class BenchCheckError(OmniMergeError):
    """Strict mode: the zoo's calibration, the discrimination check or a method failed."""


def markup_escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
#: discrimination: the best merge must beat the base's mean by this much (full mode)
MIN_MERGE_GAIN = 0.10


def _mean(res: dict[str, Any]) -> tuple[float, float]:
    from omnimerge.bench.evaluate import mean_score

    return mean_score({t: res[t] for t in TASKS})


def _row(name: str, kind: str, res: dict[str, Any], experts: dict[str, float], **extra: Any) -> dict[str, Any]:
    mean, se = _mean(res)
    norm = [res[t]["score"] / experts[t] for t in TASKS if experts[t] > 0]  # tasks no expert solves: left out
    row = {
        "name": name,
        "kind": kind,
        "scores": {t: {k: res[t][k] for k in ("score", "se", "n")} for t in TASKS},
        "mean": mean,
        "mean_se": se,
        "normalized": sum(norm) / len(norm) if norm else float("nan"),
    }
    row.update(extra)
    return row


#: calibration examples per expert for the data-aware methods (its own task's training split, never test)
CALIB_GRAM, CALIB_FISHER = 64, 32


def _refusal_given_statistics(m: Any, n_experts: int) -> str | None:
    """Why a data-aware method cannot run with its defaults, the statistics aside (the bench collects them)."""
    from omnimerge.errors import MethodParameterError

    try:
        m.resolve({}, [{}] * n_experts)
    except MethodParameterError as e:
        return str(e)
    return None


def statistics_files(kind: str, dirs: Sequence[Path], tasks: Sequence[str], folder: Path, seed: int) -> list[str]:
    """Per expert (``dirs[i]`` trained on ``tasks[i]``), its statistics of ``kind`` ('regmean_gram' or
    'fisher_diagonal') from its own task's training split, written into ``folder``; the file paths."""
    from omnimerge.bench.calibration import SPLIT, bench_batches
    from omnimerge.bench.model import load_model
    from omnimerge.stats import collect_fisher, collect_grams, save_statistics

    out = []
    for d, task in zip(dirs, tasks, strict=True):
        model = load_model(d)
        if kind == "regmean_gram":
            res = collect_grams(model, bench_batches([task], CALIB_GRAM, 16, seed))
        else:
            res = collect_fisher(model, bench_batches([task], CALIB_FISHER, 1, seed), seed=seed)
        f = folder / f"{task}.{kind}.safetensors"
        save_statistics(res, f, Path(d), manifest={"data": f"bench:{task}", "split": SPLIT})
        out.append(str(f))
        del model
    return out


def select_methods(names: Sequence[str] | None, n_experts: int = len(TASKS)) -> tuple[list[Any], dict[str, str]]:
    """The methods to run and, by name, the ones left out of the default list with the reason: every dense
    method that can merge ``n_experts`` experts with its default parameters (a method named explicitly is
    always run: a refusal is then recorded as its failure)."""
    from omnimerge.methods import get_method, registry

    if names:
        return [get_method(n) for n in names], {}
    run: list[Any] = []
    left_out: dict[str, str] = {}
    for _, m in sorted(registry().items()):
        if getattr(m, "output_kind", "dense") != "dense":
            continue
        why = m.refusal(n_experts) if m.statistics is None else _refusal_given_statistics(m, n_experts)
        if why is None:
            run.append(m)
        else:
            left_out[m.name] = why
    return run, left_out


def run_bench(
    out: str | Path = "bench-results",
    methods: Sequence[str] | None = None,
    families: Sequence[str] = FAMILIES,
    quick: bool = False,
    rebuild: bool = False,
    console: Any = None,
    zoo_root: str | Path | None = None,
    strict: bool = False,
    seed: int = 0,
    zoo_config: ZooConfig | None = None,
    threads: int | None = None,
    adamerging: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the bench on the zoo of ``seed``; write results.json / results.csv / results.md / PNG plots into ``out``;
    return the results.

    A zoo calibration shortfall or a failed discrimination check is recorded (``calibration_status``,
    ``checks``) and printed, and every method is still merged and scored; ``strict=True`` raises
    :class:`BenchCheckError` instead (after the results are written). A method that fails is recorded with its
    error (``failed``), never silently skipped. ``zoo_config`` overrides the zoo recipe (tests). ``adamerging``:
    granularities ('task', 'layer') of the opt-in AdaMerging rows (:mod:`omnimerge.bench.adamerging`)."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from omnimerge.bench import report
    from omnimerge.bench.evaluate import build_suite, evaluate
    from omnimerge.bench.merging import (
        DEFAULT_SELECT,
        LAMBDA_GRID,
        has_core_merge,
        has_param,
        has_scaling,
        interpolate,
        lora_inputs,
        make_recipe,
        merge_to_dir,
    )
    from omnimerge.bench.model import Encoder, load_model

    console = console or Console()
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"unknown family {f!r} (known: {', '.join(FAMILIES)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if zoo_config is not None:
        cfg = zoo_config
    else:
        cfg = ZooConfig.quick_config(seed) if quick else ZooConfig(seed=seed)
    t0 = time.perf_counter()
    zoo: Zoo = build_zoo(cfg, rebuild=rebuild, root=zoo_root, console=console, threads=threads)  # strict: at the end
    zoo_seconds = time.perf_counter() - t0
    info = zoo.info()
    if not info["calibration"]["ok"]:
        print_shortfall(info["calibration"], console, quick=cfg.quick)
    meths, left_out = select_methods(methods)
    for name, why in left_out.items():
        console.print(f"[dim]not run: {name} ({markup_escape(why)})[/dim]")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    enc = Encoder()
    val = build_suite("validation", cfg.n_val, cfg.seed + 17, enc)
    test = build_suite("test", cfg.n_test, cfg.seed, enc)
    results: dict[str, Any] = {
        "config": {"zoo_key": cfg.key(), "seed": cfg.seed, "quick": cfg.quick, "lambda_grid": list(LAMBDA_GRID), "select": DEFAULT_SELECT,
                   "n_val": cfg.n_val, "n_test": cfg.n_test, "tasks": list(TASKS), "zoo_root": str(zoo.root),
                   "adamerging": list(adamerging)},
        "merge_engine": "omnimerge.merge" if has_core_merge() else "in-memory",
        "methods_not_run": left_out,
        "zoo_calibration": info["calibration"],
        "calibration_status": "ok" if info["calibration"]["ok"] else "shortfall",
        "zoo_scores": info["scores"],
        "zoo_timings": info.get("timings", {}),
        "families": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="omnimerge-bench-"))
    n_units = (sum(len(LAMBDA_GRID) + 1 if has_scaling(m) else 2 for m in meths) + 2 * len(adamerging)) * len(families)
    try:
        with Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as prog:
            bar = prog.add_task("bench", total=n_units)
            base_model = _load(zoo, zoo.base_dir)
            base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
            for fam in families:
                scores = info["scores"]
                experts_own = {t: scores[f"{fam}/{t}"][t]["score"] for t in TASKS}
                rows = [_row("Base", "reference", scores["base"], experts_own)]
                indiv = {t: scores[f"{fam}/{t}"][t] for t in TASKS}
                rows.append(_row("Individual experts", "reference", indiv, experts_own))
                rows.append(_row("Mixture training", "reference", scores["mixture"], experts_own))
                expert_matrix = {t: {u: scores[f"{fam}/{t}"][u]["score"] for u in TASKS} for t in TASKS}
                if fam == "full":
                    inputs, lora_mode = [zoo.full_dir(t) for t in TASKS], "n/a"
                else:
                    inputs, lora_mode = lora_inputs(zoo, TASKS, scratch)
                stat_files: dict[str, list[str]] = {}
                for m in meths:
                    prog.update(bar, description=f"{fam}: {m.name}")
                    t1 = time.perf_counter()
                    m_inputs = list(inputs)
                    if m.statistics is not None and fam != "full":  # statistics of full checkpoints: the
                        m_inputs = [zoo.lora_merged_dir(t) for t in TASKS]     # LoRA experts merged into theirs
                    scaled = has_scaling(m)
                    params: dict[str, Any] = {"scaling": 1.0} if scaled else {}
                    if has_param(m, "seed"):  # randomised methods (DARE) draw from the zoo's seed
                        params["seed"] = cfg.seed
                    try:
                        recipe = make_recipe(m.name, zoo.base_dir, m_inputs, params)
                        if m.statistics is not None:
                            kind = m.statistics.kind
                            if kind not in stat_files:
                                folder = scratch / f"stats-{fam}"
                                folder.mkdir(exist_ok=True)
                                stat_files[kind] = statistics_files(kind, m_inputs, TASKS, folder, cfg.seed)
                            for entry, f in zip(recipe["models"], stat_files[kind], strict=True):
                                entry["statistics"] = f
                        mdir = scratch / f"{fam}-{m.name}"
                        merge_to_dir(recipe, mdir)
                        merge_s = time.perf_counter() - t1
                        merged = load_model(mdir)
                        m1 = {k: v.clone() for k, v in merged.state_dict().items()}
                        shutil.rmtree(mdir, ignore_errors=True)
                    except Exception as exc:  # noqa: BLE001 - one failing method must not stop the bench
                        err = " ".join(f"{type(exc).__name__}: {exc}".split())
                        console.print(f"[bold red]{fam}/{m.name}: FAILED[/bold red] ({markup_escape(err)})")
                        rows.append({"name": m.name, "kind": "method", "failed": err})
                        prog.advance(bar, len(LAMBDA_GRID) + 1 if scaled else 2)
                        continue
                    curve: dict[str, float] = {}
                    best_lam = None
                    if scaled:
                        best = -1.0
                        for lam in LAMBDA_GRID:
                            merged.load_state_dict(interpolate(base_sd, m1, lam))
                            v = _mean(evaluate(merged, val, enc))[0]
                            curve[f"{lam:g}"] = v
                            if v > best + 1e-12:
                                best, best_lam = v, lam
                            prog.advance(bar)
                        merged.load_state_dict(interpolate(base_sd, m1, best_lam))
                    else:
                        curve["-"] = _mean(evaluate(merged, val, enc))[0]
                        prog.advance(bar)
                    res = evaluate(merged, test, enc)
                    prog.advance(bar)
                    rows.append(_row(m.name, "method", res, experts_own, scaling=best_lam, val_curve=curve,
                                     merge_seconds=merge_s, seconds=time.perf_counter() - t1))
                    del merged, m1
                for gran in adamerging:  # opt-in: test-time adaptation on the test inputs (no labels)
                    from omnimerge.bench.adamerging import ROW_NAMES, adamerging_row

                    prog.update(bar, description=f"{fam}: adamerging ({gran})")
                    t1 = time.perf_counter()
                    try:
                        extra, merged = adamerging_row(gran, zoo.base_dir, list(inputs), base_model, cfg.seed,
                                                       scratch, quick=cfg.quick)
                    except Exception as exc:  # noqa: BLE001 - recorded like a failing method
                        err = " ".join(f"{type(exc).__name__}: {exc}".split())
                        console.print(f"[bold red]{fam}/adamerging ({gran}): FAILED[/bold red] ({markup_escape(err)})")
                        rows.append({"name": ROW_NAMES[gran], "kind": "method", "failed": err})
                        prog.advance(bar, 2)
                        continue
                    merge_s = time.perf_counter() - t1
                    curve = {"-": _mean(evaluate(merged, val, enc))[0]}
                    prog.advance(bar)
                    res = evaluate(merged, test, enc)
                    prog.advance(bar)
                    rows.append(_row(ROW_NAMES[gran], "method", res, experts_own, scaling=None, val_curve=curve,
                                     merge_seconds=merge_s, seconds=time.perf_counter() - t1, **extra))
                    del merged
                results["families"][fam] = {"rows": rows, "lora_input": lora_mode, "expert_matrix": expert_matrix}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    results["checks"] = discrimination(results)
    results["failed_methods"] = [f"{fam}/{r['name']}: {r['failed']}" for fam, fr in results["families"].items()
                                 for r in fr["rows"] if "failed" in r]
    results["timings"] = {"zoo": zoo_seconds, "zoo_build": info.get("timings", {}),
                          "bench": time.perf_counter() - t_start - zoo_seconds,
                          "total": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write_all(results, out)
    report.print_summary(results, console)
    problems = ([] if info["calibration"]["ok"] else ["zoo calibration: " + "; ".join(info["calibration"]["failures"])])
    problems += [] if results["checks"]["ok"] else ["discrimination: " + "; ".join(results["checks"]["failures"])]
    problems += [f"method failed: {f}" for f in results["failed_methods"]]
    if problems and cfg.quick:
        console.print("[yellow]quick mode: the zoo is barely trained; its checks are not expected to hold[/yellow]")
    elif problems:
        console.print("[bold red]results carry warnings[/bold red] (also in results.md / results.json):\n  "
                      + "\n  ".join(markup_escape(p) for p in problems))
    if strict and problems:
        raise BenchCheckError("strict mode: " + "; ".join(problems) + f" (results written to {out})")
    return results


def _load(zoo: Zoo, path: Path) -> Any:
    from omnimerge.bench.model import load_model

    try:
        return load_model(path)
    except Exception as exc:  # noqa: BLE001 - a damaged cache: say what to do
        raise ZooError(f"the cached zoo at {zoo.root} is broken: cannot load {path.relative_to(zoo.root)} "
                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); rebuild it with --rebuild") from None


def print_shortfall(cal: dict[str, Any], console: Any, quick: bool = False) -> None:
    """The calibration shortfall, prominently, with what it means for the results."""
    from rich.panel import Panel

    if quick:
        console.print("[yellow]quick zoo: calibration not expected to hold[/yellow] ("
                      + markup_escape("; ".join(cal["failures"])) + ")")
        return
    body = ("\n".join(markup_escape(f) for f in cal["failures"])
            + "\n\nThe bench still merges and scores every method on this zoo, but on the tasks above the expert "
            "is weaker than designed: merges are compared against a smaller expert gain there, and normalised "
            "accuracies on those tasks are inflated. Compare methods on this zoo with each other, not with "
            "published numbers. `omnimerge bench --seeds 0,1,2` shows whether a finding holds across zoos.")
    console.print(Panel(body, title="zoo calibration shortfall", border_style="red"))


def discrimination(results: dict[str, Any]) -> dict[str, Any]:
    """Check that the best merge beats the base by MIN_MERGE_GAIN and that the s.e. are smaller than the gaps."""
    fails: list[str] = []
    summary: dict[str, Any] = {}
    for fam, fr in results["families"].items():
        rows = fr["rows"]
        base = next(r for r in rows if r["name"] == "Base")
        meth = [r for r in rows if r["kind"] == "method" and "mean" in r]
        if not meth:
            continue
        best = max(meth, key=lambda r: r["mean"])
        gap = best["mean"] - base["mean"]
        se_gap = (best["mean_se"] ** 2 + base["mean_se"] ** 2) ** 0.5
        summary[fam] = {"best": best["name"], "gain_over_base": gap, "se_of_gain": se_gap,
                        "max_mean_se": max(r["mean_se"] for r in meth)}
        if gap < MIN_MERGE_GAIN:
            fails.append(f"{fam}: best merge {best['name']} is {100 * gap:+.1f} points over the base "
                         f"(< {100 * MIN_MERGE_GAIN:.0f})")
        if se_gap >= gap:
            fails.append(f"{fam}: the standard error of the gain ({100 * se_gap:.1f}) is not below it")
    return {"ok": not fails, "failures": fails, "summary": summary}
