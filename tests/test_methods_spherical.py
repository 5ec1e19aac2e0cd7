"""Spherical methods (SLERP, NuSLERP, MultiSLERP, Karcher, Model Stock) on small hand cases whose results are
worked out in the comments, and their refusals.

The golden cases (tests/test_golden.py) check them against mergekit on realistic tensors; these pin the edges
the golden cases do not reach: the endpoints, the closed forms on orthogonal vectors, the linear fallbacks,
which vectors NuSLERP interpolates, the one-expert and vanishing-mean cases, the Karcher iteration itself,
negative Model Stock ratios and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import omnimerge
from omnimerge.errors import MethodParameterError
from omnimerge.methods import TensorContext, get_method
from tests.tiny_models import save_tensors

A = "model.layers.0.mlp.up_proj.weight"
B = "model.layers.0.mlp.down_proj.weight"
LAYER = "model.layers.{}.mlp.up_proj.weight"


def _models(root: Path, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]) -> list[Path]:
    """The base folder, then one folder per expert given by its full weights (float32)."""
    out = [save_tensors(root / "base", base)]
    for i, w in enumerate(experts):
        out.append(save_tensors(root / f"expert{i}", {k: w.get(k, v) for k, v in base.items()}))
    return out


def _recipe(paths: list[Path], method: str, weights: list[float] | None = None, **params: Any) -> dict[str, Any]:
    models = [{"model": str(p)} if weights is None else {"model": str(p), "parameters": {"weight": w}}
              for p, w in zip(paths[1:], weights or [None] * (len(paths) - 1), strict=True)]
    return {"base_model": str(paths[0]), "models": models, "merge_method": method, "parameters": params,
            "select": {"include": [".*"]}}


def _merge(recipe: dict[str, Any], **kw: Any) -> dict[str, torch.Tensor]:
    return omnimerge.merge_state_dict(recipe, hash_inputs=False, **kw)


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.float32)


def _close(got: torch.Tensor, want: Any, atol: float = 1e-6) -> None:
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float32), rtol=0, atol=atol)


def _slerp_formula(t: float, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The spherical formula without any fallback, in float64 (whole tensors as one vector)."""
    u64, v64 = u.double(), v.double()
    c = float((u64 * v64).sum() / (u64.norm() * v64.norm()))
    om = math.acos(max(-1.0, min(1.0, c)))
    return ((math.sin((1 - t) * om) * u64 + math.sin(t * om) * v64) / math.sin(om)).float()


# --- slerp --------------------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> list[Path]:
    """A: base and expert at a generic angle (2 x 2); B: orthogonal rows of norm 2."""
    base = {A: _t([1.0, 0.0], [1.0, 0.0]), B: _t([2.0, 0.0])}
    return _models(tmp_path, base, [{A: _t([0.0, 1.0], [1.0, 1.0]), B: _t([0.0, 2.0])}])


def test_slerp_endpoints_give_base_and_expert(pair: list[Path]) -> None:
    base = _merge(_recipe(pair, "slerp", t=0.0))
    assert torch.equal(base[A], _t([1.0, 0.0], [1.0, 0.0])) and torch.equal(base[B], _t([2.0, 0.0]))
    expert = _merge(_recipe(pair, "slerp", t=1.0))
    _close(expert[A], [[0.0, 1.0], [1.0, 1.0]], atol=1e-7)
    _close(expert[B], [[0.0, 2.0]], atol=1e-7)


def test_slerp_orthogonal_closed_form_keeps_the_norm(pair: list[Path]) -> None:
    out = _merge(_recipe(pair, "slerp", t=1 / 3))[B]
    # Omega = pi/2: W = sin(pi/3) (2, 0) + sin(pi/6) (0, 2) = (sqrt 3, 1), norm 2 (linear: (4/3, 2/3))
    _close(out, [[math.sqrt(3.0), 1.0]])


