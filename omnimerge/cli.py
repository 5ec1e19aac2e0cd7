"""The ``omnimerge`` command line."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Merge fine-tuned (multimodal) LLMs into one model, and benchmark the merges.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (base_model, models, merge_method, parameters, ...)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output folder (a Hugging Face checkpoint)")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a recipe key, e.g. --set parameters.scaling=0.5 (repeatable)"),
    ] = None,
    device: Annotated[str, typer.Option(help="where the math runs: cpu or cuda")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    workers: Annotated[int, typer.Option(help="tensors merged concurrently (0: automatic)")] = 0,
    shard_size: Annotated[str | None, typer.Option(help="output shard size, e.g. 5GB (overrides the recipe)")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no progress bar")] = False,
    hash_inputs: Annotated[
        str,
        typer.Option("--hash", help="digest of every input file recorded in the model card: xxh3 (fast), sha256, "
                     "or none"),
    ] = "xxh3",
    recipe_format: Annotated[
        str, typer.Option("--format", help="recipe format: auto (detect), omnimerge, or mergekit (translated; "
                          "differences are printed and recorded in the model card)")
    ] = "auto",
    sync: Annotated[
        bool, typer.Option("--sync/--no-sync", help="flush the output to disk before finishing (--no-sync: faster; "
                           "a power loss soon after may leave it truncated)")
    ] = True,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue an unfinished earlier run of this merge into OUTPUT (killed, "
                           "out of memory, power loss): tensors it wrote that verify are kept, the output is "
                           "byte-identical to an uninterrupted run's; if this run fails or is interrupted, its "
                           "unfinished output is kept for the next --resume")
    ] = False,
) -> None:
    """Merge the experts of RECIPE into OUTPUT."""
    import_engine()
    from omnimerge.api import merge as do_merge
    from omnimerge.errors import RecipeError
    from omnimerge.recipe import load_recipe

    overrides = list(set_ or [])
    if shard_size:
        overrides.append(f"shard_size={shard_size}")
    if recipe_format not in ("auto", "omnimerge", "mergekit"):
        raise RecipeError(f"--format: expected auto, omnimerge or mergekit, got {recipe_format!r}")
    loaded = load_recipe(recipe, overrides, recipe_format)  # type: ignore[arg-type]
    report = do_merge(
        loaded,
        output,
        overwrite=overwrite,
        device=device,
        workers=workers or None,
        progress=not quiet,
        echo=lambda m: console.print(f"[yellow]note:[/] {escape(str(m))}", highlight=False),
        hash_inputs=hash_inputs,
        sync=sync,
        resume=resume,
    )
    out.print(f"[green]done[/] {escape(report.summary())}", highlight=False)


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="show one method's full documentation")] = None,
) -> None:
    """List every merge method with its parameters, defaults and paper."""
    from omnimerge.methods import get_method, registry
    from omnimerge.methods.modifiers import modifiers

    mods = modifiers()
    if name and name in mods and name not in registry():
        md = mods[name]
        out.print(f"[bold]{md.name}[/] (modifier, stage {md.stage}): {escape(md.summary)}\n[dim]{escape(md.paper)}[/]\n")
        out.print(escape(md.doc) + "\n")
        out.print(_param_table([md]))
        return
    if name:
        m = get_method(name)
        out.print(f"[bold]{m.name}[/]: {escape(m.summary)}\n[dim]{escape(m.paper)}[/] {m.url}\n")
        out.print(escape(m.doc) + "\n")
        caps = m.capabilities.describe()
        out.print(f"capabilities: {escape(', '.join(caps) if caps else 'whole tensors only')}\n")
        out.print(_param_table([m]))
        return
    for m in sorted(registry().values(), key=lambda m: m.name):
        out.print(f"[bold cyan]{m.name}[/] — {escape(m.summary)}\n  [dim]{escape(m.paper)}[/]")
        out.print(_param_table([m]))
    out.print("\n[bold]modifiers[/] (recipe key `modifiers:`, composed with any method above; "
              "`omnimerge methods NAME` for one):")
    for md in sorted(mods.values(), key=lambda m: m.name):
        out.print(f"[bold cyan]{md.name}[/] ({md.stage}) — {escape(md.summary)}\n  [dim]{escape(md.paper)}[/]")
        out.print(_param_table([md]))


def _param_table(ms: list) -> Table:  # type: ignore[type-arg]
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    t.add_column("parameter")
    t.add_column("default")
    t.add_column("range")
    t.add_column("meaning")
    for m in ms:
        for p in m.params:
            name = p.name + (" (per model)" if p.per_model else "")
            default = "auto" if p.default is None else repr(p.default)
            t.add_row(escape(name), escape(default), escape(p.describe_range()), escape(p.doc))
    return t


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="a checkpoint folder, cached hub id, or PEFT adapter folder")],
    tensors: Annotated[bool, typer.Option("--tensors", help="list every tensor with its component")] = False,
) -> None:
    """Print a checkpoint's components: tensor counts, parameters, dtypes, shapes."""
    from omnimerge.checkpoint.reader import Checkpoint, resolve_model_path
    from omnimerge.components import COMPONENTS, classify

    folder = resolve_model_path(path)
    if (folder / "adapter_config.json").is_file():
        from omnimerge.checkpoint.lora import describe_adapter

        out.print(describe_adapter(folder))
        return
    with Checkpoint(folder, path) as ck:
        size = sum(f.stat().st_size for f in ck.files)
        arch = ", ".join(ck.architectures) or "?"
        out.print(
            f"[bold]{escape(path)}[/]  model_type={escape(ck.model_type or '?')}  architectures={escape(arch)}\n"
            f"{len(ck.files)} weight file(s), {size / 1e6:.1f} MB, {len(ck.tensors)} tensors"
        )
        stats: dict[str, dict] = {}  # type: ignore[type-arg]
        rows = []
        for name, m in ck.tensors.items():
            comp = classify(name, m.shape)
            s = stats.setdefault(comp, {"n": 0, "params": 0, "dtypes": set(), "shapes": []})
            s["n"] += 1
            s["params"] += m.numel
            s["dtypes"].add(str(m.dtype).replace("torch.", ""))
            if len(s["shapes"]) < 3 and list(m.shape) not in s["shapes"]:
                s["shapes"].append(list(m.shape))
            rows.append((name, comp, m))
        t = Table(header_style="bold")
        for col in ("component", "tensors", "parameters", "dtypes", "example shapes"):
            t.add_column(col)
        total = sum(s["params"] for s in stats.values())
        for comp in COMPONENTS:
            if comp in stats:
                s = stats[comp]
                t.add_row(escape(comp), str(s["n"]), f"{s['params']:,} ({100 * s['params'] / max(total, 1):.1f}%)",
                          escape(", ".join(sorted(s["dtypes"]))), escape(" ".join(str(x) for x in s["shapes"])))
        out.print(t)
        if tensors:
            tt = Table(header_style="bold")
            for col in ("tensor", "component", "dtype", "shape"):
                tt.add_column(col)
            for name, comp, m in rows:
                tt.add_row(escape(name), escape(comp), str(m.dtype).replace("torch.", ""), str(list(m.shape)))
            out.print(tt)


