"""Engine behaviour: determinism, DARE's properties, exact global TIES, recipes and overrides, inputs in
every supported form, the model card, and the CLI's listing commands."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import xxhash
import yaml
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.methods import TensorContext, get_method
from omnimerge.methods.operators import disjoint_merge
from tests.conftest import golden_root

MERGED = "model.language_model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def fam() -> Path:
    return golden_root() / "full-T5" / "models"


def _recipe(fam: Path, method: str, **params) -> dict:  # type: ignore[no-untyped-def]
    return {"base_model": str(fam / "base"), "models": [{"model": str(fam / f"expert{i}")} for i in range(5)],
            "merge_method": method, "parameters": params}


def _merge(tmp_path: Path, recipe: dict, name: str = "out", **kw) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    omnimerge.merge(recipe, tmp_path / name, overwrite=True, **kw)
    return load_file(str(tmp_path / name / "model.safetensors"))


def test_workers_do_not_change_the_result(tmp_path: Path, fam: Path) -> None:
    r = _recipe(fam, "dare_ties", scaling=0.5, drop_rate=0.3, seed=7)
    one = _merge(tmp_path, r, "a", workers=1)
    four = _merge(tmp_path, r, "b", workers=4)
    again = _merge(tmp_path, r, "c", workers=2)
    for k in one:
        assert torch.equal(one[k], four[k]) and torch.equal(one[k], again[k]), k
    other_seed = _merge(tmp_path, _recipe(fam, "dare_ties", scaling=0.5, drop_rate=0.3, seed=8), "d")
    assert not torch.equal(one[MERGED], other_seed[MERGED])


def test_dare_properties(fam: Path) -> None:
    m = get_method("dare_ta")
    torch.manual_seed(0)
    tv = torch.randn(300, 200)
    for p in (0.2, 0.5, 0.9):
        kw = m.resolve({"drop_rate": p, "scaling": 1.0}, [{}])
        out = m.fn(torch.zeros(300, 200), [tv.clone()], TensorContext(name="x"), **kw)
        kept = out != 0
        frac_dropped = 1 - kept.float().mean().item()
        assert abs(frac_dropped - p) < 0.01, (p, frac_dropped)
        torch.testing.assert_close(out[kept], tv[kept] / (1 - p), rtol=1e-6, atol=0)
        again = m.fn(torch.zeros(300, 200), [tv.clone()], TensorContext(name="x"), **kw)
        assert torch.equal(out, again), "same seed, same tensor name: same mask"


def test_dare_with_zero_drop_equals_ta_and_ties(tmp_path: Path, fam: Path) -> None:
    ta = _merge(tmp_path, _recipe(fam, "task_arithmetic", scaling=0.3), "ta")
    dta = _merge(tmp_path, _recipe(fam, "dare_ta", scaling=0.3, drop_rate=0.0), "dta")
    ties = _merge(tmp_path, _recipe(fam, "ties", scaling=0.3, density=0.2), "ties")
    dties = _merge(tmp_path, _recipe(fam, "dare_ties", scaling=0.3, density=0.2, drop_rate=0.0), "dties")
    for k in ta:
        assert torch.equal(ta[k], dta[k]) and torch.equal(ties[k], dties[k]), k


def test_global_ties_equals_flattened_reference(tmp_path: Path, fam: Path) -> None:
    """granularity: global == TIES on one vector of all merged parameters (the InternVL script / TIES paper)."""
    density, scaling = 0.2, 0.7
    out = _merge(tmp_path, _recipe(fam, "ties", scaling=scaling, density=density, granularity="global"))
    base = load_file(str(fam / "base" / "model.safetensors"))
    experts = [load_file(str(fam / f"expert{i}" / "model.safetensors")) for i in range(5)]
    names = sorted(n for n in base if ".language_model.layers." in n and n.endswith("proj.weight"))
    flat = torch.stack([torch.cat([(e[n] - base[n]).flatten() for n in names]) for e in experts])
    k = int(flat.shape[1] * (1 - density))
    th = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= th)
    merged = disjoint_merge(list(trimmed), [1.0] * 5)
    pos = 0
    for n in names:
        size = base[n].numel()
        expected = base[n] + scaling * merged[pos:pos + size].view_as(base[n])
        pos += size
        torch.testing.assert_close(out[n], expected, rtol=1e-6, atol=1e-7)
    per_tensor = _merge(tmp_path, _recipe(fam, "ties", scaling=scaling, density=density), "pt")
    assert any(not torch.equal(per_tensor[n], out[n]) for n in names)


def test_per_model_weights(tmp_path: Path, fam: Path) -> None:
    r = _recipe(fam, "task_arithmetic", scaling=1.0)
    r["models"][0]["parameters"] = {"weight": 2.0}
    r["models"][1]["parameters"] = {"weight": 0.0}
    out = _merge(tmp_path, r)
    base = load_file(str(fam / "base" / "model.safetensors"))
    ex = [load_file(str(fam / f"expert{i}" / "model.safetensors")) for i in range(5)]
    expected = base[MERGED] + 2 * (ex[0][MERGED] - base[MERGED]) + sum(e[MERGED] - base[MERGED] for e in ex[2:])
    torch.testing.assert_close(out[MERGED], expected)
    bad = _recipe(fam, "task_arithmetic")
    bad["models"][0]["parameters"] = {"density": 0.3}
    with pytest.raises(omnimerge.errors.OmniMergeError, match="no parameter 'density'"):
        omnimerge.merge(bad, tmp_path / "x")


def test_select_include_exclude(tmp_path: Path, fam: Path) -> None:
    r = _recipe(fam, "task_arithmetic", scaling=1.0)
    r["select"] = {"include": ["language_model", "norm", "vision_tower"], "exclude": [r"layers\.1\."]}
    out = _merge(tmp_path, r)
    base = load_file(str(fam / "base" / "model.safetensors"))
    e0 = load_file(str(fam / "expert0" / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], out[k])}
    assert "model.language_model.layers.0.mlp.up_proj.weight" in changed
    assert not any(".layers.1." in k for k in changed)
    assert any("visual" in k for k in changed) or all(torch.equal(base[k], e0[k]) for k in base if "visual" in k)
    assert "lm_head.weight" not in changed and "model.language_model.embed_tokens.weight" not in changed


def test_recipe_file_relative_paths_overrides_and_card(tmp_path: Path, fam: Path, cli) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "work"
    shutil.copytree(fam, work / "models")
    (work / "models" / "base" / "tokenizer_config.json").write_text("{}")
    recipe = {"base_model": "models/base", "models": [{"model": f"models/expert{i}"} for i in range(2)],
              "merge_method": "ties", "parameters": {"scaling": 0.3}}
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    res = cli("merge", work / "r.yaml", "-o", out, "--set", "parameters.density=0.5", "--set",
              "out_dtype=bfloat16", "-q")
    assert res.code == 0, res.text
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    saved = yaml.safe_load((out / "omnimerge_recipe.yaml").read_text())
    assert saved["parameters"] == {"scaling": 0.3, "density": 0.5} and saved["out_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    digest = xxhash.xxh3_128((work / "models" / "expert1" / "model.safetensors").read_bytes()).hexdigest()
    assert f"xxh3_128:{digest}" in card and "Yadav et al." in card and "density: 0.5" in card
    # sha256 on request, and no digests at all
    res = cli("merge", work / "r.yaml", "-o", out, "--overwrite", "--hash", "sha256", "-q")
    assert res.code == 0, res.text
    sha = hashlib.sha256((work / "models" / "expert1" / "model.safetensors").read_bytes()).hexdigest()
    assert f"sha256:{sha}" in (out / "README.md").read_text()
    res = cli("merge", work / "r.yaml", "-o", out, "--overwrite", "--hash", "none", "-q")
    card = (out / "README.md").read_text()
    assert res.code == 0 and "not hashed" in card and sha not in card
    res = cli("merge", work / "r.yaml", "-o", out, "--overwrite", "--hash", "md5", "-q")
    assert res.code == 2 and "md5" in res.text


def test_bin_checkpoint_and_hub_cache_inputs(tmp_path: Path, fam: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # expert 1 as pytorch_model.bin, expert 0 as a hub id in a local Hugging Face cache
    bin_dir = tmp_path / "bin_expert"
    bin_dir.mkdir()
    torch.save(load_file(str(fam / "expert1" / "model.safetensors")), bin_dir / "pytorch_model.bin")
    shutil.copy(fam / "expert1" / "config.json", bin_dir)
    cache = tmp_path / "hub"
    repo = cache / "models--acme--expert0"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(fam / "expert0" / f, snap / f)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    r = {"base_model": str(fam / "base"), "models": [{"model": "acme/expert0"}, {"model": str(bin_dir)}],
         "merge_method": "task_arithmetic", "parameters": {"scaling": 1.0}}
    out = _merge(tmp_path, r)
    ref = _merge(tmp_path, {**r, "models": [{"model": str(fam / "expert0")}, {"model": str(fam / "expert1")}]}, "ref")
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    with pytest.raises(omnimerge.errors.OmniMergeError, match="not in the local Hugging Face cache"):
        omnimerge.merge({**r, "models": [{"model": "acme/unknown"}]}, tmp_path / "x")


def test_unmerged_base_tensors_are_copied_bit_for_bit_even_fp16(tmp_path: Path, fam: Path) -> None:
    half = tmp_path / "half"
    for name in ["base", "expert0", "expert1"]:
        (half / name).mkdir(parents=True)
        sd = {k: v.half() for k, v in load_file(str(fam / name / "model.safetensors")).items()}
        save_file(sd, str(half / name / "model.safetensors"))
        shutil.copy(fam / name / "config.json", half / name)
    r = {"base_model": str(half / "base"), "models": [{"model": str(half / f"expert{i}")} for i in range(2)],
         "merge_method": "weight_average"}
    out = _merge(tmp_path, r)
    base = load_file(str(half / "base" / "model.safetensors"))
    e = [load_file(str(half / f"expert{i}" / "model.safetensors")) for i in range(2)]
    for k, v in base.items():
        assert out[k].dtype == torch.float16
        if "language_model.layers" in k and k.endswith("proj.weight"):
            expected = (v.float() + ((e[0][k].float() - v.float()) + (e[1][k].float() - v.float())) / 2).half()
            assert torch.equal(out[k], expected), k
        else:
            assert torch.equal(out[k], v), k


def test_methods_and_inspect_commands(cli, fam: Path) -> None:  # type: ignore[no-untyped-def]
    res = cli("methods")
    assert res.code == 0
    for name in ("weight_average", "task_arithmetic", "ties", "dare_ta", "dare_ties"):
        assert name in res.out
    assert "density" in res.out and "drop_rate" in res.out and "arXiv" in res.out
    res = cli("methods", "ties")
    assert res.code == 0 and "Disjoint mean" in res.out
    res = cli("inspect", fam / "base")
    assert res.code == 0
    for comp in ("language_model", "vision_tower", "projector", "lm_head", "embedding", "norm", "bias"):
        assert comp in res.out
    assert "golden_toy" in res.out
    res = cli("inspect", fam / "base", "--tensors")
    assert "model.visual.merger.mlp.0.weight" in res.out


def test_copy_files_from_overlays_the_base_files(tmp_path: Path, fam: Path) -> None:
    work = tmp_path / "m"
    shutil.copytree(fam, work)
    (work / "base" / "tokenizer.json").write_text('{"base": true}')
    (work / "expert0" / "tokenizer.json").write_text('{"expert": true}')
    (work / "expert0" / "chat_template.jinja").write_text("{{ messages }}")
    r = {"base_model": str(work / "base"), "models": [{"model": str(work / "expert1")}],
         "merge_method": "task_arithmetic", "copy_files_from": str(work / "expert0")}
    omnimerge.merge(r, tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"expert": True}
    plain = {**r, "copy_files_from": None}
    omnimerge.merge(plain, tmp_path / "out2")
    assert not (tmp_path / "out2" / "chat_template.jinja").exists()
    assert json.loads((tmp_path / "out2" / "tokenizer.json").read_text()) == {"base": True}


def test_digest_cache_reuses_and_invalidates(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from omnimerge.checkpoint import files

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    cache = files.DigestCache(tmp_path / "c.json")
    first = files.FileHasher([f], cache, "sha256").start().join()[str(f)]
    assert first == "sha256:" + hashlib.sha256(b"abc" * 1000).hexdigest()
    fast = files.FileHasher([f], files.DigestCache(tmp_path / "c.json")).start().join()[str(f)]
    assert fast == "xxh3_128:" + xxhash.xxh3_128(b"abc" * 1000).hexdigest()
    reads = []
    real = files.file_digest
    monkeypatch.setattr(files, "file_digest", lambda p, algo: reads.append(1) or real(p, algo))
    again = files.FileHasher([f], files.DigestCache(tmp_path / "c.json"), "sha256").start().join()[str(f)]
    assert again == first and not reads, "an unchanged file is not read again"
    f.write_bytes(b"abd" * 1000)
    changed = files.FileHasher([f], files.DigestCache(tmp_path / "c.json"), "sha256").start().join()[str(f)]
    assert changed == "sha256:" + hashlib.sha256(b"abd" * 1000).hexdigest() and reads
