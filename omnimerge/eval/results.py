"""Scores to results: per task (metric, n, standard error, breakdowns), per capability and overall (the
paper's aggregation), and the output files: ``results.json``, ``predictions.jsonl``, ``results.md`` (rows =
models, columns = capabilities) and ``results.png``. Also :func:`rescore`, behind ``omnimerge score``:
predictions made by any harness, scored against the task's data.

The paper's aggregation: a capability's number is the unweighted mean of its tasks' numbers (the Geometry
tasks' numbers being their geometry-subset means, ``paper_value``, when the data has those subsets), and the
"Avg." column is the unweighted mean over the ten sets of :data:`~omnimerge.eval.registry.PAPER_TASKS` — here,
over the tasks evaluated (``overall``); ``paper_avg`` is set only when all ten are present.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnimerge.checkpoint.files import atomic_write
from omnimerge.errors import OmniMergeError, OutputError
from omnimerge.eval.data import read_jsonl_objects
from omnimerge.eval.metrics import mean_stderr
from omnimerge.eval.protocol import Generation
from omnimerge.eval.registry import (
    CAPABILITIES,
    PAPER_TASKS,
    Example,
    Score,
    Task,
    TaskData,
    capability_of,
    check_box_format,
    get_task,
)

__all__ = [
    "Scored",
    "aggregate",
    "prediction_row",
    "render_markdown",
    "rescore",
    "task_result",
    "write_outputs",
    "write_table",
]


@dataclass(frozen=True)
class Scored:
    """One example with what the model was asked, what it answered and its score."""

    example: Example
    prompt: str
    prediction: str
    score: Score


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def task_result(data: TaskData, scored: Sequence[Scored]) -> dict[str, Any]:
    """A task's entry of results.json: its metric's mean over the scored examples, n, the standard error,
    breakdowns by group, the paper's subset number where the task has one, and how the data was read."""
    task = data.task
    pairs = [(s.example, s.score) for s in scored]
    value, stderr = mean_stderr([sc.value for _, sc in pairs])
    groups: dict[str, list[float]] = {}
    for ex, sc in pairs:
        for g in ex.groups:
            groups.setdefault(g, []).append(sc.value)
    out: dict[str, Any] = {
        "task": task.name,
        "capability": capability_of(task.name),
        "metric": task.metric,
        "value": _clean(value),
        "n": len(pairs),
        "stderr": _clean(stderr),
        "split": data.split,
        "source": data.source,
        "rows": data.n_rows,
        "examples_in_split": data.n_examples,
        "limit": data.limit,
        "seed": data.seed,
        "skipped_images": data.skipped,
        "parse_failures": sum(not sc.parsed for _, sc in pairs),
        "groups": {g: {"value": sum(v) / len(v), "n": len(v)} for g, v in sorted(groups.items())},
    }
    if data.skip_reason:
        out["skip_reason"] = data.skip_reason
    if task.paper_groups:
        present = [g for g in task.paper_groups if g in groups]
        out["paper_groups"] = list(task.paper_groups)
        out["paper_value"] = (sum(sum(groups[g]) / len(groups[g]) for g in present) / len(present)
                              if present else None)
    out.update(task.breakdown_extra(pairs))
    return out


def _headline(entry: Mapping[str, Any], paper_geometry: bool) -> float | None:
    if paper_geometry and entry.get("paper_value") is not None:
        return float(entry["paper_value"])
    return entry.get("value")


def aggregate(tasks: Mapping[str, Mapping[str, Any]], paper_geometry: bool = True) -> dict[str, Any]:
    """Per capability (the mean of its evaluated tasks' numbers) and overall (the mean over tasks; the
    standard errors combined as for independent means). ``paper_geometry``: MathVista/MATH-Vision count with
    their geometry-subset number (``paper_value``) where present, as in the paper."""
    caps: dict[str, Any] = {}
    for cap, names in CAPABILITIES.items():
        present = [n for n in names if n in tasks and _headline(tasks[n], paper_geometry) is not None]
        if not present:
            continue
        vals = [_headline(tasks[n], paper_geometry) for n in present]
        ses = [tasks[n].get("stderr") or 0.0 for n in present]
        caps[cap] = {"value": sum(vals) / len(vals), "stderr": math.sqrt(sum(s * s for s in ses)) / len(ses),
                     "tasks": present}
    scored = [n for n in tasks if _headline(tasks[n], paper_geometry) is not None]
    overall: dict[str, Any] = {"value": None, "stderr": None, "tasks": scored, "paper_avg": None}
    if scored:
        vals = [_headline(tasks[n], paper_geometry) for n in scored]
        ses = [tasks[n].get("stderr") or 0.0 for n in scored]
        overall["value"] = sum(vals) / len(vals)
        overall["stderr"] = math.sqrt(sum(s * s for s in ses)) / len(ses)
    if all(n in scored for n in PAPER_TASKS):
        overall["paper_avg"] = sum(_headline(tasks[n], paper_geometry) for n in PAPER_TASKS) / len(PAPER_TASKS)
    return {"capabilities": caps, "overall": overall, "paper_geometry": paper_geometry}


