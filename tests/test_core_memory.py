"""Merging in memory (omnimerge.Merger, merge_state_dict, merge_into) and the sink protocol.

In memory the merge takes the same strategies as on disk (block-streamed, the streamed TIES with its patched
entries, whole tensors), so every result is compared bit for bit with the checkpoint ``omnimerge.merge`` writes.
Also: repeated merges reuse the opened inputs, parameter overrides per merge, writing into a loaded transformers
model whose in-memory names differ from the checkpoint's, and the regressions of the core's review (the
modality fan-out without ``patch``, methods writing into the context, capabilities found by ``getattr``, the
checkpoint layer importing from the methods).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.checkpoint.writer import ShardedWriter
from omnimerge.errors import OutputError
from omnimerge.methods import TensorContext, operators, registry
from omnimerge.sinks import ModelSink, Sink, StateDictSink

BIG = "model.layers.0.mlp.up_proj.weight"  # 600 x 512 = 307,200 entries: block-streamed and TIES-streamed
SMALL = "model.layers.0.self_attn.q_proj.weight"  # merged whole
NORM = "model.layers.0.input_layernorm.weight"  # copied from the base (not selected by default)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 base and 3 experts whose deltas are a few bf16 ulps (many magnitude ties and undecided signs)."""
    root = tmp_path_factory.mktemp("mem")
    g = torch.Generator().manual_seed(0)
    base = {BIG: (torch.randn(600, 512, generator=g) * 0.02).to(torch.bfloat16),
            SMALL: (torch.randn(64, 64, generator=g) * 0.02).to(torch.bfloat16),
            NORM: torch.ones(512, dtype=torch.bfloat16)}
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    for i in range(-1, 3):
        d = root / ("base" if i < 0 else f"expert{i}")
        d.mkdir()
        t = {k: v if i < 0 else (v.float() + torch.randint(-3, 4, v.shape, generator=g) * 1e-4).to(torch.bfloat16)
             for k, v in base.items()}
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
    return root


def _recipe(models: Path, method: str, weights: list[float] | None = None, **params: Any) -> dict[str, Any]:
    ms = [{"model": str(models / f"expert{i}")} for i in range(3)]
    for m, w in zip(ms, weights or [], strict=False):
        m["parameters"] = {"weight": w}
    return {"base_model": str(models / "base"), "models": ms, "merge_method": method, "parameters": params}


