"""The zoo: base, five full-fine-tuned experts, five LoRA experts and the multi-task (mixture) model.

``omnimerge zoo build`` trains them (deterministically, from seeds), saves every model with ``save_pretrained``
under ``$OMNIMERGE_CACHE/zoo/<hash>`` (default ``~/.cache/omnimerge``), evaluates the 12 models on the test split and
checks the calibration: each expert beats the base on its own task by ``min_gain`` (25 points) and beats the other
experts there. The hash covers the whole :class:`ZooConfig` and the code version, so a changed recipe rebuilds and
an unchanged one is reused.

Layout of a zoo folder::

    base/                 LlavaForConditionalGeneration + LlavaProcessor files
    full/<task>/          full fine-tuned experts (checkpoints)
    lora/<task>/          LoRA experts (peft adapters: adapter_config.json + adapter_model.safetensors)
    lora-merged/<task>/   the same experts after merge_and_unload() (full checkpoints)
    mixture/              multi-task model trained on all five tasks (the paper's "mixture training")
    zoo.json              config, training statistics, timings, the test-split scores and the calibration
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from omnimerge.bench import TASKS
from omnimerge.bench.model import ModelSpec
from omnimerge.bench.train import TrainSpec
from omnimerge.errors import OmniMergeError

ZOO_VERSION = "4"  # 3: LoRA experts seeded from the config; 4: VQA asks cell-indexed questions only


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines the zoo (hashed into its cache key)."""

    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    n_caption: int = 4000  # captioning samples per task (base pretraining)
    n_format: int = 1000  # shuffled-answer question samples per task (base's format warm-up)
    format_frac: float = 0.3  # share of format warm-up samples in the base's mixture
    n_train: int = 4000  # training samples per task (experts, mixture)
    base: TrainSpec = TrainSpec(steps=1000, lr=2e-3, warmup=50)
    full: TrainSpec = TrainSpec(steps=300, lr=2e-4)
    lora: TrainSpec = TrainSpec(steps=300, lr=2e-3, lora_r=8, lora_alpha=16)
    mixture: TrainSpec = TrainSpec(steps=600, lr=2e-4)
    #: expert steps per task where they differ from the family's spec (both families). VQA (four question
    #: types, the hardest skill) had a thin margin at 300 steps: +21 to +28 points over the base across
    #: library versions, against the 25-point bar; grounding is the next hardest. Even at 600 steps the two
    #: colour-search question types stayed at the majority answer, hence the cell-indexed VQA of zoo version 4
    #: (the gains per seed and thread count are in docs/benchmark.md, "Robustness over seeds")
    task_steps: tuple[tuple[str, int], ...] = (("vqa", 600), ("grounding", 600))
    #: expert learning-rate multipliers per task (both families)
    task_lr_scale: tuple[tuple[str, float], ...] = (("vqa", 2.0), ("grounding", 2.0))
    n_val: int = 200  # validation examples per task (lambda selection)
    n_test: int = 500  # test examples per task
    min_gain: float = 0.25
    quick: bool = False

    @staticmethod
    def quick_config(seed: int = 0) -> ZooConfig:
        """The CI-size zoo: a few training steps and few examples; calibration is not enforced."""
        return ZooConfig(
            seed=seed,
            n_caption=200,
            n_format=100,
            n_train=200,
            base=TrainSpec(steps=30, lr=2e-3, warmup=5),
            full=TrainSpec(steps=8, lr=3e-4, warmup=2),
            lora=TrainSpec(steps=8, lr=2e-3, warmup=2, lora_r=8, lora_alpha=16),
            mixture=TrainSpec(steps=8, lr=3e-4, warmup=2),
            task_steps=(("vqa", 12), ("grounding", 12)),
            n_val=16,
            n_test=24,
            quick=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def spec(self, kind: str, task: str = "") -> TrainSpec:
        """The training recipe of ``kind`` (base/full/lora/mixture) for ``task``, per-task steps applied."""
        spec: TrainSpec = getattr(self, kind)
        if kind not in ("full", "lora"):
            return spec
        steps = dict(self.task_steps).get(task, spec.steps)
        lr = spec.lr * dict(self.task_lr_scale).get(task, 1.0)
        return replace(spec, steps=steps, lr=lr)

    def stage_key(self, name: str) -> str:
        """Hash of everything that determines model ``name`` (base, full/<task>, lora/<task>, mixture) and its
        test scores: a zoo build reuses a model of another cached zoo with the same stage key."""
        base = {"version": ZOO_VERSION, "seed": self.seed, "model": asdict(self.model), "n_caption": self.n_caption,
                "n_format": self.n_format, "format_frac": self.format_frac, "base": asdict(self.base)}
        blob: dict[str, Any] = {"base": base, "n_test": self.n_test}
        if name != "base":
            kind, _, task = name.partition("/")
            blob.update({"n_train": self.n_train, "kind": kind, "task": task,
                         "spec": asdict(self.spec(kind, task))})
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def key(self) -> str:
        blob = json.dumps({"version": ZOO_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    env = os.environ.get("OMNIMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "omnimerge"


class ZooError(OmniMergeError):
    """The zoo cannot be used: a stage crashed, a cached zoo is damaged, or (strict mode) its calibration failed."""


class Zoo:
    """Paths and metadata of one built zoo."""

    def __init__(self, config: ZooConfig, root: str | Path | None = None) -> None:
        self.config = config
        self.root = Path(root) if root is not None else cache_root() / "zoo" / config.key()
        self.built = False  # True when build_zoo trained/assembled it in this process (vs. reused the cache)

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    def full_dir(self, task: str) -> Path:
        return self.root / "full" / task

    def lora_dir(self, task: str) -> Path:
        return self.root / "lora" / task

    def lora_merged_dir(self, task: str) -> Path:
        return self.root / "lora-merged" / task

    @property
    def mixture_dir(self) -> Path:
        return self.root / "mixture"

    def expert_dir(self, family: str, task: str) -> Path:
        return self.full_dir(task) if family == "full" else self.lora_merged_dir(task)

    @property
    def info_path(self) -> Path:
        return self.root / "zoo.json"

    def exists(self) -> bool:
        return self.info_path.exists()

    def info(self) -> dict[str, Any]:
        return json.loads(self.info_path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# data


def _datasets(cfg: ZooConfig, base: bool = True) -> dict[str, Any]:
    """Encoded training data: the base's mixture and each task's training set."""
    from omnimerge.bench import data as D
    from omnimerge.bench.model import Encoder
    from omnimerge.bench.train import TensorData, encode

    enc = Encoder()
    tasks = {t: encode(D.make_split(t, "train", cfg.n_train, cfg.seed), enc) for t in TASKS}
    if not base:
        return {"tasks": tasks}
    cap = TensorData.cat([encode(D.make_split(t, "train", cfg.n_caption, cfg.seed, caption=True), enc)
                          for t in TASKS])
    fmt_ex = []
    for t in TASKS:
        fmt_ex += D.make_split(t, "train", cfg.n_format, cfg.seed + 1)
    fmt = encode(D.shuffled_answers(fmt_ex, cfg.seed), enc)
    reps = max(1, round(cfg.format_frac * len(cap) / ((1.0 - cfg.format_frac) * len(fmt))))
    return {"base": TensorData.cat([cap] + [fmt] * reps), "tasks": tasks}


# ---------------------------------------------------------------------------------------------------------------
# worker jobs (run in spawned processes with one thread each)


def _job(args: tuple[str, str, dict[str, Any], str, Any]) -> dict[str, Any]:
    """Train one expert (``kind`` full/lora/mixture) from the saved base; save it; evaluate on the test split."""
    kind, task, cfg_dict, root, queue = args
    import torch

    if not isinstance(queue, _DirectQueue):
        torch.set_num_threads(1)
    from omnimerge.bench.evaluate import build_suite, evaluate
    from omnimerge.bench.model import Encoder, build_processor, load_model, save_checkpoint
    from omnimerge.bench.train import TensorData, add_lora, train

    cfg = _config_from_dict(cfg_dict)
    zoo = Zoo(cfg, root)
    tasks = torch.load(zoo.root / "tmp" / "tasks.pt", weights_only=False)
    td: TensorData = TensorData.cat(list(tasks.values())) if kind == "mixture" else tasks[task]
    spec = cfg.spec(kind, task)
    model = load_model(zoo.base_dir)
    seed = cfg.seed + 1 + TASKS.index(task) if task in TASKS else cfg.seed + 7
    if kind == "lora":
        model = add_lora(model, spec, seed=1000 + seed)
    name = f"{kind}/{task}" if kind != "mixture" else "mixture"

    def progress(step: int) -> None:
        if queue is not None and (step % 10 == 0 or step == spec.steps):
            queue.put((name, step))

    try:
        stats = train(model, td, spec, seed=seed, progress=progress)
    except Exception as exc:  # name the stage: the pool re-raises this in the parent
        raise RuntimeError(f"training {name} failed: {type(exc).__name__}: {exc}") from None
    proc = build_processor(cfg.model)
    if kind == "lora":
        model.save_pretrained(str(zoo.lora_dir(task)))
        merged = model.merge_and_unload()
        save_checkpoint(merged, zoo.lora_merged_dir(task), proc)
        model = merged
    elif kind == "full":
        save_checkpoint(model, zoo.full_dir(task), proc)
    else:
        save_checkpoint(model, zoo.mixture_dir, proc)
    enc = Encoder()
    res = evaluate(model, build_suite("test", cfg.n_test, cfg.seed, enc), enc)
    if queue is not None:
        queue.put((name, -1))
    return {"kind": kind, "task": task, "train": stats, "test": res}


def _config_from_dict(d: dict[str, Any]) -> ZooConfig:
    d = dict(d)
    d["model"] = ModelSpec(**d["model"])
    d["task_steps"] = tuple(tuple(x) for x in d.get("task_steps", ()))
    d["task_lr_scale"] = tuple(tuple(x) for x in d.get("task_lr_scale", ()))
    for k in ("base", "full", "lora", "mixture"):
        d[k] = TrainSpec(**d[k])
    return ZooConfig(**d)


# ---------------------------------------------------------------------------------------------------------------
# build


def calibration(info: dict[str, Any], min_gain: float) -> dict[str, Any]:
    """Check the calibration of both families from the test scores in ``info``."""
    out: dict[str, Any] = {"ok": True, "failures": []}
    base = info["scores"]["base"]
    for fam in ("full", "lora"):
        for t in TASKS:
            own = info["scores"][f"{fam}/{t}"][t]["score"]
            gain = own - base[t]["score"]
            others = [info["scores"][f"{fam}/{o}"][t]["score"] for o in TASKS if o != t]
            if gain < min_gain:
                out["failures"].append(f"{fam}/{t}: gain over base on {t} is {100 * gain:+.1f} points "
                                       f"(< {100 * min_gain:.0f})")
            if others and own <= max(others):
                out["failures"].append(f"{fam}/{t}: not the best expert on {t} ({own:.3f} vs {max(others):.3f})")
    out["ok"] = not out["failures"]
    return out


STAGE_FILE = "omnimerge_stage.json"


def _stage_dirs(name: str) -> list[str]:
    """The folders (relative to a zoo root) that hold model ``name``; the first one carries the stage file."""
    if name.startswith("lora/"):
        return [name, "lora-merged/" + name.split("/", 1)[1]]
    return [name]


def _find_stage(cfg: ZooConfig, name: str, zoo: Zoo) -> tuple[Path, dict[str, Any]] | None:
    """A model of another cached zoo (same parent folder) built from the same stage key, if any."""
    key = cfg.stage_key(name)
    for other in sorted(zoo.root.parent.glob("*")):
        if other == zoo.root or not other.is_dir():
            continue
        f = other / _stage_dirs(name)[0] / STAGE_FILE
        if not f.exists():
            continue
        try:
            meta = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("key") == key and all((other / d).is_dir() for d in _stage_dirs(name)):
            return other, meta
    return None


def _reuse_stage(src_root: Path, name: str, zoo: Zoo) -> None:
    for d in _stage_dirs(name):
        dst = zoo.root / d
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src_root / d, dst)
    if name.startswith("lora/"):  # the adapter names its base: point it at this zoo's base
        cfg_path = zoo.root / name / "adapter_config.json"
        ac = json.loads(cfg_path.read_text())
        ac["base_model_name_or_path"] = str(zoo.base_dir)
        cfg_path.write_text(json.dumps(ac, indent=2))


def _write_stage(zoo: Zoo, name: str, train_stats: dict[str, Any], test: dict[str, Any]) -> None:
    meta = {"key": zoo.config.stage_key(name), "train": train_stats, "test": test}
    (zoo.root / _stage_dirs(name)[0] / STAGE_FILE).write_text(json.dumps(meta, indent=1))


def build_zoo(
    config: ZooConfig,
    rebuild: bool = False,
    root: str | Path | None = None,
    console: Any = None,
    workers: int | None = None,
    strict: bool = False,
    threads: int | None = None,
) -> Zoo:
    """Build (or reuse) the zoo for ``config``.

    A calibration shortfall is recorded in ``zoo.json`` and printed, and the zoo is kept (the bench still runs on
    it and reports the shortfall); ``strict=True`` raises :class:`ZooError` instead. A stage that crashes raises
    :class:`ZooError` naming it, and the partial zoo is removed. Models whose stage key (see
    :meth:`ZooConfig.stage_key`) matches a model of another cached zoo are copied from it instead of trained
    (``rebuild=True`` trains everything). ``threads``: torch threads of the base's training and number of
    one-thread expert workers (default: min(2, cores)); the thread count can change float results in the last
    bits, so it is recorded in ``zoo.json``.
    """
    import torch
    from rich.console import Console

    console = console or Console()
    zoo = Zoo(config, root)
    if zoo.exists() and not rebuild:
        console.print(f"[green]zoo[/green] reusing {zoo.root}")
        check_zoo(zoo)
        if strict and not zoo.info()["calibration"]["ok"]:
            raise ZooError(_shortfall_message(zoo.info()["calibration"], zoo))
        return zoo
    if zoo.root.exists():
        shutil.rmtree(zoo.root)
    (zoo.root / "tmp").mkdir(parents=True)
    prev_threads = torch.get_num_threads()
    try:
        _build(zoo, rebuild, console, workers, threads)
    except BaseException as exc:
        shutil.rmtree(zoo.root, ignore_errors=True)
        if isinstance(exc, ZooError | KeyboardInterrupt):
            raise
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ZooError(f"zoo build failed ({why}); the partial zoo at {zoo.root} was "
                       "removed. Run the command again; if it fails the same way, report it with this "
                       "message") from exc
    finally:
        torch.set_num_threads(prev_threads)
    info = zoo.info()
    print_calibration(info, console)
    cal = info["calibration"]
    if not cal["ok"]:
        if strict:
            raise ZooError(_shortfall_message(cal, zoo))
        if cfg_quick(zoo):
            console.print("[yellow]quick mode: the zoo is barely trained, calibration is not expected to hold[/yellow]")
    return zoo


def cfg_quick(zoo: Zoo) -> bool:
    return bool(zoo.config.quick)


def _shortfall_message(cal: dict[str, Any], zoo: Zoo) -> str:
    return ("zoo calibration failed (strict mode):\n  " + "\n  ".join(cal["failures"])
            + f"\n(zoo kept at {zoo.root}; without --strict the bench runs on it and reports the shortfall)")


def check_zoo(zoo: Zoo) -> None:
    """Raise :class:`ZooError` if a cached zoo lacks a model file (a zoo folder damaged after its build)."""
    want = [zoo.base_dir / "model.safetensors", zoo.mixture_dir / "model.safetensors"]
    for t in TASKS:
        want += [zoo.full_dir(t) / "model.safetensors", zoo.lora_dir(t) / "adapter_model.safetensors",
                 zoo.lora_merged_dir(t) / "model.safetensors"]
    missing = [str(p.relative_to(zoo.root)) for p in want if not p.is_file()]
    try:
        info = zoo.info()
        ok = "calibration" in info and "scores" in info
    except (OSError, ValueError):
        ok = False
    if missing or not ok:
        what = f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing" if missing else \
            "zoo.json unreadable"
        raise ZooError(f"the cached zoo at {zoo.root} is broken ({what}): rebuild it with --rebuild "
                       "(or delete the folder)")


def _build(zoo: Zoo, rebuild: bool, console: Any, workers: int | None, threads: int | None) -> None:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from omnimerge.bench.evaluate import build_suite, evaluate
    from omnimerge.bench.model import (
        Encoder,
        build_model,
        build_processor,
        quiet_transformers,
        save_checkpoint,
    )
    from omnimerge.bench.train import train

    quiet_transformers()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = zoo.config
    threads = threads or max(1, min(2, os.cpu_count() or 1))
    if workers is None:
        workers = 1 if cfg.quick else threads
    console.print(f"[bold]zoo build[/bold] -> {zoo.root}  (config {cfg.key()}{', quick mode' if cfg.quick else ''})")

    names = ["base"] + [f"{k}/{t}" for k in ("full", "lora") for t in TASKS] + ["mixture"]
    reused: dict[str, dict[str, Any]] = {}
    if not rebuild:
        for name in names:
            found = _find_stage(cfg, name, zoo)
            if found is not None and (name == "base" or "base" in reused):
                _reuse_stage(found[0], name, zoo)
                reused[name] = found[1]
                console.print(f"[green]reusing[/green] {name} from {found[0].name}")

    jobs = [("full", t) for t in TASKS if f"full/{t}" not in reused]
    jobs += [("lora", t) for t in TASKS if f"lora/{t}" not in reused]
    jobs += [("mixture", "all")] if "mixture" not in reused else []
    t0 = time.perf_counter()
    data = _datasets(cfg, base="base" not in reused) if jobs or "base" not in reused else {}
    if jobs:
        torch.save(data["tasks"], zoo.root / "tmp" / "tasks.pt")
    timings["data"] = time.perf_counter() - t0

    info: dict[str, Any] = {"version": ZOO_VERSION, "key": cfg.key(), "config": cfg.to_dict(), "train": {},
                            "scores": {}, "reused": sorted(reused)}
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:
        t0 = time.perf_counter()
        if "base" in reused:
            info["train"]["base"], info["scores"]["base"] = reused["base"]["train"], reused["base"]["test"]
        else:
            torch.set_num_threads(threads)  # kept for in-process expert jobs; build_zoo restores it
            pb = prog.add_task("base", total=cfg.base.steps)
            torch.manual_seed(cfg.seed)
            base = build_model(cfg.model, seed=cfg.seed)
            base_stats = train(base, data["base"], cfg.base, seed=cfg.seed,
                               progress=lambda s: prog.update(pb, completed=s))
            save_checkpoint(base, zoo.base_dir, build_processor(cfg.model))
            enc = Encoder()
            base_scores = evaluate(base, build_suite("test", cfg.n_test, cfg.seed, enc), enc)
            _write_stage(zoo, "base", base_stats, base_scores)
            info["train"]["base"], info["scores"]["base"] = base_stats, base_scores
            del base
        data = {}
        timings["base"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        bars = {}
        for kind, task in jobs:
            name = f"{kind}/{task}" if kind != "mixture" else "mixture"
            bars[name] = prog.add_task(name, total=cfg.spec(kind, task).steps)
        results = _run_jobs(jobs, cfg, zoo, bars, prog, workers) if jobs else []
        timings["experts"] = time.perf_counter() - t0

    for r in results:
        name = f"{r['kind']}/{r['task']}" if r["kind"] != "mixture" else "mixture"
        info["train"][name] = r["train"]
        info["scores"][name] = r["test"]
        _write_stage(zoo, name, r["train"], r["test"])
    for name, meta in reused.items():
        info["train"][name], info["scores"][name] = meta["train"], meta["test"]
    info["scores"] = {n: info["scores"][n] for n in names}
    info["calibration"] = calibration(info, cfg.min_gain)
    timings["total"] = time.perf_counter() - t_start
    info["timings"] = timings
    info["threads"] = {"base": threads, "expert_workers": workers, "expert_threads": 1}
    shutil.rmtree(zoo.root / "tmp", ignore_errors=True)
    zoo.info_path.write_text(json.dumps(info, indent=1))
    zoo.built = True


def _run_jobs(jobs: list[tuple[str, str]], cfg: ZooConfig, zoo: Zoo, bars: dict[str, Any], prog: Any,
              workers: int) -> list[dict[str, Any]]:
    import multiprocessing as mp
    import queue as queue_mod

    if workers <= 1:  # in-process, one job after the other (quick mode, tests): no process start-up cost
        direct = _DirectQueue(bars, prog)
        return [_job((kind, task, cfg.to_dict(), str(zoo.root), direct)) for kind, task in jobs]
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    q = manager.Queue()
    args = [(kind, task, cfg.to_dict(), str(zoo.root), q) for kind, task in jobs]
    # longest first: the mixture, then alternate families so both workers stay busy
    order = sorted(range(len(args)), key=lambda i: -{"mixture": cfg.mixture.steps, "full": cfg.full.steps,
                                                      "lora": cfg.lora.steps}[jobs[i][0]])
    results: list[dict[str, Any]] = []
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with ctx.Pool(processes=max(1, workers)) as pool:
            pending = pool.map_async(_job, [args[i] for i in order], chunksize=1)
            while not pending.ready():
                _drain(q, bars, prog, queue_mod)
                pending.wait(0.5)
            _drain(q, bars, prog, queue_mod)
            results = pending.get()
            pool.close()  # let the workers exit on their own (leaving the block terminates them: the resource
            pool.join()  # tracker then warned of a leaked semaphore at shutdown)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
        manager.shutdown()
    return results


class _DirectQueue:
    """Progress updates of in-process jobs (the same messages the worker processes send through a queue)."""

    def __init__(self, bars: dict[str, Any], prog: Any) -> None:
        self.bars, self.prog = bars, prog

    def put(self, item: tuple[str, int]) -> None:
        name, step = item
        if step < 0:
            self.prog.update(self.bars[name], description=f"{name} ✓")
        else:
            self.prog.update(self.bars[name], completed=step)


def _drain(q: Any, bars: dict[str, Any], prog: Any, queue_mod: Any) -> None:
    while True:
        try:
            name, step = q.get_nowait()
        except queue_mod.Empty:
            return
        if step < 0:
            prog.update(bars[name], description=f"{name} ✓")
        else:
            prog.update(bars[name], completed=step)


def matrix_rows(info: dict[str, Any], family: str) -> list[tuple[str, list[float]]]:
    rows = [("base", [info["scores"]["base"][t]["score"] for t in TASKS])]
    for e in TASKS:
        rows.append((f"{family}/{e}", [info["scores"][f"{family}/{e}"][t]["score"] for t in TASKS]))
    rows.append(("mixture", [info["scores"]["mixture"][t]["score"] for t in TASKS]))
    return rows


def print_calibration(info: dict[str, Any], console: Any) -> None:
    """Print the 5 x 5 expert x task matrices (with the base and the mixture model) of both families."""
    from rich.table import Table

    from omnimerge.bench.data import TASK_TITLES

    for fam in ("full", "lora"):
        tab = Table(title=f"zoo calibration, {fam} family (test accuracy, %)")
        tab.add_column("model")
        for t in TASKS:
            tab.add_column(TASK_TITLES[t], justify="right")
        base = info["scores"]["base"]
        for name, vals in matrix_rows(info, fam):
            cells = []
            for t, v in zip(TASKS, vals, strict=True):
                s = f"{100 * v:.1f}"
                if name.endswith("/" + t):
                    s = f"[bold]{s}[/bold] ({100 * (v - base[t]['score']):+.0f})"
                cells.append(s)
            tab.add_row(name, *cells)
        console.print(tab)
    cal = info["calibration"]
    if cal["ok"]:
        console.print("[green]calibration ok[/green]: every expert beats the base by >= "
                      f"{100 * info['config']['min_gain']:.0f} points on its task and beats the other experts there")
    else:
        console.print("[red]calibration failed[/red]:\n  " + "\n  ".join(cal["failures"]))


def load_zoo(config: ZooConfig, root: str | Path | None = None) -> Zoo:
    zoo = Zoo(config, root)
    if not zoo.exists():
        raise FileNotFoundError(f"no zoo at {zoo.root}; run `omnimerge zoo build`")
    return zoo


__all__ = ["Zoo", "ZooConfig", "ZooError", "check_zoo", "build_zoo", "cache_root", "calibration", "load_zoo", "print_calibration"]
