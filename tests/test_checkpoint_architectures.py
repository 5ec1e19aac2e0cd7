"""Merges of tiny real transformers architectures: the output loads with its class (no missing or unexpected
keys), runs a forward pass, keeps the base's vision tower and on-disk names, and experts saved in the other
transformers naming layout merge exactly as if they had the base's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import omnimerge
from omnimerge.checkpoint.names import canonical_name
from omnimerge.components import classify
from omnimerge.examples import build_family, dummy_inputs, model_class


def _disk_names(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())  # noqa: SIM118


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("legacy_base", [True, False], ids=["legacy-base", "new-base"])
def test_merge_load_forward(arch: str, legacy_base: bool, tmp_path: Path) -> None:
    base_dir, experts = build_family(tmp_path / "fam", arch, 3, seed=1, legacy_layout=legacy_base,
                                     other_layout_expert=1)
    assert set(_disk_names(experts[1])) != set(_disk_names(base_dir)), "expert1 must use the other layout"
    scaling = 0.4
    report = omnimerge.merge(
        {"base_model": str(base_dir), "models": [{"model": str(e)} for e in experts],
         "merge_method": "task_arithmetic", "parameters": {"scaling": scaling}},
        tmp_path / "merged",
    )
    assert report.merged == 14
    out = tmp_path / "merged"
    assert _disk_names(out) == _disk_names(base_dir), "the output keeps the base's names, order and layout"

    cls = model_class(arch)
    merged, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    base = cls.from_pretrained(base_dir)
    exps = [cls.from_pretrained(e) for e in experts]
    with torch.no_grad():
        logits = merged(**dummy_inputs(arch)).logits
    assert torch.isfinite(logits).all()

    bsd, msd = base.state_dict(), merged.state_dict()
    esds = [e.state_dict() for e in exps]
    for name, w0 in bsd.items():
        comp = classify(name, tuple(w0.shape))
        if comp == "language_model":
            expected = w0 + scaling * sum(e[name] - w0 for e in esds)
            torch.testing.assert_close(msd[name], expected, rtol=1e-5, atol=1e-6)
            assert not torch.equal(msd[name], w0)
        else:
            assert torch.equal(msd[name], w0), f"{name} ({comp}) must stay at the base"
            if comp == "vision_tower" and w0.dim() == 2:
                assert any(not torch.equal(e[name], w0) for e in esds), "experts did change the vision tower"


def test_sharded_output_loads(tmp_path: Path) -> None:
    base_dir, experts = build_family(tmp_path / "fam", "qwen2_vl", 2, seed=3)
    out = tmp_path / "merged"
    rep = omnimerge.merge(
        {"base_model": str(base_dir), "models": [{"model": str(e)} for e in experts],
         "merge_method": "ties", "parameters": {"scaling": 1.0, "density": 0.5}, "shard_size": "100KB",
         "out_dtype": "bfloat16"},
        out,
    )
    assert len(rep.shards) > 3 and (out / "model.safetensors.index.json").is_file()
    cls = model_class("qwen2_vl")
    merged, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert {p.dtype for p in merged.state_dict().values()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(merged(**dummy_inputs("qwen2_vl")).logits.float()).all()
    # bf16 output of the unmerged tensors is the base rounded to bf16
    base = cls.from_pretrained(base_dir)
    for name, t in base.state_dict().items():
        if ".visual." in f".{name}":
            assert torch.equal(merged.state_dict()[name], t.to(torch.bfloat16))
    assert canonical_name("model.layers.0.mlp.up_proj.weight") == "model.language_model.layers.0.mlp.up_proj.weight"


#: what a method needs beyond its defaults to run (the parameters it has no default for)
REQUIRED: dict[str, dict[str, float]] = {"nearswap": {"t": 1e-3}, "slerp": {"t": 0.3}}


def _dense_methods() -> list[str]:
    from omnimerge.methods import registry

    # the data-aware methods need statistics files (tests/test_methods_data_aware.py, tests/test_stats_collect.py)
    return sorted(n for n, m in registry().items() if m.output_kind == "dense" and m.statistics is None)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], tuple[Path, list[Path]]]:
    """Per (architecture, expert count), a tiny family, built on first use."""
    root = tmp_path_factory.mktemp("arch-families")
    cache: dict[tuple[str, int], tuple[Path, list[Path]]] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, key: tuple[str, int]) -> tuple[Path, list[Path]]:
            arch, n = key
            cache[key] = build_family(root / f"{arch}-{n}", arch, n, seed=2)
            return cache[key]

    return Lazy()


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("method", _dense_methods())
def test_every_method_output_loads_with_its_class(arch: str, method: str, families: Any, tmp_path: Path) -> None:
    """Every registered method, on a real architecture: the merge loads with the transformers class (no missing
    or unexpected keys), runs a forward pass, changes the language model and leaves the other parts at the
    base."""
    from omnimerge.methods import get_method

    lo, hi = get_method(method).experts
    n = hi if hi is not None and hi < 3 else max(lo, 3)
    base_dir, experts = families[(arch, n)]
    omnimerge.merge({"base_model": str(base_dir), "models": [{"model": str(e)} for e in experts],
                     "merge_method": method, "parameters": REQUIRED.get(method, {})},
                    tmp_path / "merged", hash_inputs=False)
    cls = model_class(arch)
    merged, info = cls.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.isfinite(merged(**dummy_inputs(arch)).logits).all()
    bsd, msd = cls.from_pretrained(base_dir).state_dict(), merged.state_dict()
    changed = 0
    for name, w0 in bsd.items():
        if classify(name, tuple(w0.shape)) == "language_model":
            changed += not torch.equal(msd[name], w0)
        else:
            assert torch.equal(msd[name], w0), f"{method}: {name} must stay at the base"
    assert changed > 0, f"{method} left every language-model tensor at the base"
