"""RegMean and Fisher merging from per-expert statistics files: the closed forms on small cases, the ridge
fallback, and the checks of the statistics made before any work (tests/test_golden.py compares both methods
with FusionBench on the golden cases)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import omnimerge
from omnimerge.checkpoint.statistics import weights_digest
from tests.tiny_models import save_tensors

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"
D = "model.layers.0.mlp.down_proj.weight"
N = "model.layers.0.input_layernorm.weight"


def _stats(path: Path, kind: str, tensors: dict[str, torch.Tensor], **meta: str) -> str:
    save_file({k: v.float().clone() for k, v in tensors.items()}, str(path), metadata={"statistic": kind, **meta})
    return str(path)


def _gram(n: int, rows: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64) * scale
    return (x.T @ x / rows).float()


@pytest.fixture
def zoo(tmp_path: Path) -> dict[str, Any]:
    """A base and three experts with q/k (6 x 4, one input site), down (4 x 6) and a norm."""
    g = torch.Generator().manual_seed(0)
    base = {Q: torch.randn(6, 4, generator=g), K: torch.randn(6, 4, generator=g), D: torch.randn(4, 6, generator=g),
            N: torch.ones(4)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    paths = [save_tensors(tmp_path / "base", base)] + [save_tensors(tmp_path / f"e{i}", w) for i, w in enumerate(experts)]
    grams = []
    for _ in range(3):
        site = _gram(4, 50, g)
        grams.append({Q: site, K: site, D: _gram(6, 50, g)})
    return {"root": tmp_path, "base": base, "experts": experts, "paths": paths, "grams": grams, "gen": g}


def _recipe(zoo: dict[str, Any], method: str, stats: list[str], n: int | None = None, **params: Any) -> dict:
    paths = zoo["paths"][1:][:n]
    return {"base_model": str(zoo["paths"][0]),
            "models": [{"model": str(p), "statistics": s} for p, s in zip(paths, stats[:len(paths)], strict=True)],
            "merge_method": method, "parameters": params, "select": {"include": [".*"]}}


def _gram_files(zoo: dict[str, Any], grams: list[dict[str, torch.Tensor]] | None = None) -> list[str]:
    return [_stats(zoo["root"] / f"g{i}.safetensors", "regmean_gram", g) for i, g in enumerate(grams or zoo["grams"])]


def _merge(recipe: dict, notes: list[str] | None = None, tmp: Path | None = None) -> dict[str, torch.Tensor]:
    if notes is None:
        return omnimerge.merge_state_dict(recipe, hash_inputs=False)
    from safetensors.torch import load_file

    assert tmp is not None
    omnimerge.merge(recipe, tmp / "out", hash_inputs=False, echo=notes.append, progress=False)
    return load_file(str(tmp / "out" / "model.safetensors"))


def test_regmean_of_one_expert_is_that_expert(zoo: dict[str, Any]) -> None:
    got = _merge(_recipe(zoo, "regmean", _gram_files(zoo), n=1, reduce_non_diagonal_ratio=0.9))
    for name in (Q, K, D):
        torch.testing.assert_close(got[name], zoo["experts"][0][name], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[N], zoo["base"][N]), "a norm has no Gram: it stays at the base"


def test_regmean_with_identical_grams_is_the_average(zoo: dict[str, Any]) -> None:
    same = [zoo["grams"][0]] * 3
    got = _merge(_recipe(zoo, "regmean", _gram_files(zoo, same), reduce_non_diagonal_ratio=0.7))
    for name in (Q, K, D):
        avg = sum(e[name].double() for e in zoo["experts"]) / 3
        torch.testing.assert_close(got[name].double(), avg, rtol=1e-5, atol=1e-6)


def test_regmean_solves_the_normal_equations(zoo: dict[str, Any]) -> None:
    """W* (sum G~_t) = sum W_t G~_t, G~ with the off-diagonal part times alpha, each tensor on its own side."""
    alpha = 0.5
    got = _merge(_recipe(zoo, "regmean", _gram_files(zoo), reduce_non_diagonal_ratio=alpha))
    for name in (Q, D):
        red = [alpha * g[name].double() + (1 - alpha) * torch.diag(torch.diagonal(g[name].double()))
               for g in zoo["grams"]]
        lhs = got[name].double() @ sum(red)
        rhs = sum(e[name].double() @ r for e, r in zip(zoo["experts"], red, strict=True))
        torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got[name], sum(e[name] for e in zoo["experts"]) / 3, atol=1e-3)


def test_regmean_ill_conditioned_sum_takes_the_ridge_fallback_and_says_so(zoo: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    """Rank-1 Grams (a dead input feature direction): the sum of three is singular for the 6-wide down_proj; the
    solve takes the ridge and the run's notes name the tensor; q/k (full rank) are solved as is."""
    g = zoo["gen"]
    grams = []
    for i in range(3):
        v = torch.randn(1, 6, generator=g, dtype=torch.float64)
        grams.append({Q: zoo["grams"][i][Q], K: zoo["grams"][i][K], D: (v.T @ v).float()})
    notes: list[str] = []
    got = _merge(_recipe(zoo, "regmean", _gram_files(zoo, grams), reduce_non_diagonal_ratio=1.0), notes, tmp_path)
    said = [n for n in notes if "ridge fallback" in n]
    assert len(said) == 1 and D in said[0], notes
    assert torch.isfinite(got[D]).all()
    # the ridge solution is a tiny perturbation of a least-squares fit: on the span of the Grams it agrees
    lhs = got[D].double() @ sum(gr[D].double() for gr in grams)
    rhs = sum(e[D].double() @ gr[D].double() for e, gr in zip(zoo["experts"], grams, strict=True))
    torch.testing.assert_close(lhs, rhs, rtol=1e-3, atol=1e-3)


