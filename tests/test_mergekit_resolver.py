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
import torch

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
    f = Filters(((None, 1.0, None),), 2.0)
    assert f.at("anything", 0.0) == 1.0
    assert Filters((("mlp", Schedule((0.0, 1.0)), None),), None).at("model.norm.weight", 0.5) is None
    # a component entry matches that component only; with a filter too, both must match
    g = Filters(((None, 0.1, "vision_tower"), ("mlp", 0.2, "language_model")), 0.3)
    assert g.at("visual.blocks.0.attn.qkv.weight", 0.0, "vision_tower") == 0.1
    assert g.at("model.layers.0.mlp.up_proj.weight", 0.0, "language_model") == 0.2
    assert g.at("visual.blocks.0.mlp.fc1.weight", 0.0, "vision_tower") == 0.1
    assert g.at("model.layers.0.self_attn.q_proj.weight", 0.0, "language_model") == 0.3


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


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen2-VL base and one expert (another initialisation)."""
    from tests.tiny_models import families

    root = tmp_path_factory.mktemp("mk-vl")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        families()["qwen2_vl"]().save_pretrained(root / f"m{seed}")
        out.append(root / f"m{seed}")
    return out[0], out[1]


def test_modules_map_onto_components(vl: tuple[Path, Path], tmp_path: Path) -> None:
    """mergekit's per-module parameters (model, module, top-level scopes) become filters by component."""
    from safetensors.torch import load_file

    import omnimerge
    from omnimerge.components import classify

    base, e = map(str, vl)
    mk = {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": 1.0},
          "modules": {
              "text_decoder": {"models": [{"model": e, "parameters": {"weight": [0.0, 1.0]}}],
                               "parameters": {"lambda": 0.5}},
              "vision_tower": {"models": [{"model": e, "parameters": {"weight": 0.75}}]},
              "multi_modal_projector": {"models": [{"model": e}], "parameters": {"weight": 0.25}}}}
    om, diffs = translate(mk)
    assert om["select"] == {"include": [".*"]} and not any("modules" in d for d in diffs)
    jobs = _jobs(om)
    seen = set()
    b, x = load_file(str(vl[0] / "model.safetensors")), load_file(str(vl[1] / "model.safetensors"))
    omnimerge.merge(om, tmp_path / "out", hash_inputs=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, kw in jobs.items():
        comp = classify(name, b[name].shape)
        if comp == "vision_tower":
            want = (0.75, 1.0)
        elif comp == "projector":
            want = (0.25, 1.0)
        elif ".layers.1." in name:  # the decoder's last layer (2 layers): the gradient's end
            want = (1.0, 0.5)
        elif ".layers.0." in name or "embed" in name or "lm_head" in name or name.endswith("model.norm.weight"):
            want = (0.0, 0.5)  # the first layer, and outside the layers: t = 0
        else:
            continue
        assert (kw["weight"][0], kw["scaling"]) == want, name
        seen.add(comp)
        if b[name].is_floating_point():
            torch.testing.assert_close(got[name].float(), b[name].float() + want[0] * want[1] *
                                       (x[name].float() - b[name].float()), rtol=1e-5, atol=1e-6)
    assert {"vision_tower", "projector", "language_model", "embedding"} <= seen
    # a module left out: its tensors copied from the base (mergekit writes none: stated)
    del mk["modules"]["vision_tower"]
    om, diffs = translate(mk)
    assert "vision_tower" not in om["select"]["include"] and any("vision_tower not listed" in d for d in diffs)


@pytest.mark.parametrize(("modules", "fragment"), [
    ({"text_decoder": {"slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}]}},
     "modules.text_decoder.slices: layer ranges inside one module"),
    ({"text_decoder": {"models": [{"model": "x"}]}, "vision_tower": {"models": [{"model": "y"}]}},
     "modules.vision_tower.models: ['y'] differ from modules.text_decoder's ['x']"),
    ({"encoder": {"models": [{"model": "x"}]}}, "modules.encoder: not a module omnimerge maps"),
])
def test_modules_it_cannot_express_are_refused_in_one_line(modules: dict, fragment: str) -> None:
    with pytest.raises(RecipeError) as e:
        translate({"merge_method": "task_arithmetic", "base_model": "b", "modules": modules}, "r.yaml")
    assert fragment in str(e.value) and "\n" not in str(e.value)
