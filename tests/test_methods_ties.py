"""The streamed (block-wise) TIES / DARE-TIES / DARE-TA paths give exactly the whole-tensor results, and DARE's
counter-based masks do not depend on how a tensor is cut into blocks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.checkpoint.writer import ShardedWriter
from omnimerge.methods import TensorContext, operators

BIG = "model.layers.0.mlp.up_proj.weight"  # 1100 x 1030: 18 blocks of 64K or 2 kernel chunks, both partial
WIDE = "model.embed_tokens.weight"  # 1200 x 400
SMALL = "model.layers.0.input_layernorm.weight"
#: (method, per-expert weights, parameters): trimming, weights, global majority, DARE with and without trimming
TIES_CASES = [
    ("ties", None, {"scaling": 1.0, "density": 0.2}),
    ("ties", [1.0, 0.5, 2.0], {"scaling": 0.7, "density": 0.35}),
    ("ties", None, {"scaling": 0.5, "density": 0.2, "granularity": "global"}),
    ("dare_ties", None, {"scaling": 1.0, "drop_rate": 0.5, "density": 1.0, "seed": 3}),
    ("dare_ties", [0.8, 1.0, 1.3], {"scaling": 0.8, "drop_rate": 0.3, "density": 0.4, "seed": 5}),
    # p * 2^32 rounds to 2^32: every entry dropped (the kernels' 32-bit threshold cannot say so)
    ("dare_ties", None, {"scaling": 1.0, "drop_rate": 1.0 - 2.0**-40, "density": 1.0, "seed": 1}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base and 3 bf16 experts whose deltas are a few bf16 ulps: magnitudes tie massively, and many entries
    have an elected sign of 0 with non-zero trimmed values (the case the majority-sign fix-ups exist for)."""
    root = tmp_path_factory.mktemp("bw")
    g = torch.Generator().manual_seed(0)
    base = {
        BIG: (torch.randn(1100, 1030, generator=g) * 0.02).to(torch.bfloat16),
        WIDE: (torch.randn(1200, 400, generator=g) * 0.02).to(torch.bfloat16),
        SMALL: torch.ones(1030, dtype=torch.bfloat16),
    }
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    for i in range(-1, 3):
        d = root / ("base" if i < 0 else f"expert{i}")
        d.mkdir()
        t = {}
        for k, v in base.items():
            if i < 0:
                t[k] = v
            else:
                noise = torch.randint(-3, 4, v.shape, generator=g).to(torch.float32) * 1e-4
                if k == WIDE:  # whole rows untouched by fine-tuning, as in embeddings
                    noise[: 300] = 0
                t[k] = (v.float() + noise).to(torch.bfloat16)
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
    return root