@app.command("task-model")
def task_model(
    merged: Annotated[str, typer.Argument(help="a unified merge written with task_models: true (emr, consensus)")],
    task: Annotated[str, typer.Argument(help="the task: an expert's name as in the merge, or its 0-based number")],
    output: Annotated[str, typer.Option("-o", "--output", help="the task-specific checkpoint folder to write")],
    base: Annotated[str | None, typer.Option("--base", help="the base model (default: the one merged)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace OUTPUT if it exists")] = False,
) -> None:
    """Rebuild one expert's task-specific model from a unified merge and its per-task masks (emr, consensus)."""
    from omnimerge.task_models import write_task_model

    done = write_task_model(merged, task, output, base=base, overwrite=overwrite)
    out.print(f"[green]done[/] task {escape(repr(done['task']))} (rescaler {done['rescaler']:.4g}) -> "
              f"{escape(str(done['output']))}", highlight=False)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where the example family and merges go")] = Path(
        "omnimerge-demo"
    ),
    method: Annotated[str, typer.Option(help="merge method")] = "ties",
) -> None:
    """Build a small example family (a tiny Qwen2-VL base and three experts) and merge it."""
    from omnimerge.examples import run_demo

    run_demo(out_dir, method, echo=out.print)


@app.command()
def convert(
    recipe: Annotated[Path, typer.Argument(help="a recipe (omnimerge's or mergekit's format, detected)")],
    to: Annotated[str, typer.Option("--to", help="omnimerge or mergekit")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here (default: print)")] = None,
    source_format: Annotated[str, typer.Option("--from", help="auto (detect), omnimerge or mergekit")] = "auto",
) -> None:
    """Write the equivalent recipe in the other format; what computes differently is listed as comments."""
    import yaml

    from omnimerge import mergekit_format
    from omnimerge.errors import OmniMergeError
    from omnimerge.recipe import load_recipe, load_yaml

    if to not in ("omnimerge", "mergekit"):
        raise OmniMergeError(f"--to {to!r}: expected omnimerge or mergekit")
    try:
        text = recipe.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OmniMergeError(f"{recipe}: cannot read the recipe ({getattr(e, 'strerror', None) or e})") from None
    if source_format not in ("auto", "omnimerge", "mergekit"):
        raise OmniMergeError(f"--from {source_format!r}: expected auto, omnimerge or mergekit")
    source = source_format
    if source == "auto":
        source = "mergekit" if mergekit_format.is_mergekit_recipe(load_yaml(text, str(recipe))) else "omnimerge"
    if source == to:
        raise OmniMergeError(f"{recipe}: already a{'n' if to == 'omnimerge' else ''} {to} recipe")
    r = load_recipe(recipe, fmt=source)  # type: ignore[arg-type]
    if to == "omnimerge":
        text, diffs = r.to_yaml(), [d.removeprefix("mergekit recipe: ") for d in r.differences]
    else:
        data, diffs = mergekit_format.to_mergekit(r)
        text = yaml.safe_dump(data, sort_keys=False)
    head = f"# converted by omnimerge from {recipe.name} ({source} format)\n"
    body = head + "".join(f"# differs: {d}\n" for d in diffs) + text
    if output is None:
        typer.echo(body, nl=False)
        return
    from omnimerge.checkpoint.files import atomic_write

    try:
        atomic_write(output, lambda p: p.write_text(body, encoding="utf-8"))
    except OSError as e:
        raise OmniMergeError(f"{output}: cannot write the recipe ({e.strerror or e})") from None
    out.print(f"{to} recipe -> {output}", highlight=False, markup=False)
    for d in diffs:
        out.print(f"differs: {d}", highlight=False, markup=False)


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    from omnimerge.errors import OmniMergeError

    out: dict[str, str] = {}
    for v in values or []:
        key, sep, val = v.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise OmniMergeError(f"{option} {v!r}: expected TASK=VALUE")
        out[key.strip()] = val.strip()
    return out


@app.command()
def score(
    predictions: Annotated[Path, typer.Argument(help="a JSONL of predictions (rows with task, doc_id, prediction; "
                                                     "expression / question_index where a row holds several)")],
    out_dir: Annotated[Path, typer.Option("--out", help="where results.json, predictions.jsonl, results.md go")],
    data: Annotated[list[str] | None, typer.Option("--data", help="TASK=PATH (save_to_disk folder, parquet, "
                                                   "JSONL or hub id); default: the task's hub id, from the "
                                                   "local HF cache")] = None,
    box_format: Annotated[str, typer.Option("--box-format", help="how the model writes boxes: qwen2vl, "
                                            "qwen25vl, internvl, normalized")] = "normalized",
    split: Annotated[list[str] | None, typer.Option("--split", help="TASK=SPLIT (default: the task's "
                                                    "evaluation split)")] = None,
    images: Annotated[list[str] | None, typer.Option("--images", help="TASK=PATH: a separate image table "
                                                     "(GQA's testdev_balanced_images)")] = None,
    model: Annotated[str | None, typer.Option("--model", help="the row name in results.md")] = None,
    min_pixels: Annotated[int | None, typer.Option("--min-pixels", help="qwen25vl: the processor's min_pixels, "
                                                   "to recompute resized sizes")] = None,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", help="qwen25vl: the processor's "
                                                   "max_pixels")] = None,
) -> None:
    """Score predictions made by any harness against the tasks' data (results.json, scored predictions)."""
    from omnimerge.eval.results import rescore

    res = rescore(predictions, _pairs(data, "--data"), out_dir, box_format=box_format,
                  splits=_pairs(split, "--split"), image_sources=_pairs(images, "--images"), model=model,
                  min_pixels=min_pixels, max_pixels=max_pixels)
    _print_results(res, out_dir)



