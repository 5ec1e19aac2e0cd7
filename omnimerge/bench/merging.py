"""How the bench merges: through ``omnimerge.merge`` on the saved checkpoints, with one in-memory stand-in.

* :func:`merge_to_dir` writes a merged checkpoint folder with ``omnimerge.merge(recipe, out)``. Only while the core
  has no ``omnimerge.merge`` yet (early development) does it fall back to :func:`_merge_in_memory`, which applies
  the registered method functions tensor by tensor to the same safetensors files; ``results.json`` records which
  path ran (``merge_engine``).
* :func:`lora_inputs` decides what the LoRA family feeds to the merger: the peft adapter folders themselves
  (task vector = (alpha/r) B A, exact) when ``omnimerge.merge`` accepts them, else the experts'
  ``merge_and_unload()``-ed full checkpoints. The choice is made once, by checking that both give the same merge.
* The lambda grid: every method returns ``lambda * (unscaled merge)``, so the bench merges once with
  ``scaling = 1`` and forms ``W0 + lambda (W1 - W0)`` in memory for every lambda of the grid
  (:func:`interpolate`). Exact for every method whose only use of ``scaling`` is that final multiplication.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: what the bench merges (component names of omnimerge.components); see docs/benchmark.md "Selection"
DEFAULT_SELECT: dict[str, list[str]] = {
    "include": ["language_model", "vision_tower", "projector"],
    "exclude": [],
}
LAMBDA_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)


def has_core_merge() -> bool:
    import omnimerge

    return callable(getattr(omnimerge, "merge", None))


def has_scaling(method: Any) -> bool:
    """A method has a lambda grid iff it declares a parameter named ``scaling``."""
    return has_param(method, "scaling")


def has_param(method: Any, name: str) -> bool:
    return any(p.name == name for p in method.params)


def make_recipe(
    method: str,
    base: str | Path,
    experts: Sequence[str | Path],
    params: dict[str, Any] | None = None,
    select: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "merge_method": method,
        "parameters": dict(params or {}),
        "select": dict(select or DEFAULT_SELECT),
        "dtype": "float32",
    }
    return recipe


def merge_to_dir(recipe: dict[str, Any], out: str | Path) -> str:
    """Merge ``recipe`` into the checkpoint folder ``out``; returns the engine used (``omnimerge.merge``/``in-memory``)."""
    out = Path(out)
    if has_core_merge():
        import omnimerge

        try:
            omnimerge.merge(recipe, str(out), overwrite=True, progress=False, hash_inputs=False)
        except TypeError:  # an older core without hash_inputs
            omnimerge.merge(recipe, str(out), overwrite=True, progress=False)
        return "omnimerge.merge"
    _merge_in_memory(recipe, out)
    return "in-memory"


# ---------------------------------------------------------------------------------------------------------------
# the stand-in used only while omnimerge.merge is missing


_COMPONENT_PATTERNS = {
    "vision_tower": ("vision_tower.",),
    "projector": ("multi_modal_projector.",),
    "embedding": ("embed_tokens",),
    "lm_head": ("lm_head",),
}


def _component(name: str, t: Any) -> str:
    for comp, pats in _COMPONENT_PATTERNS.items():
        if any(p in name for p in pats):
            return comp
    if "language_model" in name:
        if t.dim() == 2:
            return "language_model"
        return "norm" if "norm" in name else "bias"
    return "other"


def _selected(name: str, t: Any, select: dict[str, list[str]]) -> bool:
    import re

    comp = _component(name, t)

    def hit(pats: list[str]) -> bool:
        return any(p == comp or (p not in _ALL_COMPONENTS and re.search(p, name)) for p in pats)

    return hit(select.get("include", ["language_model"])) and not hit(select.get("exclude", []))


_ALL_COMPONENTS = {"language_model", "embedding", "lm_head", "norm", "bias", "vision_tower", "audio_tower",
                   "projector", "other"}


def _merge_in_memory(recipe: dict[str, Any], out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from omnimerge.methods import get_method
    from omnimerge.methods.base import TensorContext

    base_dir = Path(recipe["base_model"])
    method = get_method(recipe["merge_method"])
    base = load_file(str(base_dir / "model.safetensors"))
    experts = [load_file(str(Path(m["model"]) / "model.safetensors")) for m in recipe["models"]]
    kw = method.resolve(recipe.get("parameters", {}), [m.get("parameters", {}) for m in recipe["models"]])
    merged = {}
    for name, w0 in base.items():
        if not _selected(name, w0, recipe.get("select", {})):
            merged[name] = w0
            continue
        tvs = [e[name].float() - w0.float() for e in experts]
        ctx = TensorContext(name=name, canonical=name, component=_component(name, w0), num_models=len(tvs),
                            seed=int(recipe.get("seed", 0)))
        with torch.no_grad():
            merged[name] = (w0.float() + method.fn(w0.float(), tvs, ctx, **kw)).to(w0.dtype).contiguous()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    (out / "omnimerge_recipe.json").write_text(json.dumps(recipe, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# lambda grid in memory


def load_state(path: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    sd: dict[str, Any] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def interpolate(base: dict[str, Any], merged1: dict[str, Any], lam: float) -> dict[str, Any]:
    """``W0 + lam (W1 - W0)`` for every tensor (tensors the merge left alone stay equal to the base)."""
    out = {}
    for k, w0 in base.items():
        w1 = merged1[k]
        out[k] = w0 if lam == 1.0 and w1 is w0 else w0 + lam * (w1 - w0)
    return out


def lora_inputs(zoo: Any, tasks: Sequence[str], scratch: str | Path) -> tuple[list[Path], str]:
    """The LoRA family's merge inputs: adapter folders if the merger takes them (checked once), else the
    ``merge_and_unload``-ed checkpoints. Returns (paths, "adapter" | "merged")."""
    merged = [zoo.lora_merged_dir(t) for t in tasks]
    adapters = [zoo.lora_dir(t) for t in tasks]
    if not has_core_merge():
        return merged, "merged"
    import torch

    scratch = Path(scratch)
    try:
        a = scratch / "adapter-check-a"
        b = scratch / "adapter-check-b"
        merge_to_dir(make_recipe("weight_average", zoo.base_dir, adapters), a)
        merge_to_dir(make_recipe("weight_average", zoo.base_dir, merged), b)
        sa, sb = load_state(a), load_state(b)
        same = sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    except Exception:  # the core does not take adapters (yet)
        same = False
    finally:
        for d in ("adapter-check-a", "adapter-check-b"):
            shutil.rmtree(scratch / d, ignore_errors=True)
    return (adapters, "adapter") if same else (merged, "merged")
