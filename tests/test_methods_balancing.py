"""SCE and PCB on small cases: SCE by hand (selection by variance, weights from the selected vectors, sign
erase), PCB against an independent float64 computation written from the definitions.

The golden cases (tests/test_golden.py) check both against their references; these pin the steps one by one,
the edges (no selection, nothing selected, a zero sign sum, constant magnitudes) and SCE's choice of weights at
the scale of LLM deltas, where mergekit's absolute 1e-6 switch would make them equal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import omnimerge
from tests.tiny_models import save_tensors

EMBED = "model.embed_tokens.weight"
SMALL = "model.layers.0.mlp.up_proj.weight"  # 4 x 5: d < 10^4, the clamp only pulls the top magnitude down
WIDE = "model.layers.0.mlp.down_proj.weight"  # 2 x 10000: d >= 10^4, both tails clamped


def _models(root: Path, base: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]]) -> list[Path]:
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


# --- SCE ------------------------------------------------------------------------------------------------------

# columns: c0 equal in every expert (variance 0), c1 var 6, c2 8/3, c3 1/6 (large, so the unselected energies
# are nearly equal), c4 32/3, c5 1/6, c6 50/3 (sum 0)
SCE_TAU = [[0.5, 4.0, -3.0, 20.0, -1.0, 2.0, 5.0],
           [0.5, 1.0, 1.0, 20.5, 3.0, 2.5, -5.0],
           [0.5, -2.0, -1.0, 19.5, -5.0, 1.5, 0.0]]
# select_topk 0.5 of the 6 non-zero variances: k = 3 -> c6, c4, c1. Energies of the selected vectors (x 1/7):
# 16 + 1 + 25 = 42, 1 + 9 + 25 = 35, 4 + 25 + 0 = 29 -> w = (42, 35, 29) / 106.
# c1: sum 3 -> +, experts 0 and 1 agree: (42 * 4 + 35 * 1) / 77 = 29/11
# c4: sum -3 -> -, experts 0 and 2: (42 * -1 + 29 * -5) / 71 = -187/71
# c6: sum 0 -> +, expert 0 alone (expert 2's 0 agrees with nothing): 5
SCE_WANT = [0.0, 29 / 11, 0.0, 0.0, -187 / 71, 0.0, 5.0]


def _sce_models(root: Path, scale: float) -> list[Path]:
    return _models(root, {EMBED: torch.zeros(1, 7)}, [{EMBED: torch.tensor([r]) * scale} for r in SCE_TAU])


def test_sce_selects_by_variance_weights_by_selected_energy_and_erases_signs(tmp_path: Path) -> None:
    paths = _sce_models(tmp_path, 1.0)
    out = _merge(_recipe(paths, "sce", select_topk=0.5))[EMBED]
    torch.testing.assert_close(out, torch.tensor([SCE_WANT]), rtol=1e-6, atol=1e-6)
    # weights from the unselected vectors (the full energies) would give other values in c1 and c4
    e = [sum(x * x for x in r) for r in SCE_TAU]
    assert abs((e[0] * 4 + e[1]) / (e[0] + e[1]) - 29 / 11) > 0.1
    assert abs((e[0] * -1 + e[2] * -5) / (e[0] + e[2]) + 187 / 71) > 0.1


def test_sce_without_selection_and_with_nothing_selected(tmp_path: Path) -> None:
    paths = _models(tmp_path, {EMBED: torch.full((1, 7), 10.0)}, [{EMBED: torch.tensor([r])} for r in SCE_TAU])
    everything = _merge(_recipe(paths, "sce"))[EMBED]  # select_topk 1: no selection
    assert everything[0, 0].item() == 10.5  # variance 0, all agree: their weighted mean, 0.5
    # c6: expert 0 alone agrees with the + of a zero sum, whatever the weights
    assert everything[0, 6].item() == 15.0
    nothing = _merge(_recipe(paths, "sce", select_topk=0.1))[EMBED]  # k = int(0.6) = 0: the base
    assert torch.equal(nothing, torch.full((1, 7), 10.0))


def test_sce_weights_do_not_switch_off_at_llm_scale(tmp_path: Path) -> None:
    """Deltas of ~1e-4 (mean squares ~1e-7, under mergekit's absolute 1e-6 switch to equal weights): the same
    merge scaled by 1e-4. Equal weights would give c1 = (4 + 1) / 2 e-4."""
    out = _merge(_recipe(_sce_models(tmp_path, 1e-4), "sce", select_topk=0.5))[EMBED]
    torch.testing.assert_close(out, torch.tensor([SCE_WANT]) * 1e-4, rtol=1e-5, atol=1e-11)
    assert abs(out[0, 1].item() - 2.5e-4) > 1e-5


# --- PCB ------------------------------------------------------------------------------------------------------


def _pcb_reference(taus: list[torch.Tensor], ratio: float, scaling: float, weight: list[float]) -> torch.Tensor:
    """PCB of one tensor in float64, from the definitions (sorted copies for the order statistics)."""
    x = torch.stack([t.reshape(-1).double() for t in taus])
    T, d = x.shape
    lo = x.abs().sort(dim=1).values[:, math.floor(1e-4 * d)].unsqueeze(1)
    hi = x.abs().sort(dim=1).values[:, math.floor((1 - 1e-4) * d - 1)].unsqueeze(1)
    a = torch.minimum(torch.maximum(x.abs(), lo), hi)
    hat = x.sign() * a
    span = a.max(dim=1, keepdim=True).values - a.min(dim=1, keepdim=True).values
    norm = torch.where(span > 0, (a - a.min(dim=1, keepdim=True).values) / span.clamp(min=1e-300), 0.0)
    score = torch.exp(T * norm**2) * torch.tanh(x * x.sum(dim=0))
    kappa = score.sort(dim=1).values[:, math.floor(d * (1 - ratio))].unsqueeze(1)
    top = score.max(dim=1, keepdim=True).values
    s = (torch.maximum(score, kappa) - kappa) / (top - kappa)
    w = torch.tensor(weight, dtype=torch.float64).unsqueeze(1)
    merged = (w * s * hat).sum(dim=0) / s.sum(dim=0).clamp(min=1e-12)
    return scaling * merged.reshape(taus[0].shape)


@pytest.fixture
def pcb_models(tmp_path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    # tau * sum tau ~0.1-1 even at the clamped tops: tanh is neither linear nor saturated there, so the inter
    # term of the clamped vectors (instead of the unclamped ones) moves the top scores; one outlier per expert
    deltas = []
    for i in range(3):
        small = torch.randn(4, 5, generator=g) * 0.3
        small[i, i] = 1.5 * (-1) ** i
        deltas.append({SMALL: small, WIDE: torch.randn(2, 10000, generator=g) * 0.3})
    base = {SMALL: torch.full((4, 5), 1.0), WIDE: torch.zeros(2, 10000)}
    return _models(tmp_path, base, deltas), deltas


@pytest.mark.parametrize(("ratio", "scaling", "weight"), [(0.1, 1.2, [1.0, 1.0, 1.0]), (0.25, 1.0, [0.8, 1.3, 1.1])])
def test_pcb_matches_an_independent_float64_computation(
    pcb_models: tuple[list[Path], list[dict[str, torch.Tensor]]], ratio: float, scaling: float, weight: list[float],
) -> None:
    paths, deltas = pcb_models
    out = _merge(_recipe(paths, "pcb", weight, pcb_ratio=ratio, scaling=scaling))
    for name, base in ((SMALL, 1.0), (WIDE, 0.0)):
        want = base + _pcb_reference([d[name] for d in deltas], ratio, scaling, weight)
        torch.testing.assert_close(out[name].double(), want, rtol=1e-5, atol=1e-6)


def test_pcb_small_case_by_hand(tmp_path: Path) -> None:
    """Two experts, four entries, r = 0.75: kappa is each expert's second smallest score."""
    t0, t1 = [0.5, -1.0, 2.0, 4.0], [0.5, 1.0, -1.0, 3.0]
    paths = _models(tmp_path, {EMBED: torch.zeros(1, 4)}, [{EMBED: torch.tensor([t0])}, {EMBED: torch.tensor([t1])}])
    out = _merge(_recipe(paths, "pcb", pcb_ratio=0.75, scaling=1.0))[EMBED][0].double()
    # clamp (d < 10^4: to the second largest): A0 = .5 1 2 2, A1 = .5 1 1 1 -> tau^0 = .5 -1 2 2, tau^1 = .5 1 -1 1
    # min-max: A0 -> 0 1/3 1 1, A1 -> 0 1 1 1; intra = exp(2 A^2); sum tau = 1 0 1 7 (unclamped)
    th, e2 = math.tanh, math.e**2
    s0 = [th(0.5), 0.0, e2 * th(2.0), e2 * th(28.0)]  # intra * tanh(tau0 * sum)
    s1 = [th(0.5), 0.0, e2 * th(-1.0), e2 * th(21.0)]
    k0, k1 = sorted(s0)[1], sorted(s1)[1]  # kappa: index int(4 * 0.25) = 1 -> tanh(.5) and 0
    S0 = [(max(s, k0) - k0) / (max(s0) - k0) for s in s0]
    S1 = [(max(s, k1) - k1) / (max(s1) - k1) for s in s1]
    assert S0[:2] == [0.0, 0.0] and S1[1:3] == [0.0, 0.0] and S0[3] == S1[3] == 1.0
    # entry 0: expert 1 alone -> .5; entry 1: nobody -> 0 (the 1e-12 floor); entry 2: expert 0 alone -> its 2;
    # entry 3: both at the top score -> the mean of the clamped values (2 + 1) / 2, not of 4 and 3
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, 2.0, 1.5], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert 0.0 < S0[2] < 1.0 and 0.0 < S1[0] < 1.0


def test_pcb_constant_magnitudes_do_not_make_nan(tmp_path: Path) -> None:
    paths = _models(tmp_path, {EMBED: torch.zeros(1, 4)},
                    [{EMBED: torch.tensor([[1.0, -1.0, 1.0, -1.0]])}, {EMBED: torch.tensor([[1.0, 1.0, -1.0, 1.0]])}])
    out = _merge(_recipe(paths, "pcb", pcb_ratio=0.5, scaling=1.0))[EMBED]
    assert bool(torch.isfinite(out).all())
    # min-max of a constant |tau| is 0, intra 1; sum tau = 2 0 0 0: both experts score tanh(2) at entry 0 only
    assert out.tolist() == [[1.0, 0.0, 0.0, 0.0]]