@app.command("eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="what to evaluate: checkpoint folders or hub ids in the local "
                                                "cache, PEFT adapter folders, or merge recipes (YAML, merged in "
                                                "memory); several give one row each in results.md")],
    tasks: Annotated[str | None, typer.Option("--tasks", help="comma-separated task names (chartqa,textvqa,"
                                              "refcoco,...), capability groups (vqa, geometry, chart, ocr, "
                                              "grounding) or 'paper' (the paper's ten sets)")] = None,
    suite: Annotated[str | None, typer.Option("--suite", help="a suite instead of tasks: 'mini' (the miniature "
                                              "benchmark's five tasks, on its own checkpoints)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="where results.json, predictions.jsonl, "
                                                 "results.md, results.png go (one subfolder per model when "
                                                 "several); with --tasks")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="TASK=PATH (save_to_disk folder, parquet, "
                                                   "JSONL or hub id); default: the task's hub id, from the "
                                                   "local HF cache")] = None,
    split: Annotated[list[str] | None, typer.Option("--split", help="SPLIT for every task, or TASK=SPLIT "
                                                    "(default: each task's evaluation split; the mini suite: "
                                                    "test)")] = None,
    images: Annotated[list[str] | None, typer.Option("--images", help="TASK=PATH: a separate image table "
                                                     "(GQA's testdev_balanced_images)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "--n", help="a seeded sample of this many examples "
                                              "per task (the mini suite: 500 by default)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="the seed of the --limit sample")] = 0,
    base: Annotated[str | None, typer.Option("--base", help="the base model of a PEFT adapter (default: "
                                             "its adapter_config.json's)")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16, float16 (default: float32 "
                                              "on CPU, bfloat16 on CUDA)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="requests per generate call")] = 8,
    box_format: Annotated[str, typer.Option("--box-format", help="auto (from the model's config), qwen2vl, "
                                            "qwen25vl, internvl, normalized")] = "auto",
    min_pixels: Annotated[int | None, typer.Option("--min-pixels", help="the processor's min_pixels "
                                                   "(Qwen2-VL/2.5-VL)")] = None,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", help="the processor's max_pixels "
                                                   "(Qwen2-VL/2.5-VL)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="the mini suite: also write its scores as "
                                                  "JSON here")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted evaluation into --out: the "
                                         "chunks it answered are kept (scored again), the rest generated; the "
                                         "same results as an uninterrupted run")] = False,
) -> None:
    """Evaluate models (or merges, in memory) on the paper's benchmarks: results per task, capability, overall."""
    from omnimerge.errors import OmniMergeError

    if (tasks is None) == (suite is None):
        raise OmniMergeError("eval: give --tasks (the paper's benchmarks) or --suite mini, one of them")
    if suite is not None:
        from omnimerge.eval.suites import get_suite

        run = get_suite(suite)
        if len(models) != 1 or len(split or []) > 1:
            raise OmniMergeError(f"--suite {suite}: one model and at most one --split")
        run(Path(models[0]), split=(split or ["test"])[0], n=500 if limit is None else limit, json_out=json_out)
        return
    if out_dir is None:
        raise OmniMergeError("eval --tasks: --out DIR is required (results.json, predictions.jsonl go there)")
    _eval_tasks(models, tasks or "", out_dir, data, split, images, limit, seed, base, device, dtype, batch_size,
                box_format, min_pixels, max_pixels, progress, resume)


