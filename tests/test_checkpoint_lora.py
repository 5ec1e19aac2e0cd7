"""LoRA experts and LoRA outputs, checked against peft on tiny real architectures (LLaVA, Qwen2-VL).

* omnimerge's task vector of an adapter equals the delta of peft's ``merge_and_unload()`` (plain LoRA, rsLoRA,
  rank/alpha patterns, DoRA, embedding LoRA + modules_to_save + trained biases, lora_bias, fan_in_fan_out),
  whatever the naming layout of the adapter (legacy transformers) or its file format (.bin);
* three adapters merged by task arithmetic give the model obtained from their merged full models, and mixing
  adapters with full fine-tunes in one recipe gives the same; the output loads and runs a forward pass;
* ``output: lora`` reproduces the dense merge at full rank, peft and transformers load it, and the reported
  approximation errors are the true ones at a lower rank;
* bad adapters (another base, a target module the base lacks, corrupt files, unsupported variants) are refused
  with a message naming the adapter, and nothing is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

torch.set_num_threads(1)

import peft  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from omnimerge.checkpoint.lora import AdapterFiles, open_adapter  # noqa: E402
from omnimerge.checkpoint.names import canonical_name  # noqa: E402
from omnimerge.checkpoint.reader import Checkpoint  # noqa: E402

V, H = 256, 64
LM_TARGETS = r".*language_model.*\.(q_proj|v_proj|down_proj)"
ARCHS = ("llava", "qwen2vl")


# --- builders (shared with test_methods_knots.py) ------------------------------------------------------------------


def model_class(arch: str) -> Any:
    return transformers.LlavaForConditionalGeneration if arch == "llava" else transformers.Qwen2VLForConditionalGeneration


def tiny_config(arch: str, intermediate: int = 128) -> Any:
    if arch == "llava":
        llama = transformers.LlamaConfig(
            vocab_size=V, hidden_size=H, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512,
        )
        clip = transformers.CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        )
        return transformers.LlavaConfig(
            vision_config=clip, text_config=llama, image_token_index=V - 1, image_seq_length=16
        )
    return transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=V, hidden_size=H, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=2, embed_dim=64, hidden_size=H, num_heads=4, mlp_ratio=2, patch_size=8, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 4, vision_end_token_id=V - 5,
    )


def build_base(arch: str, folder: Path, seed: int = 0, intermediate: int = 128) -> Path:
    torch.manual_seed(seed)
    model = model_class(arch)(tiny_config(arch, intermediate))
    model.save_pretrained(folder)
    return folder


def load(arch: str, folder: Path) -> Any:
    return model_class(arch).from_pretrained(folder).eval()


def make_adapter(arch: str, base_dir: Path, out: Path, seed: int, **kw: Any) -> Path:
    """A peft adapter on the base with random (non-zero) B factors, saved with save_pretrained."""
    kw.setdefault("target_modules", LM_TARGETS)
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(load(arch, base_dir), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_embedding_A" in n:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in n or (p.requires_grad and n.endswith(".bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    pm.save_pretrained(out)
    return out


def peft_merged(arch: str, base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    pm = peft.PeftModel.from_pretrained(load(arch, base_dir), adapter)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def merged_full_model(arch: str, base_dir: Path, adapter: Path, out: Path) -> Path:
    pm = peft.PeftModel.from_pretrained(load(arch, base_dir), adapter)
    pm.merge_and_unload().save_pretrained(out)
    return out


def write_recipe(folder: Path, **data: Any) -> Path:
    p = folder / f"recipe_{len(list(folder.glob('recipe_*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump({k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}))
    return p


def models(*paths: Path) -> list[dict[str, str]]:
    return [{"model": str(p)} for p in paths]


def image_inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if arch == "llava":
        ids = torch.tensor([[1] + [V - 1] * 16 + [5, 6, 7, 8]])
        return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    ids = torch.tensor([[1, V - 4] + [V - 1] * 4 + [V - 5, 5, 6, 7]])
    mm = (ids == V - 1).long()
    return {
        "input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 8 * 8, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4]]), "mm_token_type_ids": mm,
    }


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per architecture: a base and three adapters of different kinds (and their merged full models)."""
    root = tmp_path_factory.mktemp("lora")
    out: dict[str, Any] = {"root": root}
    for arch in ARCHS:
        d = root / arch
        base = build_base(arch, d / "base")
        a1 = make_adapter(arch, base, d / "a1", 1)
        a2 = make_adapter(arch, base, d / "a2", 2, r=2, lora_alpha=6, use_rslora=True)
        a3 = make_adapter(arch, base, d / "a3", 3, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
        out[arch] = {"base": base, "adapters": [a1, a2, a3]}
    return out


# --- task vectors equal peft's merge_and_unload() -------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 6},
    "patterns": {"rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 3},
                 "alpha_pattern": {"layers.1.self_attn.q_proj": 3, "v_proj": 5}},
    "dora": {"use_dora": True},
    "embedding+modules_to_save+bias": {
        "target_modules": r".*language_model.*\.(q_proj|embed_tokens)", "modules_to_save": ["lm_head"],
        "bias": "lora_only",
    },
    "lora_bias": {"target_modules": r".*language_model.*\.(q_proj|v_proj)", "lora_bias": True},
}


