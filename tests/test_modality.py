"""Modality merging (mode: modality) on tiny real architectures built from configs: a plain Qwen2 base LLM, a
Qwen2-VL vision expert and a Qwen2-Audio audio expert whose language models were copied from the base and then
fine-tuned differently (seeded perturbations), each with its own random encoder and projector.

Checks: one output per architecture that loads with its transformers class (no missing / unexpected keys) and
runs a forward pass with its modality's input; encoder/projector/norms/embeddings are the expert's own, byte
for byte, under the expert's own on-disk names; the LLM linear weights are W0 + lambda * sum_i tau_i (task
arithmetic) or the method's own result (TIES), identical in every output; the manifest; refusals by name
(different hidden size, missing LLM tensor, an LLM not fine-tuned from the base, a selected encoder); nothing
left behind on failure; the CLI; and the online composition of LoRA experts (adapters kept apart, all active at
once = W0 + sum of the LoRA products).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.components import classify
from omnimerge.errors import CheckpointError, RecipeError, TensorMismatchError
from omnimerge.examples import VOCAB, build_base, dummy_inputs, model_class, tiny_config

torch.set_num_threads(1)

ARCHS = ("qwen2_vl", "qwen2_audio")


def _llm_key(key: str) -> str | None:
    """The base Qwen2ForCausalLM's name of a multimodal model's LLM parameter (in-memory names), else None."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key == "lm_head.weight":
        return key
    return None