def _eval_tasks(models: list[str], tasks: str, out_dir: Path, data: list[str] | None, split: list[str] | None,
                images: list[str] | None, limit: int | None, seed: int, base: str | None, device: str,
                dtype: str | None, batch_size: int, box_format: str, min_pixels: int | None,
                max_pixels: int | None, progress: bool, resume: bool = False) -> None:
    from omnimerge.errors import OmniMergeError
    from omnimerge.eval.results import write_table
    from omnimerge.eval.runner import evaluate, model_name

    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise OmniMergeError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    one = [v for v in split or [] if "=" not in v]
    if len(one) > 1 or (one and len(split or []) > 1):
        raise OmniMergeError("--split: give one SPLIT for every task, or TASK=SPLIT entries, not both")
    splits: dict[str, str] | str | None = one[0] if one else _pairs(split, "--split")
    names = [model_name(m) for m in models]
    dirs = [out_dir] if len(models) == 1 else [out_dir / _unique(n, names[:i]) for i, n in enumerate(names)]
    kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    data_by_task, images_by_task = _pairs(data, "--data"), _pairs(images, "--images")
    done: list[dict] = []
    for m, d in zip(models, dirs, strict=True):
        res = evaluate(m, tasks.split(","), out=d, data=data_by_task, splits=splits,
                       image_sources=images_by_task, limit=limit, seed=seed, base=base, device=device,
                       dtype=dtype, batch_size=batch_size, box_format=box_format, processor_kwargs=kwargs or None,
                       progress=progress, name=d.name if len(models) > 1 else None, resume=resume,
                       echo=lambda msg: console.print(f"[yellow]note:[/] {escape(str(msg))}", highlight=False))
        done.append(res)
        _print_results(res, d)
    if len(models) > 1:
        write_table(out_dir, done)
        out.print(f"{len(done)} models -> {out_dir / 'results.md'}", highlight=False)