def test_slerp_interpolates_the_whole_tensor_as_one_vector(pair: list[Path]) -> None:
    out = _merge(_recipe(pair, "slerp", t=0.5))[A]
    # u = (1, 0, 1, 0), v = (0, 1, 1, 1): c = 1 / sqrt 6; at t = 1/2, W = (W0 + W1) / (2 cos(Omega / 2))
    # with cos(Omega / 2) = sqrt((1 + c) / 2)
    f = 1.0 / (2.0 * math.sqrt((1.0 + 1.0 / math.sqrt(6.0)) / 2.0))
    _close(out, [[f, f], [2 * f, f]])
    # row by row the first row (orthogonal) would be (1, 1) / sqrt 2 instead
    assert abs(out[0, 0].item() - math.sqrt(0.5)) > 0.1


def test_slerp_falls_back_to_linear_per_tensor(tmp_path: Path) -> None:
    base = {A: _t([1.0, 1.0]), B: _t([1.0, 1.0]), LAYER.format(1): _t([1.0, 1.0])}
    experts = {A: _t([1.0, 1.02]),  # c = 0.99995 > 0.9995: linear
               B: _t([1.0, 1.2]),  # c = 0.99589: spherical
               LAYER.format(1): _t([-1.0, -1.01])}  # c = -0.99999: |c| > 0.9995, linear
    paths = _models(tmp_path, base, [experts])
    out = _merge(_recipe(paths, "slerp", t=0.3))
    lin_a = [[1.0, 1.006]]
    _close(out[A], lin_a, atol=1e-7)
    assert (_slerp_formula(0.3, base[A], experts[A]) - torch.tensor(lin_a)).abs().max() > 1e-6  # tells them apart
    sph_b = _slerp_formula(0.3, base[B], experts[B])
    _close(out[B], sph_b, atol=1e-7)
    assert (sph_b - torch.tensor([[1.0, 1.06]])).abs().max() > 1e-4  # not linear
    _close(out[LAYER.format(1)], [[0.4, 0.397]], atol=1e-7)


def test_slerp_t_follows_a_schedule_over_depth(tmp_path: Path) -> None:
    base = {LAYER.format(i): _t([2.0, 0.0]) for i in range(3)}
    paths = _models(tmp_path, base, [{k: _t([0.0, 2.0]) for k in base}])
    out = _merge(_recipe(paths, "slerp", t=[0.0, 1.0]))
    assert torch.equal(out[LAYER.format(0)], _t([2.0, 0.0]))
    _close(out[LAYER.format(1)], [[math.sqrt(2.0), math.sqrt(2.0)]])  # t = 1/2 at the middle layer
    _close(out[LAYER.format(2)], [[0.0, 2.0]], atol=1e-7)


# --- nuslerp ------------------------------------------------------------------------------------------------


@pytest.fixture
def two(tmp_path: Path) -> list[Path]:
    """Base 2 everywhere (it must not enter the interpolation); tau_0 = [[1, 0], [1, 1]], tau_1 = [[0, 1],
    [1, 1]]."""
    base = {A: torch.full((2, 2), 2.0)}
    return _models(tmp_path, base, [{A: 2.0 + _t([1.0, 0.0], [1.0, 1.0])}, {A: 2.0 + _t([0.0, 1.0], [1.0, 1.0])}])


def test_nuslerp_rows_columns_and_whole_tensor(two: list[Path]) -> None:
    def run(**params: Any) -> torch.Tensor:
        return _merge(_recipe(two, "nuslerp", weights=[1.0, 1.0], **params))[A] - 2.0

    # t = 1/2. rows: row 0 orthogonal -> (1, 1) / sqrt 2; row 1 identical -> (1, 1)
    r = math.sqrt(0.5)
    _close(run(nuslerp_flatten=False), [[r, r], [1.0, 1.0]])
    # columns (nuslerp_row_wise: true, as mergekit's code): each column pair at 45 degrees, k (x + y) with
    # k = sin(pi/8) / sin(pi/4); column 0: x = (1, 1), y = (0, 1); column 1: x = (0, 1), y = (1, 1)
    k = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    _close(run(nuslerp_flatten=False, nuslerp_row_wise=True), [[k, k], [2 * k, 2 * k]])
    # whole tensor (the default): x = (1, 0, 1, 1), y = (0, 1, 1, 1), c = 2/3, (x + y) / (2 cos(Omega / 2))
    f = 1.0 / (2.0 * math.sqrt(5.0 / 6.0))
    _close(run(), [[f, f], [2 * f, 2 * f]])
    # nuslerp_row_wise does nothing when the tensor is flattened
    _close(run(nuslerp_row_wise=True), [[f, f], [2 * f, 2 * f]])