def prediction_row(task: Task, s: Scored) -> dict[str, Any]:
    """A predictions.jsonl row."""
    row: dict[str, Any] = {"task": task.name, "doc_id": s.example.doc_id}
    if task.sub_key is not None:
        row[task.sub_key] = s.example.sub
    row.update({"prompt": s.prompt, "prediction": s.prediction, "references": list(s.example.references),
                "score": s.score.value, "parsed": s.score.parsed, "extracted": s.score.extracted})
    return row


def render_markdown(results: Iterable[Mapping[str, Any]]) -> str:
    """The paper's table: one row per model, one column per capability (×100), then the average; a second
    table has every task."""
    results = list(results)
    caps = [c for c in CAPABILITIES if any(c in r["capabilities"] for r in results)]
    task_cols = [t for names in CAPABILITIES.values() for t in names if any(t in r["tasks"] for r in results)]
    task_cols += sorted({t for r in results for t in r["tasks"]} - set(task_cols))

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.2f}"

    lines = ["| model | " + " | ".join(caps) + " | Avg. |", "|---|" + "---:|" * (len(caps) + 1)]
    for r in results:
        cells = [pct(r["capabilities"].get(c, {}).get("value")) for c in caps]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {pct(r['overall']['value'])} |")
    lines += ["", "| model | " + " | ".join(task_cols) + " |", "|---|" + "---:|" * len(task_cols)]
    for r in results:
        cells = []
        for t in task_cols:
            e = r["tasks"].get(t)
            cells.append("–" if e is None else f"{pct(_headline(e, r.get('paper_geometry', True)))} "
                         f"(n={e['n']})")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    note = ("Scores ×100. A capability is the mean of its tasks; Avg. the mean over tasks. Geometry tasks count "
            "with their geometry-subset mean (the paper's) where the data has those subsets.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def _plot(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = [c for c in CAPABILITIES if any(c in r["capabilities"] for r in results)] + ["Avg."]
    fig, ax = plt.subplots(figsize=(1.4 * len(caps) + 2, 3.6))
    width = 0.8 / max(1, len(results))
    for k, r in enumerate(results):
        vals = [100 * (r["overall"]["value"] or 0) if c == "Avg." else
                100 * r["capabilities"].get(c, {}).get("value", 0.0) for c in caps]
        errs = [100 * (r["overall"]["stderr"] or 0) if c == "Avg." else
                100 * r["capabilities"].get(c, {}).get("stderr", 0.0) for c in caps]
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(caps))]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=r["model"])
    ax.set_xticks(range(len(caps)), caps)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("per capability (±1 s.e.)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_outputs(out: str | os.PathLike[str], results: Mapping[str, Any], rows: Iterable[Mapping[str, Any]],
                  others: Sequence[Mapping[str, Any]] = ()) -> dict[str, Path]:
    """``OUT/results.json``, ``OUT/predictions.jsonl``, ``OUT/results.md`` (this model's row after those of
    ``others``, earlier results to compare with) and ``OUT/results.png``; each file is written to a temporary
    name and renamed into place, so a failure leaves no half-written file."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output folder: {e.strerror}") from None
    paths = {"results": out / "results.json", "predictions": out / "predictions.jsonl",
             "markdown": out / "results.md", "plot": out / "results.png"}
    rows = list(rows)
    table = [*others, results]

    def w_json(p: Path) -> None:
        p.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def w_rows(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    try:
        atomic_write(paths["predictions"], w_rows)
    except OSError as e:
        raise OutputError(f"{out}: cannot write the results: {e.strerror or e}") from None
    write_table(out, table)
    try:
        atomic_write(paths["results"], w_json)
    except OSError as e:
        raise OutputError(f"{out}: cannot write the results: {e.strerror or e}") from None
    return paths


def write_table(out: str | os.PathLike[str], results: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """``OUT/results.md`` (one row per results object, columns = capabilities) and ``OUT/results.png``,
    each written to a temporary name and renamed into place."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output folder: {e.strerror}") from None
    paths = {"markdown": out / "results.md", "plot": out / "results.png"}
    try:
        atomic_write(paths["markdown"], lambda p: p.write_text(render_markdown(results), encoding="utf-8"))
        atomic_write(paths["plot"], lambda p: _plot(results, p))
    except OSError as e:
        raise OutputError(f"{out}: cannot write the results: {e.strerror or e}") from None
    return paths


def build_results(model: str, per_task: Mapping[str, Mapping[str, Any]], box_format: str | None,
                  paper_geometry: bool = True, **meta: Any) -> dict[str, Any]:
    """The results.json object: the model, the box convention, per task, per capability, overall."""
    agg = aggregate(per_task, paper_geometry)
    return {"model": model, "box_format": box_format, **meta, "tasks": dict(per_task), **agg}


