"""Per-task models from one EMR or consensus (TALL masks) merge: the masks and rescalers written beside the
unified checkpoint rebuild each expert's task-specific model exactly as EMR-Merging / TALL construct it
(recomputed here in numpy from the experts), the CLI materialises one as a checkpoint transformers loads, and
misuse is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

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
    ({"merge_method": "ties"}, "task_models: method 'ties' has no per-task masks (methods that do: consensus, "
                               "emr)"),
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


# --- consensus: TALL's per-task models ------------------------------------------------------------------------

GRID = 2.0**-16  # the weights on this grid (|W| < 2^8): every sum of T = 3 task vectors and W0 is exact in float32
LAM = 0.5  # dyadic: lambda |tau_MTL - tau_t| is exact too, and ties |tau_t| = lambda |tau_MTL - tau_t| occur


def _on_grid(folder: Path) -> None:
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    save_file({k: (v.double() / GRID).round().mul(GRID).to(v.dtype) for k, v in sd.items()}, str(f),
              metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tall_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The example family with every float32 weight rounded to GRID, so that the merge's float32 sums, the
    loader's W_uni - W0 and the float64 reference below agree bit for bit: the rebuilt models are compared
    exactly (on unrounded weights they would agree to a few float32 ulps, and a mask could flip at a near-tie)."""
    root = tmp_path_factory.mktemp("tall")
    base_dir, experts = build_family(root / "fam", "qwen2_vl", 3, seed=5)
    for d in (base_dir, *experts):
        _on_grid(d)
    return {"root": root, "base": base_dir, "experts": experts}


def _tall_merge(fam: dict[str, Any], name: str, **params: Any) -> dict[str, Any]:
    recipe = {"base_model": str(fam["base"]),
              "models": [{"model": str(e), "name": f"task{i}"} for i, e in enumerate(fam["experts"])],
              "merge_method": "consensus", "parameters": {"tall_mask_lambda": LAM, **params}, "task_models": True}
    notes: list[str] = []
    out = fam["root"] / name
    report = omnimerge.merge(recipe, out, hash_inputs=False, echo=notes.append)
    return {"out": out, "report": report, "notes": notes}


@pytest.fixture(scope="module")
def tall_k1(tall_family: dict[str, Any]) -> dict[str, Any]:
    return _tall_merge(tall_family, "k1", scaling=1.0, prun_thre_k=1)


@pytest.fixture(scope="module")
def tall_k2(tall_family: dict[str, Any]) -> dict[str, Any]:
    return _tall_merge(tall_family, "k2", scaling=0.5, prun_thre_k=2)


