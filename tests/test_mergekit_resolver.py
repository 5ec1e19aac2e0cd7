"""mergekit's gradients and filtered parameter lists resolve, tensor by tensor, to what mergekit's own resolver gives.

``tests/fixtures/mergekit/resolver.json`` holds, for four mergekit recipes over a tiny 4-layer Llama, every output
tensor's parameters as mergekit 0.1.5's planner resolved them (written by ``tools/mergekit_fixtures.py`` with
mergekit's interpreter). Here each recipe goes through ``translate`` (filters become omnimerge's ``{filters:
[...], other: v}``) and omnimerge's planner; every tensor's parameters must be equal, to the bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from omnimerge.engine import MergeRun
from omnimerge.errors import MethodParameterError, RecipeError
from omnimerge.mergekit_format import to_mergekit, translate
from omnimerge.methods import registry
from omnimerge.methods.base import Filters, Schedule
from omnimerge.recipe import validate_recipe
from tests.mergekit_inputs import build

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "mergekit" / "resolver.json").read_text())
#: omnimerge's name of each mergekit parameter, per where it sits
SHARED = {"lambda": "scaling", "t": "t"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mk-inputs")
    assert build(root) == FIXTURE["inputs"], "the tiny inputs are not the bytes mergekit resolved on"
    return root


def _absolute(recipe: Any, root: Path) -> Any:
    r = json.loads(json.dumps(recipe))
    r["base_model"] = str(root / r["base_model"])
    for m in r["models"]:
        m["model"] = str(root / m["model"])
    return r


def _jobs(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    run = MergeRun(validate_recipe(recipe), None)
    try:
        run.open()
        return {j.name: j.kwargs for j in run.plan()}
    finally:
        run.close()


@pytest.mark.parametrize("case", sorted(FIXTURE["recipes"]))
def test_every_tensor_resolves_as_in_mergekit(inputs: Path, case: str) -> None:
    fx = FIXTURE["recipes"][case]
    om, _ = translate(_absolute(fx["recipe"], inputs))
    experts = [Path(m["model"]).name for m in om["models"]]
    jobs = _jobs(om)
    assert set(jobs) == set(fx["tensors"])  # mergekit's output tensors are the base's
    checked = 0
    for name, want in fx["tensors"].items():
        got = jobs[name]
        for mk, value in want["shared"].items():
            if mk in SHARED:
                assert got[SHARED[mk]] == value, (case, name, mk)
                checked += 1
        for i, e in enumerate(experts):
            for mk, value in want["per_model"][e].items():
                if mk == "weight":
                    assert got["weight"][i] == value, (case, name, e)
                    checked += 1
                elif mk == "density" and "density" in got:  # one value in omnimerge: every model's
                    assert got["density"] == value, (case, name, e)
                    checked += 1
    assert checked >= len(fx["tensors"])


def test_filters_are_omnimerge_recipe_values(inputs: Path) -> None:
    """omnimerge's own form: first matching filter wins, other catches the rest, values may be gradients."""
    r = {"base_model": str(inputs / "base"), "models": [{"model": str(inputs / "a")}],
         "merge_method": "task_arithmetic", "select": {"include": [".*"]},
         "parameters": {"scaling": {"filters": [{"filter": "mlp.up", "value": [0.0, 0.9]},
                                                {"filter": "mlp", "value": 0.2}], "other": 0.7}}}
    jobs = _jobs(r)
    assert jobs["model.layers.3.mlp.up_proj.weight"]["scaling"] == 0.9
    assert jobs["model.layers.0.mlp.up_proj.weight"]["scaling"] == 0.0
    assert jobs["model.layers.2.mlp.down_proj.weight"]["scaling"] == 0.2
    assert jobs["lm_head.weight"]["scaling"] == 0.7
    # without other: the method's default (task arithmetic's scaling)
    r["parameters"]["scaling"] = {"filters": [{"filter": "mlp", "value": 0.2}]}
    assert _jobs(r)["model.norm.weight"]["scaling"] == 0.3


def test_a_required_parameter_no_filter_matches_is_refused(inputs: Path) -> None:
    """mergekit: "Missing required parameter t"; here the method's own check refuses it before any work."""
    r = {"base_model": str(inputs / "base"), "models": [{"model": str(inputs / "a")}], "merge_method": "slerp",
         "select": {"include": [".*"]}, "parameters": {"t": {"filters": [{"filter": "self_attn", "value": 0.5}]}}}
    with pytest.raises((RecipeError, MethodParameterError), match=r"slerp needs 't'"):
        _jobs(r)
    r["parameters"]["t"]["other"] = 0.25  # with a catch-all it plans
    assert _jobs(r)["model.embed_tokens.weight"]["t"] == 0.25


@pytest.mark.parametrize(("value", "fragment"), [
    ({"filters": []}, "filters are written"),
    ({"filters": [{"filter": "mlp"}]}, "a filter entry is"),
    ({"filters": [{"filter": 3, "value": 1}]}, "a filter entry is"),
    ({"filters": [{"filter": "mlp", "value": 2.0}], "other": 0.5}, "'density' must be a float in (0, 1]"),
    ([{"filter": "mlp", "value": 0.5}], "per-tensor values are written"),
])
def test_bad_filters_are_refused_by_name(inputs: Path, value: Any, fragment: str) -> None:
    r = {"base_model": str(inputs / "base"), "models": [{"model": str(inputs / "a")}], "merge_method": "ties",
         "parameters": {"density": value}}
    with pytest.raises(MethodParameterError) as e:
        _jobs(r)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_scopes_fall_through_as_in_mergekit() -> None:
    """A model's filtered list with no catch-all falls through to the top level (mergekit's resolver)."""
    r, _ = translate({"base_model": "b", "merge_method": "task_arithmetic",
                      "parameters": {"weight": [{"filter": "mlp", "value": 0.1}, {"value": 0.2}]},
                      "models": [{"model": "x", "parameters": {"weight": {"filter": "q_proj", "value": 3}}}]})
    assert r["models"][0]["parameters"]["weight"] == {
        "filters": [{"filter": "q_proj", "value": 3}, {"filter": "mlp", "value": 0.1}], "other": 0.2}
    f = Filters(((None, 1.0),), 2.0)
    assert f.at("anything", 0.0) == 1.0
    assert Filters((("mlp", Schedule((0.0, 1.0))),), None).at("model.norm.weight", 0.5) is None


def test_to_mergekit_writes_filtered_lists(inputs: Path) -> None:
    r = validate_recipe({"base_model": "b", "models": [{"model": "x", "parameters": {
        "weight": {"filters": [{"filter": "mlp", "value": [0.0, 1.0]}], "other": 0.5}}}],
        "merge_method": "dare_ta", "parameters": {"drop_rate": {"filters": [{"filter": "self_attn", "value": 0.9}]},
                                                  "scaling": 0.5}})
    mk, _ = to_mergekit(r)
    assert mk["models"][0]["parameters"]["weight"] == [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    # DARE's kept fraction, and omnimerge's default drop rate written out as the catch-all
    d = mk["parameters"]["density"]
    default = registry()["dare_ta"].param("drop_rate").default
    assert d == [{"filter": "self_attn", "value": pytest.approx(0.1)}, {"value": pytest.approx(1 - default)}]
    back, _ = translate({**mk, "base_model": "b"})
    assert back["models"][0]["parameters"]["weight"] == {"filters": [{"filter": "mlp", "value": [0.0, 1.0]}],
                                                         "other": 0.5}
