"""``omnimerge search`` end to end on the quick zoo: outputs, best.yaml reproduces the scored model bit for bit,
a killed search continues, two workers share one PostgreSQL study, bad inputs are one line."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file

import omnimerge
from omnimerge.bench import TASKS
from omnimerge.search.fast import TrialMerger
from omnimerge.search.objective import MiniSuiteObjective
from omnimerge.search.run import JOURNAL, run_search
from omnimerge.search.spec import read_search_recipe
from tests.search_helpers import cli_command, cli_env, postgres_server, search_recipe


def _journal_study(out: Path, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(out / JOURNAL))))


def test_a_short_search_writes_every_output_and_best_yaml_is_what_was_scored(quick_zoo, tmp_path: Path) -> None:
    recipe = search_recipe(tmp_path / "ta.yaml", quick_zoo)
    out = tmp_path / "out"
    lines: list[str] = []
    summary = run_search(recipe, 4, out, seed=3, echo=lines.append)
    for f in ("best.yaml", "trials.csv", "summary.json", "history.png", "coefficients.png", JOURNAL):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4
    assert {f"w{i}.g{g}" for i in range(5) for g in range(4)} | {f"w{i}.other" for i in range(5)} <= set(rows[0])
    assert set(TASKS) <= set(rows[0])
    s = json.loads((out / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    assert s["complete"] == 4 and s["merge_path"] == "cached task vectors"
    for rec in (s["best"], s["baseline"]["default"], s["baseline"]["grid"]):
        for split in ("validation", "test"):
            assert set(rec[split]["tasks"]) == set(TASKS) and rec[split]["se"] >= 0
            assert {t["n"] for t in rec[split]["tasks"].values()} == {4}
    assert len(s["top"]) == 2 and s["best"]["trial"] in {t["trial"] for t in s["top"]}
    assert s["baseline"]["grid"]["scaling"] in (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
    assert s["baseline"]["default"]["parameters"] == {"scaling": 0.3}  # task arithmetic's own default lambda
    # the default baseline is the grid's lambda 0.3 merge (unit weights): the same validation score
    assert s["baseline"]["grid"]["curve"]["0.3"] == s["baseline"]["default"]["validation"]["mean"]
    assert any("optuna-dashboard" in x for x in lines) and any("trial 4/4" in x and "ETA" in x for x in lines)

    # best.yaml is an ordinary recipe holding the searched coefficients, and merges to the scored model
    best = s["best"]["params"]
    r = omnimerge.load_recipe(out / "best.yaml")
    for i, m in enumerate(r.models):
        assert m.parameters["weight"] == {"layers": [best[f"w{i}.g{g}"] for g in range(4)],
                                          "other": best[f"w{i}.other"]}
    omnimerge.merge(out / "best.yaml", tmp_path / "merged", hash_inputs=False)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    plan = read_search_recipe(recipe, 4)
    model = MiniSuiteObjective(plan.spec.objective).load_model(str(quick_zoo.base_dir))
    with TrialMerger(plan, model) as tm:
        scored = tm.state(best)
        assert tm.path == "cached task vectors"
        engine = tm.merger.state_dict(*plan.fixed_parameters(best), device="cpu", only_merged=True)
    assert len(scored) > 50
    for name, t in scored.items():
        assert torch.equal(merged[name], t), name
        assert torch.equal(engine[name], t), name
    base = load_file(str(quick_zoo.base_dir / "model.safetensors"))
    assert sum(not torch.equal(base[n], t) for n, t in scored.items()) > 50  # the merge did change the weights


def test_a_killed_search_continues_when_run_again(quick_zoo, tmp_path: Path) -> None:
    recipe = search_recipe(tmp_path / "kill.yaml", quick_zoo, sampler="cmaes", layer_groups=None)
    out = tmp_path / "out"
    cmd = cli_command("search", recipe, "--trials", "10", "--out", out, "--no-report")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=cli_env())
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("trial 3/10"):
            break
    time.sleep(0.05)  # the next trial has started (it is asked at once and runs for ~0.1 s): kill it mid-trial
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _journal_study(out, "kill").get_trials(deepcopy=False)
    n_first = sum(t.state == TrialState.COMPLETE for t in first)
    assert 3 <= n_first < 10
    res = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"trial {n_first + 1}/10" in res.stderr  # continued, not restarted
    trials = _journal_study(out, "kill").get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 10 and len({t.number for t in complete}) == 10
    running = [t for t in first if t.state == TrialState.RUNNING]
    assert len(running) == 1
    for t in running:  # the trial the kill interrupted: failed, then retried with the same parameters
        assert trials[t.number].state == TrialState.FAIL
        retry = [c for c in complete if c.user_attrs.get("retry_of") == t.number]
        # the parameters it had drawn before it died (all, or the first ones when killed while suggesting)
        assert len(retry) == 1 and all(retry[0].params[k] == v for k, v in t.params.items())
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # CMA-ES kept its state in the trials: the search resumed the same run
    assert any(k.startswith("cma:") for t in complete[n_first:] for k in t.system_attrs)


def test_two_workers_share_one_postgresql_study(quick_zoo, tmp_path: Path) -> None:
    recipe = search_recipe(tmp_path / "pg.yaml", quick_zoo, layer_groups=2)
    with postgres_server() as url:
        procs = [subprocess.Popen(cli_command("search", recipe, "--trials", "12", "--out", tmp_path / f"w{i}",
                                              "--storage", url, "--no-report"),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env())
                 for i in range(2)]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errs
        study = optuna.load_study(study_name="pg", storage=url)
        trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 12  # the budget holds across the workers
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2, workers  # the trials were split between them
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.parametrize(("change", "expect"), [
    ({"weights": [1.0, 0.5]}, "inverted"),
    ({"weights": [0.5, 0.5]}, "empty"),
    ({"density": [0.1, 0.9]}, "has no parameter 'density'"),
    ({"sampler": "grid", "grid": 3}, "more than the trial budget"),
    ({"layer_groups": 0}, "layer_groups"),
    ({"weights": [-2.0, 1.0], "scaling": [-1.0, 1.0]}, "scaling"),
])
def test_bad_search_input_is_one_line(cli, tmp_path: Path, change: dict, expect: str) -> None:
    class Zoo:  # paths only: every check runs before a checkpoint is opened
        base_dir = tmp_path / "base"

        @staticmethod
        def full_dir(t: str) -> Path:
            return tmp_path / t

    recipe = search_recipe(tmp_path / "bad.yaml", Zoo, **change)
    res = cli("search", recipe, "--trials", "5", "--out", tmp_path / "out")
    assert res.code == 2, res.text
    assert expect in res.err and res.err.strip().count("\n") == 0, res.err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_an_unreachable_storage_is_one_line(cli, tmp_path: Path) -> None:
    class Zoo:
        base_dir = tmp_path / "base"

        @staticmethod
        def full_dir(t: str) -> Path:
            return tmp_path / t

    recipe = search_recipe(tmp_path / "s.yaml", Zoo)
    res = cli("search", recipe, "--trials", "5", "--out", tmp_path / "out",
              "--storage", "postgresql+psycopg://someone:secret@127.0.0.1:1/none")
    assert res.code == 2, res.text
    assert "cannot open the study database" in res.err and "secret" not in res.err
    assert res.err.strip().count("\n") == 0, res.err


def test_a_grid_over_a_method_parameter_merges_through_the_engine(quick_zoo, tmp_path: Path) -> None:
    recipe = search_recipe(tmp_path / "ties.yaml", quick_zoo, weights=None, layer_groups=None, sampler="grid",
                           grid=2, scaling=[0.5, 1.0], density=[0.2, 0.8], top=1)
    data = yaml.safe_load(recipe.read_text())
    data["merge_method"] = "ties"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    s = run_search(recipe, 4, out, echo=lambda m: None)
    assert s["merge_path"] == "engine"
    points = {(t["scaling"], t["density"]) for t in
              (json.loads(json.dumps(r)) for r in csv.DictReader((out / "trials.csv").open()))}
    assert points == {("0.5", "0.2"), ("0.5", "0.8"), ("1.0", "0.2"), ("1.0", "0.8")}  # every grid point once
    r = omnimerge.load_recipe(out / "best.yaml")
    assert r.parameters == {"scaling": s["best"]["params"]["scaling"], "density": s["best"]["params"]["density"]}
    omnimerge.merge(out / "best.yaml", tmp_path / "merged", hash_inputs=False)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    plan = read_search_recipe(recipe, 4)
    with TrialMerger(plan, MiniSuiteObjective(plan.spec.objective).load_model(str(quick_zoo.base_dir))) as tm:
        for name, t in tm.state(s["best"]["params"]).items():
            assert torch.equal(merged[name], t), name
