"""The tiny models the mergekit fixtures were computed on, rebuilt byte for byte (torch and safetensors only).

``tools/mergekit_fixtures.py`` imports this file from mergekit's own environment to build the inputs it runs
mergekit on; the tests build the same folders and check each input's SHA-256 against the one the fixture
recorded, so a changed input shows up as such and not as a wrong merge.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

#: a Llama small enough that mergekit's outputs can be stored as fixtures
LAYERS = 4
HIDDEN, INTER, VOCAB, HEADS, KV = 16, 32, 32, 2, 1
#: the inputs: folder name -> generator seed
MODELS = {"base": 0, "a": 1, "b": 2}
#: mergekit's example recipes run unchanged on 40-layer models (their layer ranges), narrower still
EXAMPLE_DIMS = {"layers": 40, "hidden": 8, "inter": 16, "vocab": 16}
EXAMPLE_MODELS = {"base": 10, "a": 11, "b": 12, "c": 13}


def config(layers: int = LAYERS, hidden: int = HIDDEN, inter: int = INTER, vocab: int = VOCAB) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32", "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
        "head_dim": hidden // HEADS,
    }


CONFIG = config()


def tensor_shapes(layers: int = LAYERS, hidden: int = HIDDEN, inter: int = INTER,
                  vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """LlamaForCausalLM's tensor names and shapes, in checkpoint order."""
    hd = hidden // HEADS
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (hidden,), p + "self_attn.q_proj.weight": (HEADS * hd, hidden),
                p + "self_attn.k_proj.weight": (KV * hd, hidden), p + "self_attn.v_proj.weight": (KV * hd, hidden),
                p + "self_attn.o_proj.weight": (hidden, HEADS * hd), p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter)}
    return out | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def build(root: Path, models: dict[str, int] | None = None, **dims: int) -> dict[str, str]:
    """Write every model of ``models`` (default :data:`MODELS`; folder name -> seed) under ``root``, with the
    dimensions ``dims`` (see :func:`config`); returns folder name -> SHA-256 of its weights."""
    digests = {}
    cfg = config(**dims)
    shapes = tensor_shapes(**dims)
    for name, seed in (models or MODELS).items():
        g = torch.Generator().manual_seed(seed)
        sd = {k: torch.randn(shape, generator=g, dtype=torch.float32) * 0.1 for k, shape in shapes.items()}
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        digests[name] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    return digests


def build_examples(root: Path) -> dict[str, str]:
    """The inputs of mergekit's example recipes (:data:`EXAMPLE_MODELS`, 40 layers)."""
    return build(root, EXAMPLE_MODELS, **EXAMPLE_DIMS)


#: the model names of mergekit's example recipes -> the local folders of :func:`build_examples`
EXAMPLE_NAMES = {
    "TheBloke/Llama-2-13B-fp16": "base", "mistralai/Mistral-7B-v0.1": "base", "model_a": "base",
    "psmathur/orca_mini_v3_13b": "a", "mistralai/Mistral-7B-Instruct-v0.2": "a", "model_b": "a",
    "garage-bAInd/Platypus2-13B": "b", "BioMistral/BioMistral-7B": "b",
    "WizardLM/WizardLM-13B-V1.2": "c", "WizardLM/WizardMath-13B-V1.0": "c",
}


def localise(recipe: object, root: Path) -> object:
    """``recipe`` with every model name of :data:`EXAMPLE_NAMES` replaced by its folder under ``root``."""
    if isinstance(recipe, dict):
        return {k: localise(v, root) for k, v in recipe.items()}
    if isinstance(recipe, list):
        return [localise(v, root) for v in recipe]
    if isinstance(recipe, str) and recipe in EXAMPLE_NAMES:
        return str(root / EXAMPLE_NAMES[recipe])
    return recipe
