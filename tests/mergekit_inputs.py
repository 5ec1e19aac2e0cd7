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
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "float32", "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    "head_dim": HIDDEN // HEADS,
}
#: the inputs: folder name -> generator seed
MODELS = {"base": 0, "a": 1, "b": 2}


def tensor_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """LlamaForCausalLM's tensor names and shapes, in checkpoint order."""
    hd = HIDDEN // HEADS
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (HIDDEN,), p + "self_attn.q_proj.weight": (HEADS * hd, HIDDEN),
                p + "self_attn.k_proj.weight": (KV * hd, HIDDEN), p + "self_attn.v_proj.weight": (KV * hd, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HEADS * hd), p + "post_attention_layernorm.weight": (HIDDEN,),
                p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTER)}
    return out | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def build(root: Path) -> dict[str, str]:
    """Write every model of :data:`MODELS` under ``root``; returns folder name -> SHA-256 of its weights."""
    digests = {}
    for name, seed in MODELS.items():
        g = torch.Generator().manual_seed(seed)
        sd = {k: torch.randn(shape, generator=g, dtype=torch.float32) * 0.1 for k, shape in tensor_shapes().items()}
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(CONFIG, indent=1))
        digests[name] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    return digests
