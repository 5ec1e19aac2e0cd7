"""Every golden case of ../shared/golden, run through `omnimerge merge` (the users' entry point)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from omnimerge.methods import registry
from tests.conftest import GOLDEN, golden_root

# The golden's second wave (../shared/golden/README.md) defines methods whose issues are still open. Until a
# method is registered, its cases check what a user meets today (a one-line refusal naming the method, exit
# status 2, nothing written); the moment it is registered under its name, its cases run against the golden like
# every other (no edit here needed, and a stale entry fails below). A golden method in neither set fails.
PENDING: dict[str, int] = {}


def _cases() -> list[Path]:
    return sorted(p.parent for p in GOLDEN.glob("*/*/case.json"))


def _recipe(case_dir: Path, case: dict) -> dict:
    """The case as a user's recipe: per-model parameters and statistics go where the golden README says."""
    models = []
    for i, m in enumerate(case["models"]):
        entry: dict = {"model": str((case_dir / m).resolve())}
        if case.get("model_parameters"):
            entry["parameters"] = case["model_parameters"][i]
        if case.get("statistics"):
            entry["statistics"] = str((case_dir / case["statistics"][i]).resolve())
        models.append(entry)
    return {
        "base_model": str((case_dir / case["base_model"]).resolve()),
        "models": models,
        "merge_method": case["method"],
        "parameters": case["parameters"],
        "dtype": case.get("dtype", "float32"),
    }


def test_pending_methods_are_golden_methods_not_yet_registered() -> None:
    """Every pending entry names a method the golden defines and the registry lacks (a method that lands must
    leave this list, so that its cases are compared with the golden)."""
    golden_root()
    golden_methods = {json.loads((d / "case.json").read_text())["method"] for d in _cases()}
    registered = set(registry())
    assert not set(PENDING) & registered, f"registered now, drop from PENDING: {sorted(set(PENDING) & registered)}"
    unknown = golden_methods - registered - set(PENDING)
    assert not unknown, f"golden methods neither registered nor pending: {sorted(unknown)}"
    assert set(PENDING) <= golden_methods, f"pending but not in the golden: {sorted(set(PENDING) - golden_methods)}"


@pytest.mark.parametrize("case_dir", _cases(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_case(case_dir: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    golden_root()
    case = json.loads((case_dir / "case.json").read_text())
    recipe = _recipe(case_dir, case)
    rpath = tmp_path / "recipe.yaml"
    rpath.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    res = cli("merge", rpath, "-o", out, "-q")
    method = case["method"]
    if method not in registry() and method in PENDING:
        # not implemented yet (issue PENDING[method]): the user gets the one-line error and no output folder
        assert res.code == 2, res.text
        # (the data-aware ones are refused earlier, at the per-model `statistics` key the recipe lacks today)
        said = f"unknown method '{method}'" in res.text or "statistics: unknown key" in res.text
        assert said and len(res.text.strip().splitlines()) == 1, res.text
        assert not out.exists(), "a refused merge must leave nothing behind"
        return
    assert res.code == 0, res.text
    got = load_file(str(out / "model.safetensors"))
    expected = load_file(str(case_dir / case["expected"]))
    base = load_file(str(Path(recipe["base_model"]) / "model.safetensors"))
    assert set(got) == set(base) == set(expected), "no tensor may be dropped or added"
    merged = set(case["merged_tensors"])
    tol = case["tolerance"]
    for name, exp in expected.items():
        out_t = got[name]
        assert out_t.dtype == base[name].dtype and out_t.shape == exp.shape, name
        if name not in merged:
            assert torch.equal(out_t, base[name]), f"{name}: unmerged tensor must equal the base bit for bit"
            continue
        if "rel_fro" in tol:
            err = float((out_t - exp).norm() / (exp - base[name]).norm())
            assert err <= tol["rel_fro"], f"{name}: relative Frobenius error {err:.4g} > {tol['rel_fro']}"
        else:
            bound = tol["atol"] + tol["rtol"] * exp.abs()
            excess = float(((out_t - exp).abs() - bound).max())
            assert excess <= 0, f"{name}: exceeds tolerance by {excess:.3g} (max |diff| {(out_t - exp).abs().max():.3g})"


@pytest.mark.parametrize("method", ["weight_average", "task_arithmetic", "ties"])
@pytest.mark.parametrize("regime", ["full-T3", "full-T5", "lora-T3", "lora-T5"])
def test_elementwise_methods_are_the_reference_bit_for_bit(regime: str, method: str, tmp_path: Path,
                                                           cli) -> None:  # type: ignore[no-untyped-def]
    """The methods without an SVD reproduce the reference's float32 arithmetic exactly, not only within the
    case's tolerance: weight averaging sums the experts' weights as the reference does (W0 + mean tau would be
    ~1 ulp off), task arithmetic and TIES do the reference's operations in its order. (The SVD-based methods
    agree to ~1e-8, the differences of two LAPACK runs, within their tolerances above.)"""
    golden_root()
    case_dir = GOLDEN / regime / method
    case = json.loads((case_dir / "case.json").read_text())
    recipe = {"base_model": str((case_dir / case["base_model"]).resolve()),
              "models": [{"model": str((case_dir / m).resolve())} for m in case["models"]],
              "merge_method": method, "parameters": case["parameters"]}
    rpath = tmp_path / "recipe.yaml"
    rpath.write_text(yaml.safe_dump(recipe))
    res = cli("merge", rpath, "-o", tmp_path / "merged", "-q")
    assert res.code == 0, res.text
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = load_file(str(case_dir / case["expected"]))
    for name in case["merged_tensors"]:
        assert torch.equal(got[name], expected[name]), f"{name}: not bit-identical to the reference"