def test_nuslerp_t_is_the_second_models_share_of_the_weights(tmp_path: Path) -> None:
    paths = _models(tmp_path, {A: _t([1.0, 1.0])}, [{A: _t([3.0, 1.0])}, {A: _t([1.0, 3.0])}])
    out = _merge(_recipe(paths, "nuslerp", weights=[1.0, 3.0]))[A]
    # tau_0 = (2, 0), tau_1 = (0, 2), t = 3/4: 2 (sin(pi/8), sin(3 pi/8)); swapped t would mirror it
    _close(out, [[1.0 + 2 * math.sin(math.pi / 8), 1.0 + 2 * math.sin(3 * math.pi / 8)]])
    # weights summing to ~0: t = 1/2
    even = _merge(_recipe(paths, "nuslerp", weights=[1.0, -1.0]))[A]
    _close(even, [[1.0 + math.sqrt(2.0), 1.0 + math.sqrt(2.0)]])


# --- multislerp ---------------------------------------------------------------------------------------------


def test_multislerp_of_one_expert_is_that_expert(tmp_path: Path) -> None:
    paths = _models(tmp_path, {A: _t([1.0, 2.0], [3.0, 4.0])}, [{A: _t([1.5, 1.0], [3.0, 5.0])}])
    _close(_merge(_recipe(paths, "multislerp", weights=[0.4]))[A], [[1.5, 1.0], [3.0, 5.0]], atol=1e-7)


def test_multislerp_mean_direction_at_the_mean_norm(tmp_path: Path) -> None:
    paths = _models(tmp_path, {A: _t([1.0, 1.0])}, [{A: _t([4.0, 1.0])}, {A: _t([1.0, 5.0])}])  # (3, 0), (0, 4)
    s = 1 / math.sqrt(2.0)
    # equal weights: m = (1, 1) / sqrt 2, scale (3 + 4) / 2 (a plain average would be (1.5, 2))
    _close(_merge(_recipe(paths, "multislerp"))[A], [[1 + 3.5 * s, 1 + 3.5 * s]])
    # weights 1, 3 -> 1/4, 3/4: m = (1, 3) / sqrt 10, scale 3/4 + 3
    d = 3.75 / math.sqrt(10.0)
    _close(_merge(_recipe(paths, "multislerp", weights=[1.0, 3.0]))[A], [[1 + d, 1 + 3 * d]])
    # normalize_weights false: the same direction, scale 1 * 3 + 3 * 4
    d = 15.0 / math.sqrt(10.0)
    out = _merge(_recipe(paths, "multislerp", weights=[1.0, 3.0], normalize_weights=False))[A]
    _close(out, [[1 + d, 1 + 3 * d]], atol=1e-5)


def test_multislerp_vanishing_mean_direction(cli: Any, tmp_path: Path) -> None:
    # two opposite task vectors: the weighted sum of the task vectors, (1, 0) / 2 + (-2, 0) / 2
    p2 = _models(tmp_path / "two", {A: _t([1.0, 1.0])}, [{A: _t([2.0, 1.0])}, {A: _t([-1.0, 1.0])}])
    _close(_merge(_recipe(p2, "multislerp"))[A], [[0.5, 1.0]])
    # three experts (one equal to the base): no mean direction, a one-line error naming the tensor
    p3 = _models(tmp_path / "three", {A: _t([1.0, 1.0])},
                 [{A: _t([2.0, 1.0])}, {A: _t([0.0, 1.0])}, {A: _t([1.0, 1.0])}])
    with pytest.raises(MethodParameterError, match=f"tensor '{A}'.*vanishes"):
        _merge(_recipe(p3, "multislerp"))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe(p3, "multislerp")))
    res = cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert res.code == 2 and A in res.err and len(res.err.strip().splitlines()) == 1, res.text
    assert "Traceback" not in res.text and not (tmp_path / "out").exists()


def test_multislerp_all_zero_task_vectors_give_the_base(tmp_path: Path) -> None:
    paths = _models(tmp_path, {A: _t([1.0, 2.0])}, [{}, {}, {}])
    assert torch.equal(_merge(_recipe(paths, "multislerp"))[A], _t([1.0, 2.0]))


