"""mergekit's ``slices``: passthrough frankenmerges and per-slice merges (omnimerge.slices).

* a passthrough frankenmerge of two tiny models (Llama, Qwen2) with overlapping layer ranges loads with its
  transformers class, has the summed layer count, and each output layer's tensors are the bytes of the right
  source layer (embeddings from the first slice's source, norm and lm_head from the last's);
* a two-slice ``linear`` recipe (two sources each, parameters at the source, slice and top level, a one-layer
  slice) equals mergekit 0.1.5's output on the same inputs (``tests/fixtures/mergekit/slices_linear``, written
  by ``tools/mergekit_fixtures.py`` with mergekit itself);
* recipes mergekit rejects (a bad range, a range past the last layer, sources of different lengths) are
  refused in one line, exit status 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import omnimerge
from omnimerge.mergekit_format import translate
from tests.mergekit_inputs import build
from tests.tiny_models import families

FIX = Path(__file__).parent / "fixtures" / "mergekit" / "slices_linear"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two differently initialised tiny models per architecture, saved as transformers writes them."""
    root = tmp_path_factory.mktemp("slices")
    out = {}
    for arch in ("llama", "qwen2"):
        ms = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = families()[arch]()
            model.config.num_hidden_layers  # noqa: B018 - built with 2 layers; rebuilt below with 4
            cfg = model.config
            cfg.num_hidden_layers = 4
            if getattr(cfg, "layer_types", None) is not None:
                cfg.layer_types = ["full_attention"] * 4
            model = type(model)(cfg)
            d = root / f"{arch}{seed}"
            model.save_pretrained(d)
            ms.append(d)
        out[arch] = (ms[0], ms[1])
    return out


def _frankenmerge(a: Path, b: Path) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                       {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_passthrough_frankenmerge_loads_and_copies_the_right_layers(pairs, tmp_path: Path, cli, arch: str) -> None:  # type: ignore[no-untyped-def]
    import transformers

    a, b = pairs[arch]
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(_frankenmerge(a, b)))
    r = cli("merge", tmp_path / "mk.yaml", "-o", tmp_path / "out", "--quiet")
    assert r.code == 0, r.text
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == json.loads((a / "config.json").read_text())["architectures"][0]
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    where = [(sa, 0), (sa, 1), (sa, 2), (sb, 1), (sb, 2), (sb, 3)]  # output layer -> (source, its layer)
    n = 0
    for name, t in got.items():
        if ".layers." in name:
            o = int(name.split(".layers.")[1].split(".")[0])
            src, layer = where[o]
            want = src[name.replace(f".layers.{o}.", f".layers.{layer}.")]
        else:
            want = (sa if "embed" in name else sb)[name]
        assert t.dtype == want.dtype and torch.equal(t.view(torch.uint8), want.view(torch.uint8)), name
        n += 1
    per_layer = sum(1 for k in sa if ".layers.0." in k)
    assert n == len(sa) + 2 * per_layer  # 6 layers instead of 4, every other tensor once
    with torch.no_grad():  # it runs
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_linear_slices_equal_mergekit(tmp_path: Path) -> None:
    inputs = json.loads((FIX / "inputs.json").read_text())
    assert build(tmp_path / "in") == inputs, "the tiny inputs are not the bytes mergekit merged"
    mk = yaml.safe_load((FIX / "recipe.yaml").read_text())
    for sl in mk["slices"]:
        for s in sl["sources"]:
            s["model"] = str(tmp_path / "in" / s["model"])
    recipe, diffs = translate(mk)
    omnimerge.merge(recipe, tmp_path / "out", hash_inputs=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = load_file(str(FIX / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name  # measured: bit-identical (mergekit sums in float32 too)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == json.loads((FIX / "config.json").read_text())["num_hidden_layers"] == 3
    assert any("base_model: none given" in d for d in diffs)


@pytest.mark.parametrize(("ranges", "fragment"), [
    ([[[2, 1]]], "slices[0].sources[0].layer_range: [2, 1] is not a range of layers"),
    ([[[0, 2]], [[1, 9]]], "slices[1].sources[0].layer_range: [1, 9] goes past the last layer"),
    ([[[0, 2], [1, 4]]], "slices[0]: its sources cover different numbers of layers ([2, 3])"),
    ([[[0, 2], [0, 2]]], "slices[0]: passthrough copies one source per slice, got 2"),
])
def test_slices_mergekit_rejects_are_refused_in_one_line(pairs, tmp_path: Path, cli, ranges, fragment) -> None:  # type: ignore[no-untyped-def]
    a, b = pairs["llama"]
    slices = [{"sources": [{"model": str((a, b)[j % 2]), "layer_range": lr} for j, lr in enumerate(sl)]}
              for sl in ranges]
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": slices}))
    r = cli("merge", tmp_path / "mk.yaml", "-o", tmp_path / "out", "--quiet")
    assert r.code == 2, r.text
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], r.text
    assert r.err.rstrip().endswith(errors[0])  # the last line, nothing after it
    assert "Traceback" not in r.text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["linear", "passthrough"])
def test_slices_convert_both_ways(which: str) -> None:
    from omnimerge.mergekit_format import to_mergekit
    from omnimerge.recipe import validate_recipe

    mk = yaml.safe_load((FIX / "recipe.yaml").read_text()) if which == "linear" else {
        "merge_method": "passthrough", "base_model": "a",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 3], "parameters": {"scale": [1.0, 0.5]}}]},
                   {"sources": [{"model": "b", "layer_range": [1, 4]}]}]}
    om, _ = translate(mk)
    back, _ = to_mergekit(validate_recipe(om))
    assert [[s["layer_range"] for s in sl["sources"]] for sl in back["slices"]] == \
        [[s["layer_range"] for s in sl["sources"]] for sl in mk["slices"]]
    again, _ = translate(back)
    assert again["slices"] == om["slices"] and again["merge_method"] == om["merge_method"]