def _check_task_vectors(
    arch: str, base_dir: Path, adapter: Path, reference: Path | None = None
) -> tuple[int, float]:
    """Compare omnimerge's task vectors of ``adapter`` with peft's merge of ``reference`` (default: itself)."""
    merged = peft_merged(arch, base_dir, reference or adapter)
    base_sd = load(arch, base_dir).state_dict()
    ck = Checkpoint(base_dir)
    src = open_adapter(adapter, str(adapter), ck, "a")
    try:
        src.validate(ck, list(ck.tensors))
        changed, worst = 0, 0.0
        for name, w0 in base_sd.items():
            bname = ck.find(canonical_name(name))
            if bname is None:
                continue
            base = ck.read(bname).to(torch.float32)
            tv, lr = src.task_vector(bname, ck.canonical_of(bname), base, torch.float32, torch.device("cpu"))
            expected = merged[name] - w0
            if tv is None:
                assert torch.equal(merged[name], w0), f"{name}: peft changed it, omnimerge says tau = 0"
                continue
            changed += 1
            err = float((tv - expected).abs().max())
            worst = max(worst, err)
            assert err <= 1e-6, f"{name}: |tau - peft delta| = {err:.3g}"
            if lr is not None:
                assert float((lr.dense() - tv).abs().max()) <= 1e-6, name
        return changed, worst
    finally:
        src.close()
        ck.close()


# lora_bias needs projections with a bias: Qwen2's q/k/v have one, Llama's (LLaVA) do not.
@pytest.mark.parametrize(
    ("arch", "variant"), [(a, v) for a in ARCHS for v in VARIANTS if not (v == "lora_bias" and a == "llava")]
)
def test_task_vector_equals_peft_merge_and_unload(arch: str, variant: str, fam: dict[str, Any]) -> None:
    base = fam[arch]["base"]
    adapter = make_adapter(arch, base, fam["root"] / arch / f"v_{variant}", 7, **VARIANTS[variant])
    changed, _worst = _check_task_vectors(arch, base, adapter)
    assert changed >= 4


