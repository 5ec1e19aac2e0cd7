"""What a search maximises: an :class:`Objective` scores a loaded (merged) model on a named split.

The protocol is small so that any evaluation can back it: ``score(model, split)`` returns, per task, the score
in [0, 1], its standard error and the number of examples; ``value`` turns that into the number optuna
maximises (the mean over tasks). The splits are

* ``"validation"``: the fixed, seeded subset the trials are scored on (the first ``limit`` examples);
* ``"fresh"``: more validation data, disjoint from that subset, for re-scoring the best few (winner's curse);
* ``"test"``: the reporting split, never seen by the search, scored once per reported recipe.

:class:`MiniObjective` is the miniature benchmark (``omnimerge.bench``). The task-pool objective
(``objective: {tasks: [...]}``) is not joined to :mod:`omnimerge.eval.runner` (the ``omnimerge eval`` loop) yet:
asking for it is a one-line error, not a stand-in.
"""

from __future__ import annotations

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
        from omnimerge.bench.evaluate import evaluate

        return evaluate(model, self._suite(split), self.enc)


def make_objective(spec: MiniSpec | TasksObjective) -> Objective:
    """The objective a search recipe names."""
    if isinstance(spec, TasksObjective):
        raise SearchError(f"objective: {{tasks: {spec.tasks}}}: searching on the task pool is not "
                          f"joined to omnimerge eval yet; use objective: {{suite: mini}}")
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
