"""Evaluate a model on tasks of the pool: the join of :mod:`~omnimerge.eval.registry` (data, prompts, scoring),
a :class:`~omnimerge.eval.protocol.Backend` (generation) and :mod:`~omnimerge.eval.results` (aggregation, files).
Behind ``omnimerge eval``.

Order of work, so that a mistake costs seconds, not a model load: every task name is checked, then every task's
data is read (fields, split, the ``limit`` sample, images decoded once to count those that cannot be), then the
model is loaded (a checkpoint, an adapter on its base, or a recipe merged in memory), then the examples are
answered in chunks (a chunk's images are decoded only while it is generated, so memory does not grow with the
split) and scored. ``predictions.jsonl`` keeps, per example, the prompt, the raw generation, each image's size
as the model saw it, the extracted answer and the score, so ``omnimerge score`` on that file reproduces
``results.json`` exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omnimerge.errors import OmniMergeError
from omnimerge.eval.journal import EvalJournal, fingerprint
from omnimerge.eval.protocol import Backend, Generation
from omnimerge.eval.registry import CAPABILITIES, PAPER_TASKS, Task, TaskData, check_box_format, get_task
from omnimerge.eval.results import Scored, build_results, prediction_row, task_result, write_outputs

__all__ = ["CHUNK", "evaluate", "expand_tasks", "load_tasks", "model_name", "run_task"]

#: examples generated per backend call: the backend sorts each call's requests by length, so a chunk much
#: larger than a batch pads little, while only one chunk's decoded images are held at a time
CHUNK = 256


def model_name(source: Any) -> str:
    """The row name of a model in results.md: the folder's or recipe's name (a dict recipe: 'recipe')."""
    if isinstance(source, Mapping):
        return "recipe"
    p = Path(str(source))
    return p.stem if p.suffix in (".yaml", ".yml") else (p.name or str(source))


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names as typed, with two shorthands: ``paper`` (the ten sets of the paper's "Avg." column) and a
    capability group's name (``vqa``, ``geometry``, ``chart``, ``ocr``, ``grounding``: its tasks)."""
    groups = {cap.lower(): list(ts) for cap, ts in CAPABILITIES.items()}
    out: list[str] = []
    for raw in names:
        key = raw.strip().lower()
        if not key:
            continue
        out.extend(PAPER_TASKS if key == "paper" else groups.get(key, [raw.strip()]))
    return out


def load_tasks(tasks: Sequence[str], *, data: Mapping[str, str | os.PathLike[str]] | None = None,
               splits: Mapping[str, str] | str | None = None,
               image_sources: Mapping[str, str | os.PathLike[str]] | None = None,
               limit: int | None = None, seed: int = 0) -> dict[str, TaskData]:
    """Every task's examples (names as users type them; each name once, in the order given). ``splits``: one
    split for all tasks, or per task; ``data[task]``: where its data is (default: its hub id in the local cache)."""
    if not expand_tasks(tasks):
        raise OmniMergeError("no task to evaluate; name at least one (e.g. --tasks chartqa,textvqa)")
    if limit is not None and limit < 1:
        raise OmniMergeError(f"limit must be at least 1, got {limit}")
    pool: dict[str, Task] = {}
    for name in expand_tasks(tasks):
        task = get_task(name)
        pool.setdefault(task.name, task)
    data = _by_task(data, "data", pool)
    image_sources = _by_task(image_sources, "images", pool)
    per_split = (dict.fromkeys(pool, splits) if isinstance(splits, str)
                 else _by_task(splits, "split", pool))
    return {name: task.load(data.get(name), split=per_split.get(name), limit=limit, seed=seed,
                            image_source=image_sources.get(name))
            for name, task in pool.items()}