# --- rescoring ---------------------------------------------------------------------------------------------------


def _read_predictions(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise OmniMergeError(f"{path}: no such predictions file")
    rows = read_jsonl_objects(path)
    for lineno, row in rows:
        for key in ("task", "doc_id", "prediction"):
            if key not in row:
                raise OmniMergeError(f"{path}:{lineno}: the row has no '{key}' (rows need task, doc_id, "
                                     "prediction)")
    if not rows:
        raise OmniMergeError(f"{path}: no predictions in the file")
    return rows


def rescore(
    predictions: str | os.PathLike[str],
    data: Mapping[str, str | os.PathLike[str]] | None = None,
    out: str | os.PathLike[str] | None = None,
    box_format: str = "normalized",
    splits: Mapping[str, str] | None = None,
    image_sources: Mapping[str, str | os.PathLike[str]] | None = None,
    model: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    paper_geometry: bool = True,
) -> dict[str, Any]:
    """Score a predictions JSONL (rows with ``task``, ``doc_id``, ``prediction``, and ``expression`` /
    ``question_index`` for tasks whose rows hold several examples) against each task's data (``data[task]``, else
    its hub id through the local cache), writing ``results.json``, ``predictions.jsonl`` (each row with its
    ``score``), ``results.md`` and ``results.png`` under ``out`` when given. Returns the results object."""
    check_box_format(box_format)
    path = Path(predictions)
    rows = _read_predictions(path)
    data = {get_task(k).name: v for k, v in (data or {}).items()}
    splits = {get_task(k).name: v for k, v in (splits or {}).items()}
    image_sources = {get_task(k).name: v for k, v in (image_sources or {}).items()}
    by_task: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    tasks: dict[str, Task] = {}
    for lineno, row in rows:
        task = get_task(str(row["task"]))
        tasks[task.name] = task
        by_task.setdefault(task.name, []).append((lineno, row))
    per_task: dict[str, Any] = {}
    out_rows: list[dict[str, Any]] = []
    for name, task_rows in by_task.items():
        task = tasks[name]
        if hasattr(task, "min_pixels"):
            task.min_pixels, task.max_pixels = min_pixels, max_pixels  # type: ignore[attr-defined]
        loaded = task.load(data.get(name), split=splits.get(name), images="header" if task.needs_image_size
                           else "none", image_source=image_sources.get(name))
        seen: set[tuple[int, int | None]] = set()
        scored: list[Scored] = []
        for lineno, row in task_rows:
            where = f"{path}:{lineno}"
            try:
                doc_id = int(row["doc_id"])
            except (TypeError, ValueError):
                raise OmniMergeError(f"{where}: doc_id must be an integer, found {row['doc_id']!r}") from None
            sub = _sub_index(task, loaded, row, doc_id, where)
            if (doc_id, sub) in loaded.skipped_ids:
                continue
            ex = loaded.find(doc_id, sub)
            if ex is None:
                what = f"doc_id {doc_id}" + (f", {task.sub_key} {sub}" if task.sub_key else "")
                raise OmniMergeError(f"{where}: {name} has no example {what} in {loaded.source} "
                                     f"({loaded.n_rows} rows)")
            if (doc_id, sub) in seen:
                raise OmniMergeError(f"{where}: a second prediction for {name} doc_id {doc_id}"
                                     + (f" {task.sub_key} {sub}" if task.sub_key else ""))
            seen.add((doc_id, sub))
            text = row["prediction"]
            if not isinstance(text, str):
                raise OmniMergeError(f"{where}: prediction must be a string, found {type(text).__name__}")
            sizes = tuple(tuple(int(v) for v in s) for s in row.get("image_sizes") or ())
            sc = task.score(ex, Generation(text, sizes), box_format)  # type: ignore[arg-type]
            prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else task.prompt(ex, box_format)
            s = Scored(ex, prompt, text, sc)
            scored.append(s)
            out_rows.append(prediction_row(task, s))
        per_task[name] = task_result(loaded, scored)
    results = build_results(model or path.stem, per_task, box_format, paper_geometry, predictions=str(path))
    if out is not None:
        write_outputs(out, results, out_rows)
    return results


def _sub_index(task: Task, loaded: TaskData, row: Mapping[str, Any], doc_id: int, where: str) -> int | None:
    if task.sub_key is None:
        return None
    value = row.get(task.sub_key)
    if value is None:
        subs = [e.sub for e in loaded.examples if e.doc_id == doc_id]
        if len(subs) == 1:
            return subs[0]
        raise OmniMergeError(f"{where}: {task.name} row {doc_id} holds {len(subs)} examples; the prediction needs "
                             f"'{task.sub_key}' (0-based) to say which")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OmniMergeError(f"{where}: {task.sub_key} must be an integer, found {value!r}") from None
