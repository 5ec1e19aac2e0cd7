"""What a search maximises: an :class:`Objective` scores a loaded (merged) model on a named split.

The protocol is small so that any evaluation can back it: ``score(model, split)`` returns, per task, the score
in [0, 1], its standard error and the number of examples; ``value`` turns that into the number optuna
maximises (the mean over tasks). The splits are

* ``"validation"``: the fixed, seeded subset the trials are scored on (the first ``limit`` examples);
* ``"fresh"``: more validation data, disjoint from that subset, for re-scoring the best few (winner's curse);
* ``"test"``: the reporting split, never seen by the search, scored once per reported recipe.

:class:`MiniObjective` is the miniature benchmark (``omnimerge.bench``). The task-pool objective
(``objective: {tasks: [...]}``), :class:`TaskPoolObjective`, is the paper's benchmarks through the ``omnimerge
eval`` loop (:mod:`omnimerge.eval.runner`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from omnimerge.search.spec import MiniObjective as MiniSpec
from omnimerge.search.spec import SearchError, TasksObjective

SPLITS = ("validation", "fresh", "test")


class Objective(Protocol):
    """Scores models on named splits (see the module docstring)."""

    name: str

    def load_model(self, path: str | Path) -> Any: ...

    def score(self, model: Any, split: str) -> dict[str, dict[str, Any]]: ...

    def score_iter(self, model: Any, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The scores task by task, in a fixed order (what pruning looks at between tasks)."""
        ...

    def sizes(self) -> dict[str, int]: ...