def _modality_model(arch: str, base_sd: dict[str, torch.Tensor], seed: int, tau_scale: float,
                    hidden: int | None = None) -> torch.nn.Module:
    """A multimodal model whose LLM is the base's plus a seeded task vector on its linear weights."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    if hidden is not None:
        cfg.text_config.hidden_size = hidden
    model = model_class(arch)(cfg).eval()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            bk = _llm_key(k)
            if bk is None or hidden is not None:
                continue
            p.copy_(base_sd[bk])
            if tau_scale and classify(k, tuple(p.shape)) == "language_model":
                p.add_(tau_scale * p.std() * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modality")
    base = build_base("qwen2", seed=0)
    base.save_pretrained(root / "base")
    sd = base.state_dict()
    paths = {"base": root / "base"}
    for i, arch in enumerate(ARCHS):
        _modality_model(arch, sd, seed=10 + i, tau_scale=0.05).save_pretrained(root / arch)
        paths[arch] = root / arch
    return paths


def _recipe(family: dict[str, Path], method: str = "task_arithmetic", **params: float) -> dict:
    return {
        "mode": "modality",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[a]), "name": a.split("_")[-1]} for a in ARCHS],
        "merge_method": method,
        "parameters": params,
    }


def _disk(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _audio_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1] + [VOCAB - 3] * 25 + [10, 11, 12]])
    return {"input_ids": ids, "input_features": torch.randn(1, 16, 100, generator=g),
            "feature_attention_mask": torch.ones(1, 100, dtype=torch.long)}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    return _audio_inputs() if arch == "qwen2_audio" else dummy_inputs(arch)


@pytest.mark.parametrize("fused", [False, True], ids=["whole-tensor", "block-streamed"])
def test_task_arithmetic_outputs(family: dict[str, Path], tmp_path: Path, fused: bool,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import omnimerge.engine

    if fused:  # the engine's block-by-block path for elementwise methods, which tiny tensors do not reach
        monkeypatch.setattr(omnimerge.engine, "FUSED_BLOCK", 1000)
    lam = 0.5
    out = tmp_path / "omni"
    rep = omnimerge.merge(_recipe(family, scaling=lam), out)
    assert rep.strategies == ({"fused": 14} if fused else {"whole": 14})
    assert sorted(rep.outputs) == ["qwen2_audio", "qwen2_vl"]
    assert rep.merged == 14  # 2 layers x 7 linear weights, merged once
    base = _disk(family["base"])
    taus = {}
    for arch in ARCHS:  # on disk: Qwen2-VL model.layers.*, Qwen2-Audio language_model.model.layers.*
        e = _disk(family[arch])
        taus[arch] = {n.removeprefix("language_model."): e[n] - base[n.removeprefix("language_model.")]
                      for n in e if classify(n, tuple(e[n].shape)) == "language_model"}
    for arch in ARCHS:
        folder = out / arch
        exp = _disk(family[arch])
        got = _disk(folder)
        with safe_open(str(folder / "model.safetensors"), "pt") as f, \
                safe_open(str(family[arch] / "model.safetensors"), "pt") as fe:
            assert list(f.keys()) == list(fe.keys()), "the output keeps the expert's names and order"
        merged_names = 0
        for name, w in exp.items():
            comp = classify(name, tuple(w.shape))
            canon_base = name.removeprefix("language_model.")
            if comp == "language_model":
                w0 = base[canon_base]
                expected = w0 + lam * (taus["qwen2_vl"][canon_base] + taus["qwen2_audio"][canon_base])
                torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6)
                assert not torch.equal(got[name], w)
                merged_names += 1
            else:  # encoder, projector, embeddings, norms, lm_head: the expert's own, bit for bit
                assert torch.equal(got[name], w), f"{arch}: {name} ({comp}) must be the expert's own"
        assert merged_names == 14
        for f in ("config.json", "generation_config.json"):
            assert (folder / f).read_bytes() == (family[arch] / f).read_bytes()
        cls = model_class(arch)
        model, info = cls.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            logits = model(**_inputs(arch)).logits
        assert torch.isfinite(logits).all()
    # the two outputs carry the same merged LLM
    vl, au = _disk(out / "qwen2_vl"), _disk(out / "qwen2_audio")
    for n in vl:
        if n.startswith("model.layers.") and n.endswith("proj.weight"):
            assert torch.equal(vl[n], au["language_model." + n])
    man = json.loads((out / "manifest.json").read_text())
    assert man["mode"] == "modality" and man["method"] == "task_arithmetic" and man["kind"] == "dense"
    assert man["parameters"]["scaling"] == lam
    assert man["shared"]["tensors"] == 14
    assert man["outputs"]["qwen2_vl"]["modalities"] == ["video", "vision"]
    assert man["outputs"]["qwen2_audio"]["modalities"] == ["audio"]
    assert man["outputs"]["qwen2_audio"]["architectures"] == ["Qwen2AudioForConditionalGeneration"]
    assert man["outputs"]["qwen2_vl"]["own_tensors_from"] == "vl"
    assert [e["output"] for e in man["experts"]] == ["qwen2_vl", "qwen2_audio"]
    digests = [f["digest"] for i in man["inputs"] for f in i["files"]]
    assert len(digests) == 6 and all(d.startswith("xxh3_128:") and len(d) == 9 + 32 for d in digests)
    assert (out / "qwen2_vl" / "README.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_ties_and_same_architecture_group(family: dict[str, Path], tmp_path: Path) -> None:
    """TIES through the engine equals the method applied to the tensors; two experts of one architecture give
    one output that carries the first one's own tensors."""
    from omnimerge.methods import TensorContext, get_method

    base = build_base("qwen2", seed=0).state_dict()
    second_vl = tmp_path / "vl2"
    _modality_model("qwen2_vl", base, seed=33, tau_scale=0.05).save_pretrained(second_vl)
    r = _recipe(family, "ties", scaling=1.0, density=0.5)
    r["models"].append({"model": str(second_vl), "name": "vl2"})
    out = tmp_path / "omni"
    rep = omnimerge.merge(r, out)
    assert sorted(rep.outputs) == ["qwen2_audio", "qwen2_vl"]
    assert rep.outputs["qwen2_vl"]["experts"] == ["vl", "vl2"]
    assert rep.outputs["qwen2_vl"]["own_tensors_from"] == "vl"
    m = get_method("ties")
    kw = m.resolve({"scaling": 1.0, "density": 0.5}, [{}, {}, {}])
    w0 = _disk(family["base"])
    e = [_disk(family["qwen2_vl"]), _disk(family["qwen2_audio"]), _disk(second_vl)]
    got = _disk(out / "qwen2_vl")
    n = "model.layers.1.mlp.down_proj.weight"
    tvs = [e[0][n] - w0[n], e[1]["language_model." + n] - w0[n], e[2][n] - w0[n]]
    ctx = TensorContext(name=n, canonical="model.language_model.layers.1.mlp.down_proj.weight",
                        component="language_model", num_models=3)
    torch.testing.assert_close(got[n], w0[n] + m.fn(w0[n].clone(), tvs, ctx, **kw), rtol=1e-5, atol=1e-6)
    own = [k for k in got if k.startswith("visual.")]
    assert own and all(torch.equal(got[k], e[0][k]) for k in own)
    assert any(not torch.equal(e[0][k], e[2][k]) for k in own)


