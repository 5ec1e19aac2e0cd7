"""Entry-selection methods (MagMax, EMR, RAM, RAM+, consensus, NearSwap, LiNeS) and mergekit's linear on small
hand-made cases whose results are written out by hand, streamed against whole, and their refusals.

The golden cases (tests/test_golden.py) check them against the reference implementations; these pin what the
golden cases do not reach: the layer coefficient of LiNeS on a partial selection, the edges of each rule, the
block-streamed path and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import omnimerge
from tests.tiny_models import save_tensors

LAYER = "model.layers.{}.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"
BIG = "model.layers.0.self_attn.q_proj.weight"  # 700 x 300: several 64K-entry blocks, the last one partial


def _models(root: Path, base: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]]) -> list[Path]:
    """The base folder, then one folder per expert W0 + delta (float32: the hand results are exact)."""
    out = [save_tensors(root / "base", base)]
    for i, d in enumerate(deltas):
        out.append(save_tensors(root / f"expert{i}", {k: v + d.get(k, torch.zeros_like(v)) for k, v in base.items()}))
    return out


def _recipe(paths: list[Path], method: str, weights: list[float] | None = None, **params: Any) -> dict[str, Any]:
    models = [{"model": str(p)} if weights is None else {"model": str(p), "parameters": {"weight": w}}
              for p, w in zip(paths[1:], weights or [None] * (len(paths) - 1), strict=True)]
    return {"base_model": str(paths[0]), "models": models, "merge_method": method, "parameters": params,
            "select": {"include": [".*"]}}


def _merge(recipe: dict[str, Any], **kw: Any) -> dict[str, torch.Tensor]:
    return omnimerge.merge_state_dict(recipe, hash_inputs=False, **kw)


def _row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


@pytest.fixture
def row3(tmp_path: Path) -> list[Path]:
    """One 1 x 6 tensor, base 10, three experts: columns exercise ties, sign splits and inactive entries."""
    base = {EMBED: torch.full((1, 6), 10.0)}
    d = [_row(1.0, -2.0, 0.0, 0.5, 3.0, 0.0),
         _row(-3.0, 2.0, 0.0, 0.0, -1.0, 4.0),
         _row(1.0, 1.0, 0.0, 0.0, -1.0, -4.0)]
    return _models(tmp_path, base, [{EMBED: x} for x in d])


def test_magmax_takes_largest_magnitude_later_expert_on_ties(row3: list[Path]) -> None:
    out = _merge(_recipe(row3, "magmax", scaling=1.0))[EMBED]
    # column 1: |-2| = |2| -> expert 1 (later wins); column 5: |4| = |-4| -> expert 2
    assert out.tolist() == [[7.0, 12.0, 10.0, 10.5, 13.0, 6.0]]
    half = _merge(_recipe(row3, "magmax", scaling=0.5))[EMBED]
    assert half.tolist() == [[8.5, 11.0, 10.0, 10.25, 11.5, 8.0]]


def test_emr_elected_sign_times_largest_agreeing_magnitude(row3: list[Path]) -> None:
    out = _merge(_recipe(row3, "emr", scaling=1.0))[EMBED]
    # sums: -1, 1, 0, 0.5, 1, 0 -> gamma -1, +1, -1, +1, +1, -1 (0 -> -1)
    # agreeing max: 3, 2, none (0), 0.5, 3, 4
    assert out.tolist() == [[7.0, 12.0, 10.0, 10.5, 13.0, 6.0]]


def test_ram_averages_over_active_experts_only(row3: list[Path]) -> None:
    out = _merge(_recipe(row3, "ram", epsilon=0.75))[EMBED]
    # column 0: all active -> -1/3; 1: all -> 1/3; 2: none -> base; 3: 0.5 <= eps -> none; 4: all -> 1/3;
    # 5: experts 1, 2 -> 0
    want = torch.tensor([[10 - 1 / 3, 10 + 1 / 3, 10.0, 10.0, 10 + 1 / 3, 10.0]])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    # the default epsilon: column 3 active in expert 0 alone keeps its value
    assert _merge(_recipe(row3, "ram"))[EMBED][0, 3].item() == 10.5


def test_ramplus_boosts_unique_entries_by_the_shared_ratio(tmp_path: Path) -> None:
    base = {EMBED: torch.zeros(1, 5)}
    # expert 0 active at 0, 1, 2 (2 shared with expert 1), expert 1 at 1, 2, 4 -> entry 0 and 4 unique
    paths = _models(tmp_path, base, [{EMBED: _row(2.0, 1.0, 3.0, 0.0, 0.0)},
                                     {EMBED: _row(0.0, 3.0, 1.0, 0.0, 4.0)}])
    out = _merge(_recipe(paths, "ramplus_tl", r=0.5, alpha=1.5))[EMBED]
    # expert 0: S = 2, U = 1 -> rho 2, clipped to 1.5 -> lambda 1.75; expert 1 likewise
    assert out.tolist() == [[3.5, 2.0, 2.0, 0.0, 7.0]]
    capped = _merge(_recipe(paths, "ramplus_tl", r=0.5, alpha=0.2))[EMBED]
    torch.testing.assert_close(capped, torch.tensor([[2.2, 2.0, 2.0, 0.0, 4.4]]), rtol=0, atol=1e-6)


def test_consensus_keeps_entries_of_at_least_k_masks(row3: list[Path]) -> None:
    def run(k: int, lam: float = 0.6) -> list[float]:
        return _merge(_recipe(row3, "consensus", scaling=1.0, tall_mask_lambda=lam, prun_thre_k=k))[EMBED][0].tolist()

    # tau_MTL = -1, 1, 0, 0.5, 1, 0
    assert run(0) == [9.0, 11.0, 10.0, 10.5, 11.0, 10.0]  # k = 0: task arithmetic
    assert run(4) == [10.0] * 6  # k > T: the base
    # masks (lambda 0.6, strict): col 0: |1| > 1.2? no, |3| > 1.2 yes, |1| > 1.2 no -> 1; col 1: 1.8, 1.8, 0 ->
    # |2| yes, |2| yes, |1| > 0 yes -> 3; col 3: |0.5| > 0 yes -> 1; col 4: |3| > 1.2 yes, |1| > 1.2 no x2 -> 1;
    # col 5: |4| > 2.4 yes x2 -> 2 (tau_MTL 0 there)
    assert run(2) == [10.0, 11.0, 10.0, 10.0, 10.0, 10.0]
    assert run(1) == [9.0, 11.0, 10.0, 10.5, 11.0, 10.0]


def test_nearswap_moves_at_most_t_towards_the_expert(tmp_path: Path) -> None:
    paths = _models(tmp_path, {EMBED: torch.full((1, 5), 1.0)}, [{EMBED: _row(0.05, -0.3, 0.0, 2.0, -0.1)}])
    out = _merge(_recipe(paths, "nearswap", t=0.1))[EMBED]
    torch.testing.assert_close(out, torch.tensor([[1.05, 0.9, 1.0, 1.1, 0.9]]), rtol=0, atol=1e-7)


@pytest.mark.parametrize(("params", "experts", "needle"), [
    ({"t": 0.1}, 2, "exactly 1 expert; the recipe lists 2"),
    ({}, 1, "nearswap needs 't'"),
])
def test_nearswap_refusals_are_one_line_and_write_nothing(
    cli: Any, tmp_path: Path, params: dict[str, Any], experts: int, needle: str,
) -> None:
    zero = {EMBED: torch.zeros(1, 3)}
    paths = _models(tmp_path, {EMBED: torch.ones(1, 3)}, [zero] * experts)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe(paths, "nearswap", **params)))
    res = cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert res.code == 2, res.text
    assert needle in res.err, res.err
    assert "Traceback" not in res.text and len(res.err.strip().splitlines()) == 1, res.err
    assert not (tmp_path / "out").exists()


def test_lines_coefficient_rises_with_depth_in_the_base_stack(tmp_path: Path) -> None:
    base = {EMBED: torch.zeros(2, 2), **{LAYER.format(i): torch.zeros(2, 2) for i in range(5)}}
    ones = {k: torch.ones(2, 2) for k in base}
    paths = _models(tmp_path, base, [ones, ones])
    recipe = _recipe(paths, "lines", alpha=0.2, beta=0.8)
    out = _merge(recipe)
    # tau = 2 everywhere; layer l of 5 gets 0.2 + 0.8 l / 4, the embeddings 0.2
    assert out[EMBED].unique().tolist() == [pytest.approx(0.4)]
    for i in range(5):
        assert out[LAYER.format(i)].unique().tolist() == [pytest.approx(2 * (0.2 + 0.8 * i / 4))], i
    # merging only layers 1 and 3: the depth is still the base's 5 layers, not the 2 selected
    recipe["select"] = {"include": [r"model\.layers\.[13]\..*"]}
    part = _merge(recipe)
    assert part[LAYER.format(1)].unique().tolist() == [pytest.approx(0.8)]
    assert part[LAYER.format(3)].unique().tolist() == [pytest.approx(1.6)]
    assert part[LAYER.format(0)].unique().tolist() == [0.0] and part[EMBED].unique().tolist() == [0.0]


def test_linear_weights_normalised_or_summed(tmp_path: Path) -> None:
    base = {EMBED: torch.full((1, 2), 1.0)}
    paths = _models(tmp_path, base, [{EMBED: _row(1.0, 3.0)}, {EMBED: _row(3.0, -1.0)}])  # W = 2, 4 / 4, 0
    out = _merge(_recipe(paths, "linear", weights=[1.0, 3.0]))[EMBED]
    assert out.tolist() == [[3.5, 1.0]]  # (2 + 12) / 4, (4 + 0) / 4
    summed = _merge(_recipe(paths, "linear", weights=[0.5, 0.25], normalize=False))[EMBED]
    assert summed.tolist() == [[2.0, 2.0]]  # 0.5 W1 + 0.25 W2: not an average, and the base is not mixed in


def test_linear_refuses_zero_weight_sum_only_when_normalising(cli: Any, tmp_path: Path) -> None:
    paths = _models(tmp_path, {EMBED: torch.ones(1, 2)}, [{EMBED: _row(1.0, 1.0)}, {EMBED: _row(2.0, 2.0)}])
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe(paths, "linear", weights=[1.0, -1.0])))
    res = cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert res.code == 2 and "sums to zero" in res.err and len(res.err.strip().splitlines()) == 1, res.text
    assert not (tmp_path / "out").exists()
    # W1 - W2 is a legitimate (if unusual) unnormalised sum
    out = _merge(_recipe(paths, "linear", weights=[1.0, -1.0], normalize=False))[EMBED]
    assert out.tolist() == [[-1.0, -1.0]]


STREAMED = [("magmax", {"scaling": 0.7}), ("emr", {"scaling": 0.9}), ("ram", {"epsilon": 2e-3}),
            ("consensus", {"scaling": 0.4, "prun_thre_k": 2}), ("lines", {"alpha": 0.3, "beta": 0.5}),
            ("linear", {})]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    g = torch.Generator().manual_seed(7)
    base = {BIG: torch.randn(700, 300, generator=g), EMBED: torch.randn(300, 64, generator=g)}
    deltas = [{k: torch.randn(v.shape, generator=g) * 3e-3 for k, v in base.items()} for _ in range(3)]
    return _models(tmp_path_factory.mktemp("sel"), base, deltas)


@pytest.mark.parametrize(("method", "params"), STREAMED, ids=[m for m, _ in STREAMED])
def test_streamed_equals_whole(big: list[Path], method: str, params: dict[str, Any]) -> None:
    recipe = _recipe(big, method, **params)
    with omnimerge.Merger(recipe, hash_inputs=False) as m:
        auto = m.state_dict()
        used = m.last_report.strategies
    # linear of full experts is computed from their weights; the others stream BIG in fused blocks
    assert used.get("from_weights" if method == "linear" else "fused", 0) >= 1, used
    whole = _merge(recipe, strategy="whole")
    assert auto.keys() == whole.keys()
    for k in auto:
        assert torch.equal(auto[k], whole[k]), (method, k)


def test_refusal_says_why_a_method_cannot_run_with_its_defaults() -> None:
    from omnimerge.methods import get_method

    assert "exactly 1 expert; the recipe lists 3" in (get_method("nearswap").refusal(3) or "")
    assert "needs 't'" in (get_method("nearswap").refusal(1) or "")  # one expert, but no default swap distance
    assert get_method("ties").refusal(3) is None and get_method("magmax").refusal(1) is None


def test_arcee_fusion_keeps_the_outlier_importances(tmp_path: Path) -> None:
    """Each entry is the base's or the expert's; the kept set is the importances at or above the outlier bar,
    recomputed here in numpy float64 from the definition."""
    import numpy as np

    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(40, 30, generator=g) * 0.05
    tau = torch.randn(40, 30, generator=g) * 1e-3
    tau[3, 4], tau[17, 0] = 0.4, -0.3  # two large changes: their rows' KL grows, their importances stand out
    paths = _models(tmp_path, {EMBED: w0}, [{EMBED: tau}])
    out = _merge(_recipe(paths, "arcee_fusion"))[EMBED]
    w1 = (w0 + tau).double().numpy()
    b = w0.double().numpy()

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(w1) + 1e-8, softmax(b) + 1e-8
    imp = (np.abs(w1 - b) * (p * np.log(p / q)).sum(axis=1, keepdims=True)).ravel()
    srt = np.sort(imp)
    q1, q2, q3 = (srt[int(f * (imp.size - 1))] for f in (0.25, 0.5, 0.75))
    keep = (imp >= q2 + 1.5 * (q3 - q1)).reshape(w0.shape)
    assert 0 < keep.sum() < keep.size and keep[3, 4] and keep[17, 0]
    expert = w0 + tau
    assert torch.equal(out[torch.from_numpy(keep)], expert[torch.from_numpy(keep)])
    assert torch.equal(out[torch.from_numpy(~keep)], w0[torch.from_numpy(~keep)])