def test_fisher_normalised_by_global_norms(zoo: dict[str, Any]) -> None:
    g = zoo["gen"]
    fish = [{k: torch.rand(v.shape, generator=g) * (i + 1) for k, v in zoo["base"].items()} for i in range(3)]
    files = [_stats(zoo["root"] / f"f{i}.safetensors", "fisher_diagonal", f) for i, f in enumerate(fish)]
    r = _recipe(zoo, "fisher", files)
    r["models"][1]["parameters"] = {"weight": 2.0}
    got = _merge(r)
    w = [1.0, 2.0, 1.0]
    norms = [float(torch.cat([t.double().flatten() for t in f.values()]).norm()) for f in fish]
    inv = [1 / (n + 1e-6) for n in norms]
    c = [wi * v / sum(inv) for wi, v in zip(w, inv, strict=True)]
    for name in zoo["base"]:
        num = sum(ci * (f[name].double() + 1e-6) * e[name].double()
                  for ci, f, e in zip(c, fish, zoo["experts"], strict=True))
        den = sum(ci * (f[name].double() + 1e-6) for ci, f in zip(c, fish, strict=True))
        torch.testing.assert_close(got[name].double(), num / den, rtol=1e-5, atol=1e-6)


# --- the statistics are checked before any work --------------------------------------------------------------


def _refused(cli, recipe: dict, tmp_path: Path, *want: str) -> None:  # type: ignore[no-untyped-def]
    import yaml

    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    res = cli("merge", rp, "-o", tmp_path / "out", "-q")
    assert res.code == 2, res.text
    assert len(res.text.strip().splitlines()) == 1, res.text
    for w in want:
        assert w in res.text, res.text
    assert not (tmp_path / "out").exists()


def test_missing_statistics_key_or_file(zoo: dict[str, Any], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    r = _recipe(zoo, "regmean", _gram_files(zoo))
    del r["models"][1]["statistics"]
    _refused(cli, r, tmp_path, "models[1].statistics", "regmean_gram")
    r = _recipe(zoo, "regmean", _gram_files(zoo))
    r["models"][2]["statistics"] = str(tmp_path / "nowhere.safetensors")
    _refused(cli, r, tmp_path, "nowhere.safetensors", "does not exist")
    r = _recipe(zoo, "ties", _gram_files(zoo))
    _refused(cli, r, tmp_path, "models[0].statistics", "uses no statistics")


def test_wrong_kind_missing_tensor_wrong_shape_other_model(zoo: dict[str, Any], tmp_path: Path,
                                                           cli) -> None:  # type: ignore[no-untyped-def]
    files = _gram_files(zoo)
    _refused(cli, _recipe(zoo, "fisher", files), tmp_path, "regmean_gram", "fisher_diagonal", "g0.safetensors")
    grams = [dict(g) for g in zoo["grams"]]
    del grams[1][D]
    _refused(cli, _recipe(zoo, "regmean", _gram_files(zoo, grams)), tmp_path, "g1.safetensors", D, "[6, 6]")
    grams = [dict(g) for g in zoo["grams"]]
    grams[2][D] = torch.eye(4)
    _refused(cli, _recipe(zoo, "regmean", _gram_files(zoo, grams)), tmp_path, D, "[4, 4]", "expected [6, 6]")
    grams = [dict(g) for g in zoo["grams"]]
    grams[0]["model.layers.7.mlp.up_proj.weight"] = torch.eye(4)
    _refused(cli, _recipe(zoo, "regmean", _gram_files(zoo, grams)), tmp_path, "another model", "layers.7")


def test_statistics_of_other_weights_are_refused_by_digest(zoo: dict[str, Any], tmp_path: Path,
                                                           cli) -> None:  # type: ignore[no-untyped-def]
    paths = zoo["paths"]
    digests = [weights_digest(sorted(p.iterdir())) for p in paths[1:]]
    files = [_stats(zoo["root"] / f"h{i}.safetensors", "regmean_gram", g, weights_digest=d)
             for i, (g, d) in enumerate(zip(zoo["grams"], digests, strict=True))]
    ok = _recipe(zoo, "regmean", files)
    assert set(_merge(ok)) == set(zoo["base"])  # the recorded digests match: it merges
    swapped = _recipe(zoo, "regmean", [files[1], files[0], files[2]])  # expert 0 given expert 1's statistics
    _refused(cli, swapped, tmp_path, "models[0].statistics", "collected on other weights")


def test_modality_mode_is_refused_not_silently_unweighted(zoo: dict[str, Any], tmp_path: Path,
                                                          cli) -> None:  # type: ignore[no-untyped-def]
    r = _recipe(zoo, "regmean", _gram_files(zoo))
    r["mode"] = "modality"
    _refused(cli, r, tmp_path, "mode:", "statistics")