def _save_model(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``tensors`` saved as a model folder ``dst`` with the config of the model folder ``src``."""
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def _with_entry(models: Path, tmp: Path, expert: str, name: str, index: tuple[int, int], value: float) -> Path:
    """A copy of ``expert`` with one entry of tensor ``name`` set to ``value``."""
    t = load_file(str(models / expert / "model.safetensors"))
    t[name][index] = value
    return _save_model(models / expert, tmp / "bad", t)


def _as_float32(models: Path, dst: Path, edit: Any) -> Path:
    """Every model of ``models`` in float32 under ``dst``, each tensor dict passed through ``edit(folder, t)``."""
    for d in models.iterdir():
        t = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
        _save_model(d, dst / d.name, edit(d.name, t))
    return dst


def _recipe(models: Path, method: str, weights: list[float] | None = None, **params) -> dict:  # type: ignore[no-untyped-def]
    ws = weights or [1.0, 1.0, 1.0]
    return {"base_model": str(models / "base"),
            "models": [{"model": str(models / f"expert{i}"), "parameters": {"weight": w}} for i, w in enumerate(ws)],
            "merge_method": method, "parameters": params, "select": {"include": [".*"]}}


def _run(models: Path, tmp: Path, recipe: dict, name: str, **kw) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    omnimerge.merge(recipe, tmp / name, hash_inputs=False, **kw)
    return load_file(str(tmp / name / "model.safetensors"))


def _whole(models: Path, tmp: Path, recipe: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """The reference: every tensor merged whole (no block streaming), chosen through the strategy option."""
    report = omnimerge.merge(recipe, tmp / "whole", hash_inputs=False, strategy="whole")
    assert set(report.strategies) <= {"whole", "from_weights"}, report.strategies
    return load_file(str(tmp / "whole" / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), f"{k}: not bit-identical"


@pytest.fixture
def patches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Per streamed tensor: the number of undecided entries (elected sign 0, some non-zero trimmed entry)."""
    seen: list[int] = []
    real = operators.SparseBlockwise.fixups

    def spy(self, st):  # type: ignore[no-untyped-def]
        seen.append(sum(len(i) for i in st.fix_idx))
        return real(self, st)

    monkeypatch.setattr(operators.SparseBlockwise, "fixups", spy)
    return seen


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("wrong", ["opposite", "zero"])
def test_wrong_majority_guess_is_amended(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         wrong: str, use_kernels: bool) -> None:
    """Undecided entries stream with the majority sign guessed from the sample; when the full count disagrees
    (forced here) or is 0, they are patched into the written output: the result is still exact."""
    r = _recipe(models, "ties", scaling=0.8, density=0.25)
    whole = _whole(models, tmp_path, r, monkeypatch)
    real_begin = operators.SparseBlockwise.begin
    written: list[int] = []
    real_patch = ShardedWriter.patch
    flip = (lambda g: -g) if wrong == "opposite" else (lambda g: 0.0 if g else 1.0)
    monkeypatch.setattr(operators.SparseBlockwise, "begin", lambda self, *a: _set_guess(real_begin(self, *a), flip))
    monkeypatch.setattr(ShardedWriter, "patch",
                        lambda self, n, i, v: written.append(len(i)) or real_patch(self, n, i, v))
    streamed = _run(models, tmp_path, r, "streamed", use_kernels=use_kernels)
    assert written and sum(written) > 0, "the forced wrong guess must be amended"
    _same(streamed, whole)


def _set_guess(st, flip):  # type: ignore[no-untyped-def]
    st.guess = flip(st.guess)
    return st


@pytest.mark.parametrize(
    ("method", "weights", "params"),
    [*TIES_CASES, ("dare_ta", [1.0, 0.5, 2.0], {"scaling": 0.6, "drop_rate": 0.4, "seed": 1})],
)
def test_streamed_equals_whole_tensor(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      patches: list[int], method: str, weights: list[float] | None,
                                      params: dict) -> None:  # type: ignore[type-arg]
    r = _recipe(models, method, weights, **params)
    streamed = _run(models, tmp_path, r, "streamed", workers=2)
    whole = _whole(models, tmp_path, r, monkeypatch)
    _same(streamed, whole)
    base = load_file(str(models / "base" / "model.safetensors"))
    if params.get("drop_rate", 0.0) > 0.99:  # everything dropped: the merged model is the base
        assert all(torch.equal(streamed[k], base[k]) for k in base)
    else:
        assert not torch.equal(streamed[BIG], base[BIG]), "the merge changed nothing: the test would prove nothing"
    if method == "ties" and params.get("granularity") != "global":
        assert patches and sum(patches) > 0, "no entry needed the majority-sign fix-up: the case is too easy"


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.3}),
                                                ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05})])
def test_missed_bracket_falls_back_exactly(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           method: str, params: dict) -> None:  # type: ignore[type-arg]
    r = _recipe(models, method, scaling=1.0, **params)
    whole = _whole(models, tmp_path, r, monkeypatch)
    real = operators.SparseBlockwise.begin
    misses = []

    def wrong_bracket(self, ctx, numel, params, sample):  # type: ignore[no-untyped-def]
        st = real(self, ctx, numel, params, sample)
        for i, b in enumerate(st.brackets):
            if b is not None:  # a bracket far below every magnitude: the counting sweep must detect the miss
                st.brackets[i] = operators.RankBracket(lo=0.0, hi=1e-30, k=b.k)
                misses.append(i)
        return st

    monkeypatch.setattr(operators.SparseBlockwise, "begin", wrong_bracket)
    streamed = _run(models, tmp_path, r, "streamed")
    assert misses
    _same(streamed, whole)


