"""A small example family built offline from configs: a tiny real-architecture base and a few experts.

Used by ``omnimerge demo`` (the README's first command) and by the tests. The experts are the base plus
structured, seeded task vectors (a low-rank part and small noise) on the language model's linear weights, and
small changes to the vision tower, so that a merge has something to do and its output can be checked: the
language model moves, the vision tower stays at the base.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VOCAB = 256


def quiet_transformers() -> None:
    """Offline, no progress bars, errors only: transformers as the examples and the benchmark use it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def tiny_config(arch: str) -> Any:
    """A tiny transformers config of a real architecture: 'qwen2_vl', 'llava', 'qwen2_audio' or 'qwen2'."""
    quiet_transformers()
    import transformers as T

    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if arch == "qwen2_vl":
        return T.Qwen2VLConfig(
            text_config=dict(text, rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])),
            vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=8,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 4,
            vision_end_token_id=VOCAB - 5,
        )
    if arch == "llava":
        clip = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
        return T.LlavaConfig(vision_config=clip, text_config=T.LlamaConfig(**text), image_token_index=VOCAB - 1,
                             image_seq_length=16)
    if arch == "qwen2":
        return T.Qwen2Config(**text)
    if arch == "qwen2_audio":
        return T.Qwen2AudioConfig(
            audio_config=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                              d_model=64, max_source_positions=50),
            text_config=T.Qwen2Config(**text).to_dict(), audio_token_index=VOCAB - 3,
        )
    raise ValueError(f"unknown example architecture {arch!r}")


def model_class(arch: str) -> Any:
    import transformers as T

    return {
        "qwen2_vl": T.Qwen2VLForConditionalGeneration,
        "llava": T.LlavaForConditionalGeneration,
        "qwen2": T.Qwen2ForCausalLM,
        "qwen2_audio": T.Qwen2AudioForConditionalGeneration,
    }[arch]


def build_base(arch: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = model_class(arch)(tiny_config(arch))
    model.eval()
    return model


def make_expert(base: Any, seed: int, rank: int = 4, scale: float = 0.02, noise: float = 1e-3) -> Any:
    """A copy of ``base`` with a seeded low-rank + noise task vector on every LLM linear weight (and a small
    change to the vision/audio tower, which a default merge must ignore)."""
    import copy

    from omnimerge.components import classify

    g = torch.Generator().manual_seed(seed)
    expert = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in expert.named_parameters():
            comp = classify(name, tuple(p.shape))
            if comp == "language_model" and p.dim() == 2:
                m, n = p.shape
                b = torch.randn(m, rank, generator=g)
                a = torch.randn(rank, n, generator=g)
                delta = b @ a / (rank * n) ** 0.5
                p.add_(scale * delta * p.std() / (delta.std() + 1e-12))
                p.add_(noise * p.std() * torch.randn(m, n, generator=g))
            elif comp in ("vision_tower", "audio_tower") and p.dim() == 2:
                p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    return expert


def build_family(
    out_dir: Path, arch: str = "qwen2_vl", n_experts: int = 3, seed: int = 0, legacy_layout: bool = True,
    other_layout_expert: int | None = None,
) -> tuple[Path, list[Path]]:
    """Save a base and ``n_experts`` experts under ``out_dir``; return their folders.

    ``legacy_layout`` chooses transformers' on-disk names (its default) or the in-memory ones; expert
    ``other_layout_expert`` is saved in the other layout, as a checkpoint from another transformers version.
    """
    out_dir = Path(out_dir)
    base = build_base(arch, seed)
    base_dir = out_dir / "base"
    base.save_pretrained(base_dir, save_original_format=legacy_layout)
    experts = []
    for i in range(n_experts):
        e = make_expert(base, seed=1000 * (seed + 1) + i)
        d = out_dir / f"expert{i}"
        layout = legacy_layout if i != other_layout_expert else not legacy_layout
        e.save_pretrained(d, save_original_format=layout)
        experts.append(d)
    return base_dir, experts


def dummy_inputs(arch: str) -> dict[str, torch.Tensor]:
    """A small batch the architecture's forward accepts (an image for the VLMs)."""
    g = torch.Generator().manual_seed(0)
    if arch == "qwen2_vl":
        ids = torch.tensor([[1, VOCAB - 4] + [VOCAB - 1] * 4 + [VOCAB - 5, 10, 11, 12]])
        return {
            "input_ids": ids,
            "pixel_values": torch.randn(16, 3 * 2 * 8 * 8, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]]),
            "mm_token_type_ids": (ids == VOCAB - 1).long(),
        }
    if arch == "llava":
        ids = torch.tensor([[1] + [VOCAB - 1] * 16 + [10, 11, 12]])
        return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    return {"input_ids": torch.tensor([[1, 10, 11, 12]])}


def run_demo(out_dir: Path, method: str = "ties", echo: Callable[..., None] = print) -> dict[str, Any]:
    """Build the example family (tiny Qwen2-VL; one expert in the other naming layout), merge it, load the
    result with transformers, run a forward pass, and check the vision tower is the base's."""
    import time

    from omnimerge.api import merge
    from omnimerge.methods import get_method

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    base_dir, experts = build_family(out_dir / "family", "qwen2_vl", 3, seed=0, other_layout_expert=2)
    echo(f"built a tiny Qwen2-VL base and {len(experts)} experts in {time.perf_counter() - t0:.1f} s under "
         f"{out_dir / 'family'} (expert2 saved in the other transformers naming layout)")
    params: dict[str, Any] = {}
    if get_method(method).param("scaling") is not None:
        params["scaling"] = 0.5
    recipe = {
        "base_model": str(base_dir),
        "models": [{"model": str(e)} for e in experts],
        "merge_method": method,
        "parameters": params,
    }
    merged_dir = out_dir / f"merged-{method}"
    report = merge(recipe, merged_dir, overwrite=True)
    echo(report.summary())
    cls = model_class("qwen2_vl")
    merged = cls.from_pretrained(merged_dir, trust_remote_code=False)
    base = cls.from_pretrained(base_dir, trust_remote_code=False)
    with torch.no_grad():
        logits = merged(**dummy_inputs("qwen2_vl")).logits
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    vision_same = all(torch.equal(base_sd[k], merged_sd[k]) for k in base_sd if ".visual." in f".{k}")
    moved = sum(not torch.equal(base_sd[k], merged_sd[k]) for k in base_sd)
    echo(f"loaded {merged_dir} with {cls.__name__}: forward pass ok (logits {tuple(logits.shape)}), "
         f"{moved} tensors changed, vision tower identical to the base: {vision_same}")
    if not (torch.isfinite(logits).all() and vision_same and moved > 0):
        raise RuntimeError("demo check failed")
    return {"report": report, "merged": merged_dir, "moved": moved}
