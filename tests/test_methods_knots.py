"""KnOTS: checked against an independent re-implementation of the reference (gstoica27/KnOTS ``SVDMerger`` +
``masking_ops.py``), per tensor and with the reference's global trimming over all adapted layers, on LoRA factors,
dense deltas, and real peft adapters of a tiny LLaVA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from omnimerge.methods import TensorContext, get_method
from omnimerge.methods.base import LowRank
from omnimerge.methods.knots import shared_basis

torch.set_num_threads(1)


# --- the reference, written from gstoica27/KnOTS task_merger.py / masking_ops.py ---------------------------------


def ref_knots(
    deltas: list[list[torch.Tensor]], top_k: float, scaling: float, concat_across_output: bool = True
) -> list[torch.Tensor]:
    """``deltas[j][t]``: task t's update of matrix j. TIES masks over the flattened coordinates of all matrices
    (one row per task), sign from the sum of values with zeros set to the majority sign, disjoint mean."""
    bases, blocks = [], []
    for ds in deltas:
        xs = [d.double() if concat_across_output else d.double().T for d in ds]
        u, s, vh = torch.linalg.svd(torch.cat(xs, dim=1), full_matrices=False)
        u, vh, s = u[:, s > 1e-5], vh[s > 1e-5], s[s > 1e-5]
        n = xs[0].shape[1]
        bases.append(u)
        blocks.append([torch.diag(s) @ v for v in torch.split(vh, n, dim=1)])
    T = len(deltas[0])
    M = torch.stack([torch.cat([b[t].flatten() for b in blocks]) for t in range(T)])  # T x D
    d = M.shape[1]
    k = d - int(d * top_k)
    kth = M.abs().kthvalue(k, dim=1, keepdim=True).values
    prune = M.abs() >= kth
    pruned = M * prune
    sign = torch.sign(pruned.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign.unsqueeze(0) > 0, pruned > 0, pruned < 0) & prune
    masked = M * agree * scaling
    merged = masked.sum(0) / (masked != 0).sum(0).clamp(min=1)
    out, pos = [], 0
    for u, b in zip(bases, blocks, strict=True):
        size = b[0].numel()
        w = u @ merged[pos:pos + size].reshape(b[0].shape)
        pos += size
        out.append((w if concat_across_output else w.T).float())
    return out


def _lora(m: int, n: int, r: int, g: torch.Generator, scale: float = 1.0) -> LowRank:
    return LowRank(torch.randn(m, r, generator=g) * 0.3, torch.randn(r, n, generator=g), scale)


def _ctx(factors: list[LowRank] | None, name: str = "model.language_model.layers.0.self_attn.q_proj.weight") -> Any:
    return TensorContext(name=name, canonical=name, component="language_model", num_models=3, factors=factors)


def _params(**kw: Any) -> dict[str, Any]:
    m = get_method("knots")
    return m.resolve(kw, [{}, {}, {}])


@pytest.fixture
def loras() -> list[LowRank]:
    g = torch.Generator().manual_seed(0)
    return [_lora(48, 40, 4, g, 2.0), _lora(48, 40, 3, g, 0.5), _lora(48, 40, 5, g, 1.0)]


def test_shared_basis_from_factors_equals_dense(loras: list[LowRank]) -> None:
    dense = [f.dense() for f in loras]
    for concat in (True, False):
        u1, c1 = shared_basis(dense, loras, concat)
        u2, c2 = shared_basis(dense, None, concat)
        assert u1.shape[1] == u2.shape[1] == 12  # sum of the ranks
        for a, b, x in zip(c1, c2, dense, strict=True):
            # same coordinates up to the sign of each basis vector; U C_t reconstructs X_t
            assert torch.allclose(a.abs(), b.abs(), atol=1e-5)
            assert torch.allclose((u1 @ a).float(), x if concat else x.T, atol=1e-5)


def test_knots_task_arithmetic_is_task_arithmetic(loras: list[LowRank]) -> None:
    knots, ta = get_method("knots"), get_method("task_arithmetic")
    dense = [f.dense() for f in loras]
    expected = ta.fn(None, [d.clone() for d in dense], _ctx(None), **ta.resolve({"scaling": 0.6}, [{}] * 3))
    for factors in (loras, None):
        for concat in (True, False):
            got = knots.fn(None, [d.clone() for d in dense], _ctx(factors),
                           **_params(merge="task_arithmetic", concat_across_output=concat, granularity="tensor"))
            assert torch.allclose(got, expected, atol=1e-5), (factors is None, concat)


@pytest.mark.parametrize("concat", [True, False])
def test_knots_ties_matches_reference_per_tensor(loras: list[LowRank], concat: bool) -> None:
    knots = get_method("knots")
    dense = [f.dense() for f in loras]
    expected = ref_knots([dense], 0.2, 0.6, concat)[0]
    for factors in (loras, None):
        got = knots.fn(None, [d.clone() for d in dense], _ctx(factors),
                       **_params(granularity="tensor", concat_across_output=concat))
        assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    # and it is not task arithmetic
    assert not torch.allclose(expected, 0.6 * sum(dense), atol=1e-3)


def test_knots_non_matrix_and_zero_tensors() -> None:
    knots = get_method("knots")
    ties = get_method("ties")
    g = torch.Generator().manual_seed(1)
    vecs = [torch.randn(64, generator=g) for _ in range(3)]
    ctx = _ctx(None, "model.language_model.norm.weight")
    # density 0.25 of 64 entries: both trimming conventions keep 16 (see knots_threshold)
    got = knots.fn(None, [v.clone() for v in vecs], ctx, **_params(granularity="tensor", scaling=0.5, density=0.25))
    exp = ties.fn(None, [v.clone() for v in vecs], ctx,
                  **ties.resolve({"scaling": 0.5, "density": 0.25}, [{}] * 3))
    assert torch.equal(got, exp)
    zeros = [torch.zeros(8, 6) for _ in range(3)]
    assert torch.equal(knots.fn(None, zeros, _ctx(None), **_params()), torch.zeros(8, 6))


def test_knots_dare_is_deterministic(loras: list[LowRank]) -> None:
    knots = get_method("knots")
    dense = [f.dense() for f in loras]
    kw = _params(granularity="tensor", drop_rate=0.3, seed=5)
    a = knots.fn(None, [d.clone() for d in dense], _ctx(loras), **kw)
    b = knots.fn(None, [d.clone() for d in dense], _ctx(loras), **kw)
    c = knots.fn(None, [d.clone() for d in dense], _ctx(loras), **_params(granularity="tensor"))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --- end to end on peft adapters of a tiny LLaVA (global trimming, as the reference) -----------------------------


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.test_checkpoint_lora import build_base, make_adapter

    root = tmp_path_factory.mktemp("knots")
    base = build_base("llava", root / "base")
    adapters = [
        make_adapter("llava", base, root / "a1", 1),
        make_adapter("llava", base, root / "a2", 2, r=2, lora_alpha=6, use_rslora=True),
        make_adapter("llava", base, root / "a3", 3, rank_pattern={"v_proj": 2}),
    ]
    return {"root": root, "base": base, "adapters": adapters}


def test_knots_global_matches_reference_on_adapters(llava: dict[str, Any], tmp_path: Path) -> None:
    from tests.test_checkpoint_lora import _merge_api, models, peft_merged, read_weights

    base, adapters = llava["base"], llava["adapters"]
    recipe = {"base_model": str(base), "models": models(*adapters), "merge_method": "knots"}
    _merge_api(recipe, tmp_path / "k")
    got = read_weights(tmp_path / "k")
    base_w = read_weights(base)
    # the experts' deltas from peft, on the base's on-disk names
    from omnimerge.checkpoint.names import canonical_name
    from omnimerge.checkpoint.reader import Checkpoint

    ck = Checkpoint(base)
    merged = [peft_merged("llava", base, a) for a in adapters]
    deltas: dict[str, list[torch.Tensor]] = {}
    for name in merged[0]:
        bname = ck.find(canonical_name(name))
        if bname is None:
            continue
        ds = [m[name] - base_w[bname] for m in merged]
        if any(bool(d.any()) for d in ds):
            deltas[bname] = ds
    ck.close()
    assert len(deltas) == 6
    expected = dict(zip(deltas, ref_knots(list(deltas.values()), 0.2, 0.6), strict=True))
    for name, w in got.items():
        if name in expected:
            err = float((w - base_w[name] - expected[name]).abs().max())
            assert err <= 1e-5, (name, err)
        else:
            assert torch.equal(w, base_w[name]), name


def test_knots_mixes_adapters_and_full_models(llava: dict[str, Any], tmp_path: Path) -> None:
    from tests.test_checkpoint_lora import _merge_api, merged_full_model, models, read_weights

    base, adapters = llava["base"], llava["adapters"]
    full = merged_full_model("llava", base, adapters[1], tmp_path / "full1")
    ms = models(adapters[0], full, adapters[2])
    _merge_api({"base_model": str(base), "models": ms, "merge_method": "knots",
                "parameters": {"merge": "task_arithmetic", "scaling": 0.5}}, tmp_path / "k")
    _merge_api({"base_model": str(base), "models": ms, "merge_method": "task_arithmetic",
                "parameters": {"scaling": 0.5}}, tmp_path / "ta")
    a, b = read_weights(tmp_path / "k"), read_weights(tmp_path / "ta")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    # TIES on the mix (dense path, global) runs and changes exactly the adapted matrices
    _merge_api({"base_model": str(base), "models": ms, "merge_method": "knots"}, tmp_path / "kt")
    c, base_w = read_weights(tmp_path / "kt"), read_weights(base)
    assert sum(not torch.equal(c[k], base_w[k]) for k in c) == 6
