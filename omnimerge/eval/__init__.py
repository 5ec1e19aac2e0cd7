"""Evaluation of (merged) MLLMs on real benchmarks: a task pool (one module per dataset family), model backends
that generate answers, and scoring. :mod:`omnimerge.eval.protocol` is the contract between them.

The pool's public API::

    from omnimerge.eval import get_task, task_names, aggregate
    task = get_task("chartqa")
    data = task.load("chartqa-test/", limit=200, seed=0)      # TaskData: examples, skipped images, ...
    reqs = [task.request(ex, box_format) for ex in data.examples]
    score = task.score(ex, generation, box_format)             # Score(value in [0, 1], parsed, extracted)
    entry = task_result(data, scored)                          # results.json's entry for the task
    results = build_results(model, {task.name: entry}, box_format)   # + per capability, overall
"""

from omnimerge.eval.registry import (
    CAPABILITIES,
    PAPER_TASKS,
    Example,
    Score,
    Task,
    TaskData,
    capability_of,
    get_task,
    task_names,
)
from omnimerge.eval.results import (
    Scored,
    aggregate,
    build_results,
    prediction_row,
    render_markdown,
    rescore,
    task_result,
    write_outputs,
)

__all__ = [
    "CAPABILITIES",
    "PAPER_TASKS",
    "Example",
    "Score",
    "Scored",
    "Task",
    "TaskData",
    "aggregate",
    "build_results",
    "capability_of",
    "get_task",
    "prediction_row",
    "render_markdown",
    "rescore",
    "task_names",
    "task_result",
    "write_outputs",
]
