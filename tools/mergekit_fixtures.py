"""Compute the mergekit fixtures under ``tests/fixtures/mergekit/`` with mergekit 0.1.5 itself.

Run with mergekit's own interpreter (CI never needs mergekit; the tests read what this wrote)::

    /tmp/omnimerge-perf/mergekit-venv/bin/python tools/mergekit_fixtures.py

(``python -m benchmarks.perf.run --with-mergekit`` creates that environment.) It builds the tiny Llama inputs of
``tests/mergekit_inputs.py`` in a temporary folder and writes:

* ``resolver.json``: per recipe (gradients, filters, filters whose values are gradients, SLERP's filtered ``t``),
  for every output tensor the parameters mergekit's planner resolved (its ``parameter_resolver`` through
  ``MergePlanner``: shared ones and per input model), and the SHA-256 of each input;
* ``slices_linear/``: mergekit-yaml's output for a two-slice ``linear`` recipe over two sources with different
  layer ranges and parameters at the source, slice and top level (``model.safetensors``, ``config.json``,
  ``recipe.yaml``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "mergekit"
sys.path.insert(0, str(ROOT / "tests"))

import mergekit_inputs  # noqa: E402  (tests/mergekit_inputs.py: torch and safetensors only)

RESOLVER_RECIPES: dict[str, dict] = {
    "gradients": {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": [0.0, 0.3, 1.0]}},
                   {"model": "b", "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": [1.0, 0.5], "normalize": False},
    },
    "filters": {
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [{"filter": "q_proj", "value": 2.0}]}},
                   {"model": "b", "parameters": {"weight": 0.5}}],
        "parameters": {"density": [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.7},
                                   {"value": 0.5}],
                       "weight": 1.0, "lambda": [{"filter": "lm_head", "value": 0.5}, {"value": 1.0}]},
    },
    "filters_gradients": {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [{"filter": "layers.1.", "value": 3.0}]}},
                   {"model": "b"}],
        "parameters": {"weight": [{"filter": "self_attn", "value": [0.0, 1.0]},
                                  {"filter": "mlp", "value": [1.0, 0.2, 0.6]}, {"value": 0.4}],
                       "lambda": [{"filter": "embed", "value": 0.25}, {"value": [0.8, 1.2]}]},
    },
    "slerp": {  # mergekit's examples/gradient-slerp.yml
        "merge_method": "slerp", "base_model": "base",
        "models": [{"model": "base"}, {"model": "a"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
    },
}

SLICES_LINEAR = {
    "merge_method": "linear", "dtype": "float32",
    "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]},
                     {"model": "b", "layer_range": [1, 3], "parameters": {"weight": 0.3}}],
         "parameters": {"weight": 0.7}},
        {"sources": [{"model": "a", "layer_range": [3, 4]}, {"model": "b", "layer_range": [3, 4]}]},
    ],
    "parameters": {"weight": 1.0},
}


def _plain(v: object) -> object:
    """mergekit's immutable maps (and their values) as JSON: mappings by items(), models by path."""
    if hasattr(v, "items"):
        return {str(getattr(getattr(k, "model", None), "path", k)): _plain(x) for k, x in v.items()}
    return v


def resolve(recipe: dict) -> dict[str, dict]:
    """Every output tensor's parameters as mergekit's planner resolves them for ``recipe`` (cwd: the inputs)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions()
    LoaderCache().setup(options=options)
    base_cfg = ModelReference.model_validate("base").config()
    arch = get_architecture_info(config, options)
    planner = MergePlanner(config, arch, options=options, out_model_config=base_cfg)
    planner._plan()  # the planner's per-tensor resolution, without executing anything
    out: dict[str, dict] = {}
    for weight, task in planner._tensors:
        assert isinstance(task, ExecuteMergeMethodTask)
        out[weight.name] = {"shared": _plain(task.parameters), "per_model": _plain(task.input_parameters)}
    return out


#: an example with one key changed (name -> (example, change)): arcee_fusion in float32, where mergekit does
#: not round its inputs to bfloat16 first
VARIANTS = {"arcee_fusion-float32": ("arcee_fusion", {"dtype": "float32"})}


def examples(work: Path, exe: Path, env: dict[str, str]) -> None:
    """mergekit-yaml on each of its example recipes (``tests/fixtures/mergekit/examples/*.yml``) over the tiny
    40-layer inputs; its outputs kept in ``examples/<name>/`` (weights and config.json)."""
    root = work / "examples-in"
    digests = mergekit_inputs.build_examples(root)
    status = {}
    runs = [(f.stem, f, {}) for f in sorted((OUT / "examples").glob("*.yml"))]
    runs += [(name, OUT / "examples" / f"{src}.yml", change) for name, (src, change) in VARIANTS.items()]
    for stem, f, change in runs:
        recipe = {**mergekit_inputs.localise(yaml.safe_load(f.read_text()), root), **change}
        (work / f"{stem}.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = work / f"out-{stem}"
        r = subprocess.run([str(exe), str(work / f"{stem}.yml"), str(out), "--no-copy-tokenizer", "--quiet",
                            "--random-seed", "0"], env=env, capture_output=True, text=True)
        status[stem] = r.returncode
        if r.returncode != 0:
            print(f"{stem}: mergekit failed: {r.stderr.strip().splitlines()[-1]}")
            continue
        dest = OUT / "examples" / stem
        dest.mkdir(exist_ok=True)
        shutil.copy(out / "model.safetensors", dest / "model.safetensors")
        shutil.copy(out / "config.json", dest / "config.json")
    (OUT / "examples" / "inputs.json").write_text(json.dumps({"inputs": digests, "mergekit_exit": status},
                                                             indent=1) + "\n")


def main() -> None:
    import mergekit

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        digests = mergekit_inputs.build(work)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            fixture = {"mergekit_version": getattr(mergekit, "__version__", "0.1.5"), "inputs": digests,
                       "recipes": {k: {"recipe": r, "tensors": resolve(r)} for k, r in RESOLVER_RECIPES.items()}}
            (OUT / "resolver.json").write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
            exe = Path(sys.executable).parent / "mergekit-yaml"
            # absolute paths: mergekit's model card looks a bare name up on the hub
            run = json.loads(json.dumps(SLICES_LINEAR))
            for sl in run["slices"]:
                for src in sl["sources"]:
                    src["model"] = str(work / src["model"])
            (work / "slices.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            subprocess.run([str(exe), "slices.yaml", "out-slices", "--no-copy-tokenizer", "--quiet"], check=True,
                           env=env)
            dest = OUT / "slices_linear"
            dest.mkdir(exist_ok=True)
            for f in ("model.safetensors", "config.json"):
                shutil.copy(work / "out-slices" / f, dest / f)
            (dest / "recipe.yaml").write_text(yaml.safe_dump(SLICES_LINEAR, sort_keys=False))
            (dest / "inputs.json").write_text(json.dumps(digests, indent=1) + "\n")
            examples(work, exe, env)
        finally:
            os.chdir(cwd)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
