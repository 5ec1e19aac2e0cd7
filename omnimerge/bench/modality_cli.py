"""``omnimerge bench --suite modality``: the modality suite's command.

The bench CLI (:mod:`omnimerge.bench.cli`) dispatches ``--suite modality`` to :func:`bench_modality`; it also
runs on its own: ``python -m omnimerge.bench.modality_cli --out bench-results/modality``.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape


def bench_modality(out: Path, methods: list[str] | None = None, quick: bool = False, rebuild: bool = False,
                   seeds: list[int] | None = None) -> None:
    """Build (or reuse) the modality zoo, merge the vision/audio/video experts' LLMs with each method, evaluate
    every modality's tasks and the joint tasks; print the table, write results.{json,csv,md} and modality.png."""
    for k, v in (("OMP_WAIT_POLICY", "PASSIVE"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                 ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    from rich.console import Console
    from rich.markdown import Markdown

    from omnimerge.bench.modality import markdown, run_modality_bench

    console = Console()
    seeds = seeds or [0]
    if len(seeds) > 1:
        from omnimerge.bench.seeds import modality_markdown, run_modality_seeds

        agg = run_modality_seeds(out, seeds, console.print, methods=methods, quick=quick, rebuild=rebuild)
        console.print(Markdown(modality_markdown(agg)))
        console.print(f"results in {escape(str(out))} (each seed's run in seed-<s>/; {sum(agg['seconds']):.0f} s)")
        return
    res = run_modality_bench(out, methods=methods, quick=quick, rebuild=rebuild, log=console.print, seed=seeds[0])
    console.print(Markdown(markdown(res)))
    console.print(f"results in {escape(str(out))} ({res['seconds']:.0f} s)")


def main(
    out: Path = typer.Option(Path("bench-results/modality"), "--out", help="folder for results and the plot"),
    methods: str = typer.Option("", "--methods", help="comma-separated methods (default: every dense one)"),
    quick: bool = typer.Option(False, "--quick", help="CI-size run: barely trained zoo, few examples"),
    rebuild: bool = typer.Option(False, "--rebuild", help="retrain the modality zoo even if cached"),
) -> None:
    """Run the modality suite (vision, audio and video experts on one LLM; joint tasks)."""
    bench_modality(out, [m.strip() for m in methods.split(",") if m.strip()] or None, quick, rebuild)


if __name__ == "__main__":  # pragma: no cover
    typer.run(main)
