"""Modifiers composed with methods in the recipe (``modifiers:``): each composition equals the method that the
papers define for it (task arithmetic + DARE is DARE-TA, TIES + DARE is DARE-TIES, task arithmetic + LiNeS is
LiNeS, task arithmetic + Breadcrumbs' mask is Breadcrumbs), streamed equals whole, a global pass sees the
modified task vectors, and a bad modifier is refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import omnimerge

BIG = "model.layers.{}.mlp.up_proj.weight"  # 520 x 300: the streamed paths cut it into blocks
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("mods")
    g = torch.Generator().manual_seed(9)
    base = {**{BIG.format(i): torch.randn(520, 300, generator=g) * 0.02 for i in range(3)},
            EMBED: torch.randn(64, 32, generator=g) * 0.02}
    out = []
    for i in range(-1, 3):
        d = root / ("base" if i < 0 else f"expert{i}")
        d.mkdir()
        t = base if i < 0 else {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
        out.append(d)
    return out


def _recipe(fam: list[Path], method: str, params: dict[str, Any], modifiers: list[Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    r = {"base_model": str(fam[0]), "models": [{"model": str(p)} for p in fam[1:]], "merge_method": method,
         "parameters": params, "select": {"include": [".*"]}, **extra}
    if modifiers is not None:
        r["modifiers"] = modifiers
    return r


def _merge(recipe: dict[str, Any], **kw: Any) -> dict[str, torch.Tensor]:
    return omnimerge.merge_state_dict(recipe, hash_inputs=False, **kw)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8)


def test_task_arithmetic_with_dare_is_dare_ta(fam: list[Path]) -> None:
    got = _merge(_recipe(fam, "task_arithmetic", {"scaling": 0.7}, [{"dare": {"drop_rate": 0.4, "seed": 5}}]))
    _same(got, _merge(_recipe(fam, "dare_ta", {"scaling": 0.7, "drop_rate": 0.4, "seed": 5})))
    other_seed = _merge(_recipe(fam, "task_arithmetic", {"scaling": 0.7}, [{"dare": {"drop_rate": 0.4, "seed": 6}}]))
    assert not torch.equal(got[EMBED], other_seed[EMBED])


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_ties_with_dare_is_dare_ties(fam: list[Path], granularity: str) -> None:
    """DARE before TIES's trim is DARE-TIES; with global thresholds the global pass must see the dropped
    vectors (else the thresholds differ)."""
    p = {"scaling": 0.8, "density": 0.3, "granularity": granularity}
    got = _merge(_recipe(fam, "ties", p, [{"dare": {"drop_rate": 0.3, "seed": 2}}]))
    want = _merge(_recipe(fam, "dare_ties", {**p, "drop_rate": 0.3, "seed": 2}))
    _same(got, want, exact=False)  # the composition merges whole tensors; dare_ties may run the fused kernels
    assert not torch.equal(got[EMBED], _merge(_recipe(fam, "ties", p))[EMBED])


def test_task_arithmetic_with_lines_is_lines(fam: list[Path]) -> None:
    got = _merge(_recipe(fam, "task_arithmetic", {"scaling": 1.0}, [{"lines": {"alpha": 0.2, "beta": 0.5}}]))
    _same(got, _merge(_recipe(fam, "lines", {"alpha": 0.2, "beta": 0.5})))


def test_task_arithmetic_with_breadcrumbs_mask_is_breadcrumbs(fam: list[Path]) -> None:
    mods = [{"breadcrumbs": {"density": 0.5, "gamma": 0.05}}]
    got = _merge(_recipe(fam, "task_arithmetic", {"scaling": 0.9}, mods))
    _same(got, _merge(_recipe(fam, "breadcrumbs", {"scaling": 0.9, "density": 0.5, "gamma": 0.05})), exact=False)


def test_lines_over_ties_scales_each_layer(fam: list[Path]) -> None:
    """LiNeS on top of TIES (as its paper): the TIES delta of layer l times alpha + beta l / (L - 1)."""
    p = {"scaling": 1.0, "density": 0.3}
    plain = _merge(_recipe(fam, "ties", p))
    got = _merge(_recipe(fam, "ties", p, [{"lines": {"alpha": 0.25, "beta": 0.5}}]))
    base = _merge(_recipe(fam, "ties", {**p, "scaling": 0.0}))
    for i in range(3):
        k = BIG.format(i)
        torch.testing.assert_close(got[k] - base[k], (plain[k] - base[k]) * (0.25 + 0.5 * i / 2), rtol=1e-5,
                                   atol=1e-8)  # W is rounded to float32 (ulp ~2e-9 at |W| ~ 0.02)
    torch.testing.assert_close(got[EMBED] - base[EMBED], (plain[EMBED] - base[EMBED]) * 0.25, rtol=1e-5, atol=1e-8)


def test_modifiers_in_order_and_streamed_equals_whole(fam: list[Path]) -> None:
    mods = [{"dare": {"drop_rate": 0.5, "seed": 1}}, {"lines": {"alpha": 0.3, "beta": 0.3}}]
    recipe = _recipe(fam, "magmax", {"scaling": 1.0}, mods)
    with omnimerge.Merger(recipe, hash_inputs=False) as m:
        auto = m.state_dict()
        assert m.last_report.strategies.get("fused", 0) >= 1, m.last_report.strategies  # elementwise: streamed
        assert m.last_report.method == "magmax+dare+lines"
    _same(auto, _merge(recipe, strategy="whole"))
    # a whole-tensor modifier makes the composition whole-tensor
    with omnimerge.Merger(_recipe(fam, "magmax", {}, [{"magnitude": {"density": 0.5}}]), hash_inputs=False) as m:
        m.state_dict()
        assert set(m.last_report.strategies) == {"whole"}, m.last_report.strategies


def test_recipe_with_modifiers_is_recorded_in_the_model_card(fam: list[Path], tmp_path: Path) -> None:
    omnimerge.merge(_recipe(fam, "task_arithmetic", {}, [{"lines": {"alpha": 0.1}}]), tmp_path / "o",
                    hash_inputs=False)
    card = (tmp_path / "o" / "README.md").read_text()
    assert "modifiers" in card and "lines" in card
    omnimerge.merge(_recipe(fam, "task_arithmetic", {}), tmp_path / "p", hash_inputs=False)
    assert "modifiers" not in (tmp_path / "p" / "README.md").read_text()


@pytest.mark.parametrize(("mods", "needle"), [
    ([{"sharpen": {}}], "modifiers[0]: unknown modifier 'sharpen' (known: breadcrumbs, dare, lines, magnitude)"),
    ([{"dare": {"rate": 0.1}}], "modifiers[0].dare: modifier 'dare' has no parameter 'rate'"),
    ([{"dare": {"drop_rate": 1.0}}], "drop_rate"),
    (["lines", {"dare": {}, "lines": {}}], "modifiers[1]: expected one modifier"),
])
def test_bad_modifiers_refused_in_one_line(fam: list[Path], tmp_path: Path, cli: Any, mods: list[Any],
                                          needle: str) -> None:
    r = tmp_path / "r.json"
    r.write_text(json.dumps(_recipe(fam, "ties", {}, mods)))
    res = cli("merge", r, "-o", tmp_path / "out", "-q")
    assert res.code == 2 and needle in res.err, res.text
    assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.text
    assert not (tmp_path / "out").exists()
