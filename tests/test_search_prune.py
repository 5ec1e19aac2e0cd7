"""Pruning (``search: {prune: median}``): a trial stops after the task at which its best running mean falls
below the median of the earlier complete trials' at that task; pruned trials count toward the budget, record the tasks they
scored, and never win."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import optuna
from optuna.trial import TrialState

from omnimerge.bench import TASKS
from omnimerge.search.run import JOURNAL, run_search
from tests.search_helpers import search_recipe


def test_median_pruning_stops_hopeless_trials(quick_zoo, tmp_path: Path) -> None:
    recipe = search_recipe(tmp_path / "p.yaml", quick_zoo, sampler="random", prune="median", prune_warmup=2,
                           weights=[0.0, 1.5], layer_groups=None)
    out = tmp_path / "out"
    lines: list[str] = []
    summary = run_search(recipe, 8, out, seed=0, echo=lines.append)
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="p", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(out / JOURNAL))))
    trials = sorted(study.trials, key=lambda t: t.number)
    states = [t.state for t in trials]
    assert len(trials) == 8 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "no trial was pruned (the check below would be empty)"
    assert summary["pruned"] == len(pruned) and summary["complete"] == 8 - len(pruned)
    assert all(t.state == TrialState.COMPLETE for t in trials[:2])  # the warm-up trials run every task
    for t in pruned:
        steps = sorted(t.intermediate_values)
        last = steps[-1]
        assert len(t.user_attrs["scores"]) == last + 1 < len(TASKS)
        assert list(t.user_attrs["scores"]) == list(TASKS)[: last + 1]  # the tasks in their fixed order
        # the median pruner's rule: its best running mean so far is below the median, at that step, of the
        # earlier complete trials
        earlier = [u.intermediate_values[last] for u in trials[: t.number] if u.state == TrialState.COMPLETE]
        assert len(earlier) >= 2
        assert max(t.intermediate_values.values()) < statistics.median(earlier)
        assert any(f"(#{t.number}): pruned after {last + 1} task(s)" in x for x in lines)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert list(t.user_attrs["scores"]) == list(TASKS)
    assert summary["best"]["trial"] not in {t.number for t in pruned}
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == [s.name for s in states]
    assert json.loads((out / "summary.json").read_text())["prune"] == "median"


def test_prune_is_validated(cli, tmp_path: Path, quick_zoo) -> None:  # type: ignore[no-untyped-def]
    recipe = search_recipe(tmp_path / "p.yaml", quick_zoo, prune="sometimes")
    res = cli("search", recipe, "--trials", "2", "--out", tmp_path / "o")
    assert res.code == 2 and "prune" in res.err and "Traceback" not in res.text, res.text


def test_hyperband_runs_ask_and_tell(quick_zoo, tmp_path: Path) -> None:
    recipe = search_recipe(tmp_path / "h.yaml", quick_zoo, sampler="random", prune="hyperband",
                           weights=[0.0, 1.5], layer_groups=None)
    summary = run_search(recipe, 5, tmp_path / "out", seed=1, echo=lambda _m: None)
    assert summary["prune"] == "hyperband" and summary["complete"] + summary["pruned"] == 5
    assert summary["complete"] >= 1 and summary["best"]["trial"] >= 0