def _unique(name: str, before: list[str]) -> str:
    return name if name not in before else f"{name}-{before.count(name) + 1}"


def _print_results(res: dict, where: Path) -> None:
    for name, t in res["tasks"].items():
        if t["value"] is None:
            out.print(f"{name}: no prediction scored ({t['skipped_images']} skipped)", highlight=False)
            continue
        extra = f", parse failures {t['parse_failures']}" if t["parse_failures"] else ""
        skipped = f", {t['skipped_images']} skipped (image)" if t["skipped_images"] else ""
        out.print(f"{name}: {t['metric']} {100 * t['value']:.2f} ± {100 * t['stderr']:.2f} (n={t['n']}"
                  f"{extra}{skipped})", highlight=False)
    if res["overall"]["value"] is not None:
        out.print(f"{res['model']}: overall {100 * res['overall']['value']:.2f} ± "
                  f"{100 * res['overall']['stderr']:.2f} over {len(res['overall']['tasks'])} task(s) -> {where}",
                  highlight=False)

@app.command()
def search(
    recipe: Annotated[Path, typer.Argument(help="a merge recipe with a search: section (objective, ranges, sampler)")],
    trials: Annotated[int, typer.Option("--trials", help="the study's trial budget (across every worker)")],
    out_dir: Annotated[Path, typer.Option("--out", help="where the study journal, best.yaml, trials.csv, "
                                                       "summary.json and the plots go")],
    storage: Annotated[str | None, typer.Option("--storage", help="an optuna database URL (e.g. postgresql://...) "
                                                "shared by several worker processes; default: a journal file in "
                                                "--out")] = None,
    seed: Annotated[int, typer.Option("--seed", help="the sampler's seed")] = 0,
    study_name: Annotated[str | None, typer.Option("--study-name", help="default: the recipe's file name")] = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="--no-report: run trials only (an extra "
                                         "worker), write no outputs")] = True,
) -> None:
    """Search merge coefficients on validation data (optuna); re-running the same command continues the study."""
    import_engine()
    from omnimerge.search.run import run_search

    run_search(recipe, trials, out_dir, storage=storage, seed=seed, study_name=study_name, report=report,
               echo=lambda m: console.print(escape(str(m)), highlight=False, soft_wrap=True))


