"""The study: optuna samples and keeps it; this module runs trials, keeps the budget, and writes the outputs.

* **Storage.** By default a journal file ``DIR/study.journal``: re-running the same command continues the same
  study (the samplers' state, CMA-ES's included, lives in the trials). ``--storage URL`` opens any database
  optuna supports (PostgreSQL, MySQL, SQLite), so worker processes on many machines share one study.
* **Budget.** Exact across workers: before a trial starts the finished and running trials are counted, and a
  trial that finds ``--trials`` of them numbered before it is given back (``surplus``) instead of run.
  (``MaxTrialsCallback`` counts only finished trials and overshoots with several workers.)
* **Dead trials are retried.** A trial left RUNNING by a process of this machine that no longer exists is marked
  FAIL and its parameters are queued again; with a database, trials send heartbeats and a trial whose worker
  (on any machine) stopped beating is failed and retried the same way (``RetryHeartbeatStaleTrialCallback``).
* **Outputs** (the worker that sees the budget complete, unless ``report=False``): ``best.yaml``,
  ``trials.csv``, ``summary.json``, ``history.png``, ``coefficients.png``; see :func:`write_report`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from omnimerge.checkpoint.files import atomic_write
from omnimerge.search.objective import Objective, make_objective, value, zoo_models
from omnimerge.search.spec import SearchError, SearchPlan, read_search_recipe

HEARTBEAT_S = 10
GRACE_S = 40
JOURNAL = "study.journal"
JOURNAL_LOCK_GRACE_S = 5


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool | None:
    """Whether the process ``owner`` (host:pid) runs; None when it is on another machine."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy reads: say so with what was given
        return url.split("@")[-1]


def open_storage(out: Path, url: str | None) -> Any:
    """The study's storage: the journal file in ``out``, or the database at ``url`` (checked now)."""
    import optuna

    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        # a killed worker leaves its lock file behind; optuna breaks such a lock after grace_period (30 by
        # default, every write here holds it for milliseconds)
        path = str(out / JOURNAL)
        return optuna.storages.JournalStorage(JournalFileBackend(
            path, lock_obj=JournalFileOpenLock(path, grace_period=JOURNAL_LOCK_GRACE_S)))
    import warnings

    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                                  heartbeat_stale_trial_callback=retry)
        except (IntegrityError, ProgrammingError):  # workers starting together race to create the tables
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
        except Exception as e:  # noqa: BLE001 - any driver's error: one line
            msg = " ".join(str(e).split())[:200]
            raise SearchError(f"--storage {_hide_password(url)}: cannot open the study database "
                              f"({type(e).__name__}: {msg})") from None
    raise AssertionError("unreachable")


def make_sampler(plan: SearchPlan, seed: int) -> Any:
    import optuna

    s = plan.spec.sampler
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if s == "cmaes":
        x0 = {d.name: (d.low + d.high) / 2 for d in plan.dims}
        sigma0 = min(d.high - d.low for d in plan.dims) / 6
        import warnings

        with warnings.catch_warnings():  # x0/sigma0 are deprecated since optuna 4.9 (to go in 6.0, our bound)
            warnings.simplefilter("ignore", FutureWarning)
            return optuna.samplers.CmaEsSampler(x0=x0, sigma0=sigma0, seed=seed)
    import numpy as np

    grid = {d.name: [float(v) for v in np.linspace(d.low, d.high, plan.spec.grid)] for d in plan.dims}
    return _AskTellGrid(grid, seed=seed)


