"""Per-task models from one EMR merge: the masks and rescalers written beside the unified checkpoint rebuild
each expert's task-specific model exactly as EMR-Merging constructs it (recomputed here in numpy from the
experts), the CLI materialises one as a checkpoint transformers loads, and misuse is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import omnimerge
from omnimerge.examples import build_family, model_class
from omnimerge.task_models import pack, unpack


@pytest.fixture(scope="module")
def emr_merge(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("emr")
    base_dir, experts = build_family(root / "fam", "qwen2_vl", 3, seed=4)
    recipe = {"base_model": str(base_dir),
              "models": [{"model": str(e), "name": f"task{i}"} for i, e in enumerate(experts)],
              "merge_method": "emr", "parameters": {"scaling": 1.0}, "task_models": True}
    report = omnimerge.merge(recipe, root / "unified", hash_inputs=False)
    return {"root": root, "base": base_dir, "experts": experts, "report": report, "out": root / "unified"}


def _reference(base: Path, experts: list[Path], names: list[str]) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    """EMR-Merging's per-task construction (Huang et al.; FusionBench ``emr_merge``), in float64 numpy: per task
    the masked unified vectors of the named tensors, and the rescalers over all of them."""
    w0 = load_file(str(base / "model.safetensors"))
    ws = [load_file(str(e / "model.safetensors")) for e in experts]
    masked: dict[str, list[np.ndarray]] = {}
    l1_tau, l1_kept = np.zeros(3), np.zeros(3)
    for n in names:
        taus = [w[n].double().numpy() - w0[n].double().numpy() for w in ws]
        flag = np.where(sum(taus) > 0, 1.0, -1.0)
        masks = [t * flag > 0 for t in taus]
        uni = flag * np.max([np.abs(t) * m for t, m in zip(taus, masks, strict=True)], axis=0)
        masked[n] = [uni * m for m in masks]
        for i in range(3):
            l1_tau[i] += np.abs(taus[i]).sum()
            l1_kept[i] += np.abs(masked[n][i]).sum()
    return masked, l1_tau / l1_kept


def test_rebuilt_task_models_equal_emr_construction(emr_merge: dict[str, Any]) -> None:
    out: Path = emr_merge["out"]
    index = json.loads((out / "task_models" / "task_models.json").read_text())
    assert index["tasks"] == ["task0", "task1", "task2"] and index["method"] == "emr"
    names = sorted(index["tensors"])
    assert len(names) == emr_merge["report"].merged > 0
    masked, rescalers = _reference(emr_merge["base"], emr_merge["experts"], names)
    np.testing.assert_allclose(index["rescalers"], rescalers, rtol=1e-9)
    assert all(abs(r - 1.0) > 1e-3 for r in rescalers)  # the rescaling matters on this family
    w0 = load_file(str(emr_merge["base"] / "model.safetensors"))
    for t in range(3):
        rebuilt = omnimerge.load_task_model(out, f"task{t}")
        assert rebuilt.keys() == w0.keys()
        for n, w in rebuilt.items():
            if n in index["tensors"]:
                want = w0[n].double().numpy() + rescalers[t] * masked[n][t]
                np.testing.assert_allclose(w.double().numpy(), want, rtol=0, atol=2e-7, err_msg=n)
            else:
                assert torch.equal(w, w0[n]), n
        # a task's model differs from the unified one and from the other tasks'
        assert not torch.equal(rebuilt[names[0]], omnimerge.load_task_model(out, (t + 1) % 3)[names[0]])


def test_masks_are_a_fraction_of_the_experts(emr_merge: dict[str, Any]) -> None:
    tm = emr_merge["report"].task_models
    assert tm["tasks"] == ["task0", "task1", "task2"]
    masks = sum(p.stat().st_size for p in (emr_merge["out"] / "task_models").glob("masks*.safetensors"))
    assert tm["mask_bytes"] == masks
    merged_entries = sum(int(np.prod(s)) for s in json.loads(
        (emr_merge["out"] / "task_models" / "task_models.json").read_text())["tensors"].values())
    assert masks < 3 * merged_entries / 8 + 64 * 1024  # 1 bit per entry and task, plus the headers
    w0 = load_file(str(emr_merge["base"] / "model.safetensors"))
    assert tm["experts_bytes"] == 3 * sum(t.numel() * t.element_size() for t in w0.values())
    assert "per-task masks for 3 tasks" in emr_merge["report"].summary()


def test_cli_materialises_a_loadable_task_model(emr_merge: dict[str, Any], cli: Any) -> None:
    dst = emr_merge["root"] / "task1-model"
    res = cli("task-model", emr_merge["out"], "task1", "-o", dst)
    assert res.code == 0, res.text
    cls = model_class("qwen2_vl")
    model, info = cls.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want = omnimerge.load_task_model(emr_merge["out"], 1)
    on_disk = load_file(str(dst / "model.safetensors"))
    assert on_disk.keys() == want.keys() and all(torch.equal(on_disk[k], want[k]) for k in want)
    again = cli("task-model", emr_merge["out"], "task1", "-o", dst)
    assert again.code == 2 and "already exists" in again.err


@pytest.mark.parametrize(("edit", "needle"), [
    ({"merge_method": "ties"}, "task_models: method 'ties' has no per-task masks (methods that do: emr)"),
    ({"parameters": {"scaling": [0.5, 1.0]}}, "task_models: give single parameter values"),
])
def test_task_models_refused_where_they_cannot_be_built(emr_merge: dict[str, Any], tmp_path: Path, cli: Any,
                                                       edit: dict[str, Any], needle: str) -> None:
    recipe = {"base_model": str(emr_merge["base"]), "models": [{"model": str(e)} for e in emr_merge["experts"]],
              "merge_method": "emr", "task_models": True, **edit}
    r = tmp_path / "r.json"
    r.write_text(json.dumps(recipe))
    res = cli("merge", r, "-o", tmp_path / "out", "-q")
    assert res.code == 2 and needle in res.err and len(res.err.strip().splitlines()) == 1, res.text
    assert not (tmp_path / "out").exists()


def test_task_model_of_unknown_task_or_plain_merge(emr_merge: dict[str, Any], tmp_path: Path, cli: Any) -> None:
    res = cli("task-model", emr_merge["out"], "ocr", "-o", tmp_path / "x")
    assert res.code == 2 and "no task 'ocr' (tasks: task0, task1, task2)" in res.err, res.text
    res = cli("task-model", emr_merge["out"], "7", "-o", tmp_path / "x")
    assert res.code == 2 and "task 7 out of range" in res.err, res.text
    res = cli("task-model", emr_merge["base"], "0", "-o", tmp_path / "x")
    assert res.code == 2 and "no per-task masks" in res.err, res.text
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (17, 9)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    masks = [torch.rand(shape, generator=g) > 0.5 for _ in range(3)]
    packed = pack(masks)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-int(np.prod(shape)) // 8))
    for t in range(3):
        assert torch.equal(unpack(packed, t, shape), masks[t])