def _by_task(values: Mapping[str, Any] | None, what: str, pool: Mapping[str, Task]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (values or {}).items():
        name = get_task(k).name
        if name not in pool:
            raise OmniMergeError(f"{what} for '{k}', which is not among the tasks evaluated ({', '.join(pool)})")
        out[name] = v
    return out


def run_task(backend: Backend | None, loaded: TaskData, box_format: str, *, chunk: int = CHUNK,
             on_progress: Any = None, answered: Sequence[Mapping[str, Any]] = (),
             on_chunk: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer and score one task's examples: (its results.json entry, its predictions.jsonl rows).

    ``answered``: predictions rows of the first examples, answered by an earlier run (whole chunks; see
    :mod:`omnimerge.eval.journal`): scored again, not generated. ``on_chunk(task, start, rows)``: after each
    chunk generated."""
    task = loaded.task
    scored: list[Scored] = []
    rows: list[dict[str, Any]] = []
    examples = loaded.examples
    for ex, old in zip(examples, answered, strict=False):
        sizes = tuple(tuple(int(v) for v in sz) for sz in old.get("image_sizes") or ())
        gen = Generation(str(old["prediction"]), sizes)  # type: ignore[arg-type]
        prompt = old["prompt"] if isinstance(old.get("prompt"), str) else task.prompt(ex, box_format)
        s = Scored(ex, prompt, gen.text, task.score(ex, gen, box_format))
        scored.append(s)
        row = prediction_row(task, s)
        row["image_sizes"] = [list(sz) for sz in gen.image_sizes]
        rows.append(row)
    if answered and on_progress is not None:
        on_progress(len(scored))
    for start in range(len(scored), len(examples), chunk):
        part = examples[start:start + chunk]
        if backend is None:
            raise OmniMergeError(f"{task.name}: no backend to answer the examples the earlier run did not")
        requests = [task.request(ex, box_format) for ex in part]
        gens: list[Generation] = backend.generate(requests)
        if len(gens) != len(requests):
            raise OmniMergeError(f"{task.name}: the backend answered {len(gens)} of {len(requests)} requests")
        new: list[dict[str, Any]] = []
        for ex, req, gen in zip(part, requests, gens, strict=True):
            s = Scored(ex, req.prompt, gen.text, task.score(ex, gen, box_format))
            scored.append(s)
            row = prediction_row(task, s)
            row["image_sizes"] = [list(sz) for sz in gen.image_sizes]
            new.append(row)
        rows.extend(new)
        if on_chunk is not None:
            on_chunk(task.name, start, new)
        if on_progress is not None:
            on_progress(len(part))
    return task_result(loaded, scored), rows


def evaluate(
    model: str | os.PathLike[str] | Mapping[str, Any] | None,
    tasks: Sequence[str],
    *,
    out: str | os.PathLike[str] | None = None,
    data: Mapping[str, str | os.PathLike[str]] | None = None,
    splits: Mapping[str, str] | str | None = None,
    image_sources: Mapping[str, str | os.PathLike[str]] | None = None,
    limit: int | None = None,
    seed: int = 0,
    base: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: Any = None,
    batch_size: int = 8,
    box_format: str = "auto",
    processor_kwargs: Mapping[str, Any] | None = None,
    merge_parameters: dict[str, Any] | None = None,
    backend: Backend | None = None,
    name: str | None = None,
    progress: bool = True,
    paper_geometry: bool = True,
    others: Sequence[Mapping[str, Any]] = (),
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks`` and return the results object (see :func:`~omnimerge.eval.results.
    build_results`); with ``out``, also write ``results.json``, ``predictions.jsonl``, ``results.md`` (after the
    rows of ``others``) and ``results.png`` there.

    ``model``: a checkpoint folder or hub id in the local cache, a PEFT adapter folder (on ``base`` or its own
    base), or a merge recipe (YAML path or mapping) merged in memory; or None with an explicit ``backend``.
    ``box_format``: ``auto`` takes the model family's convention from its config. ``limit``: a seeded sample of
    that many examples per task. The model is loaded only after every task's data has been read.

    With ``out``, the answers are journaled chunk by chunk (:mod:`omnimerge.eval.journal`); ``resume``
    continues an interrupted run of the same evaluation into ``out`` from its answered chunks (the results equal
    an uninterrupted run's; the model is not even loaded if every answer is there). ``echo``: one-line notes."""
    if box_format != "auto":
        check_box_format(box_format)
    if batch_size < 1:
        raise OmniMergeError(f"batch size must be at least 1, got {batch_size}")
    if model is None and backend is None:
        raise OmniMergeError("evaluate needs a model or a backend")
    loaded_tasks = load_tasks(tasks, data=data, splits=splits, image_sources=image_sources, limit=limit, seed=seed)
    journal: EvalJournal | None = None
    answered: dict[str, list[dict[str, Any]]] = {}
    if out is not None:
        settings = {"box_format": box_format, "device": device, "dtype": str(dtype), "batch_size": batch_size,
                    "processor_kwargs": dict(processor_kwargs or {}), "chunk": CHUNK,
                    "backend": type(backend).__name__ if backend is not None else "TransformersBackend"}
        fp = fingerprint(model, base, merge_parameters, loaded_tasks, settings)
        journal = EvalJournal(Path(out), fp, resume, echo)
        answered = {t: journal.done(t, d.task.sub_key, d.examples, CHUNK) for t, d in loaded_tasks.items()}
        kept = sum(len(v) for v in answered.values())
        if resume and kept and echo:
            total_n = sum(len(d.examples) for d in loaded_tasks.values())
            echo(f"resuming an interrupted evaluation: {kept} of {total_n} answers kept from {journal.path.name}")
    need_model = any(len(answered.get(t, ())) < len(d.examples) for t, d in loaded_tasks.items())
    if box_format == "auto" and (journal is None or journal.box_format is None):
        need_model = True
    closer: Any = None
    t_load = time.perf_counter()
    if backend is None and need_model:
        from omnimerge.eval.backends import TransformersBackend
        from omnimerge.eval.models import load_model

        closer = load_model(model, base=base, device=device, dtype=dtype, merge_parameters=merge_parameters,
                            processor_kwargs=processor_kwargs)
        try:
            backend = TransformersBackend(closer, batch_size=batch_size, progress=False)
        except BaseException:
            closer.close()
            raise
    load_s = time.perf_counter() - t_load
    if box_format != "auto":
        fmt = box_format
    elif backend is not None:
        fmt = backend.box_format
    else:
        assert journal is not None and journal.box_format is not None
        fmt = journal.box_format
    backend_name = type(backend).__name__ if backend is not None else str(journal.backend if journal else "")
    per_task: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    generated = [0]
    t0 = time.perf_counter()
    finished = False

    def on_chunk(task: str, start: int, new: list[dict[str, Any]]) -> None:
        generated[0] += len(new)
        if journal is not None:
            journal.add(task, start, new, fmt, backend_name)

    try:
        bar = _progress(progress)
        with bar if bar is not None else nullcontext():
            for tname, loaded in loaded_tasks.items():
                handle = bar.add_task(tname, total=len(loaded.examples)) if bar is not None else None
                entry, task_rows = run_task(
                    backend, loaded, fmt, chunk=CHUNK, answered=answered.get(tname, ()), on_chunk=on_chunk,
                    on_progress=(lambda n, h=handle: bar.advance(h, n)) if bar is not None else None)
                per_task[tname] = entry
                rows.extend(task_rows)
        gen_s = time.perf_counter() - t0
        label = name or (model_name(model) if model is not None else type(backend).__name__)
        results = build_results(label, per_task, fmt, paper_geometry,
                                source=None if model is None or isinstance(model, Mapping) else str(model),
                                backend=backend_name, device=device, batch_size=batch_size,
                                seconds={"load": round(load_s, 3), "generate_and_score": round(gen_s, 3)},
                                requests_per_s=round(generated[0] / gen_s, 3) if gen_s > 0 and generated[0]
                                else None)
        if out is not None:
            write_outputs(out, results, rows, others)
        finished = True
        return results
    finally:
        if closer is not None:
            closer.close()
        if journal is not None:
            journal.close(finished)
            if not finished and generated[0] and echo:
                echo(f"the answers so far are kept in {journal.path}: run the same evaluation with --resume to "
                     f"continue it")


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)
