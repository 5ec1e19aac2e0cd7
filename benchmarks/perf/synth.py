"""Synthetic sharded bf16 checkpoints with real Qwen2 shapes (fast, vectorised, reproducible from a seed).

The base has N(0, 0.02) weights (norm weights around 1, biases small). Each expert is the base plus a
fine-tuning-sized delta: dense noise N(0, (rel_noise * std)^2) plus, for 2-D weights, a rank-``rank`` part of the
same size, so the deltas are a few bf16 ulps and have some structure, like real fine-tunes. Files are written
as Hugging Face sharded safetensors (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``)
with a ``config.json`` that mergekit and transformers recognise (``Qwen2ForCausalLM``).

Generated checkpoints are cached under the data folder and reused (a ``.complete`` marker records the
generator version and parameters).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

GEN_VERSION = 1

# Real Qwen2 sizes (https://huggingface.co/Qwen/Qwen2-0.5B and Qwen2-1.5B config.json); embeddings are tied.
MODELS: dict[str, dict] = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True),
    # ~1.5 GB in bf16 (748M parameters): the size benchmarks/bench_merge.py uses
    "qwen2-0.75b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                        num_key_value_heads=16, vocab_size=64000, max_position_embeddings=32768,
                        rope_theta=1000000.0, tie_word_embeddings=True),
    # a small model for smoke tests (--quick)
    "qwen2-tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096,
                       rope_theta=1000000.0, tie_word_embeddings=True),
}


def config_json(model: str) -> dict:
    c = MODELS[model]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": c["num_hidden_layers"],
        "rms_norm_eps": 1e-06,
        "sliding_window": c["max_position_embeddings"],
        "use_cache": True,
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
        **c,
    }


def tensor_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen2ForCausalLM checkpoint (tied embeddings: no lm_head), in HF file order."""
    c = MODELS[model]
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out


def num_params(model: str) -> int:
    n = 0
    for _, s in tensor_shapes(model):
        k = 1
        for d in s:
            k *= d
        n += k
    return n


def _seed(*parts: object) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    scale = 0.02 if len(shape) == 2 else 0.01
    return torch.randn(shape, generator=g).mul_(scale)


def _tensors(model: str, seed: int, expert: int | None, rel_noise: float, rank: int,
             base_dir: Path | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, bf16 tensor) for the base (expert None) or expert ``expert`` (read from the written base)."""
    base_ck = None
    if expert is not None:
        from safetensors import safe_open

        assert base_dir is not None
        idx = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
        handles: dict[str, object] = {}

        def base_ck(name: str) -> torch.Tensor:  # type: ignore[no-redef]
            f = idx[name]
            if f not in handles:
                handles[f] = safe_open(str(base_dir / f), "pt")
            return handles[f].get_tensor(name)  # type: ignore[attr-defined]

    for name, shape in tensor_shapes(model):
        g = torch.Generator().manual_seed(_seed(model, seed, "base" if expert is None else expert, name))
        if expert is None:
            yield name, _base_tensor(name, shape, g).to(torch.bfloat16)
            continue
        w0 = base_ck(name).float()
        std = float(w0.std()) if name.find("norm") < 0 else 0.05
        sigma = rel_noise * std
        delta = torch.randn(shape, generator=g).mul_(sigma)
        if len(shape) == 2 and rank > 0:
            a = torch.randn(shape[0], rank, generator=g)
            b = torch.randn(rank, shape[1], generator=g)
            delta.addmm_(a, b, alpha=sigma / rank**0.5)
        yield name, w0.add_(delta).to(torch.bfloat16)


def write_checkpoint(folder: Path, model: str, tensors: Iterator[tuple[str, torch.Tensor]],
                     shard_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(model)
    # plan the shards from the shapes (bf16 = 2 bytes), so they can be written while generating
    plan: list[list[str]] = [[]]
    cur = 0
    for name, shape in shapes:
        nb = 2
        for d in shape:
            nb *= d
        if plan[-1] and cur + nb > shard_bytes:
            plan.append([])
            cur = 0
        plan[-1].append(name)
        cur += nb
    n = len(plan)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    where = {name: i for i, names in enumerate(plan) for name in names}
    pending: dict[str, torch.Tensor] = {}
    total = 0
    for name, t in tensors:
        pending[name] = t.contiguous()
        total += t.numel() * 2
        i = where[name]
        if name == plan[i][-1]:
            save_file(pending, str(folder / files[i]), metadata={"format": "pt"})
            pending = {}
    index = {"metadata": {"total_size": total}, "weight_map": {nm: files[where[nm]] for nm, _ in shapes}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config_json(model), indent=2))


def ensure_models(data_dir: Path, model: str, num_experts: int, *, seed: int = 0, rel_noise: float = 0.01,
                  rank: int = 8, shard_bytes: int = 1_000_000_000, log=print) -> tuple[Path, list[Path]]:
    """Generate (or reuse) the base and ``num_experts`` experts of ``model``; return their folders."""
    torch.set_num_threads(os.cpu_count() or 1)
    root = data_dir / f"{model}-seed{seed}-noise{rel_noise:g}-rank{rank}"
    stamp = json.dumps({"v": GEN_VERSION, "model": model, "seed": seed, "noise": rel_noise, "rank": rank,
                        "shard_bytes": shard_bytes})

    def done(d: Path) -> bool:
        m = d / ".complete"
        return m.is_file() and m.read_text() == stamp

    import shutil
    import time

    base = root / "base"
    if not done(base):
        shutil.rmtree(base, ignore_errors=True)
        t = time.perf_counter()
        write_checkpoint(base, model, _tensors(model, seed, None, rel_noise, rank, None), shard_bytes)
        (base / ".complete").write_text(stamp)
        log(f"generated {base} in {time.perf_counter() - t:.1f} s")
    experts = []
    for e in range(num_experts):
        d = root / f"expert{e}"
        if not done(d):
            shutil.rmtree(d, ignore_errors=True)
            t = time.perf_counter()
            write_checkpoint(d, model, _tensors(model, seed, e, rel_noise, rank, base), shard_bytes)
            (d / ".complete").write_text(stamp)
            log(f"generated {d} in {time.perf_counter() - t:.1f} s")
        experts.append(d)
    return base, experts


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))