def _grid_class() -> Any:
    import optuna

    class AskTellGrid(optuna.samplers.GridSampler):
        """optuna's grid sampler without its ``study.stop()`` once the grid is covered: that works inside
        ``optimize`` only, and here trials are asked and told (the budget, checked to be at least the grid's
        size, ends the search; a grid point already visited is drawn again, as optuna does when over-asked)."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return AskTellGrid


def _AskTellGrid(grid: dict[str, list[float]], seed: int) -> Any:  # noqa: N802 - a class made on demand
    return _grid_class()(grid, seed=seed)


def _suggest(trial: Any, plan: SearchPlan) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in plan.dims:
        if d.integer:
            out[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high))
        else:
            out[d.name] = trial.suggest_float(d.name, d.low, d.high)
    return out


def _trial_id(storage: Any, study: Any, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def _finished_states() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def recover(study: Any, storage: Any) -> list[int]:
    """Fail the RUNNING trials whose process (on this machine) is gone and queue their parameters again;
    returns their numbers. With a database, stale heartbeats are handled the same way on every machine."""
    import optuna
    from optuna.trial import TrialState

    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
    done = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if owner is None or _alive(owner) is not False:
            continue
        storage.set_trial_state_values(_trial_id(storage, study, t.number), TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        done.append(t.number)
    return done


def _counts(study: Any) -> tuple[int, int]:
    """(finished: complete or pruned, running) trials of the study."""
    from optuna.trial import TrialState

    ts = study.get_trials(deepcopy=False, states=(*_finished_states(), TrialState.RUNNING))
    return sum(t.state != TrialState.RUNNING for t in ts), sum(t.state == TrialState.RUNNING for t in ts)


def make_pruner(plan: SearchPlan) -> Any:
    """optuna's pruner for ``prune:`` (steps are the objective's tasks, in order; the reported value is the
    running mean over the tasks scored so far)."""
    import optuna

    if plan.spec.prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=plan.spec.prune_warmup, n_warmup_steps=0)
    if plan.spec.prune == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=len(_tasks_of(plan)))
    return optuna.pruners.NopPruner()


def _tasks_of(plan: SearchPlan) -> list[str]:
    obj = plan.spec.objective
    if hasattr(obj, "tasks"):
        return list(obj.tasks)
    from omnimerge.bench import TASKS

    return list(TASKS)


class _Heartbeat:
    """Heartbeats of one running trial (database storage only): optuna's own thread runs inside
    ``optimize`` only, and trials here are asked and told."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        import optuna

        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if isinstance(storage, optuna.storages.RDBStorage):
            storage.record_heartbeat(trial_id)

            def beat() -> None:
                while not self.stop.wait(HEARTBEAT_S):
                    storage.record_heartbeat(trial_id)

            self.thread = threading.Thread(target=beat, daemon=True)
            self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def run_search(recipe: str | Path, trials: int, out: str | Path, *, storage: str | None = None, seed: int = 0,
               study_name: str | None = None, report: bool = True, echo: Any = print) -> dict[str, Any]:
    """Run (or continue) the search of ``recipe`` until the study holds ``trials`` complete trials; with
    ``report``, write the outputs into ``out`` and return the summary (else the counts)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out)
    plan = read_search_recipe(recipe, trials, zoo_models)
    st = open_storage(out, storage)  # before any work: an unreachable database is a one-line error
    objective = make_objective(_local_paths(plan.spec.objective, plan))
    name = study_name or Path(recipe).stem
    try:
        study = optuna.load_study(study_name=name, storage=st)
    except KeyError:
        study = None
    n_before = len(study.trials) if study is not None else 0
    sampler = make_sampler(plan, seed + n_before + (os.getpid() if storage else 0))
    study = optuna.create_study(study_name=name, storage=st, sampler=sampler, pruner=make_pruner(plan),
                                direction="maximize", load_if_exists=True)
    _check_same_space(study, plan)
    retried = recover(study, st)
    if retried:
        echo(f"retrying trial(s) {', '.join(map(str, retried))} left unfinished by a process that is gone")
    model = objective.load_model(_abs(plan.recipe.base_model, plan))
    from omnimerge.search.fast import TrialMerger

    t_start = time.perf_counter()
    run_here = 0
    with TrialMerger(plan, model) as tm:
        echo(f"search: {len(plan.dims)} coefficient(s), sampler {plan.spec.sampler}, trials merged by "
             f"{tm.path}; study '{name}' ({'journal ' + str(out / JOURNAL) if storage is None else 'database'})")
        while True:
            done, running = _counts(study)
            if done >= trials:
                break
            if done + running >= trials:
                if not report:
                    break
                time.sleep(1.0)  # other workers' trials: wait for them (a dead one is failed and retried)
                recover(study, st)
                continue
            trial = study.ask()
            trial.set_user_attr("worker", _owner())
            ahead = sum(1 for t in study.get_trials(deepcopy=False, states=(*_finished_states(), TrialState.RUNNING))
                        if t.number < trial.number)
            if ahead >= trials:  # another worker took the last place first: give this one back
                fixed = study.trials[trial.number].system_attrs.get("fixed_params")
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                if fixed:
                    study.enqueue_trial(fixed, skip_if_exists=False)
                continue
            params = _suggest(trial, plan)
            hb = _Heartbeat(st, _trial_id(st, study, trial.number))
            try:
                t0 = time.perf_counter()
                tm.apply(params)
                scores: dict[str, dict[str, Any]] = {}
                pruned = False
                for step, (task, res) in enumerate(objective.score_iter(model, "validation")):
                    scores[task] = res
                    if plan.spec.prune != "none":
                        trial.report(value(scores)[0], step)
                        if trial.should_prune():
                            pruned = True
                            break
                v, se = value(scores)
                trial.set_user_attr("scores", {t: s["score"] for t, s in scores.items()})
                trial.set_user_attr("n", {t: s["n"] for t, s in scores.items()})
                trial.set_user_attr("se", se)
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                if pruned:
                    study.tell(trial, state=TrialState.PRUNED)
                else:
                    study.tell(trial, v)
            except BaseException:
                hb.close()
                if study.trials[trial.number].state == TrialState.RUNNING:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            hb.close()
            run_here += 1
            done = _counts(study)[0]
            per = (time.perf_counter() - t_start) / run_here
            what = (f"pruned after {len(scores)} task(s) at {100 * v:.2f}" if pruned else f"{100 * v:.2f}")
            try:
                best = study.best_trial
                best_txt = f"best {100 * best.value:.2f} (#{best.number})"
            except ValueError:  # every trial so far pruned
                best_txt = "no complete trial yet"
            echo(f"trial {done}/{trials} (#{trial.number}): {what} | {best_txt} | {per:.2f}s/trial, ETA "
                 f"{max(0, trials - done) * per:.0f}s")
        if not report:
            return {"complete": _counts(study)[0], "run_here": run_here}
        summary = write_report(plan, study, tm, objective, model, out, trials, storage, name)
    echo(summary["dashboard"])
    echo(f"best: {100 * summary['best']['test']['mean']:.2f} ± {100 * summary['best']['test']['se']:.2f} on "
         f"test (trial #{summary['best']['trial']}) -> {out / 'best.yaml'}")
    return summary


def _abs(path: str, plan: SearchPlan) -> str:
    p = Path(path)
    if not p.is_absolute() and plan.recipe.base_path is not None and (plan.recipe.base_path / p).exists():
        return str((plan.recipe.base_path / p).resolve())
    return path


def _check_same_space(study: Any, plan: SearchPlan) -> None:
    want = [d.name for d in plan.dims]
    have = study.user_attrs.get("dimensions")
    if have is None:
        study.set_user_attr("dimensions", want)
    elif have != want:
        raise SearchError(f"study '{study.study_name}': it searches {len(have)} other coefficient(s) "
                          f"({', '.join(have[:4])}...); use another --out, --storage or --study-name")


# ---------------------------------------------------------------------------------------------------------------
# the outputs


def _record(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    mean, se = value(scores)
    return {"mean": mean, "se": se, "tasks": {t: {k: s[k] for k in ("score", "se", "n")} for t, s in scores.items()}}


def _local_paths(spec: Any, plan: SearchPlan) -> Any:
    """A task-pool objective's data paths, relative ones taken from the recipe's folder (as the recipe's models)."""
    from omnimerge.search.spec import TasksObjective

    root = plan.recipe.base_path
    if not isinstance(spec, TasksObjective) or root is None:
        return spec

    def fix(v: str) -> str:
        return str(root / v) if not Path(v).expanduser().is_absolute() and (root / v).exists() else v

    return spec.model_copy(update={"data": {k: fix(v) for k, v in spec.data.items()},
                                   "images": {k: fix(v) for k, v in spec.images.items()}})


def write_report(plan: SearchPlan, study: Any, tm: Any, objective: Objective, model: Any, out: Path,
                 trials: int, storage: str | None, name: str) -> dict[str, Any]:
    """Baselines, the winner's-curse re-scoring, the test scores; best.yaml, trials.csv, summary.json, plots."""
    from optuna.trial import TrialState

    from omnimerge.methods import get_method

    out.mkdir(parents=True, exist_ok=True)
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: (-t.value, t.number))
    if not complete:
        raise SearchError(f"study '{name}': every trial was pruned: raise prune_warmup (trials that always finish) or "
                          f"run more trials")
    top = []
    for t in complete[: plan.spec.top]:
        tm.apply(t.params)
        fresh = objective.score(model, "fresh")
        top.append({"trial": t.number, "params": dict(t.params), "validation": t.value, "fresh": _record(fresh)})
    winner = max(top, key=lambda r: (r["fresh"]["mean"], r["validation"], -r["trial"]))
    wt = next(t for t in complete if t.number == winner["trial"])
    tm.apply(wt.params)
    best = {"trial": wt.number, "params": dict(wt.params), "validation": _record(objective.score(model, "validation")),
            "fresh": winner["fresh"], "test": _record(objective.score(model, "test"))}
    baseline: dict[str, Any] = {}
    # the baseline: the method's defaults for its lambda and every searched coefficient (other values kept;
    # written out: a Merger's parameters are laid over the recipe's)
    method = get_method(plan.recipe.merge_method)
    defaults = {p.name: p.default for p in method.params}
    searched = {"scaling"} | {d.param or d.kind for d in plan.dims if d.kind != "weight"}
    top_params = {**plan.recipe.parameters, **{k: defaults[k] for k in searched if k in defaults}}
    per = [{**m.parameters, **({"weight": defaults["weight"]} if plan.spec.weights is not None else {})}
           for m in plan.recipe.models]
    tm.merger.into(model, top_params, per, only_merged=True)
    baseline["default"] = {"parameters": top_params, "validation": _record(objective.score(model, "validation")),
                           "test": _record(objective.score(model, "test"))}
    if "scaling" in defaults:
        from omnimerge.bench.merging import LAMBDA_GRID

        curve = {}
        best_lam, best_v, best_val = LAMBDA_GRID[0], -math.inf, {}
        for lam in LAMBDA_GRID:
            tm.merger.into(model, {**top_params, "scaling": lam}, per, only_merged=True)
            v = _record(objective.score(model, "validation"))
            curve[f"{lam:g}"] = v["mean"]
            if v["mean"] > best_v + 1e-12:
                best_lam, best_v, best_val = lam, v["mean"], v
        tm.merger.into(model, {**top_params, "scaling": best_lam}, per, only_merged=True)
        baseline["grid"] = {"scaling": best_lam, "curve": curve, "validation": best_val,
                            "test": _record(objective.score(model, "test"))}
    best_recipe = plan.recipe_at(wt.params)
    data = best_recipe.model_dump(exclude={"base_dir"})
    data["base_model"] = _abs(data["base_model"], plan)
    for m in data["models"]:
        m["model"] = _abs(m["model"], plan)
    from omnimerge.recipe import validate_recipe

    text = validate_recipe(data, "best.yaml").to_yaml()
    header = (f"# omnimerge search: trial #{wt.number} of study '{name}' (validation "
              f"{100 * best['validation']['mean']:.2f}, fresh {100 * best['fresh']['mean']:.2f}, test "
              f"{100 * best['test']['mean']:.2f}); run it with: omnimerge merge best.yaml -o merged\n")
    atomic_write(out / "best.yaml", lambda p: p.write_bytes((header + text).encode()))
    atomic_write(out / "trials.csv", lambda p: p.write_bytes(trials_csv(study, plan).encode()))
    dash = ("open the study: pip install optuna-dashboard && optuna-dashboard "
            + (f"--storage-class JournalFileStorage {out / JOURNAL}" if storage is None
               else f"'{_hide_password(storage)}'"))
    summary = {
        "study": name, "objective": plan.spec.objective.model_dump(), "sampler": plan.spec.sampler,
        "dimensions": [d.name for d in plan.dims], "trials": trials,
        "complete": len(complete),
        "pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))), "prune": plan.spec.prune,
        "failed_or_retried": len(study.get_trials(deepcopy=False,
                                                                            states=(TrialState.FAIL,))),
        "merge_path": tm.path, "sizes": objective.sizes(), "baseline": baseline, "top": top, "best": best,
        "best_yaml": str(out / "best.yaml"), "dashboard": dash,
        "trial_seconds": sum(t.user_attrs.get("seconds", 0.0)
                             for t in study.get_trials(deepcopy=False, states=_finished_states())),
    }
    atomic_write(out / "summary.json", lambda p: p.write_bytes(json.dumps(summary, indent=1).encode()))
    plots(study, plan, wt.params, out)
    return summary