@app.command()
def stats(
    expert: Annotated[str, typer.Argument(help="the expert: a checkpoint folder (or a PEFT adapter folder)")],
    calib: Annotated[str, typer.Option("--calib", help="calibration data: bench:TASK[,TASK...] (the miniature "
                                       "suite's training split) or a JSONL of prompts (+ images, answers)")],
    out_file: Annotated[Path, typer.Option("-o", "--out", help="the statistics file to write (.safetensors)")],
    kind: Annotated[str, typer.Option("--kind", help="gram (RegMean's input Grams) or fisher (diagonal "
                                      "Fisher)")] = "gram",
    n: Annotated[int, typer.Option("--n", help="examples (per task for bench:)")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="examples per forward (Grams; the Fisher "
                                            "takes one at a time)")] = 8,
    fisher: Annotated[str, typer.Option("--fisher", help="true (labels drawn from the model) or empirical (the "
                                        "data's answers)")] = "true",
    include: Annotated[str | None, typer.Option(help="only weights whose name matches this regex")] = None,
    exclude: Annotated[str | None, typer.Option(help="leave out weights whose name matches this regex")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of the sampled labels (true Fisher) and the bench data")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing statistics file")] = False,
) -> None:
    """Collect an expert's statistics for the data-aware methods (regmean: --kind gram; fisher: --kind fisher)."""
    from omnimerge.errors import OmniMergeError
    from omnimerge.eval.models import load_model
    from omnimerge.stats import collect_fisher, collect_grams, save_statistics

    if kind not in ("gram", "fisher"):
        raise OmniMergeError(f"--kind: expected gram or fisher, got {kind!r}")
    if n < 1 or batch_size < 1:
        raise OmniMergeError("--n and --batch-size must be at least 1")
    if out_file.exists() and not overwrite:
        raise OmniMergeError(f"{out_file}: already exists (use --overwrite to replace it)")
    loaded = load_model(expert, device=device)  # float32 on the CPU, bfloat16 on CUDA; sums in float64
    bs = batch_size if kind == "gram" else 1
    batches, source = _calibration(calib, loaded, expert, n, bs, seed)
    model = loaded.model
    if kind == "gram":
        res = collect_grams(model, batches, include=include, exclude=exclude)
    else:
        res = collect_fisher(model, batches, mode=fisher, seed=seed, include=include, exclude=exclude)
    weights_from = loaded.path if loaded.path is not None else Path(expert)
    done = save_statistics(res, out_file, weights_from, manifest={**source, "batch_size": bs, "device": device,
                                                                  "include": include, "exclude": exclude})
    count = res.manifest.get("tokens")
    tokens = sum(count.values()) if isinstance(count, dict) else count
    out.print(f"[green]done[/] {res.kind}: {len(res.tensors)} tensors, {tokens} tokens, "
              f"{res.manifest['seconds']:.1f} s -> {escape(str(done))}", highlight=False)


def _calibration(calib: str, loaded: object, expert: str, n: int, bs: int, seed: int) -> tuple[object, dict]:
    """Calibration batches for ``--calib`` (bench:TASKS or a JSONL) and what the manifest records of them."""
    if calib.startswith("bench:"):
        from omnimerge.bench.calibration import SPLIT, bench_batches

        tasks = [t for t in calib[len("bench:"):].split(",") if t]
        return bench_batches(tasks, n, bs, seed), {"data": calib, "split": SPLIT, "n_per_task": n}
    from omnimerge.checkpoint.files import file_digest
    from omnimerge.stats.data import jsonl_batches

    path = Path(calib)
    batches = jsonl_batches(path, loaded.processor, loaded.config, n=n, batch_size=bs,  # type: ignore[attr-defined]
                            what=f"'{expert}'")
    return batches, {"data": str(path.resolve()) if path.is_file() else calib, "n": n,
                     "data_digest": file_digest(path, "xxh3_128") if path.is_file() else None}


