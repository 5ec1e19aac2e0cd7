"""Parameters as schedules over depth (mergekit's gradients) and the layer index in the method's context.

A list value of a float parameter is interpolated across the base's layer stack, t = layer / (depth - 1), and
tensors outside the layers take t = 0 (mergekit). Each layer's merged tensor must equal, bit for bit, a merge with
the scalar value of that layer, on every strategy (block-streamed, streamed TIES, whole).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.errors import MethodParameterError, RecipeError
from omnimerge.methods import registry
from omnimerge.methods.base import Schedule

LAYERS = 3
UP = "model.layers.{}.mlp.up_proj.weight"  # 600 x 512: streamed
Q = "model.layers.{}.self_attn.q_proj.weight"  # 64 x 64: whole
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sched")
    g = torch.Generator().manual_seed(0)
    base = {EMBED: (torch.randn(100, 64, generator=g) * 0.02).to(torch.bfloat16)}
    for i in range(LAYERS):
        base[UP.format(i)] = (torch.randn(600, 512, generator=g) * 0.02).to(torch.bfloat16)
        base[Q.format(i)] = (torch.randn(64, 64, generator=g) * 0.02).to(torch.bfloat16)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    for e in range(-1, 3):
        d = root / ("base" if e < 0 else f"expert{e}")
        d.mkdir()
        t = {k: v if e < 0 else (v.float() + torch.randn(v.shape, generator=g) * 2e-3).to(torch.bfloat16)
             for k, v in base.items()}
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
    return root


def _recipe(models: Path, method: str, per_model: list[dict[str, Any]] | None = None, **params: Any) -> dict:
    ms = [{"model": str(models / f"expert{i}"), **({"parameters": per_model[i]} if per_model else {})}
          for i in range(3)]
    return {"base_model": str(models / "base"), "models": ms, "merge_method": method, "parameters": params,
            "select": {"include": [".*"]}}


def _merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    omnimerge.merge(recipe, out, hash_inputs=False)
    return load_file(str(out / "model.safetensors"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize(("method", "param", "schedule", "fixed"), [
    ("task_arithmetic", "scaling", [0.2, 1.0], {}),
    ("ties", "density", [0.1, 0.3, 0.9], {"scaling": 0.8}),
    ("dare_ties", "drop_rate", [0.0, 0.6], {"scaling": 1.0, "density": 0.5, "seed": 3}),
])
def test_schedule_equals_per_layer_scalars(models: Path, tmp_path: Path, method: str, param: str,
                                           schedule: list[float], fixed: dict[str, Any]) -> None:
    got = _merge(_recipe(models, method, **fixed, **{param: schedule}), tmp_path / "sched")
    s = Schedule(tuple(schedule))
    for i in range(LAYERS):
        value = s.at(i / (LAYERS - 1))
        one = _merge(_recipe(models, method, **fixed, **{param: value}), tmp_path / f"l{i}")
        for name in (UP.format(i), Q.format(i)):
            assert torch.equal(_bits(got[name]), _bits(one[name])), f"{name}: not the merge with {param}={value}"
        if i == 0:  # outside the layers: t = 0
            assert torch.equal(_bits(got[EMBED]), _bits(one[EMBED]))
    assert not torch.equal(_bits(got[UP.format(0)]), _bits(_merge(
        _recipe(models, method, **fixed, **{param: s.at(1.0)}), tmp_path / "end")[UP.format(0)]))


def test_per_model_schedules(models: Path, tmp_path: Path) -> None:
    got = _merge(_recipe(models, "task_arithmetic", [{"weight": [1.0, 0.0]}, {}, {"weight": [0.0, 2.0]}],
                         scaling=0.5), tmp_path / "s")
    mid = _merge(_recipe(models, "task_arithmetic", [{"weight": 0.5}, {}, {"weight": 1.0}], scaling=0.5),
                 tmp_path / "m")
    assert torch.equal(_bits(got[UP.format(1)]), _bits(mid[UP.format(1)]))


def test_schedule_interpolation() -> None:
    s = Schedule((0.0, 1.0, 0.5))
    assert [s.at(t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.5, 1.0, 0.75, 0.5]
    assert Schedule((2.0, 4.0)).at(-1.0) == 2.0 and Schedule((2.0, 4.0)).at(2.0) == 4.0


@pytest.mark.parametrize(("params", "per_model", "error", "fragment"), [
    ({"density": [0.2, 1.5]}, None, MethodParameterError, "'density' must be a float in (0, 1]"),
    ({"granularity": ["tensor", "global"]}, None, MethodParameterError, "schedule over depth, for float"),
    ({"density": []}, None, MethodParameterError, "empty list"),
    ({"density": [0.2, 0.5], "granularity": "global"}, None, RecipeError, "cannot be used where 'ties'"),
])
def test_bad_schedules(models: Path, tmp_path: Path, params: dict, per_model: Any, error: type,
                       fragment: str) -> None:
    with pytest.raises(error, match=None) as e:
        omnimerge.merge(_recipe(models, "ties", per_model, **params), tmp_path / "o", hash_inputs=False)
    assert fragment in str(e.value), str(e.value)
    assert not (tmp_path / "o").exists()


def test_weights_summing_to_zero_at_some_depth(models: Path, tmp_path: Path) -> None:
    per = [{"weight": [1.0, -1.0]}, {"weight": [0.0, 0.0]}, {"weight": [-1.0, 1.0]}]  # zero sum everywhere
    with pytest.raises(MethodParameterError, match="sums to zero"):
        omnimerge.merge(_recipe(models, "weight_average", per), tmp_path / "o", hash_inputs=False)
    assert not (tmp_path / "o").exists()


def test_context_knows_the_layer(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, tuple[int | None, int]] = {}
    ta = registry()["task_arithmetic"]

    def spy(base, tvs, ctx, **kw):  # type: ignore[no-untyped-def]
        seen[ctx.name] = (ctx.layer, ctx.num_layers)
        return ta.fn(base, tvs, ctx, **kw)

    monkeypatch.setitem(registry(), "task_arithmetic", dataclasses.replace(
        ta, fn=spy, capabilities=dataclasses.replace(ta.capabilities, elementwise=False, linear=None)))
    omnimerge.merge(_recipe(models, "task_arithmetic"), tmp_path / "o", hash_inputs=False)
    assert seen[UP.format(2)] == (2, LAYERS) and seen[Q.format(0)] == (0, LAYERS)
    assert seen[EMBED] == (None, 0)