def test_streamed_ties_reports_non_finite_input(models: Path, tmp_path: Path) -> None:
    # TIES would trim a NaN away silently: it must be reported instead
    bad = _with_entry(models, tmp_path, "expert1", BIG, (3, 5), float("nan"))
    r = _recipe(models, "ties", density=0.2)
    r["models"][1]["model"] = str(bad)
    with pytest.raises(omnimerge.errors.NonFiniteTensorError, match="up_proj"):
        omnimerge.merge(r, tmp_path / "out", hash_inputs=False)
    assert not (tmp_path / "out").exists()


def test_dare_masks_do_not_depend_on_blocks() -> None:
    ctx = TensorContext(name="w")
    n = 200_003
    whole = operators.dare_multiplier(ctx, 0, 0, n, 0.3, seed=11)
    parts = torch.cat([operators.dare_multiplier(ctx, 0, s, min(n, s + 65536) - s, 0.3, seed=11) for s in range(0, n, 65536)])
    assert torch.equal(whole, parts)
    pos = np.array([0, 17, 65535, 65536, 199_999, 200_002], dtype=np.int64)
    assert torch.equal(operators.dare_multiplier(ctx, 0, 0, 0, 0.3, positions=pos, seed=11), whole[torch.from_numpy(pos)])
    assert set(whole.unique().tolist()) == {0.0, float(np.float32(1.0 / 0.7))}
    assert abs(float((whole == 0).float().mean()) - 0.3) < 0.005
    # experts and tensors draw different masks; positions past 2^32 are keyed by their high word too
    assert not torch.equal(whole, operators.dare_multiplier(ctx, 1, 0, n, 0.3, seed=11))
    assert not torch.equal(whole, operators.dare_multiplier(ctx, 0, 0, n, 0.3, seed=12))
    assert not torch.equal(whole, operators.dare_multiplier(TensorContext(name="v"), 0, 0, n, 0.3, seed=11))
    far = operators.dare_multiplier(ctx, 0, 0, 0, 0.3, positions=np.arange(n, dtype=np.int64) + (1 << 32), seed=11)
    assert not torch.equal(whole, far) and abs(float((far == 0).float().mean()) - 0.3) < 0.005
    # across 2^32 too: a block that straddles it gives each entry the mask it has in any other block
    edge = (1 << 32) - 1000
    span = operators.dare_multiplier(ctx, 0, edge, 3000, 0.3, seed=11)
    assert torch.equal(span[:1000], operators.dare_multiplier(ctx, 0, edge, 1000, 0.3, seed=11))
    assert torch.equal(span[1000:], operators.dare_multiplier(ctx, 0, 1 << 32, 2000, 0.3, seed=11))
    # neighbouring entries are independent: the joint keep rate of (j, j+1) is (1 - p)^2
    k = (whole != 0).float()
    assert abs(float((k[1:] * k[:-1]).mean()) - 0.49) < 0.005


def test_compiled_dare_masks_past_two_to_the_32() -> None:
    """The compiled kernels' DARE masks are ties.dare_'s, on both sides of flat position 2^32 (where the high word
    of the position is keyed in)."""
    from omnimerge import kernels

    assert kernels.available()
    ctx = TensorContext(name="w")
    n, start, p = 5000, (1 << 32) - 2000, 0.35
    keys = np.array([operators.dare_key(ctx, i, 4) for i in range(2)], dtype=np.int64)
    tv = np.ones((2, n), np.float32)
    assert kernels._kernels()["prepare"](tv, n, start, keys, round(p * 2.0**32), float(np.float32(1 / (1 - p))),
                                         True)  # type: ignore[index]
    for i in range(2):
        assert torch.equal(torch.from_numpy(tv[i]), operators.dare_multiplier(ctx, i, start, n, p, seed=4))
    assert 0.3 < float((tv == 0).mean()) < 0.4


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from omnimerge import kernels

    assert kernels.available(), "numba kernels unavailable: the fast path would silently be off"
    kernels.wait()  # a background load started by an earlier merge must not leave chunks on the torch path
    calls: list[int] = []
    real = kernels.LinearBlocks.__call__

    def spy(self, base, experts):  # type: ignore[no-untyped-def]
        calls.append(experts[0].numel())
        return real(self, base, experts)

    monkeypatch.setattr(kernels.LinearBlocks, "__call__", spy)
    return calls


