"""The component map and name normalisation on the real on-disk names of every supported family."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omnimerge.checkpoint.names import canonical_name
from omnimerge.components import Selector, classify
from tests.tiny_models import families

_TOWERS = [
    (r"^model\.visual\.merger\.", "projector"),
    (r"^model\.(multi_modal_projector|connector)\.", "projector"),
    (r"^model\.image_newline$", "projector"),
    (r"^model\.(vision_tower|visual|vision_model)\.", "vision_tower"),
    (r"^model\.audio_tower\.", "audio_tower"),
]


def truth(model: torch.nn.Module, name: str) -> str:
    """The component of an in-memory parameter, derived from its prefix and its module's type (not from
    omnimerge's name rules)."""
    for pat, comp in _TOWERS:
        if re.search(pat, name):
            return comp
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if name.startswith("lm_head."):
        return "lm_head"
    if isinstance(mod, torch.nn.Embedding):
        return "embedding"
    if "norm" in type(mod).__name__.lower():
        return "norm"
    if isinstance(mod, torch.nn.Linear):
        return "bias" if leaf == "bias" else "language_model"
    return "other"


@pytest.mark.parametrize("family", list(families()))
def test_components_of_every_family(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = families()[family]()
    model.save_pretrained(tmp_path)  # transformers' default on-disk layout (legacy names for most VLMs)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        disk = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    memory = dict(model.state_dict())
    mem_by_canon = {canonical_name(n): n for n in memory}
    assert len(mem_by_canon) == len(memory)
    for name, shape in disk.items():
        canon = canonical_name(name)
        assert canon in mem_by_canon, f"{family}: on-disk '{name}' normalises to '{canon}', unknown in memory"
        mem_name = mem_by_canon[canon]
        expected = truth(model, mem_name)
        assert classify(name, shape) == expected, f"{family}: {name}"
        assert classify(mem_name, shape) == expected, f"{family}: {mem_name}"
    comps = {classify(n, s) for n, s in disk.items()}
    assert {"language_model", "embedding", "norm"} <= comps
    if family not in ("llama", "qwen2"):
        assert comps & {"vision_tower", "audio_tower"} and "projector" in comps, comps


def test_internvl_remote_code_names() -> None:
    """InternVL's trust_remote_code checkpoints: vision_model.*, mlp1.*, language_model.model.*."""
    cases = {
        "vision_model.encoder.layers.0.attn.qkv.weight": "vision_tower",
        "vision_model.embeddings.patch_embedding.weight": "vision_tower",
        "mlp1.0.weight": "projector",
        "mlp1.1.weight": "projector",
        "language_model.model.layers.3.self_attn.q_proj.weight": "language_model",
        "language_model.model.layers.3.self_attn.q_proj.bias": "bias",
        "language_model.model.layers.3.input_layernorm.weight": "norm",
        "language_model.model.embed_tokens.weight": "embedding",
        "language_model.lm_head.weight": "lm_head",
    }
    for name, comp in cases.items():
        shape = (4,) if comp in ("bias", "norm") or name.startswith("mlp1.0") else (4, 4)
        assert classify(name, shape) == comp, name


def test_naming_layouts_line_up() -> None:
    pairs = [
        ("language_model.model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "model.vision_tower.encoder.layers.0.mlp.fc1.weight"),
        ("model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.0.self_attn.q_proj.weight"),
        ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
        ("multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.weight"),
        ("model.text_model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight"),
    ]
    for old, new in pairs:
        assert canonical_name(old) == canonical_name(new), (old, new)


def test_selector_components_and_regexes() -> None:
    s = Selector(["language_model", r"multi_modal_projector\.linear_2"], [r"layers\.1\."])
    assert s.selects("language_model.model.layers.0.mlp.up_proj.weight", "language_model")
    assert not s.selects("language_model.model.layers.1.mlp.up_proj.weight", "language_model")
    assert s.selects("multi_modal_projector.linear_2.weight", "projector")
    assert not s.selects("multi_modal_projector.linear_1.weight", "projector")
    assert not s.selects("language_model.model.norm.weight", "norm")
    from omnimerge.errors import RecipeError

    with pytest.raises(RecipeError, match="neither a component"):
        Selector(["(unclosed"])