# --- karcher ------------------------------------------------------------------------------------------------


def test_karcher_of_identical_experts_is_that_expert(tmp_path: Path) -> None:
    w = _t([0.3, -1.2, 2.0], [0.5, 0.1, -0.7])
    paths = _models(tmp_path, {A: torch.zeros(2, 3)}, [{A: w}] * 3)
    _close(_merge(_recipe(paths, "karcher"))[A], w, atol=1e-6)


def test_karcher_geodesic_mean_at_the_mean_norm(tmp_path: Path) -> None:
    # full weights (2, 0), (0, 3), (0, 3): directions at angles 0, pi/2, pi/2 with alpha 1/3 each; their Karcher
    # mean on the circle is at angle pi/3, the normalised Euclidean mean (1/3, 2/3) at atan 2. Scale: the mean
    # of the norms 8/3 (the norm of the mean would be |(2/3, 2)|). The base (1, 1) is not one of the points.
    paths = _models(tmp_path, {A: _t([1.0, 1.0])}, [{A: _t([2.0, 0.0])}, {A: _t([0.0, 3.0])}, {A: _t([0.0, 3.0])}])
    s = 8.0 / 3.0
    _close(_merge(_recipe(paths, "karcher"))[A], [[s * 0.5, s * math.sqrt(3.0) / 2]])
    # no iteration: the renormalised Euclidean mean
    _close(_merge(_recipe(paths, "karcher", max_iter=0))[A], [[s / math.sqrt(5.0), 2 * s / math.sqrt(5.0)]])


def test_karcher_from_task_vectors_equals_from_weights() -> None:
    """The engine computes full experts from their weights; LoRA experts go through the task-vector form."""
    meth = get_method("karcher")
    assert meth.capabilities.from_weights is not None and not meth.capabilities.elementwise
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 5, generator=g)
    ws = [torch.randn(8, 5, generator=g) for _ in range(3)]  # far apart: several iterations
    kw = meth.resolve({}, [{}] * 3)
    ctx = TensorContext(name=A, num_models=3)
    from_w = meth.capabilities.from_weights([w.clone() for w in ws], ctx, **kw)
    delta = meth.fn(base, [w - base for w in ws], ctx, **kw)
    _close(base + delta, from_w, atol=1e-5)
    norms = torch.stack([w.norm() for w in ws])
    assert math.isclose(float(from_w.norm()), float(norms.mean()), rel_tol=1e-5)
    # the mean is the stationary point: the tangent sum at it is ~0
    m = (from_w / from_w.norm()).double()
    tangent = torch.zeros_like(m)
    for w in ws:
        u = (w / w.norm()).double()
        th = math.acos(float((m * u).sum()))
        tangent += th / math.sin(th) * (u - math.cos(th) * m)
    assert tangent.norm() < 1e-4


# --- model_stock --------------------------------------------------------------------------------------------


def test_model_stock_ratio_from_task_vector_cosines(tmp_path: Path) -> None:
    base = {A: _t([1.0, 1.0])}
    # T = 2, tau = (1, 0), (1, 1): c = 1/sqrt 2, t = 2c / (1 + c) = 2 (sqrt 2 - 1); delta = t (1, 1/2)
    p2 = _models(tmp_path / "two", base, [{A: _t([2.0, 1.0])}, {A: _t([2.0, 2.0])}])
    t = 2 * (math.sqrt(2.0) - 1)
    _close(_merge(_recipe(p2, "model_stock"))[A], [[1 + t, 1 + t / 2]])
    # T = 3, tau = (1, 0), (0, 1), (1, 1): cosines 0, 1/sqrt 2, 1/sqrt 2 -> c = sqrt 2 / 3,
    # t = 3c / (1 + 2c); delta = t (2/3, 2/3)
    p3 = _models(tmp_path / "three", base, [{A: _t([2.0, 1.0])}, {A: _t([1.0, 2.0])}, {A: _t([2.0, 2.0])}])
    c = math.sqrt(2.0) / 3
    t = 3 * c / (1 + 2 * c)
    _close(_merge(_recipe(p3, "model_stock"))[A], [[1 + t * 2 / 3, 1 + t * 2 / 3]])


