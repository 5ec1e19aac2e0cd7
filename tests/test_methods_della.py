"""DELLA (``della``, ``della_linear``) by its properties: its masks are random, so there is no golden output (see
``../shared/golden/README.md``, "Random methods").

With density 1 it is TIES / task arithmetic bit for bit; the kept fraction averages rho, keep rates rise with the
magnitude rank within each row (and only within it), every pruned task vector keeps its L1 norm with one factor
for all its survivors, the seed decides the masks, and neither the number of workers nor the strategy changes a
bit. Impossible keep probabilities are refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import omnimerge
from omnimerge.methods import get_method
from omnimerge.methods.base import TensorContext
from omnimerge.methods.operators import MagnitudeRankedDrop
from tests.tiny_models import save_tensors

ROWS = "model.layers.0.mlp.up_proj.weight"  # 400 x 64: the statistics
BIG = "model.layers.0.self_attn.q_proj.weight"  # 520 x 512 > 2^18 entries: large enough to stream, if it could
NORM = "model.layers.0.input_layernorm.weight"  # 1-D: one row
SHAPES = {ROWS: (400, 64), BIG: (520, 512), NORM: (64,)}
RHO, EPS = 0.4, 0.15


def _deltas(seed: int) -> dict[str, torch.Tensor]:
    """Random task vectors whose rows have very different scales (row r scaled by e^(4 r / rows)): a ranking
    over the whole tensor would keep the small rows far less often than the large ones."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        x = torch.randn(shape, generator=g) * 1e-3
        if len(shape) == 2:
            x *= torch.exp(torch.linspace(0.0, 4.0, shape[0])).unsqueeze(1)
        out[name] = x
    return out


def _models(root: Path, base: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]]) -> list[Path]:
    out = [save_tensors(root / "base", base)]
    for i, d in enumerate(deltas):
        out.append(save_tensors(root / f"expert{i}", {k: v + d[k] for k, v in base.items()}))
    return out


def _recipe(paths: list[Path], method: str, weights: list[float] | None = None, include: str = ".*",
            **params: Any) -> dict[str, Any]:
    models = [{"model": str(p)} if weights is None else {"model": str(p), "parameters": {"weight": w}}
              for p, w in zip(paths[1:], weights or [None] * (len(paths) - 1), strict=True)]
    return {"base_model": str(paths[0]), "models": models, "merge_method": method, "parameters": params,
            "select": {"include": [include]}}


def _merge(recipe: dict[str, Any], **kw: Any) -> dict[str, torch.Tensor]:
    return omnimerge.merge_state_dict(recipe, hash_inputs=False, **kw)


@pytest.fixture(scope="module")
def zero_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """A zero base (so the merged weight *is* the merged delta, bit for bit) and three experts."""
    deltas = [_deltas(s) for s in (1, 2, 3)]
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    return _models(tmp_path_factory.mktemp("della0"), base, deltas), deltas


@pytest.fixture(scope="module")
def real_base(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    g = torch.Generator().manual_seed(9)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in SHAPES.items()}
    return _models(tmp_path_factory.mktemp("della1"), base, [_deltas(s) for s in (4, 5, 6)])


def _pruned(paths: list[Path], expert: int, seed: int, rescale: bool, include: str = ".*") -> dict[str, torch.Tensor]:
    """Expert ``expert``'s pruned task vector t_i alone: della_linear with one-hot weights on a zero base
    (0 * t_j adds exact zeros)."""
    w = [1.0 if i == expert else 0.0 for i in range(len(paths) - 1)]
    return _merge(_recipe(paths, "della_linear", w, include, density=RHO, epsilon=EPS, seed=seed,
                          rescale=rescale, scaling=1.0))


def test_density_one_is_ties_and_task_arithmetic_bit_for_bit(real_base: list[Path]) -> None:
    w = [1.0, 0.6, 1.4]
    ties = _merge(_recipe(real_base, "ties", w, density=1.0, scaling=0.7))
    della = _merge(_recipe(real_base, "della", w, density=1.0, scaling=0.7))  # rescale and normalize: defaults
    ta = _merge(_recipe(real_base, "task_arithmetic", w, scaling=0.7))
    della_linear = _merge(_recipe(real_base, "della_linear", w, density=1.0, scaling=0.7))
    for name in SHAPES:
        assert torch.equal(della[name], ties[name]), name
        assert torch.equal(della_linear[name], ta[name]), name
    # and pruning does change them (the comparison above can fail)
    pruned = _merge(_recipe(real_base, "della", w, density=0.7, scaling=0.7))
    assert not torch.equal(pruned[ROWS], ties[ROWS])
    assert not torch.equal(della[ROWS], della_linear[ROWS])  # sign election vs sum