@app.command("stats-plusplus")
def stats_plusplus(
    base: Annotated[str, typer.Argument(help="the base model folder")],
    experts: Annotated[list[str], typer.Argument(help="the experts' checkpoint folders")],
    calib: Annotated[list[str], typer.Option("--calib", help="per expert, in order (or one for all): "
                                             "bench:TASK[,TASK] or a JSONL")],
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="folder for one statistics file per expert")],
    alpha: Annotated[float, typer.Option("--alpha", help="regmean's reduce_non_diagonal_ratio used for the "
                                         "merged earlier layers (merge with the same value)")] = 0.6,
    n: Annotated[int, typer.Option("--n", help="examples (per task for bench:)")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of the bench data")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace existing statistics files")] = False,
) -> None:
    """RegMean++ Grams: each layer's inputs from the already merged earlier layers (then merge with regmean)."""
    from omnimerge.errors import OmniMergeError
    from omnimerge.eval.models import load_model
    from omnimerge.stats import save_statistics
    from omnimerge.stats.plusplus import regmean_plusplus_grams

    if len(calib) not in (1, len(experts)):
        raise OmniMergeError(f"--calib: give one calibration set per expert ({len(experts)}) or one for all, "
                             f"got {len(calib)}")
    outs = [out_dir / f"{Path(e.rstrip('/')).name or f'expert{i}'}.safetensors" for i, e in enumerate(experts)]
    if len(set(outs)) != len(outs):
        outs = [out_dir / f"expert{i}.safetensors" for i in range(len(experts))]
    for o in outs:
        if o.exists() and not overwrite:
            raise OmniMergeError(f"{o}: already exists (use --overwrite to replace it)")
    base_m = load_model(base, device=device)
    loaded = [load_model(e, device=device) for e in experts]
    data, sources = [], []
    for i, e in enumerate(experts):
        batches, src = _calibration(calib[i if len(calib) > 1 else 0], loaded[i], e, n, batch_size, seed)
        data.append(list(batches))  # type: ignore[call-overload]
        sources.append(src)
    res = regmean_plusplus_grams(base_m.model, [lm.model for lm in loaded], data, alpha=alpha,
                                 log=lambda m: console.print(f"[yellow]note:[/] {escape(str(m))}", highlight=False))
    for r, lm, e, o, src in zip(res, loaded, experts, outs, sources, strict=True):
        save_statistics(r, o, lm.path or Path(e), manifest={**src, "batch_size": batch_size, "device": device,
                                                             "base": str(base)})
    out.print(f"[green]done[/] RegMean++ Grams for {len(experts)} experts -> {escape(str(out_dir))} (merge with "
              f"merge_method: regmean, reduce_non_diagonal_ratio: {alpha})", highlight=False)


@app.command()
def adamerge(
    recipe: Annotated[Path, typer.Argument(help="a task_arithmetic recipe (base, experts, select, dtype)")],
    data: Annotated[list[str], typer.Option("--data", help="unlabelled adaptation inputs, one task each: "
                                            "bench:TASK[,TASK] (the miniature suite) or a JSONL of prompts "
                                            "(+ images; answers are never read); repeatable")],
    out_recipe: Annotated[Path, typer.Option("-o", "--out", help="the learned recipe to write (.yaml)")],
    split: Annotated[str, typer.Option("--split", help="bench: split whose inputs are read: test (AdaMerging's "
                                       "protocol), validation or train")] = "test",
    n: Annotated[int, typer.Option("--n", help="examples per task")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="examples per task per step")] = 16,
    steps: Annotated[int, typer.Option("--steps", help="Adam steps (one batch of every task each)")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="Adam's learning rate")] = 1e-3,
    granularity: Annotated[str, typer.Option("--granularity", help="task (one coefficient per expert) or layer "
                                             "(per expert and decoder layer, + one for the rest)")] = "task",
    init: Annotated[float, typer.Option("--init", help="initial coefficient (the paper: 0.3)")] = 0.3,
    answer_tokens: Annotated[int, typer.Option("--answer-tokens", help="entropy over the first K answer tokens "
                                               "(K-1 decoded greedily)")] = 1,
    seed: Annotated[int, typer.Option(help="seed of the batch order (and of the bench data)")] = 0,
    merge_out: Annotated[Path | None, typer.Option("--merge", help="also merge the learned recipe into this "
                                                   "folder (the streaming engine)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output recipe / --merge folder")] = False,
) -> None:
    """Learn task-arithmetic coefficients by AdaMerging (entropy minimisation on unlabelled inputs)."""
    import_engine()
    from omnimerge.adamerging import (
        GRANULARITIES,
        adamerge,
        adaptation_batches,
        check_data,
        check_recipe,
        header_of,
        write_recipe,
    )
    from omnimerge.checkpoint.reader import resolve_model_path
    from omnimerge.errors import OmniMergeError
    from omnimerge.eval.models import load_config, load_model
    from omnimerge.recipe import load_recipe

    if granularity not in GRANULARITIES:
        raise OmniMergeError(f"--granularity: expected task or layer, got {granularity!r}")
    if n < 1 or batch_size < 1 or steps < 0 or answer_tokens < 1:
        raise OmniMergeError("--n, --batch-size and --answer-tokens must be at least 1, --steps at least 0")
    for p in (out_recipe, merge_out):
        if p is not None and p.exists() and not overwrite:
            raise OmniMergeError(f"{p}: already exists (use --overwrite to replace it)")
    r = load_recipe(recipe)
    check_recipe(r)
    base_dir = resolve_model_path(r.base_model, r.base_path)
    sources = check_data(data, split, n, load_config(base_dir))  # before any model loads
    loaded = load_model(base_dir, device=device)
    batches, names, banned = adaptation_batches(sources, loaded, split=split, n=n, batch_size=batch_size, seed=seed)
    res = adamerge(r, loaded.model, batches, steps=steps, lr=lr, granularity=granularity, init=init, seed=seed,
                   answer_tokens=answer_tokens, banned=banned, device=device)
    write_recipe(res, out_recipe, header_of(res, data, split))
    before, after = res.info["entropy_first_batches"]
    out.print(f"[green]done[/] {granularity}-wise AdaMerging over {len(names)} task(s) ({', '.join(names)}), "
              f"{steps} steps, {res.seconds:.1f} s: entropy {before:.4f} -> {after:.4f} -> "
              f"{escape(str(out_recipe))}", highlight=False)
    if granularity == "task":
        out.print("coefficients: " + ", ".join(f"{x:.4f}" for x in res.coefficients[:, 0].tolist()), highlight=False)
    if merge_out is not None:
        import omnimerge

        omnimerge.merge(out_recipe, merge_out, overwrite=overwrite, progress=False, device=device)
        out.print(f"[green]merged[/] -> {escape(str(merge_out))}", highlight=False)