def test_model_stock_negative_ratio_is_applied_and_a_vanishing_one_gives_the_base(tmp_path: Path) -> None:
    base = {A: _t([1.0, 1.0])}
    # tau = (1, 0), (-1, 1): c = -1/sqrt 2, t = 2c / (1 + c) = -2 / (sqrt 2 - 1) ~ -4.83; delta = t (0, 1/2)
    paths = _models(tmp_path / "neg", base, [{A: _t([2.0, 1.0])}, {A: _t([0.0, 2.0])}])
    t = -2 / (math.sqrt(2.0) - 1)
    _close(_merge(_recipe(paths, "model_stock"))[A], [[1.0, 1 + t / 2]], atol=1e-5)
    # tau = (1, 0), (-1, 0): c = -1, 1 + c = 0 -> t = 0
    opp = _models(tmp_path / "opp", base, [{A: _t([2.0, 1.0])}, {A: _t([0.0, 1.0])}])
    assert torch.equal(_merge(_recipe(opp, "model_stock"))[A], _t([1.0, 1.0]))


def test_model_stock_filter_wise_ratio_per_row(tmp_path: Path) -> None:
    base = {A: torch.zeros(2, 2)}
    # tau_0 = [[1, 0], [1, 0]], tau_1 = [[1, 1], [-1, 1]]: whole tensor c = 0 -> t = 0 (the base);
    # per row: row 0 c = 1/sqrt 2 -> t = 2 (sqrt 2 - 1), mean (1, 1/2); row 1 c = -1/sqrt 2 -> t ~ -4.83, mean
    # (0, 1/2)
    paths = _models(tmp_path, base, [{A: _t([1.0, 0.0], [1.0, 0.0])}, {A: _t([1.0, 1.0], [-1.0, 1.0])}])
    assert torch.equal(_merge(_recipe(paths, "model_stock"))[A], torch.zeros(2, 2))
    t0, t1 = 2 * (math.sqrt(2.0) - 1), -2 / (math.sqrt(2.0) - 1)
    _close(_merge(_recipe(paths, "model_stock", filter_wise=True))[A], [[t0, t0 / 2], [0.0, t1 / 2]], atol=1e-5)


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "params", "experts", "needle"), [
    ("slerp", {"t": 0.5}, 2, "exactly 1 expert; the recipe lists 2"),
    ("slerp", {}, 1, "slerp needs 't'"),
    ("slerp", {"t": 1.5}, 1, "'t' must be a float in [0, 1]"),
    ("nuslerp", {}, 3, "exactly 2 experts; the recipe lists 3"),
    ("model_stock", {}, 1, "at least 2 experts; the recipe lists 1"),
])
def test_refusals_are_one_line_and_write_nothing(
    cli: Any, tmp_path: Path, method: str, params: dict[str, Any], experts: int, needle: str,
) -> None:
    paths = _models(tmp_path, {A: torch.ones(1, 3)}, [{A: torch.full((1, 3), float(i + 2))} for i in range(experts)])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe(paths, method, **params)))
    res = cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert res.code == 2, res.text
    assert needle in res.err, res.err
    assert "Traceback" not in res.text and len(res.err.strip().splitlines()) == 1, res.err
    assert not (tmp_path / "out").exists()


def test_multislerp_refuses_weights_summing_to_zero_when_normalising(cli: Any, tmp_path: Path) -> None:
    paths = _models(tmp_path, {A: torch.ones(1, 2)}, [{A: _t([2.0, 1.0])}, {A: _t([1.0, 2.0])}])
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe(paths, "multislerp", weights=[1.0, -1.0])))
    res = cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert res.code == 2 and "sums to zero" in res.err and len(res.err.strip().splitlines()) == 1, res.text
    assert not (tmp_path / "out").exists()


def test_refusal_reports_the_defaults_that_cannot_run() -> None:
    assert "needs 't'" in (get_method("slerp").refusal(1) or "")
    assert "exactly 2 experts" in (get_method("nuslerp").refusal(3) or "")
    assert get_method("nuslerp").refusal(2) is None and get_method("multislerp").refusal(1) is None
    assert get_method("karcher").refusal(1) is None and get_method("model_stock").refusal(2) is None
