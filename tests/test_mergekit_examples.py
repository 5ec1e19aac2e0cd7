"""mergekit's own example recipes (its ``examples/`` folder), model names replaced by tiny local 40-layer Llamas,
run through omnimerge's translation and merge, against mergekit 0.1.5's outputs on the same inputs
(``tests/fixtures/mergekit/examples/<name>/``, written by ``tools/mergekit_fixtures.py`` with mergekit itself).

``benchmarks/mergekit_examples.py`` prints the whole table (every example, its outcome, its distance to mergekit's
output); docs/mergekit.md lists it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import omnimerge
from omnimerge.errors import RecipeError
from omnimerge.mergekit_format import translate
from tests.mergekit_inputs import build_examples, localise

FIX = Path(__file__).parent / "fixtures" / "mergekit" / "examples"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mk-examples")
    assert build_examples(root) == json.loads((FIX / "inputs.json").read_text())["inputs"]
    return root


def _run(name: str, inputs: Path, out: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    recipe, diffs = translate(localise(yaml.safe_load((FIX / f"{name}.yml").read_text()), inputs))
    omnimerge.merge(recipe, out, hash_inputs=False)
    return load_file(str(out / "model.safetensors")), diffs


@pytest.mark.parametrize("name", ["linear", "gradient-slerp", "orcamini-platy-44layer"])
def test_deterministic_examples_equal_mergekit_within_float16_rounding(inputs: Path, tmp_path: Path,
                                                                       name: str) -> None:
    """Every tensor within rounding of mergekit's (it rounds the inputs to the recipe's float16 before merging,
    omnimerge the result only: stated), the frankenmerge's bytes equal; same tensors, dtypes and layer count."""
    got, diffs = _run(name, inputs, tmp_path / "o")
    want = load_file(str(FIX / name / "model.safetensors"))
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype == torch.float16, k
        if name == "orcamini-platy-44layer":
            assert torch.equal(got[k], w), k
        else:  # within bfloat16 rounding at the tensor's scale (measured: within one float16 ulp of it)
            scale = w.float().abs().max().item()
            torch.testing.assert_close(got[k].float(), w.float(), rtol=0, atol=2.0**-8 * scale, msg=k)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == json.loads((FIX / name / "config.json").read_text())["num_hidden_layers"]
    assert any(d.startswith("dtype: float16") for d in diffs)


def test_bio_merge_runs_and_states_its_difference(inputs: Path, tmp_path: Path) -> None:
    """TIES with normalize: false: omnimerge's TIES always divides by the agreeing weights (stated), so the
    result differs from mergekit's sum by design."""
    got, diffs = _run("bio-merge", inputs, tmp_path / "o")
    assert any("normalize: false" in d for d in diffs) and any("int8_mask" in d for d in diffs)
    assert set(got) == set(load_file(str(FIX / "bio-merge" / "model.safetensors")))


def test_ties_example_with_per_model_densities_is_refused(inputs: Path) -> None:
    mk = localise(yaml.safe_load((FIX / "ties.yml").read_text()), inputs)
    with pytest.raises(RecipeError, match=r"models\[\]\.parameters\.density: per-model values .* differ"):
        translate(mk)


def test_arcee_fusion_equals_mergekit_in_float32(inputs: Path, tmp_path: Path) -> None:
    """The arcee_fusion example with dtype: float32 (mergekit's output stored as ``arcee_fusion-float32``) is
    mergekit's bit for bit. With the example's bfloat16, mergekit rounds the inputs first, which moves its
    keep threshold: entries near it are kept by one and not the other (the dtype difference is stated)."""
    mk = {**localise(yaml.safe_load((FIX / "arcee_fusion.yml").read_text()), inputs), "dtype": "float32"}
    recipe, _ = translate(mk)
    omnimerge.merge(recipe, tmp_path / "o", hash_inputs=False)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    want = load_file(str(FIX / "arcee_fusion-float32" / "model.safetensors"))
    assert set(got) == set(want)
    for k, w in want.items():
        assert torch.equal(got[k], w), k