def value(scores: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """The mean over tasks and its standard error (independent tasks: sqrt(sum se^2) / T)."""
    vals = [float(r["score"]) for r in scores.values()]
    ses = [float(r["se"]) for r in scores.values()]
    return sum(vals) / len(vals), (sum(s * s for s in ses) ** 0.5) / len(ses)


class MiniSuiteObjective:
    """The miniature suite: the five procedural tasks, greedy decoding, the bench's metrics.

    Validation is the first ``limit`` examples of each task's validation stream (seed ``zoo_seed + 17``, as the
    bench's lambda selection uses); fresh data the next ``fresh`` examples of the same stream (disjoint); test
    the first ``test_limit`` of the test stream (seed ``zoo_seed``, the bench's reporting split)."""

    def __init__(self, spec: MiniSpec) -> None:
        from omnimerge.bench.model import Encoder

        self.spec = spec
        self.name = f"mini/{spec.family}"
        self.enc = Encoder()
        self._suites: dict[str, Any] = {}

    def sizes(self) -> dict[str, int]:
        return {"validation": self.spec.limit, "fresh": self.spec.fresh, "test": self.spec.test_limit}

    def _suite(self, split: str) -> Any:
        if split not in SPLITS:
            raise SearchError(f"objective: unknown split {split!r} (known: {', '.join(SPLITS)})")
        if split not in self._suites:
            import torch

            from omnimerge.bench import TASKS
            from omnimerge.bench.data import iter_examples
            from omnimerge.bench.evaluate import EvalSet
            from omnimerge.bench.model import pixel_array

            s = self.spec
            suite = {}
            for t in TASKS:
                if split == "test":
                    stream, skip, n = iter_examples(t, "test", s.zoo_seed), 0, s.test_limit
                else:
                    stream = iter_examples(t, "validation", s.zoo_seed + 17)
                    skip, n = (0, s.limit) if split == "validation" else (s.limit, s.fresh)
                exs = [next(stream) for _ in range(skip + n)][skip:]
                ids = torch.tensor([self.enc.prompt(ex.question) for ex in exs], dtype=torch.long)
                suite[t] = EvalSet(t, exs, ids, torch.from_numpy(pixel_array([ex.image for ex in exs])))
            self._suites[split] = suite
        return self._suites[split]

    def load_model(self, path: str | Path) -> Any:
        from omnimerge.bench.model import load_model

        return load_model(path)

    def score(self, model: Any, split: str) -> dict[str, dict[str, Any]]:
        return dict(self.score_iter(model, split))

    def score_iter(self, model: Any, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        from omnimerge.bench.evaluate import evaluate

        suite = self._suite(split)
        for task, es in suite.items():
            yield task, evaluate(model, {task: es}, self.enc)[task]


class TaskPoolObjective:
    """The paper's benchmarks (:mod:`omnimerge.eval`): the model is the base's transformers model, answered
    through :class:`~omnimerge.eval.backends.TransformersBackend` with its own processor and chat template, and
    each task scored with its own metric (see :class:`~omnimerge.search.spec.TasksObjective` for the splits).
    Every task's data is read when the objective is made, before any model loads."""

    def __init__(self, spec: TasksObjective) -> None:
        from dataclasses import replace

        from omnimerge.eval.runner import load_tasks

        self.spec = spec
        self.name = "tasks/" + ",".join(spec.tasks)
        self._backend: Any = None
        search = load_tasks(spec.tasks, data=spec.data, splits=spec.split, image_sources=spec.images,
                            limit=spec.limit + spec.fresh, seed=spec.seed)
        tests: dict[str, str] = {}
        for name, d in search.items():
            test = spec.test_split or d.task.split
            if test == spec.split:
                raise SearchError(f"objective: {name}: the search split '{spec.split}' is also its reporting "
                                  f"split; give another split (or test_split) so that the reported scores are "
                                  f"on data the search never saw")
            if len(d.examples) <= spec.limit:
                raise SearchError(f"objective: {name}: split '{spec.split}' has {len(d.examples)} usable "
                                  f"examples; limit {spec.limit} + fresh {spec.fresh} need more than {spec.limit}")
            tests[name] = test
        self._data = {
            "validation": {n: replace(d, examples=d.examples[:spec.limit]) for n, d in search.items()},
            "fresh": {n: replace(d, examples=d.examples[spec.limit:]) for n, d in search.items()},
        }
        per_test: dict[str, Any] = {}
        for name, test in tests.items():
            per_test.update(load_tasks([name], data={k: v for k, v in spec.data.items() if k == name},
                                       splits=test, image_sources={k: v for k, v in spec.images.items()
                                                                   if k == name},
                                       limit=spec.test_limit, seed=spec.seed))
        self._data["test"] = per_test

    def sizes(self) -> dict[str, int]:
        return {split: min(len(d.examples) for d in data.values()) for split, data in self._data.items()}

    def load_model(self, path: str | Path) -> Any:
        from omnimerge.eval.backends import TransformersBackend
        from omnimerge.eval.models import load_model

        loaded = load_model(path, device=self.spec.device)
        self._backend = TransformersBackend(loaded, batch_size=self.spec.batch_size, progress=False)
        return loaded.model

    def score(self, model: Any, split: str) -> dict[str, dict[str, Any]]:
        return dict(self.score_iter(model, split))

    def score_iter(self, model: Any, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        from omnimerge.eval.runner import run_task

        if split not in SPLITS:
            raise SearchError(f"objective: unknown split {split!r} (known: {', '.join(SPLITS)})")
        if self._backend is None or self._backend.model is not model:
            raise SearchError("objective: score a model this objective loaded (load_model)")
        for name, data in self._data[split].items():
            entry, _rows = run_task(self._backend, data, self._backend.box_format)
            head = entry.get("paper_value") if entry.get("paper_value") is not None else entry["value"]
            yield name, {"score": float(head or 0.0), "se": float(entry["stderr"] or 0.0), "n": entry["n"]}


def make_objective(spec: MiniSpec | TasksObjective) -> Objective:
    """The objective a search recipe names."""
    if isinstance(spec, TasksObjective):
        return TaskPoolObjective(spec)
    return MiniSuiteObjective(spec)


def zoo_models(spec: MiniSpec | TasksObjective) -> tuple[Path, list[tuple[str, Path]]]:
    """The miniature zoo's base and the experts of ``spec.family`` (building the zoo if it is not cached)."""
    if not isinstance(spec, MiniSpec):
        raise SearchError("base_model and models are required with a task-pool objective")
    from omnimerge.bench import TASKS
    from omnimerge.bench.zoo import ZooConfig, build_zoo

    cfg = ZooConfig.quick_config(spec.zoo_seed) if spec.zoo == "quick" else ZooConfig(seed=spec.zoo_seed)
    zoo = build_zoo(cfg)
    if spec.family == "full":
        return zoo.base_dir, [(t, zoo.full_dir(t)) for t in TASKS]
    return zoo.base_dir, [(t, zoo.lora_dir(t)) for t in TASKS]