def test_passthrough_scale_gradient_and_a_based_slice(tmp_path: Path) -> None:
    """passthrough's per-source scale runs over the slice (t = i / (n - 1)); a task-arithmetic slice merges each
    source layer's difference from the base's layer at the same place (the base among the sources)."""
    build(tmp_path / "in")
    p = {k: str(tmp_path / "in" / k) for k in ("base", "a")}
    mk = {"merge_method": "passthrough", "base_model": p["base"], "dtype": "float32",
          "slices": [{"sources": [{"model": p["a"], "layer_range": [1, 4], "parameters": {"scale": [1.0, 0.5]}}]}]}
    omnimerge.merge(translate(mk)[0], tmp_path / "pt", hash_inputs=False)
    got, a = load_file(str(tmp_path / "pt" / "model.safetensors")), load_file(str(tmp_path / "in" / "a" / "model.safetensors"))
    for o, s in enumerate((1.0, 0.75, 0.5)):
        name = f"model.layers.{o}.mlp.up_proj.weight"
        torch.testing.assert_close(got[name], a[name.replace(f".{o}.", f".{o + 1}.")] * s, rtol=0, atol=0)
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # t = 0: scale 1
    ta = {"merge_method": "task_arithmetic", "base_model": p["base"], "dtype": "float32",
          "parameters": {"lambda": 0.5},
          "slices": [{"sources": [{"model": p["base"], "layer_range": [0, 2]},
                                  {"model": p["a"], "layer_range": [2, 4], "parameters": {"weight": 2.0}}]}]}
    omnimerge.merge(translate(ta)[0], tmp_path / "ta", hash_inputs=False)
    got = load_file(str(tmp_path / "ta" / "model.safetensors"))
    base = load_file(str(tmp_path / "in" / "base" / "model.safetensors"))
    assert json.loads((tmp_path / "ta" / "config.json").read_text())["num_hidden_layers"] == 2
    for o in range(2):
        name = f"model.layers.{o}.self_attn.q_proj.weight"
        want = base[name] + 0.5 * 2.0 * (a[name.replace(f".{o}.", f".{o + 2}.")] - base[name])
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["lm_head.weight"], base["lm_head.weight"] + (a["lm_head.weight"] - base["lm_head.weight"]))
