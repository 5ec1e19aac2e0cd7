"""mergekit recipes: detection, translation (pure) and an end-to-end merge through `omnimerge merge`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from omnimerge.errors import RecipeError
from omnimerge.mergekit_format import is_mergekit_recipe, translate
from omnimerge.recipe import load_recipe

TIES = {
    "models": [
        {"model": "base"},
        {"model": "a", "parameters": {"density": 0.5, "weight": 0.5}},
        {"model": "b", "parameters": {"density": 0.5, "weight": [0.2, 0.8]}},
    ],
    "merge_method": "ties",
    "base_model": "base",
    "parameters": {"normalize": True, "int8_mask": True, "lambda": 0.7},
    "dtype": "float16",
    "tokenizer_source": "a",
}


def test_detection() -> None:
    assert is_mergekit_recipe(TIES)
    assert is_mergekit_recipe({"slices": [], "merge_method": "passthrough"})
    omni = {"base_model": "b", "models": [{"model": "a"}], "merge_method": "ties", "parameters": {"scaling": 1}}
    assert not is_mergekit_recipe(omni)
    # tokenizer: and chat_template are keys of both formats: mergekit's unless an omnimerge-only key is there
    assert is_mergekit_recipe({**omni, "tokenizer": {"source": "union"}})
    assert not is_mergekit_recipe({**omni, "chat_template": "chatml", "select": {"include": [".*"]}})


def test_ties_translation_keeps_mergekit_meaning() -> None:
    r, diffs = translate(TIES)
    assert r["base_model"] == "base"
    assert [m["model"] for m in r["models"]] == ["a", "b"]  # the base listed among models is dropped
    assert r["models"][1]["parameters"] == {"weight": [0.2, 0.8]}  # a gradient stays a schedule
    assert r["parameters"] == {"density": 0.5, "scaling": 0.7}
    assert r["select"] == {"include": [".*"]}  # mergekit merges every tensor
    # a's vocabulary, embeddings re-indexed; mergekit's dtype is the inputs' and (no out_dtype) the output's:
    # omnimerge merges in float32 and writes float16
    assert r["tokenizer"] == {"source": "a"} and r["dtype"] == "float32" and r["out_dtype"] == "float16"
    assert any(d.startswith("dtype: float16: mergekit rounds the inputs") for d in diffs)
    assert any("elected sign" in d for d in diffs) and any("int8_mask" in d for d in diffs)
    _, diffs = translate({**TIES, "parameters": {"normalize": False}})
    assert any("normalize: false" in d for d in diffs)


def test_dare_density_is_keep_fraction_and_lambda_defaults_to_one() -> None:
    data = {"base_model": "b", "merge_method": "dare_ties",
            "models": [{"model": "x", "parameters": {"weight": 1.0, "density": [0.2, 0.6]}}]}
    r, _ = translate(data)
    assert r["merge_method"] == "dare_ties"
    assert r["parameters"]["drop_rate"] == pytest.approx([0.8, 0.4])
    assert r["parameters"]["density"] == 1.0 and r["parameters"]["scaling"] == 1.0
    r, _ = translate({**data, "merge_method": "dare_linear"})
    assert r["merge_method"] == "dare_ta" and "density" not in r["parameters"]


def test_top_level_parameters_are_per_model_defaults_and_catch_all_filters() -> None:
    data = {"base_model": "b", "merge_method": "linear",
            "parameters": {"weight": [{"filter": "*", "value": 0.5}]},
            "models": [{"model": "x"}, {"model": "y", "parameters": {"weight": 2.0}}]}
    r, diffs = translate(data)
    assert [m["parameters"]["weight"] for m in r["models"]] == [0.5, 2.0]
    assert r["parameters"] == {"normalize": True}  # mergekit's linear normalizes by default
    assert diffs == []
    # a model's own setting wins over the top-level one, as in mergekit: a top-level filter it never uses is fine
    data["parameters"] = {"weight": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]}
    data["models"][0]["parameters"] = {"weight": 3.0}
    r, _ = translate(data)
    assert [m["parameters"]["weight"] for m in r["models"]] == [3.0, 2.0]


@pytest.mark.parametrize(("change", "key"), [
    ({"merge_method": "frobnicate"}, "merge_method"),
    ({"slices": [{"sources": []}]}, "slices"),
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "tokenizer_source"),
    ({"models": [{"model": "x", "parameters": {"density": 0.3}}, {"model": "y", "parameters": {"density": 0.5}}]},
     "density"),
    ({"models": [{"model": "x", "parameters": {"weight": [{"filter": "self_attn", "value": {"a": 1}}]}}]},
     "weight"),
    ({"colour": "blue"}, "colour"),
    ({"merge_method": "linear", "models": [{"model": "b", "parameters": {"weight": 1}}, {"model": "x"}]},
     "models[0]"),
    # wrong types are refused by name, not as a TypeError (found by the recipe fuzz test)
    ({"merge_method": []}, "merge_method"),
    ({"merge_method": {"ties": 1}}, "merge_method"),
    ({"parameters": [1, 2]}, "parameters"),
    ({"models": [{"model": "x", "parameters": "dense"}]}, "models[0].parameters"),
    ({"base_model": ["b"]}, "base_model"),
    ({"parameters": {"lambda": 0.5, "scaling": {}}}, "scaling"),
    ({"merge_method": "dare_ties", "models": [{"model": "x", "parameters": {"density": "half"}}]}, "density"),
])
def test_rejections_name_the_key(change: dict, key: str) -> None:
    data = {"base_model": "b", "merge_method": "ties", "models": [{"model": "x", "parameters": {"weight": 1}}],
            **change}
    with pytest.raises(RecipeError) as e:
        translate(data, "r.yaml")
    msg = str(e.value)
    assert msg.startswith("r.yaml: ") and key in msg and "\n" not in msg


def test_load_recipe_translates_and_validates(tmp_path: Path) -> None:
    p = tmp_path / "mk.yaml"
    p.write_text(yaml.safe_dump(TIES))
    r = load_recipe(p)
    assert r.merge_method == "ties" and r.parameters["scaling"] == 0.7
    assert r.select.include == [".*"]
    assert r.differences and all(d.startswith("mergekit recipe: ") for d in r.differences)
    assert "differences" not in r.to_yaml()


def test_mergekit_task_arithmetic_end_to_end(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from omnimerge.examples import build_family

    base, (a, b) = build_family(tmp_path / "fam", arch="qwen2", n_experts=2)
    recipe = {"base_model": str(base), "merge_method": "task_arithmetic", "dtype": "float32",
              "parameters": {"lambda": 0.5, "int8_mask": True},
              "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                         {"model": str(b), "parameters": {"weight": 0.3}}]}
    p = tmp_path / "mk.yaml"
    p.write_text(yaml.safe_dump(recipe))
    res = cli("merge", p, "-o", tmp_path / "out", "-q")
    assert res.code == 0, res.text
    assert "int8_mask" in res.text  # the stated difference is printed
    card = (tmp_path / "out" / "README.md").read_text()
    assert "int8_mask" in card
    sd0, sda, sdb = (load_file(str(d / "model.safetensors")) for d in (base, a, b))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    changed = 0
    for k, w0 in sd0.items():
        want = w0 + 0.5 * (1.0 * (sda[k] - w0) + 0.3 * (sdb[k] - w0))
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(out[k], w0)
    norms = [k for k in sd0 if "norm" in k and not torch.equal(sda[k], sd0[k])]
    assert changed and all(not torch.equal(out[k], sd0[k]) for k in norms)  # mergekit merges norms too


# --- omnimerge convert -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "params"), [
    ("task_arithmetic", {"scaling": 0.4}),
    ("ties", {}),                                    # omnimerge's defaults (0.3, 0.2) must be written out
    ("linear", {}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
])
def test_convert_round_trip_merges_the_same(tmp_path: Path, cli, method: str, params: dict) -> None:  # type: ignore[no-untyped-def]
    """omnimerge -> mergekit -> omnimerge: the converted-back recipe merges to the same bytes (everything
    selected, as mergekit merges every tensor)."""
    from safetensors.torch import load_file

    from omnimerge.examples import build_family

    base, (a, b) = build_family(tmp_path / "fam", arch="qwen2", n_experts=2)
    omni = {"base_model": str(base), "merge_method": method, "parameters": params, "select": {"include": [".*"]},
            "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                       {"model": str(b), "parameters": {"weight": 0.6}}]}
    (tmp_path / "omni.yaml").write_text(yaml.safe_dump(omni))
    r = cli("convert", tmp_path / "omni.yaml", "--to", "mergekit", "-o", tmp_path / "mk.yaml")
    assert r.code == 0, r.text
    mk = yaml.safe_load((tmp_path / "mk.yaml").read_text())
    assert mk["merge_method"] == method and [m["parameters"]["weight"] for m in mk["models"]] == [1.0, 0.6]
    if method == "ties":
        assert mk["parameters"]["lambda"] == 0.3 and mk["parameters"]["density"] == 0.2
    r = cli("convert", tmp_path / "mk.yaml", "--to", "omnimerge", "-o", tmp_path / "back.yaml")
    assert r.code == 0, r.text
    for name in ("omni", "back"):
        res = cli("merge", tmp_path / f"{name}.yaml", "-o", tmp_path / f"out-{name}", "-q")
        assert res.code == 0, res.text
    x = load_file(str(tmp_path / "out-omni" / "model.safetensors"))
    y = load_file(str(tmp_path / "out-back" / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_convert_names_what_mergekit_lacks(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    def run(recipe: dict, to: str = "mergekit"):  # type: ignore[no-untyped-def]
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        return cli("convert", tmp_path / "r.yaml", "--to", to)

    omni = {"base_model": "b", "models": [{"model": "x"}], "merge_method": "ties"}
    r = run(omni)
    assert r.code == 0 and "select:" in r.out and "# differs:" in r.out      # stated, not silent
    for change, needle in [({"merge_method": "tsv"}, "'tsv' has no mergekit equivalent"),
                           ({"modifiers": [{"dare": {"drop_rate": 0.5}}]}, "modifiers"),
                           ({"output": "lora", "rank": 4}, "output"),
                           ({"merge_method": "dare_ties"}, "parameters.density")]:
        r = run({**omni, **change})
        assert r.code == 2 and needle in r.err and len(r.err.strip().splitlines()) == 1, (change, r.err)
    r = run(omni, "omnimerge")
    assert r.code == 2 and "already an omnimerge recipe" in r.err
    r = run(omni, "safetensors")
    assert r.code == 2 and "--to" in r.err
