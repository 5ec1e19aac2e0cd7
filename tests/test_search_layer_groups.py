"""Layer groups (``Steps``): a per-expert weight piecewise constant over the language model's decoder layers.

Every decoder layer of a tiny Llava (5 text layers, 4 groups: a depth the groups do not divide) must get its
group's value exactly, the vision tower's layers and every tensor outside the decoder the ``other`` value, and
the merged tensors must be those of a plain merge with that single value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import omnimerge
from omnimerge.api import as_recipe
from omnimerge.engine import MergeRun
from omnimerge.errors import MethodParameterError
from omnimerge.options import as_options
from omnimerge.plan import layer_of

TEXT_LAYERS = 5
GROUPS = [0.1, 0.25, 0.5, 0.75]
OTHER = 0.9


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omnimerge.bench.model import ModelSpec, build_model, save_checkpoint

    root = tmp_path_factory.mktemp("groups")
    spec = ModelSpec(text_hidden=32, text_layers=TEXT_LAYERS, text_heads=2, text_kv_heads=1, text_mlp=64,
                     vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64)
    save_checkpoint(build_model(spec, seed=0), root / "base")
    save_checkpoint(build_model(spec, seed=1), root / "expert")
    return root


def _recipe(root: Path, weight: object) -> dict:
    return {"base_model": str(root / "base"), "models": [{"model": str(root / "expert"),
                                                          "parameters": {"weight": weight}}],
            "merge_method": "task_arithmetic", "parameters": {"scaling": 1.0},
            "select": {"include": ["language_model", "vision_tower", "projector"]}, "dtype": "float32"}


def _group(layer: int) -> int:
    return layer * len(GROUPS) // TEXT_LAYERS


def test_every_tensor_gets_its_groups_value_exactly(family: Path) -> None:
    run = MergeRun(as_recipe(_recipe(family, {"layers": GROUPS, "other": OTHER})), None,
                   as_options(None))
    run.set_parameters()
    run.open()
    try:
        jobs = [j for j in run.plan() if j.merged]
    finally:
        run.close()
    seen_groups = set()
    n_vision = 0
    for j in jobs:
        (w,) = j.kwargs["weight"]
        where = layer_of(j.canonical)
        if where is not None and "language_model" in where[0]:
            assert w == GROUPS[_group(where[1])], j.name
            seen_groups.add(_group(where[1]))
        else:
            n_vision += "vision_tower" in j.name
            assert w == OTHER, j.name
    assert seen_groups == set(range(len(GROUPS)))
    assert n_vision > 0  # the vision tower's layer stack does not take the decoder's groups


def test_the_merge_equals_a_plain_merge_per_group(family: Path, tmp_path: Path) -> None:
    omnimerge.merge(_recipe(family, {"layers": GROUPS, "other": OTHER}), tmp_path / "g", hash_inputs=False)
    got = load_file(str(tmp_path / "g" / "model.safetensors"))
    plain = {}
    for v in {*GROUPS, OTHER}:
        omnimerge.merge(_recipe(family, v), tmp_path / f"p{v}", hash_inputs=False)
        plain[v] = load_file(str(tmp_path / f"p{v}" / "model.safetensors"))
    for name, t in got.items():
        where = layer_of(name)
        if where is not None and "language_model" in where[0]:
            want = plain[GROUPS[_group(where[1])]][name]
        else:
            want = plain[OTHER][name]
        assert torch.equal(t, want), name


def test_bad_layer_groups_are_refused_by_name(family: Path) -> None:
    for bad in ({"layers": []}, {"layers": [0.1], "other": 0.2, "x": 1}, {"layers": ["a"], "other": 0.1}):
        with pytest.raises(MethodParameterError, match="weight"):
            MergeRun(as_recipe(_recipe(family, bad)), None, as_options(None)).set_parameters()
