"""CLI commands of the benchmark: ``bench``, ``zoo build|info``, and the ``mini`` suite of ``omnimerge eval``.

The core CLI calls :func:`register`; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from omnimerge.errors import OmniMergeError


class BenchError(OmniMergeError):
    """The zoo's calibration or the bench's discrimination check failed (the CLI prints it, exit status 2)."""


def _env() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _console() -> Any:
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=150)


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def bench(
    out: Path = typer.Option(Path("bench-results"), "--out", help="folder for results.json/csv/md and plots"),
    methods: str = typer.Option("", "--methods", help="comma-separated methods (default: every registered one)"),
    families: str = typer.Option("full,lora", "--families", help="expert families: full, lora"),
    quick: bool = typer.Option(False, "--quick", help="CI-size run: tiny zoo, few examples (checks not enforced)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="rebuild the zoo even if a cached one matches"),
    suite: str = typer.Option("mini", "--suite", help="mini (the five capability tasks) or modality "
                              "(vision/audio/video experts on one LLM, and joint tasks)"),
    seeds: str = typer.Option("0", "--seeds", help="zoo seeds, e.g. 0,1,2: one zoo per seed (each cached), "
                              "results as mean ± s.d. over seeds in OUT, each seed's run in OUT/seed-<s>"),
    strict: bool = typer.Option(False, "--strict", help="exit with status 2 if the zoo's calibration, the "
                                "discrimination check or a method fails (the results are written first)"),
    threads: int = typer.Option(0, "--threads", help="torch threads for training the zoo (default: min(2, "
                                "cores)); float results may differ in the last bits with another count"),
    adamerging: str = typer.Option("", "--adamerging", help="opt-in AdaMerging rows: task, layer or task,layer "
                                   "(coefficients learned on the test inputs without labels; ~1 min per row "
                                   "and family on 2 cores)"),
) -> None:
    """Run the miniature MLLM merging benchmark (builds or reuses the zoo first)."""
    _env()
    try:
        from omnimerge.bench.seeds import parse_seeds

        seed_list = parse_seeds(seeds)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if threads < 0:
        raise BenchError(f"--threads: expected a positive number of threads, got {threads}")
    from omnimerge.bench.adamerging import parse_granularities

    try:
        ada = parse_granularities(adamerging)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if suite == "modality":
        from omnimerge.bench.modality_cli import bench_modality

        bench_modality(out, _split(methods), quick, rebuild, seeds=seed_list)
        return
    if suite != "mini":
        raise BenchError(f"--suite: unknown suite {suite!r} (known: mini, modality)")
    from omnimerge.bench.runner import run_bench

    console = _console()
    kw = dict(methods=_split(methods), families=_split(families) or ["full", "lora"], quick=quick,
              rebuild=rebuild, strict=strict, threads=threads or None, adamerging=ada)
    if len(seed_list) == 1:
        run_bench(out, console=console, seed=seed_list[0], **kw)  # type: ignore[arg-type]
    else:
        from omnimerge.bench.seeds import run_mini_seeds

        run_mini_seeds(out, seed_list, console, **kw)
    console.print(f"results written to {escape(str(out))}/ (results.json, results.md, *.png"
                  + (", results.csv)" if len(seed_list) == 1 else "; each seed's run in seed-<s>/)"))


def mini_suite(model: Path, *, split: str = "test", n: int = 500, json_out: Path | None = None) -> None:
    """Evaluate a checkpoint (or peft adapter folder) on the mini suite (the bench's five tasks):
    ``omnimerge eval MODEL --suite mini [--split test|validation] [--n 500] [--json FILE]``."""
    _env()
    if split not in ("test", "validation"):
        raise OmniMergeError(f"--split {split!r}: the mini suite has test and validation")
    if n < 1:
        raise OmniMergeError(f"--n {n}: at least one example per task")
    import json

    import torch
    from rich.table import Table

    from omnimerge.bench import TASKS
    from omnimerge.bench.data import TASK_TITLES
    from omnimerge.bench.evaluate import build_suite, evaluate, mean_score
    from omnimerge.bench.model import Encoder, load_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    enc = Encoder()
    m = load_model(model)
    res = evaluate(m, build_suite(split, n, 0, enc), enc)
    mean, se = mean_score(res)
    tab = Table(title=f"{model} on the mini suite ({split}, {n} per task, % ± s.e.)")
    for t in TASKS:
        tab.add_column(TASK_TITLES[t], justify="right")
    tab.add_column("Avg.", justify="right")
    tab.add_row(*[f"{100 * res[t]['score']:.1f}±{100 * res[t]['se']:.1f}" for t in TASKS], f"{100 * mean:.1f}±{100 * se:.1f}")
    _console().print(tab)
    if json_out is not None:
        json_out.write_text(json.dumps({"model": str(model), "split": split, "scores": res, "mean": mean,
                                        "mean_se": se}, indent=1))


zoo_app = typer.Typer(help="The benchmark's model zoo (base, experts, mixture model).", no_args_is_help=True)


@zoo_app.command("build")
def zoo_build(
    quick: bool = typer.Option(False, "--quick", help="the CI-size zoo"),
    rebuild: bool = typer.Option(False, "--rebuild", help="rebuild even if cached"),
    seed: int = typer.Option(0, "--seed", min=0, help="the zoo's seed (data, initialisation, training)"),
    strict: bool = typer.Option(False, "--strict", help="exit with status 2 if the calibration fails"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads for training (default: min(2, cores))"),
) -> None:
    """Train (or reuse) the zoo and print its calibration matrix."""
    _env()
    from omnimerge.bench.runner import print_shortfall
    from omnimerge.bench.zoo import ZooConfig, build_zoo, print_calibration

    console = _console()
    cfg = ZooConfig.quick_config(seed) if quick else ZooConfig(seed=seed)
    zoo = build_zoo(cfg, rebuild=rebuild, console=console, strict=strict, threads=threads or None)
    info = zoo.info()
    if not info["calibration"]["ok"]:
        print_shortfall(info["calibration"], console, quick=quick)
    if not zoo.built:  # a fresh build has printed it already
        print_calibration(info, console)
    t = info.get("timings", {})
    console.print(f"zoo at {escape(str(zoo.root))}; build times: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))


@zoo_app.command("info")
def zoo_info(quick: bool = typer.Option(False, "--quick", help="the CI-size zoo"),
             seed: int = typer.Option(0, "--seed", min=0, help="the zoo's seed")) -> None:
    """Where the zoo is cached, its config and calibration."""
    _env()
    from omnimerge.bench.zoo import Zoo, ZooConfig, print_calibration

    console = _console()
    zoo = Zoo(ZooConfig.quick_config(seed) if quick else ZooConfig(seed=seed))
    if not zoo.exists():
        raise BenchError(f"no zoo built at {zoo.root} (run `omnimerge zoo build{' --quick' if quick else ''}`)")
    print_calibration(zoo.info(), console)
    console.print(f"zoo at {escape(str(zoo.root))}")


def register(app: typer.Typer) -> None:
    """Add ``bench`` and the ``zoo`` sub-commands to the omnimerge CLI, and the ``mini`` suite to ``eval``."""
    app.command("bench")(bench)
    from omnimerge.eval.suites import register_suite

    register_suite("mini", mini_suite)
    app.add_typer(zoo_app, name="zoo")