@pytest.mark.parametrize(
    ("method", "params", "out_dtype", "fp32_inputs"),
    [
        ("task_arithmetic", {"scaling": 0.3}, None, False),
        ("task_arithmetic", {"scaling": 1.0}, "float32", False),
        ("weight_average", {}, None, False),
        ("task_arithmetic", {"scaling": 0.7}, None, True),
        ("weight_average", {}, "bfloat16", True),
    ],
)
def test_compiled_linear_kernel_equals_torch(models: Path, tmp_path: Path, kernel_calls: list[int], method: str,
                                             params: dict, out_dtype: str | None, fp32_inputs: bool) -> None:  # type: ignore[type-arg]
    src = models
    if fp32_inputs:
        src = _as_float32(models, tmp_path / "fp32", lambda _d, t: {k: v * 1.37 for k, v in t.items()})
    r = _recipe(src, method, **params)
    if out_dtype:
        r["out_dtype"] = out_dtype
    fast = _run(src, tmp_path, r, "fast", workers=2)
    assert sum(kernel_calls) >= 1100 * 1030 + 1200 * 400, "the compiled kernel did not run"
    n = len(kernel_calls)
    slow = _run(src, tmp_path, r, "slow", use_kernels=False)
    assert len(kernel_calls) == n
    _same(fast, slow) if next(iter(fast.values())).dtype != torch.float32 else \
        [torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=0) for k in fast]
    base = load_file(str(src / "base" / "model.safetensors"))
    assert not torch.equal(fast[BIG].float(), base[BIG].float())


def test_compiled_kernel_is_skipped_for_weights_and_reports_nan(models: Path, tmp_path: Path,
                                                                kernel_calls: list[int]) -> None:
    weighted = _run(models, tmp_path, _recipe(models, "task_arithmetic", [1.0, 0.5, 2.0], scaling=0.3), "w")
    assert not kernel_calls, "unit weights only: torch's add(alpha=w) may fuse a multiply-add"
    ref = _run(models, tmp_path, _recipe(models, "task_arithmetic", [1.0, 0.5, 2.0], scaling=0.3), "w2",
               use_kernels=False)
    _same(weighted, ref)
    bad = _with_entry(models, tmp_path, "expert2", WIDE, (1100, 7), float("inf"))
    r = _recipe(models, "task_arithmetic", scaling=0.3)
    r["models"][2]["model"] = str(bad)
    with pytest.raises(omnimerge.errors.NonFiniteTensorError, match="embed_tokens"):
        omnimerge.merge(r, tmp_path / "out", hash_inputs=False)
    assert kernel_calls and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("method", "weights", "params"),
    TIES_CASES,
)
def test_compiled_ties_equals_torch(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    patches: list[int], method: str, weights: list[float] | None,
                                    params: dict) -> None:  # type: ignore[type-arg]
    from omnimerge import kernels

    assert kernels.available()
    kernels.preload(torch.bfloat16, torch.bfloat16, 3, ties=True)
    kernels.wait()
    calls: list[int] = []
    real = kernels.TiesBlocks.merge
    monkeypatch.setattr(kernels.TiesBlocks, "merge",
                        lambda self, st, s, b, r: calls.append(b.numel()) or real(self, st, s, b, r))
    r = _recipe(models, method, weights, **params)
    fast = _run(models, tmp_path, r, "fast", workers=2)
    assert sum(calls) == 1100 * 1030 + 1200 * 400, "the compiled TIES kernel did not merge every large tensor"
    n_patched = sum(patches)
    slow = _run(models, tmp_path, r, "slow", use_kernels=False)
    _same(fast, slow)
    if method == "ties" and params.get("granularity") != "global":
        assert n_patched > 0 and sum(patches) == 2 * n_patched, "both paths amend the same undecided entries"