def _on_disk(recipe: dict[str, Any], out: Path, **kw: Any) -> dict[str, torch.Tensor]:
    omnimerge.merge(recipe, out, hash_inputs=False, **kw)
    return load_file(str(out / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), f"{k}: not bit-identical"


CASES = [
    ("weight_average", None, {}),
    ("task_arithmetic", None, {"scaling": 0.7}),
    ("task_arithmetic", [1.0, 0.5, 2.0], {"scaling": 0.7}),
    ("ties", None, {"scaling": 0.8, "density": 0.25}),
    ("dare_ties", [0.8, 1.0, 1.3], {"scaling": 0.8, "drop_rate": 0.3, "density": 0.4, "seed": 5}),
    ("dare_ta", None, {"scaling": 0.6, "drop_rate": 0.4, "seed": 1}),
    ("tsv", None, {"scaling": 1.0}),
]


@pytest.mark.parametrize(("method", "weights", "params"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_state_dict_equals_the_written_checkpoint(models: Path, tmp_path: Path, method: str,
                                                  weights: list[float] | None, params: dict[str, Any]) -> None:
    r = _recipe(models, method, weights, **params)
    disk = _on_disk(r, tmp_path / "out")
    with omnimerge.Merger(r) as m:
        mem = m.state_dict()
        report = m.last_report
    _same(mem, disk)
    assert report.output is None and report.merged == 2 and report.copied == 1
    assert sum(report.strategies.values()) == 2
    if method in ("ties", "dare_ties"):
        assert report.strategies.get("blockwise") == 1, report.strategies  # BIG streamed, its patches applied
    if method in ("task_arithmetic", "dare_ta") and weights is None:
        assert report.strategies.get("fused") == 1, report.strategies
    assert "memory" in report.summary()


@pytest.mark.parametrize("wrong", ["opposite", "zero"])
def test_streamed_ties_patches_reach_the_memory_sink(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     wrong: str) -> None:
    """A wrong streamed majority-sign guess (forced) is amended through the sink's ``patch``: still exact."""
    r = _recipe(models, "ties", scaling=0.8, density=0.25)
    whole = _on_disk(r, tmp_path / "whole", strategy="whole")
    real_begin = operators.SparseBlockwise.begin
    flip = (lambda g: -g) if wrong == "opposite" else (lambda g: 0.0 if g else 1.0)

    def begin(self, *a):  # type: ignore[no-untyped-def]
        st = real_begin(self, *a)
        st.guess = flip(st.guess)
        return st

    patched: list[int] = []
    real_patch = StateDictSink.patch
    monkeypatch.setattr(operators.SparseBlockwise, "begin", begin)
    monkeypatch.setattr(StateDictSink, "patch", lambda self, n, i, v: patched.append(len(i)) or real_patch(self, n, i, v))
    _same(omnimerge.merge_state_dict(r), whole)
    assert patched and sum(patched) > 0


def test_repeated_merges_reuse_the_opened_inputs(models: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import omnimerge.engine as engine

    opened: list[str] = []
    real_open = engine.open_checkpoint
    monkeypatch.setattr(engine, "open_checkpoint", lambda *a: opened.append(str(a[0])) or real_open(*a))
    r = _recipe(models, "ties", density=0.3)
    with omnimerge.Merger(r) as m:
        got = {lam: {k: v.clone() for k, v in m.state_dict({"scaling": lam}).items()} for lam in (0.2, 0.9)}
        weighted = m.state_dict({"scaling": 0.5}, [{"weight": 2.0}, {}, {"weight": 0.5}])
        assert len(opened) == 1, "the base is opened once for every merge of a Merger"
    for lam, sd in got.items():
        _same(sd, _on_disk(_recipe(models, "ties", density=0.3, scaling=lam), tmp_path / f"l{lam}"))
    _same(weighted, _on_disk(_recipe(models, "ties", [2.0, 1.0, 0.5], density=0.3, scaling=0.5), tmp_path / "w"))
    assert not torch.equal(got[0.2][BIG], got[0.9][BIG])


@pytest.mark.parametrize(("method", "weights", "params"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kept_inputs_give_the_same_bits_without_reading(models: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, method: str,
                                                        weights: list[float] | None, params: dict[str, Any]) -> None:
    """keep_inputs: the first merge reads the inputs once and keeps them; later merges (other parameters) read no
    checkpoint tensor and give what a merge from the checkpoints gives."""
    from omnimerge.checkpoint.reader import Checkpoint

    other = {**params, "scaling": 0.35} if "scaling" in params else params
    r = _recipe(models, method, weights, **params)
    with omnimerge.Merger(r, keep_inputs=True) as m:
        first = {k: v.clone() for k, v in m.state_dict(only_merged=True).items()}
        reads: list[str] = []
        real_read = Checkpoint.read
        monkeypatch.setattr(Checkpoint, "read", lambda self, name, *a, **k: reads.append(name) or real_read(
            self, name, *a, **k))
        second = m.state_dict(other, only_merged=True)
        assert set(m.last_report.strategies) == {"kept"}
        monkeypatch.undo()
    assert not reads, f"kept inputs: the second merge read {reads[:3]}"
    with omnimerge.Merger(r) as fresh:
        _same(first, fresh.state_dict(only_merged=True))
    disk = _on_disk(_recipe(models, method, weights, **other), tmp_path / "o")
    _same(second, {k: disk[k] for k in second})
    assert set(second) == {BIG, SMALL}


def test_kept_inputs_with_lora_experts(tmp_path: Path) -> None:
    """LoRA experts: the dense task vectors B A are built once and kept; the results equal a fresh merge."""
    from tests.conftest import golden_root

    fam = golden_root() / "lora-T3" / "models"
    r = {"base_model": str(fam / "base"), "models": [{"model": str(fam / f"expert{i}")} for i in range(3)],
         "merge_method": "tsv", "parameters": {"scaling": 1.0}}
    with omnimerge.Merger(r, keep_inputs=True) as m:
        m.state_dict()
        kept = {k: v.clone() for k, v in m.state_dict({"scaling": 0.5}).items()}
        assert set(m.last_report.strategies) == {"kept"}
    _same(kept, {k: v for k, v in omnimerge.merge_state_dict(r, overrides=["parameters.scaling=0.5"]).items()})


def test_kept_inputs_that_do_not_fit_are_not_kept(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import omnimerge.engine as engine

    monkeypatch.setattr(engine, "_free_memory", lambda device: 1000)
    notes: list[str] = []
    with omnimerge.Merger(_recipe(models, "task_arithmetic"), keep_inputs=True, echo=notes.append) as m:
        m.state_dict()
        assert "kept" not in m.last_report.strategies
    assert any("keep_inputs" in n and "more than half the free memory" in n for n in notes), notes


def test_parameter_overrides_are_checked(models: Path) -> None:
    from omnimerge.errors import MethodParameterError, RecipeError

    with omnimerge.Merger(_recipe(models, "ties")) as m:
        with pytest.raises(MethodParameterError, match="density"):
            m.state_dict({"density": 1.5})
        with pytest.raises(MethodParameterError, match="no parameter 'lambda'"):
            m.state_dict({"lambda": 0.5})
        with pytest.raises(RecipeError, match="2 entries for 3 experts"):
            m.state_dict(model_parameters=[{}, {}])


def test_merge_into_a_loaded_model(tmp_path: Path) -> None:
    """Qwen2-VL experts saved with transformers' on-disk names (model.layers.*, visual.*) merged into a model
    loaded in memory (model.language_model.*, model.visual.*) in float32: the model then holds what loading the
    merged checkpoint gives; ``only_merged`` into a model loaded from the base gives the same."""
    from omnimerge.examples import build_family, model_class

    base_dir, experts = build_family(tmp_path / "fam", arch="qwen2_vl", n_experts=2)
    recipe = {"base_model": str(base_dir), "models": [{"model": str(e)} for e in experts],
              "merge_method": "task_arithmetic", "parameters": {"scaling": 0.5}}
    omnimerge.merge(recipe, tmp_path / "merged", hash_inputs=False)
    cls = model_class("qwen2_vl")
    want = cls.from_pretrained(tmp_path / "merged").state_dict()
    model = cls.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = omnimerge.merge_into(model, recipe)
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    changed = [k for k in want if not torch.equal(before[k], got[k])]
    assert changed and all(".language_model." in k for k in changed), changed
    assert report.merged == len(changed)
    fresh = cls.from_pretrained(base_dir)
    with omnimerge.Merger(recipe) as m:
        m.into(fresh, only_merged=True)
        assert m.last_report.copied > 0
    for k in want:
        assert torch.equal(fresh.state_dict()[k], want[k]), k


def test_model_sink_refuses_what_does_not_fit() -> None:
    model = torch.nn.Linear(4, 3)
    with pytest.raises(OutputError, match="has no parameter or buffer"):
        ModelSink(model, [("model.layers.0.mlp.up_proj.weight", torch.float32, (3, 4))], {})
    with pytest.raises(OutputError, match=r"shape \[3, 4\], the merge writes \[4, 3\]"):
        ModelSink(model, [("weight", torch.float32, (4, 3))], {})


def test_memory_sink_checks_every_planned_tensor_arrives() -> None:
    sink = StateDictSink([("a", torch.float32, (2, 3)), ("b", torch.bfloat16, (4,))])
    assert isinstance(sink, Sink) and isinstance(ShardedWriter.__new__(ShardedWriter), Sink)
    sink.write("a", torch.ones(2, 3))
    sink.write_part("b", torch.zeros(2, dtype=torch.bfloat16), 0, False)
    with pytest.raises(OutputError, match="never written, e.g. 'b'"):
        sink.finish()
    sink.write_part("b", torch.full((2,), 2.0, dtype=torch.bfloat16), 2, True)
    import numpy as np

    sink.patch("b", np.array([0, 3]), torch.tensor([5.0, 7.0], dtype=torch.bfloat16))
    assert sink.finish() == []
    assert sink.tensors["b"].tolist() == [5.0, 0.0, 2.0, 7.0]
    with pytest.raises(OutputError, match="outside the tensor"):
        sink.write_part("b", torch.zeros(3, dtype=torch.bfloat16), 2, True)
    with pytest.raises(OutputError, match="not part of the planned output"):
        sink.write("c", torch.ones(1))


def test_modality_ties_streamed_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: mode: modality + TIES on a streamed tensor whose majority-sign guess is wrong crashed with
    "'_Fanout' object has no attribute 'patch'". The fan-out now amends every output; the result equals the
    whole-tensor merge."""
    from omnimerge.checkpoint.names import canonical_name
    from omnimerge.components import classify
    from omnimerge.examples import build_base
    from tests.test_modality import ARCHS, _modality_model

    base = build_base("qwen2", seed=0)
    base.save_pretrained(tmp_path / "base")
    for i, arch in enumerate(ARCHS):
        _modality_model(arch, base.state_dict(), seed=10 + i, tau_scale=0.05).save_pretrained(tmp_path / arch)
    # LLM weights on a 2^-12 grid and task vectors of -3..3 steps of 2^-10 (exact in float32): the experts' trimmed
    # values cancel exactly in places, so entries with elected sign 0 exist (what the majority-sign fix-ups are for)
    g = torch.Generator().manual_seed(3)
    bfile = tmp_path / "base" / "model.safetensors"
    b = load_file(str(bfile))
    for k, v in b.items():
        if v.dim() == 2 and classify(k, tuple(v.shape)) == "language_model":
            b[k] = (v * 4096).round() / 4096
    save_file(b, str(bfile), metadata={"format": "pt"})
    by_canonical = {canonical_name(k): v for k, v in b.items()}
    for arch in ARCHS:
        efile = tmp_path / arch / "model.safetensors"
        e = load_file(str(efile))
        for k, v in e.items():
            w0 = by_canonical.get(canonical_name(k))
            if w0 is not None and v.dim() == 2 and classify(k, tuple(v.shape)) == "language_model":
                e[k] = w0 + torch.randint(-3, 4, v.shape, generator=g).float() / 1024
        save_file(e, str(efile), metadata={"format": "pt"})
    recipe = {"mode": "modality", "base_model": str(tmp_path / "base"), "merge_method": "ties",
              "models": [{"model": str(tmp_path / a), "name": a.split("_")[-1]} for a in ARCHS],
              "parameters": {"scaling": 0.7, "density": 0.3}}
    omnimerge.merge(recipe, tmp_path / "whole", hash_inputs=False, strategy="whole")
    ties = registry()["ties"]  # the tiny LLM's tensors are below the streaming size: stream from 1024 entries
    monkeypatch.setitem(registry(), "ties", dataclasses.replace(
        ties, capabilities=dataclasses.replace(ties.capabilities, blockwise_min_numel=1024)))
    real_begin = operators.SparseBlockwise.begin

    def begin(self, *a):  # type: ignore[no-untyped-def]
        st = real_begin(self, *a)
        st.guess = -st.guess if st.guess else 1.0
        return st

    patched: list[str] = []
    real_patch = ShardedWriter.patch
    monkeypatch.setattr(operators.SparseBlockwise, "begin", begin)
    monkeypatch.setattr(ShardedWriter, "patch", lambda self, n, i, v: patched.append(n) or real_patch(self, n, i, v))
    rep = omnimerge.merge(recipe, tmp_path / "streamed", hash_inputs=False)
    assert rep.strategies.get("blockwise", 0) > 0 and patched
    assert len(patched) % len(ARCHS) == 0, "every output is amended"
    for arch in ARCHS:
        _same(load_file(str(tmp_path / "streamed" / arch / "model.safetensors")),
              load_file(str(tmp_path / "whole" / arch / "model.safetensors")))


def _ctx_state(ctx: TensorContext) -> dict[str, Any]:
    return {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.name not in ("log", "info")}


@pytest.mark.parametrize("name", sorted(n for n, m in registry().items() if m.output_kind == "dense"))
def test_methods_do_not_write_into_the_context(name: str) -> None:
    method = registry()[name]
    lo, hi = method.experts
    n = hi if hi is not None and hi < 3 else max(lo, 3)  # methods of one or two experts get theirs
    g = torch.Generator().manual_seed(1)
    base = torch.randn(24, 16, generator=g)
    tvs = [torch.randn(24, 16, generator=g) * 0.1 for _ in range(n)]
    params = {p.name: p.default for p in method.params if not p.per_model}
    if "drop_rate" in params:
        params["seed"] = 7
    params.update({"nearswap": {"t": 0.05}, "slerp": {"t": 0.3}}.get(name, {}))  # no defaults for these
    kw = method.resolve(params, [{} for _ in tvs])
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight", canonical="model.layers.0.mlp.up_proj.weight",
                        component="language_model", num_models=n)
    if method.statistics is not None:  # data-aware: each expert's statistic for the tensor (a Gram, a Fisher)
        shape = method.statistics.shape(ctx.name, tuple(base.shape), "language_model")
        assert shape is not None
        stats = [torch.rand(shape, generator=g) for _ in range(n)]
        ctx.statistics = [s @ s.T if len(shape) == 2 and shape[0] == shape[1] != base.shape[0] else s for s in stats]
    gp = method.global_pass
    if gp is not None and gp.needed(kw):  # the engine's global pass, over this one tensor
        state = gp.init(n, kw)
        for p in range(gp.passes):
            gp.update(p, state, [t.clone() for t in tvs], ctx)
            gp.finish(p, state)
        ctx.stats = gp.result(state)
    before = _ctx_state(ctx)
    method.fn(base, [t.clone() for t in tvs], ctx, **kw)
    assert _ctx_state(ctx) == before


def test_capabilities_are_declared_not_attached() -> None:
    for name, m in registry().items():
        for attr in ("elementwise", "linear", "blockwise", "from_weights", "compiled"):
            assert not hasattr(m.fn, attr), f"{name}: capability '{attr}' attached to the function"
    caps = {n: m.capabilities for n, m in registry().items()}
    assert caps["ties"].blockwise is not None and caps["ties"].compiled == "ties"
    assert caps["weight_average"].from_weights is not None and caps["task_arithmetic"].linear is not None
    assert not caps["tsv"].elementwise and caps["dare_ta"].elementwise


def test_checkpoint_layer_imports_nothing_from_methods() -> None:
    for path in sorted((ROOT / "omnimerge" / "checkpoint").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for mod in mods:
                assert not mod.startswith(("omnimerge.methods", "omnimerge.engine")), f"{path.name}: imports {mod}"