def test_kept_fraction_averages_rho_and_keep_rates_rise_with_rank_within_each_row(
    zero_base: tuple[list[Path], list[dict[str, torch.Tensor]]],
) -> None:
    paths, deltas = zero_base
    tau = deltas[0][ROWS]
    order = tau.abs().argsort(dim=1)  # rank 0 = smallest |tau| of the row
    kept = []
    for seed in (11, 12, 13, 14):
        out = _pruned(paths, 0, seed, rescale=False, include="up_proj")[ROWS]
        keep = out != 0
        assert torch.equal(out[keep], tau[keep])  # survivors untouched without rescale
        kept.append(torch.gather(keep.double(), 1, order))  # per row, by rank
    by_rank = torch.stack(kept)  # seeds x rows x n
    n = by_rank.shape[-1]
    assert abs(float(by_rank.mean()) - RHO) < 0.006, float(by_rank.mean())
    # per row, not over the tensor: the small-scale rows keep as much as the large-scale ones
    half = by_rank.shape[1] // 2
    assert abs(float(by_rank[:, :half].mean()) - RHO) < 0.01 and abs(float(by_rank[:, half:].mean()) - RHO) < 0.01
    # the four smallest of each row: rho - eps + 2 eps 1.5 / 63 = 0.257; the four largest: 0.543
    small, large = float(by_rank[..., :4].mean()), float(by_rank[..., -4:].mean())
    assert abs(small - (RHO - EPS + 2 * EPS * 1.5 / (n - 1))) < 0.025, small
    assert abs(large - (RHO + EPS - 2 * EPS * 1.5 / (n - 1))) < 0.025, large
    bins = by_rank.reshape(*by_rank.shape[:2], 8, n // 8).mean(dim=(0, 1, 3))  # 8 rank octiles
    want = RHO - EPS + 2 * EPS * (torch.arange(8, dtype=torch.float64) * 8 + 3.5) / (n - 1)
    assert bool((bins[1:] > bins[:-1]).all()), bins
    torch.testing.assert_close(bins, want, rtol=0, atol=0.02)


def test_each_pruned_task_vector_keeps_its_l1_norm_with_one_factor(
    zero_base: tuple[list[Path], list[dict[str, torch.Tensor]]],
) -> None:
    paths, deltas = zero_base
    for i in range(3):
        scaled = _pruned(paths, i, 5, rescale=True)
        plain = _pruned(paths, i, 5, rescale=False)
        for name in SHAPES:
            tau, out = deltas[i][name].double(), scaled[name].double()
            keep = out != 0
            assert torch.equal(keep, plain[name] != 0), name  # rescaling does not change the mask
            assert 0.3 < float(keep.double().mean()) < 0.5, name
            l1 = float(tau.abs().sum())
            assert abs(float(out.abs().sum()) - l1) <= 1e-6 * l1, name
            ratio = out[keep] / tau[keep]
            factor = l1 / float(tau[keep].abs().sum())
            assert factor > 1.5, name
            # one factor: every survivor is tau * factor up to one float32 rounding
            assert float((ratio - factor).abs().max()) <= 2.0**-23 * factor, name


def test_the_seed_decides_the_masks(zero_base: tuple[list[Path], list[dict[str, torch.Tensor]]]) -> None:
    paths, deltas = zero_base
    a = _merge(_recipe(paths, "della", seed=7))
    b = _merge(_recipe(paths, "della", seed=7))
    c = _merge(_recipe(paths, "della", seed=8))
    for name in SHAPES:
        assert torch.equal(a[name], b[name]), name
    differ = (_pruned(paths, 0, 7, False)[ROWS] != 0) != (_pruned(paths, 0, 8, False)[ROWS] != 0)
    assert not torch.equal(a[ROWS], c[ROWS]) and float(differ.double().mean()) > 0.3
    # each expert draws its own mask (the expert index is in the key)
    m0 = MagnitudeRankedDrop(RHO, EPS, 7).apply_(deltas[0][ROWS].clone(), (), TensorContext(name=ROWS), 0) != 0
    m1 = MagnitudeRankedDrop(RHO, EPS, 7).apply_(deltas[0][ROWS].clone(), (), TensorContext(name=ROWS), 1) != 0
    assert float((m0 != m1).double().mean()) > 0.3


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_output_does_not_depend_on_workers_or_strategy(real_base: list[Path], method: str) -> None:
    assert get_method(method).capabilities.blockwise is None  # ranks per row, rescales per tensor: no stream
    r = _recipe(real_base, method, [1.0, 0.6, 1.4], density=0.6, epsilon=0.2, scaling=0.8, seed=3)
    ref = _merge(r, workers=1)
    for kw in ({"workers": 2}, {"strategy": "whole"}, {"strategy": "whole", "workers": 2}):
        got = _merge(r, **kw)
        for name in SHAPES:
            assert torch.equal(got[name], ref[name]), (kw, name)


def test_keep_probability_by_rank_within_the_row() -> None:
    drop = MagnitudeRankedDrop(0.5, 0.2, 0)
    p = drop.keep_probability(torch.tensor([[0.3, -0.1, 0.2, 0.1, -0.5]]))
    # ranks by |x|, ties by position: 3, 0, 2, 1, 4 of n - 1 = 4
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.3, 0.5, 0.4, 0.7]], dtype=torch.float64))
    assert drop.keep_probability(torch.tensor([[2.0]])).item() == 0.5  # a row of one: rho


@pytest.mark.parametrize(("method", "density", "epsilon"), [
    ("della", 0.9, 0.15), ("della", 0.1, 0.15), ("della_linear", 0.5, 0.5), ("della_linear", 0.85, 0.15),
])
def test_impossible_keep_probabilities_are_refused_in_one_line(
    cli: Any, tmp_path: Path, method: str, density: float, epsilon: float,
) -> None:
    z = {NORM: torch.zeros(4)}
    paths = _models(tmp_path, z, [{NORM: torch.ones(4)}, {NORM: -torch.ones(4)}])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe(paths, method, density=density, epsilon=epsilon)))
    res = cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert res.code == 2, res.text
    assert "strictly between 0 and 1" in res.err and method in res.err, res.err
    assert "Traceback" not in res.text and len(res.err.strip().splitlines()) == 1, res.err
    assert not (tmp_path / "out").exists()
    # density 1 prunes nothing: any epsilon is fine
    ok = _merge(_recipe(paths, method, density=1.0, epsilon=epsilon))
    assert ok[NORM].shape == (4,)
