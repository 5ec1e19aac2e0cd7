"""Merges of tiny real transformers architectures: the output loads with its class (no missing or unexpected
keys), runs a forward pass, keeps the base's vision tower and on-disk names, and experts saved in the other
transformers naming layout merge exactly as if they had the base's layout."""

from __future__ import annotations

from pathlib import Path

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