def trials_csv(study: Any, plan: SearchPlan) -> str:
    buf = io.StringIO()
    dims = [d.name for d in plan.dims]
    tasks = sorted({k for t in study.trials for k in t.user_attrs.get("scores", {})})
    w = csv.writer(buf)
    w.writerow(["number", "state", "value", "se", "seconds", "worker", "retry_of", *dims, *tasks])
    for t in study.trials:
        sc = t.user_attrs.get("scores", {})
        w.writerow([t.number, t.state.name, "" if t.value is None else t.value, t.user_attrs.get("se", ""),
                    t.user_attrs.get("seconds", ""), t.user_attrs.get("worker", ""),
                    t.user_attrs.get("retry_of", ""), *[t.params.get(d, "") for d in dims],
                    *[sc.get(k, "") for k in tasks]])
    return buf.getvalue()


def plots(study: Any, plan: SearchPlan, best: dict[str, float], out: Path) -> None:
    """history.png (every trial's value and the best so far) and coefficients.png (the best's coefficients per
    expert and layer group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [t.number for t in done]
    ys = [100 * t.value for t in done]
    ax.plot(xs, ys, "o", ms=3, label="trial")
    ax.plot(xs, [max(ys[: i + 1]) for i in range(len(ys))], "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation mean (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=100)
    plt.close(fig)
    labels = plan.expert_labels()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    k = plan.spec.layer_groups
    if plan.spec.weights is not None and k is not None:
        cols = [f"g{g}" for g in range(k)] + ["other"]
        grid = [[best[f"w{i}.{c}"] for c in cols] for i in range(len(labels))]
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(labels)), labels)
        fig.colorbar(im, ax=ax, label="weight")
        ax.set_xlabel("decoder layer group")
    else:
        names = [d.name for d in plan.dims]
        ax.bar(range(len(names)), [best[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_title("best coefficients")
    fig.tight_layout()
    fig.savefig(out / "coefficients.png", dpi=100)
    plt.close(fig)