def _refused(recipe: dict, out: Path, exc: type[Exception], *needles: str) -> None:
    with pytest.raises(exc) as info:
        omnimerge.merge(recipe, out)
    msg = str(info.value)
    for s in needles:
        assert s in msg, msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary folder left"


def test_refuses_other_hidden_size(family: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "audio96"
    _modality_model("qwen2_audio", {}, seed=5, tau_scale=0, hidden=96).save_pretrained(bad)
    r = _recipe(family)
    r["models"][1] = {"model": str(bad), "name": "audio96"}
    _refused(r, tmp_path / "out", CheckpointError, "expert 'audio96'", "hidden_size=96", "hidden_size=64")


def test_refuses_missing_llm_tensor(family: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "audio-missing"
    bad.mkdir()
    sd = _disk(family["qwen2_audio"])
    del sd["language_model.model.layers.1.self_attn.o_proj.weight"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_bytes((family["qwen2_audio"] / "config.json").read_bytes())
    r = _recipe(family)
    r["models"][1]["model"] = str(bad)
    _refused(r, tmp_path / "out", TensorMismatchError, "expert 'audio'",
             "model.language_model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight")


def test_refuses_llm_of_another_base(family: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other-vl"
    other_base = build_base("qwen2", seed=99).state_dict()  # same shapes, unrelated weights
    _modality_model("qwen2_vl", other_base, seed=3, tau_scale=0.01).save_pretrained(other)
    r = _recipe(family)
    r["models"][0] = {"model": str(other), "name": "foreign"}
    _refused(r, tmp_path / "out", CheckpointError, "expert 'foreign'", "not a fine-tune of the base")


def test_refuses_selected_encoder(family: dict[str, Path], tmp_path: Path) -> None:
    r = _recipe(family)
    r["base_model"] = str(family["qwen2_vl"])  # the base may be one of the experts: its LLM is the shared one
    r["select"] = {"include": ["language_model", "vision_tower"]}
    _refused(r, tmp_path / "out", RecipeError, "vision_tower", "only the language model is merged")


def test_base_is_a_modality_model_and_cli(lora_family: dict[str, Path], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """The base may be a modality model whose LLM is the shared one (its vision tower is ignored): same result as
    the plain LLM base. Through the CLI; a second run refuses the existing output."""
    import yaml

    r = _recipe(lora_family, scaling=0.3)
    r["models"] = [{"model": str(lora_family[a + "-dense"]), "name": a} for a in ARCHS]
    r["base_model"] = str(lora_family["qwen2_vl-model"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    res = cli("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q")
    assert res.code == 0, res.text
    assert "qwen2_vl (video+vision)" in res.text and "qwen2_audio (audio)" in res.text
    r["base_model"] = str(lora_family["base"])
    omnimerge.merge(r, tmp_path / "plain")
    for arch in ARCHS:
        a, b = _disk(tmp_path / "out" / arch), _disk(tmp_path / "plain" / arch)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = cli("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q")
    assert res.code == 2 and "already exists" in res.text


# --- LoRA experts: online composition ------------------------------------------------------------------------------
LLM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("modality-lora")
    base = build_base("qwen2", seed=0)
    base.save_pretrained(root / "base")
    sd = base.state_dict()
    paths = {"base": root / "base"}
    save_mod = {"qwen2_vl": ["merger"], "qwen2_audio": ["multi_modal_projector"]}
    for i, arch in enumerate(ARCHS):
        mm = root / f"{arch}-model"
        _modality_model(arch, sd, seed=20 + i, tau_scale=0).save_pretrained(mm)
        model = model_class(arch).from_pretrained(mm)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLM_TARGETS,
                                                      modules_to_save=save_mod[arch]))
        g = torch.Generator().manual_seed(40 + i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n or "modules_to_save" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(root / f"{arch}-lora")
        paths[arch] = root / f"{arch}-lora"
        paths[arch + "-model"] = mm
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(root / f"{arch}-dense")  # what one expert alone is, as a full checkpoint
        paths[arch + "-dense"] = root / f"{arch}-dense"
    return paths


def _expected_composition(lora_family: dict[str, Path], arch: str) -> dict[str, torch.Tensor]:
    """This modality's model with its own projector (modules_to_save) and W0 + both experts' LoRA products."""
    other = "qwen2_audio" if arch == "qwen2_vl" else "qwen2_vl"
    cls = model_class(arch)
    esd = cls.from_pretrained(lora_family[arch + "-dense"]).state_dict()
    theirs = model_class(other).from_pretrained(lora_family[other + "-dense"]).state_dict()
    w0 = cls.from_pretrained(lora_family[arch + "-model"]).state_dict()
    for k in esd:
        if classify(k, tuple(esd[k].shape)) == "language_model" and k in theirs:
            esd[k] = esd[k] + (theirs[k] - w0[k])
    return esd


def test_online_composition(lora_family: dict[str, Path], tmp_path: Path) -> None:
    from omnimerge.modality import load_online

    out = tmp_path / "online"
    rep = omnimerge.merge(_recipe(lora_family, "online_composition"), out)
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "online" and man["activate"] == ["vl", "audio"]
    assert sorted(man["adapters"]) == ["audio", "vl"] and rep.merged == 0
    for arch, label in (("qwen2_vl", "vl"), ("qwen2_audio", "audio")):
        folder = out / man["adapters"][label]["path"]
        ad = load_file(str(folder / "adapter_model.safetensors"))
        assert len(ad) == 28 and all("lora_" in k and "language_model" in k for k in ad), "LLM LoRA only"
        assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] is None
        # the modality model carries the expert's own projector (its modules_to_save) and the base's LLM
        got, dense = _disk(out / arch), _disk(lora_family[arch + "-dense"])
        model_sd = _disk(lora_family[arch + "-model"])
        moved = 0
        for k, w in got.items():
            if classify(k, tuple(w.shape)) in ("projector", "vision_tower", "audio_tower"):
                assert torch.equal(w, dense[k]), k
                moved += not torch.equal(w, model_sd[k])
            else:
                assert torch.equal(w, model_sd[k]), k
        assert moved >= 2, "the expert's trained projector is in its modality model"
        # all adapters active at once == W0 + sum of the two LoRA products (+ this expert's projector)
        composed = load_online(out, arch)
        expected = model_class(arch).from_pretrained(out / arch)
        expected.load_state_dict(_expected_composition(lora_family, arch))
        with torch.no_grad():
            inputs = _inputs(arch)
            torch.testing.assert_close(composed(**inputs).logits, expected(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_dense_merge_of_lora_experts(lora_family: dict[str, Path], tmp_path: Path) -> None:
    """LoRA adapter experts (trained on their modality models, whose LLM is the base): task arithmetic with
    lambda = 1 gives, for each modality, a full checkpoint equal to the online composition's dense form."""
    out = tmp_path / "dense"
    rep = omnimerge.merge(_recipe(lora_family, "task_arithmetic", scaling=1.0), out)
    assert rep.merged == 14 and sorted(rep.outputs) == ["qwen2_audio", "qwen2_vl"]
    for arch in ARCHS:
        cls = model_class(arch)
        model, info = cls.from_pretrained(out / arch, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        expected = _expected_composition(lora_family, arch)
        for k, w in model.state_dict().items():
            torch.testing.assert_close(w, expected[k], rtol=1e-5, atol=1e-6, msg=k)
        with torch.no_grad():
            assert torch.isfinite(model(**_inputs(arch)).logits).all()


def test_online_needs_adapters(family: dict[str, Path], tmp_path: Path) -> None:
    _refused(_recipe(family, "online_composition"), tmp_path / "out", RecipeError, "expert 'vl'",
             "full checkpoint, not a PEFT adapter")


def test_online_refused_in_capability_mode(family: dict[str, Path], tmp_path: Path) -> None:
    r = _recipe(family, "online_composition")
    r["mode"] = "capability"
    _refused(r, tmp_path / "out", RecipeError, "online_composition", "mode: modality")