@pytest.mark.parametrize("experts", [1, 7, 12])
@pytest.mark.parametrize("method", ["task_arithmetic", "weight_average"])
def test_compiled_linear_kernel_any_number_of_experts(models: Path, tmp_path: Path, kernel_calls: list[int],
                                                      method: str, experts: int) -> None:
    """One loop over a tuple of the experts, for any number of them: the same bits as torch's left-to-right
    sum."""
    r = _recipe(models, method, [1.0] * 3, **({"scaling": 0.4} if method == "task_arithmetic" else {}))
    r["models"] = ((r["models"] + r["models"][::-1]) * 2)[:experts]
    fast = _run(models, tmp_path, r, "fast")
    assert kernel_calls
    _same(fast, _run(models, tmp_path, r, "slow", use_kernels=False))


@pytest.mark.parametrize("experts", [6, 9])
def test_compiled_ties_many_experts(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    experts: int) -> None:
    """6 experts (a fused loop) and 9 (more than the fused loops take: the row kernels) through the compiled TIES
    path: same bits as torch."""
    from omnimerge import kernels
    from omnimerge._generated.ties_fused import TIES_MAX

    kernels.preload(torch.bfloat16, torch.bfloat16, 3, ties=True)
    kernels.wait()
    rows: list[int] = []
    real = kernels._kernels()["ties_merge_chunk"]  # type: ignore[index]
    monkeypatch.setitem(kernels._kernels(), "ties_merge_chunk", lambda *a: rows.append(1) or real(*a))  # type: ignore[arg-type]
    for n, (method, params) in enumerate((("ties", {"scaling": 1.0, "density": 0.3}),
                           ("dare_ties", {"scaling": 0.9, "drop_rate": 0.4, "density": 0.5, "seed": 2}),
                           ("dare_ties", {"scaling": 1.0, "drop_rate": 1.0 - 2.0**-40, "density": 1.0, "seed": 2}))):
        r = _recipe(models, method, **params)
        r["models"] = (r["models"] * 3)[:experts]
        fast = _run(models, tmp_path, r, f"fast-{n}")
        _same(fast, _run(models, tmp_path, r, f"slow-{n}", use_kernels=False))
    assert bool(rows) == (experts > TIES_MAX)


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_weight_average_reads_no_base_tensor(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             use_kernels: bool, weights: list[float] | None) -> None:
    """From full checkpoints, weight averaging is computed from the experts' weights alone: the base's merged
    tensors are never read, and the streamed result (compiled or torch blocks) is exactly the whole-tensor
    sum_i w_i W_i / sum_i w_i in float32, rounded once."""
    from omnimerge.checkpoint.reader import Checkpoint

    reads: list[tuple[str, str]] = []
    real = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: reads.append((self.path.name, name)) or real(self, name))
    r = _recipe(models, "weight_average", weights)
    r["select"] = {"include": [r"mlp|embed"]}  # the layer norm stays the base's (copied, not read as a tensor)
    got = _run(models, tmp_path, r, "wa", use_kernels=use_kernels, workers=2)
    assert reads and not [n for d, n in reads if d == "base"], "the base was read for a merged tensor"
    monkeypatch.setattr(Checkpoint, "read", real)
    whole = _whole(models, tmp_path, r, monkeypatch)
    _same(got, whole)
    ws = weights or [1.0, 1.0, 1.0]
    experts = [load_file(str(models / f"expert{i}" / "model.safetensors")) for i in range(3)]
    for name in (BIG, WIDE):
        acc = experts[0][name].float() * ws[0] if ws[0] != 1.0 else experts[0][name].float()
        for e, w in zip(experts[1:], ws[1:], strict=True):
            acc = acc.add(e[name].float(), alpha=w)
        assert torch.equal(got[name].view(torch.int16), (acc / sum(ws)).to(torch.bfloat16).view(torch.int16))
    base = load_file(str(models / "base" / "model.safetensors"))
    assert torch.equal(got[SMALL], base[SMALL])