def _tall_reference(fam: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """TALL (Wang et al.; FusionBench ``generate_task_masks``) in float64 numpy for one tensor: W0, tau_MTL, the
    masks m_t = [|tau_t| > lambda |tau_MTL - tau_t|] and their count c."""
    w0 = load_file(str(fam["base"] / "model.safetensors"))[name].double().numpy()
    taus = [load_file(str(e / "model.safetensors"))[name].double().numpy() - w0 for e in fam["experts"]]
    mtl = taus[0] + taus[1] + taus[2]
    masks = [np.abs(t) > LAM * np.abs(mtl - t) for t in taus]
    return w0, mtl, masks, sum(m.astype(np.int64) for m in masks)


def _check_tall_task_models(fam: dict[str, Any], merged: dict[str, Any], k: int) -> None:
    out: Path = merged["out"]
    index = json.loads((out / "task_models" / "task_models.json").read_text())
    assert index["method"] == "consensus" and index["tasks"] == ["task0", "task1", "task2"]
    assert index["rescalers"] == [1.0, 1.0, 1.0]
    names = sorted(index["tensors"])
    assert len(names) == merged["report"].merged > 0
    w0_all = load_file(str(fam["base"] / "model.safetensors"))
    rebuilt = [omnimerge.load_task_model(out, f"task{t}") for t in range(3)]
    ties = dropped = 0
    for n in names:
        w0, mtl, masks, count = _tall_reference(fam, n)
        keep = count >= k
        for t in range(3):
            want = torch.from_numpy(w0 + np.where(masks[t] & keep, mtl, 0.0)).float()  # exact: on the grid
            assert rebuilt[t][n].dtype == torch.float32 and torch.equal(rebuilt[t][n], want), (n, t)
        ties += sum(int(np.count_nonzero((np.abs(tv) == LAM * np.abs(mtl - tv)) & (tv != 0)))
                    for tv in (load_file(str(e / "model.safetensors"))[n].double().numpy() - w0
                               for e in fam["experts"]))
        dropped += sum(int(np.count_nonzero(m & ~keep)) for m in masks)
    assert ties > 0  # the strict test is exercised (>= would keep these entries)
    assert (dropped > 0) == (k >= 2)  # with k >= 2 some masked entries are really missing from the task models
    for t in range(3):
        assert rebuilt[t].keys() == w0_all.keys()
        for n in w0_all.keys() - set(names):
            assert torch.equal(rebuilt[t][n], w0_all[n]), n
        assert not torch.equal(rebuilt[t][names[0]], rebuilt[(t + 1) % 3][names[0]])


def test_consensus_task_models_are_tall_per_task_models(tall_family: dict[str, Any],
                                                        tall_k1: dict[str, Any]) -> None:
    """prun_thre_k 1, scaling 1: task t's model is TALL's theta0 + m_t tau_MTL, bit for bit, and no note."""
    _check_tall_task_models(tall_family, tall_k1, k=1)
    assert not [m for m in tall_k1["notes"] + tall_k1["report"].notes if "prun_thre_k" in m]


def test_consensus_task_models_with_k2_lack_the_dropped_entries_and_say_so(tall_family: dict[str, Any],
                                                                          tall_k2: dict[str, Any]) -> None:
    """prun_thre_k 2 (scaling 0.5): task t's model is W0 + m_t [c >= 2] tau_MTL, and one note says why."""
    _check_tall_task_models(tall_family, tall_k2, k=2)
    notes = [m for m in tall_k2["notes"] if "task models" in m]
    assert len(notes) == 1 and notes == [m for m in tall_k2["report"].notes if "task models" in m]
    assert "fewer than prun_thre_k = 2 tasks" in notes[0] and "prun_thre_k: 1 gives TALL's per-task models" in notes[0]


def test_consensus_masks_are_the_tall_masks_at_t_over_8_bytes_per_entry(tall_family: dict[str, Any],
                                                                       tall_k2: dict[str, Any]) -> None:
    folder = tall_k2["out"] / "task_models"
    index = json.loads((folder / "task_models.json").read_text())
    payload = 0
    for shard in index["shards"]:
        sd = load_file(str(folder / shard))
        for n, packed in sd.items():
            shape = index["tensors"][n]
            assert packed.dtype == torch.uint8 and tuple(packed.shape) == (3, -(-int(np.prod(shape)) // 8)), n
            _, _, masks, _ = _tall_reference(tall_family, n)
            for t in range(3):
                assert np.array_equal(unpack(packed, t, shape).numpy(), masks[t]), (n, t)
            payload += packed.numel()
        header = int.from_bytes((folder / shard).read_bytes()[:8], "little")
        assert (folder / shard).stat().st_size == 8 + header + sum(v.numel() for v in sd.values())
    entries = sum(int(np.prod(s)) for s in index["tensors"].values())
    assert entries > 0 and 3 * entries / 8 <= payload < 3 * entries / 8 + len(index["tensors"])  # T/8 per entry
    files = sum(p.stat().st_size for p in folder.glob("masks*.safetensors"))
    assert tall_k2["report"].task_models["mask_bytes"] == files == index["mask_bytes"]
    assert files < 3 * entries / 8 + 64 * 1024


def test_cli_materialises_a_consensus_task_model(tall_k1: dict[str, Any], cli: Any) -> None:
    dst = tall_k1["out"].parent / "k1-task2"
    res = cli("task-model", tall_k1["out"], "task2", "-o", dst)
    assert res.code == 0 and "rescaler 1" in res.out, res.text
    cls = model_class("qwen2_vl")
    _, info = cls.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want = omnimerge.load_task_model(tall_k1["out"], "task2")
    on_disk = load_file(str(dst / "model.safetensors"))
    assert on_disk.keys() == want.keys() and all(torch.equal(on_disk[k], want[k]) for k in want)


def test_consensus_note_reaches_the_cli(tall_family: dict[str, Any], tmp_path: Path, cli: Any) -> None:
    recipe = {"base_model": str(tall_family["base"]), "models": [{"model": str(e)} for e in tall_family["experts"]],
              "merge_method": "consensus", "parameters": {"prun_thre_k": 3}, "task_models": True}
    r = tmp_path / "r.json"
    r.write_text(json.dumps(recipe))
    res = cli("merge", r, "-o", tmp_path / "out", "-q", "--hash", "none")
    text = " ".join(res.err.split())
    assert res.code == 0, res.text
    assert text.count("lack the entries kept by fewer than prun_thre_k = 3 tasks") == 1, res.text