def test_fan_in_fan_out_adapter_equals_peft(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers store W^T: peft merges (B A)^T there (fan_in_fan_out)."""
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"],
                                                   fan_in_fan_out=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "a")
    merged = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "a"
    ).merge_and_unload().state_dict()
    w0 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").state_dict()
    ck = Checkpoint(tmp_path / "base")
    src = open_adapter(tmp_path / "a", "a", ck, "a")
    src.validate(ck, list(ck.tensors))
    n = 0
    for name in ck.tensors:
        base_t = ck.read(name).float()
        tv, lr = src.task_vector(name, ck.canonical_of(name), base_t, torch.float32, torch.device("cpu"))
        key = name if name in merged else f"transformer.{name}"
        if tv is None:
            assert torch.equal(merged[key], w0[key]), name
            continue
        n += 1
        assert float((tv - (merged[key] - w0[key])).abs().max()) <= 1e-6, name
        assert lr is not None and torch.allclose(lr.dense(), tv, atol=1e-7)
    src.close()
    ck.close()
    assert n == 4


def test_legacy_layout_adapter_keys(fam: dict[str, Any], tmp_path: Path) -> None:
    """An adapter saved by transformers < 4.52 (language_model.model.* / model.layers.* module names) maps onto
    the same base tensors as a current one (peft 0.21 itself silently skips the Qwen2-VL one: missing keys)."""
    from safetensors.torch import load_file, save_file

    for arch, old in (("llava", "base_model.model.language_model.model."), ("qwen2vl", "base_model.model.model.")):
        src = fam[arch]["adapters"][0]
        dst = tmp_path / arch
        shutil.copytree(src, dst)
        sd = load_file(str(dst / "adapter_model.safetensors"))
        sd = {k.replace("base_model.model.model.language_model.", old): v for k, v in sd.items()}
        assert all(k.startswith(old) for k in sd)
        save_file(sd, str(dst / "adapter_model.safetensors"))
        changed, _ = _check_task_vectors(arch, fam[arch]["base"], dst, reference=src)
        assert changed == 6


def test_bin_adapter_and_unselected_targets(fam: dict[str, Any], tmp_path: Path) -> None:
    """adapter_model.bin reads like safetensors; LoRA on tensors the recipe does not select (here the CLIP
    tower, hit by target_modules=["q_proj"]) is reported, and those tensors keep the base's values."""
    from safetensors.torch import load_file

    arch = "llava"
    src = fam[arch]["adapters"][0]
    dst = tmp_path / "as_bin"
    shutil.copytree(src, dst)
    torch.save(load_file(str(dst / "adapter_model.safetensors")), dst / "adapter_model.bin")
    (dst / "adapter_model.safetensors").unlink()
    changed, _ = _check_task_vectors(arch, fam[arch]["base"], dst, reference=src)
    assert changed == 6
    wide = make_adapter(arch, fam[arch]["base"], tmp_path / "all_q", 4, target_modules=["q_proj"])
    report, notes = _merge_api({"base_model": str(fam[arch]["base"]), "models": models(wide),
                                "merge_method": "task_arithmetic"}, tmp_path / "o")
    assert any("changes 2 tensor(s) the recipe does not select" in n and "vision_tower" in n for n in notes), notes
    got, base_w = read_weights(tmp_path / "o"), read_weights(fam[arch]["base"])
    assert [k for k in got if not torch.equal(got[k], base_w[k])] == [
        f"language_model.model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)
    ]


# --- merging adapters, full models and mixes ----------------------------------------------------------------------


def test_adapters_merge_like_their_merged_full_models(fam: dict[str, Any], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    arch = "llava"
    base, adapters = fam[arch]["base"], fam[arch]["adapters"]
    fulls = [merged_full_model(arch, base, a, tmp_path / f"full{i}") for i, a in enumerate(adapters)]
    outs = {}
    for tag, ms in (("adapters", adapters), ("full", fulls), ("mixed", [adapters[0], fulls[1], adapters[2]])):
        r = write_recipe(tmp_path, base_model=base, models=models(*ms), merge_method="task_arithmetic",
                         parameters={"scaling": 0.5})
        res = cli("merge", r, "-o", tmp_path / tag, "-q")
        assert res.code == 0, res.text
        outs[tag] = read_weights(tmp_path / tag)
    base_w = read_weights(base)
    assert set(outs["adapters"]) == set(base_w)
    n_changed = 0
    for name, w in outs["full"].items():
        for tag in ("adapters", "mixed"):
            err = float((outs[tag][name] - w).abs().max())
            assert err <= 1e-6, f"{tag} vs full: {name}: {err:.3g}"
        n_changed += int(not torch.equal(w, base_w[name]))
    assert n_changed == 6  # q, v, down in 2 layers
    # the output loads and runs
    m = load(arch, tmp_path / "adapters")
    with torch.no_grad():
        logits = m(**image_inputs(arch)).logits
    assert torch.isfinite(logits).all()
    ref = load(arch, tmp_path / "full")
    with torch.no_grad():
        assert torch.allclose(ref(**image_inputs(arch)).logits, logits, atol=1e-5)


# --- output: lora -----------------------------------------------------------------------------------------------------


def _merge_api(recipe: dict[str, Any], out: Path) -> tuple[Any, list[str]]:
    from omnimerge.api import merge

    notes: list[str] = []
    report = merge(recipe, out, echo=notes.append, hash_inputs=False)
    return report, notes


def _peft_apply(arch: str, base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    pm = peft.PeftModel.from_pretrained(load(arch, base_dir), adapter_dir)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_output_lora_full_rank_reproduces_dense_merge(arch: str, fam: dict[str, Any], tmp_path: Path) -> None:
    base, adapters = fam[arch]["base"], fam[arch]["adapters"]
    recipe = {"base_model": str(base), "models": models(*adapters), "merge_method": "task_arithmetic",
              "parameters": {"scaling": 0.7}}
    _merge_api(recipe, tmp_path / "dense")
    report, notes = _merge_api({**recipe, "output": "lora", "rank": 16}, tmp_path / "lora")
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "config.json").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 16
    # ranks: a1 4 + a2 2 + a3 (q 4, v 2, down 4) -> q 10, v 8, down 10: all below 16, so all in rank_pattern
    assert sorted(set(cfg["rank_pattern"].values())) == [8, 10]
    assert report.lora_modules == 6 and max(report.lora_relative_error.values()) < 1e-5
    assert any("relative error" in n for n in notes)
    dense = load(arch, tmp_path / "dense").state_dict()
    via_peft = _peft_apply(arch, base, out)
    assert set(via_peft) == set(dense)
    worst = max(float((via_peft[k] - dense[k]).abs().max()) for k in dense)
    assert worst <= 1e-5, worst
    # transformers' own adapter loading (the base named in adapter_config.json) gives the same model
    auto = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        la = auto(**image_inputs(arch)).logits
        ld = load(arch, tmp_path / "dense")(**image_inputs(arch)).logits
    assert torch.allclose(la, ld, atol=1e-5)


def test_output_lora_reruns_are_byte_identical(fam: dict[str, Any], tmp_path: Path) -> None:
    """The adapter file is the same bytes on every run and worker count (its safetensors metadata once had two keys,
    which the library writes in an order that changes from call to call)."""
    from omnimerge.api import merge

    base, adapters = fam["qwen2vl"]["base"], fam["qwen2vl"]["adapters"]
    recipe = {"base_model": str(base), "models": models(*adapters), "merge_method": "ties", "output": "lora",
              "rank": 3}
    blobs = set()
    for i, workers in enumerate((1, 1, 2, 2, 1, 2)):
        merge(recipe, tmp_path / f"o{i}", workers=workers, hash_inputs=False)
        blobs.add((tmp_path / f"o{i}" / "adapter_model.safetensors").read_bytes())
    assert len(blobs) == 1


def test_output_lora_low_rank_reports_true_errors(fam: dict[str, Any], tmp_path: Path) -> None:
    arch = "qwen2vl"
    base, adapters = fam[arch]["base"], fam[arch]["adapters"]
    recipe = {"base_model": str(base), "models": models(*adapters), "merge_method": "ties",
              "parameters": {"scaling": 1.0, "density": 0.3}}
    _merge_api(recipe, tmp_path / "dense")
    report, _ = _merge_api({**recipe, "output": "lora", "rank": 3}, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {}  # TIES deltas are full rank: every module uses rank 3
    dense = load(arch, tmp_path / "dense").state_dict()
    base_sd = load(arch, base).state_dict()
    via_peft = _peft_apply(arch, base, tmp_path / "lora")
    checked = 0
    for module, reported in report.lora_module_errors.items():
        k = module + ".weight"
        d = dense[k] - base_sd[k]
        true = float((via_peft[k] - dense[k]).norm() / d.norm())
        assert 0.05 < true < 1.0 and abs(true - reported) < 1e-4, (module, true, reported)
        checked += 1
    assert checked == 6
    assert set(report.lora_relative_error) == {"q_proj", "v_proj", "down_proj"}


def test_output_lora_is_a_sink_fed_whole_tensors_by_any_number_of_workers(fam: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """The LoRA output is a Sink like the others: the engine's executor feeds it whole tensors (it factorises
    them as they arrive), and the adapter is the same bytes whatever the number of workers asked for."""
    from omnimerge.api import merge
    from omnimerge.checkpoint.lora import LoraAdapterSink
    from omnimerge.sinks import Sink

    arch = "qwen2vl"
    recipe = {"base_model": str(fam[arch]["base"]), "models": models(*fam[arch]["adapters"]),
              "merge_method": "ties", "parameters": {"scaling": 1.0, "density": 0.3}, "output": "lora", "rank": 3}
    got = []
    for w in (1, 2):
        merge(recipe, tmp_path / f"w{w}", hash_inputs=False, workers=w)
        got.append(load_file(str(tmp_path / f"w{w}" / "adapter_model.safetensors")))
    assert got[0].keys() == got[1].keys()
    differ = {k: float((got[0][k].float() - got[1][k].float()).abs().max()) for k in got[0]
              if not torch.equal(got[0][k], got[1][k])}
    assert not differ, differ
    from omnimerge.checkpoint.reader import open_checkpoint
    from omnimerge.errors import OutputError

    base = open_checkpoint(str(fam[arch]["base"]))
    name = next(n for n in base.tensors if n.endswith("q_proj.weight"))
    meta = base.tensors[name]
    sink = LoraAdapterSink(tmp_path / "x", base, [(name, base.canonical_of(name), "llm", meta.dtype, meta.shape)],
                           3, method="ties", base_ref="b", task_type=None, notes=print)
    assert isinstance(sink, Sink) and sink.whole_tensors
    with pytest.raises(OutputError, match="whole tensors"):
        sink.write_part(name, base.read(name).reshape(-1)[:4], 0, False)
    with pytest.raises(OutputError, match="never written"):
        sink.finish()
    sink.write(name, base.read(name).float())  # unchanged: the merged model would equal the base
    with pytest.raises(OutputError, match="equals the base"):
        sink.finish()
    base.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_output_lora_mixed_experts_with_norms_and_biases(arch: str, fam: dict[str, Any], tmp_path: Path) -> None:
    """A full fine-tune that also changed the norms and biases, plus an adapter: weights become LoRA (rank 64 =
    full rank here), norms are saved through modules_to_save, and so are the Qwen2 q/k/v projections whose bias
    changed (stored whole); peft reproduces the dense merge."""
    base = fam[arch]["base"]
    m = load(arch, base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "language_model" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    m.save_pretrained(tmp_path / "full")
    recipe = {"base_model": str(base), "models": models(tmp_path / "full", fam[arch]["adapters"][0]),
              "merge_method": "task_arithmetic", "parameters": {"scaling": 0.5},
              "select": {"include": ["language_model", "norm", "bias"]}}
    _merge_api(recipe, tmp_path / "dense")
    report, notes = _merge_api({**recipe, "output": "lora", "rank": 64}, tmp_path / "lora")
    # 2 x (input, post_attention) layernorm + final norm; Qwen2: + q/k/v (bias) in 2 layers
    assert len(report.lora_modules_to_save) == (5 if arch == "llava" else 11)
    assert report.lora_modules == (14 if arch == "llava" else 8)
    if arch == "qwen2vl":
        assert any("stores it whole" in n for n in notes)
    dense = load(arch, tmp_path / "dense").state_dict()
    via_peft = _peft_apply(arch, base, tmp_path / "lora")
    worst = max(float((via_peft[k] - dense[k]).abs().max()) for k in dense)
    assert worst <= 1e-5, worst


def test_factorise_large_matrix_randomized_is_near_optimal() -> None:
    """The randomized range finder used for large matrices: exact for a delta of rank <= R + 16, and within a
    hair of the optimal (Eckart-Young) error for a full-rank one."""
    from omnimerge.checkpoint.lora import _factorise

    g = torch.Generator().manual_seed(0)
    low = torch.randn(1100, 20, generator=g) @ torch.randn(20, 1200, generator=g)
    u, s, vh = _factorise(low, 24, g)
    assert s.shape[0] == 20 and float(((u * s) @ vh - low).norm() / low.norm()) < 1e-5
    full = low + 0.3 * torch.randn(1100, 1200, generator=g)
    u, s, vh = _factorise(full, 16, g)
    err = float(((u * s) @ vh - full).norm())
    sv = torch.linalg.svdvals(full)
    best = float(sv[16:].pow(2).sum().sqrt())
    assert s.shape[0] == 16 and 0.999 * best <= err <= 1.001 * best


def test_optmerge_auto_picks_lora_for_adapters(fam: dict[str, Any], tmp_path: Path) -> None:
    arch = "qwen2vl"
    recipe = {"base_model": str(fam[arch]["base"]), "models": models(*fam[arch]["adapters"][:2]),
              "merge_method": "optmerge", "parameters": {"variant": "auto", "steps": 3}}
    _r, notes = _merge_api(recipe, tmp_path / "o")
    assert any("variant auto -> lora" in n for n in notes), notes


# --- bad inputs ---------------------------------------------------------------------------------------------------------


def _expect_refusal(cli, tmp_path: Path, base: Path, adapter: Path, *needles: str) -> str:  # type: ignore[no-untyped-def]
    r = write_recipe(tmp_path, base_model=base, models=models(adapter), merge_method="task_arithmetic")
    out = tmp_path / f"out_{adapter.name}"
    res = cli("merge", r, "-o", out, "-q")
    assert res.code == 2, res.text
    text = " ".join(res.err.split())
    for n in needles:
        assert n in text, (n, text)
    assert not out.exists(), "nothing may be written"
    assert not list(tmp_path.glob(f".{out.name}*")), "no temporary folder may be left"
    return text


def test_adapter_for_another_base_is_refused(fam: dict[str, Any], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    arch = "llava"
    base = fam[arch]["base"]
    # same shapes, another model: refused by name
    other = build_base(arch, tmp_path / "other_model", seed=9)
    a_other = make_adapter(arch, other, tmp_path / "for_other", 1)
    _expect_refusal(cli, tmp_path, base, a_other, "for_other", "was made for the base", "other_model")
    # the name agrees but the shapes do not (intermediate size 96): refused by shape, naming the module
    wide = build_base(arch, tmp_path / "wide" / "base", intermediate=96)
    a_wide = make_adapter(arch, wide, tmp_path / "for_wide", 1)
    cfg = json.loads((a_wide / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (a_wide / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_refusal(cli, tmp_path, base, a_wide, "for_wide", "down_proj", "lora_A has shape [4, 96]",
                    "expected [4, 128]")


def test_target_module_missing_from_base_is_refused(fam: dict[str, Any], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    base = fam["llava"]["base"]
    a = tmp_path / "ghost"
    shutil.copytree(fam["llava"]["adapters"][0], a)
    sd = load_file(str(a / "adapter_model.safetensors"))
    sd = {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in sd.items()}
    save_file(sd, str(a / "adapter_model.safetensors"))
    _expect_refusal(cli, tmp_path, base, a, "ghost", "target module", "layers.7.self_attn.q_proj",
                    "missing from the base")


def test_corrupt_adapters_are_refused(fam: dict[str, Any], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    base = fam["llava"]["base"]
    src = fam["llava"]["adapters"][0]
    trunc = tmp_path / "truncated"
    shutil.copytree(src, trunc)
    f = trunc / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_refusal(cli, tmp_path, base, trunc, "truncated", "adapter_model.safetensors")
    garbage = tmp_path / "garbage"
    shutil.copytree(src, garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _expect_refusal(cli, tmp_path, base, garbage, "garbage", "corrupt")
    badcfg = tmp_path / "badcfg"
    shutil.copytree(src, badcfg)
    (badcfg / "adapter_config.json").write_text("{ r: 4,")
    _expect_refusal(cli, tmp_path, base, badcfg, "badcfg", "adapter_config.json", "invalid JSON")
    noweights = tmp_path / "noweights"
    shutil.copytree(src, noweights)
    (noweights / "adapter_model.safetensors").unlink()
    _expect_refusal(cli, tmp_path, base, noweights, "noweights", "without weights")
    wrong_r = tmp_path / "wrong_r"
    shutil.copytree(src, wrong_r)
    cfg = json.loads((wrong_r / "adapter_config.json").read_text())
    cfg["r"] = 8
    (wrong_r / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_refusal(cli, tmp_path, base, wrong_r, "wrong_r", "gives rank 8", "lora_A has 4 rows")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("target_parameters", ["mlp.experts.gate_up_proj"], "target_parameters"),
        ("init_lora_weights", "pissa", "changes the base weights"),
        ("alora_invocation_tokens", [5, 6], "aLoRA"),
        ("peft_type", "IA3", "LoRA adapters only"),
    ],
)
def test_unsupported_adapters_are_refused(field: str, value: Any, needle: str, fam: dict[str, Any],
                                          tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    a = tmp_path / f"unsup_{field}"
    shutil.copytree(fam["llava"]["adapters"][0], a)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg[field] = value
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_refusal(cli, tmp_path, fam["llava"]["base"], a, a.name, needle)


def test_output_lora_needs_rank(fam: dict[str, Any], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    r = write_recipe(tmp_path, base_model=fam["llava"]["base"], models=models(fam["llava"]["adapters"][0]),
                     merge_method="task_arithmetic", output="lora")
    res = cli("merge", r, "-o", tmp_path / "o", "-q")
    assert res.code == 2 and "rank" in res.err and not (tmp_path / "o").exists()


def test_inspect_adapter(fam: dict[str, Any], cli) -> None:  # type: ignore[no-untyped-def]
    a = fam["qwen2vl"]["adapters"][2]
    res = cli("inspect", a)
    assert res.code == 0, res.text
    text = " ".join(res.out.split())
    for needle in ("PEFT LoRA adapter", "r=4", "q_proj", "v_proj", "down_proj", "6 LoRA modules"):
        assert needle in text, (needle, text)
    files = AdapterFiles(a)
    assert {m.r for m in files.modules.values() if m.name.endswith("v_proj")} == {2}
    assert {m.scale for m in files.modules.values() if m.name.endswith("down_proj")} == {3 / 4}
    files.close()