@pytest.mark.parametrize("value, match", [(float("nan"), "expert2.*NaN or Inf"), (3.0e38, "overflows")])
def test_weight_average_reports_bad_values(models: Path, tmp_path: Path, value: float, match: str) -> None:
    """A NaN in an expert names the expert and tensor; finite values whose sum overflows float32 are reported as
    an overflow; nothing is written either way."""
    def edit(folder: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if folder == "expert2" or (folder != "base" and value > 1e38):
            t[BIG][5, 7] = value
        return t

    src = _as_float32(models, tmp_path / "fp32", edit)
    with pytest.raises(omnimerge.errors.NonFiniteTensorError, match=match):
        omnimerge.merge(_recipe(src, "weight_average"), tmp_path / "out", hash_inputs=False)
    assert not (tmp_path / "out").exists()


BREADCRUMBS_CASES = [
    ("breadcrumbs", [1.0, 0.6, 1.4], {"scaling": 0.7, "density": 0.4, "gamma": 0.1}),
    ("breadcrumbs", None, {"scaling": 0.5, "density": 0.3, "gamma": 0.02, "normalize": True}),
    ("breadcrumbs_ties", [1.0, 0.6, 1.4], {"scaling": 0.7, "density": 0.4, "gamma": 0.1}),
    ("breadcrumbs_ties", [0.8, 1.0, 1.3], {"scaling": 1.0, "density": 0.2, "gamma": 0.0, "normalize": True}),
    ("breadcrumbs_ties", None, {"scaling": 1.0, "density": 0.95, "gamma": 0.1}),  # the cuts do not fit: n_top shrinks
]


@pytest.mark.parametrize(("method", "weights", "params"), BREADCRUMBS_CASES)
def test_breadcrumbs_streams_bit_identically(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             method: str, weights: list[float] | None,
                                             params: dict) -> None:  # type: ignore[type-arg]
    """A composed method gets the streamed form for free: its two cuts per expert are order statistics found by
    the shared bracket machinery, and the result equals the whole-tensor form bit for bit."""
    r = _recipe(models, method, weights, **params)
    report = omnimerge.merge(r, tmp_path / "streamed", hash_inputs=False, workers=2)
    assert report.strategies.get("blockwise", 0) >= 2, report.strategies  # BIG and WIDE stream
    streamed = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    whole = _whole(models, tmp_path, r, monkeypatch)
    _same(streamed, whole)
    base = load_file(str(models / "base" / "model.safetensors"))
    assert not torch.equal(streamed[BIG], base[BIG])


def test_breadcrumbs_rescale_merges_whole(models: Path, tmp_path: Path) -> None:
    """``rescale`` needs norms over the whole tensor: those parameters take the whole-tensor form (declared by the
    method, not found out), and rescaling changes the result."""
    r = _recipe(models, "breadcrumbs", scaling=0.7, density=0.4, gamma=0.1, rescale=True)
    report = omnimerge.merge(r, tmp_path / "a", hash_inputs=False)
    assert "blockwise" not in report.strategies, report.strategies
    plain = _recipe(models, "breadcrumbs", scaling=0.7, density=0.4, gamma=0.1)
    omnimerge.merge(plain, tmp_path / "b", hash_inputs=False)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert not torch.equal(a[BIG], b[BIG])


@pytest.mark.parametrize(("n", "density", "gamma"), [(1000, 0.4, 0.1), (1000, 0.95, 0.1), (997, 0.3, 0.0),
                                                     (1000, 1.0, 0.1), (50, 0.01, 0.5)])
def test_magnitude_outliers_is_the_sorted_index_mask(n: int, density: float, gamma: float) -> None:
    """On distinct magnitudes the order-statistic cuts select exactly mergekit's mask: sort |x| ascending, keep
    ranks [n_bot, N - n_top) with n_top = int(gamma N), n_bot = N - int(density N) - n_top (n_top shrinks when
    n_bot < 0); density 1 keeps everything."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    op = operators.MagnitudeOutliers(density, gamma, n)
    vals = [float(x.abs().kthvalue(k).values) for k in op.ranks]
    got = op.apply_(x.clone(), vals, TensorContext(name="t"), 0)
    want = torch.zeros(n)
    if density >= 1.0:
        want = x.clone()
    else:
        keep, top = int(density * n), int(gamma * n)
        bot = n - keep - top
        if bot < 0:
            top, bot = top + bot, 0
        idx = x.abs().argsort()[bot:n - top]
        want[idx] = x[idx]
    assert torch.equal(got, want)
    assert int(torch.count_nonzero(got)) == (n if density >= 1.0 else int(density * n))