def _register_plugins() -> None:
    try:
        from omnimerge.bench.cli import register
    except ImportError as e:  # the benchmark package is optional at import time only
        if "omnimerge.bench" not in str(e):
            raise
        return
    register(app)


_register_plugins()


def import_engine() -> None:
    """Import torch and the engine with the cyclic GC paused, then freeze what was imported: the GC passes over
    torch's large module heap cost ~0.15 s at import and ~0.2 s more at interpreter exit, and free nothing."""
    was = gc.isenabled()
    gc.disable()
    try:
        import omnimerge.engine  # noqa: F401
    finally:
        if was:
            gc.enable()
        gc.freeze()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C (the temporary output folder is removed on the way out)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []  # the termination signal caught, if any (typer reports it only as exit code 130)


def _on_signal(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Terminated(signum)


def _catch_termination() -> None:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_signal)


def main() -> None:
    """Entry point: user errors print one line (no traceback) and exit with status 2; SIGINT, SIGTERM and SIGHUP
    remove what the run had begun to write and exit with 128 + the signal's number."""
    from omnimerge.errors import OmniMergeError

    _catch_termination()
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit instead of raising it
        if rc == 130 and _received:
            _interrupted(Terminated(_received[0]))
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except OmniMergeError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except (typer.Exit, SystemExit) as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C (and Terminated) into Exit(130)
            _interrupted(e.__cause__)
        code = getattr(e, "exit_code", None)
        if code is None:
            code = getattr(e, "code", 0)
        sys.exit(code or 0)
    except Exception as e:  # usage errors (a missing argument, an unknown option) and the like
        usage, abort = _click_errors()
        if isinstance(e, usage):
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if isinstance(e, abort):
            sys.exit(1)
        raise


def _interrupted(e: KeyboardInterrupt) -> None:
    if isinstance(e, Terminated):
        import signal

        console.print(f"[red]terminated[/] ({signal.Signals(e.signum).name})")
        sys.exit(128 + e.signum)
    console.print("[red]interrupted[/]")
    sys.exit(130)


def _click_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """click's usage-error and abort classes: typer >= 0.23 raises those of its vendored copy of click
    (``typer._click``), older typer those of click itself; both are matched."""
    import importlib

    usage: list[type[BaseException]] = []
    abort: list[type[BaseException]] = []
    for mod in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, "ClickException"):
            usage.append(m.ClickException)
        if hasattr(m, "Abort"):
            abort.append(m.Abort)
    return tuple(usage), tuple(abort)


if __name__ == "__main__":
    main()
