"""Training: tensorised datasets, the AdamW loop for full fine-tuning, and LoRA (peft) training.

Examples are encoded once into tensors (pixel values, input ids, labels, attention mask) with the same encoding
the ``LlavaProcessor`` produces. The loss is the usual causal-LM cross-entropy on the answer tokens and ``</s>``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omnimerge.bench.data import Example
from omnimerge.bench.model import CLIP_MEAN, CLIP_STD, EOS, PAD, PROMPT_LEN, Encoder

#: LoRA targets: every linear layer of the vision tower, the projector and the LLM (the LM head excluded).
LORA_TARGETS = r".*(vision_tower|multi_modal_projector|language_model).*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2|linear_1|linear_2|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class TensorData:
    """Encoded examples: ``pixel`` (N,3,H,W) uint8 RGB, ``ids``/``labels``/``mask`` (N,L) int64."""

    pixel: Any
    ids: Any
    labels: Any
    mask: Any

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @staticmethod
    def cat(parts: Sequence[TensorData]) -> TensorData:
        import torch

        width = max(p.ids.shape[1] for p in parts)

        def pad(t: Any, value: int) -> Any:
            if t.shape[1] == width:
                return t
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return TensorData(
            torch.cat([p.pixel for p in parts]),
            torch.cat([pad(p.ids, PAD) for p in parts]),
            torch.cat([pad(p.labels, -100) for p in parts]),
            torch.cat([pad(p.mask, 0) for p in parts]),
        )


def encode(examples: Sequence[Example], enc: Encoder) -> TensorData:
    """Encode examples for training (prompt left-padded to PROMPT_LEN, answer + </s>, right padding)."""
    import torch

    answers = [enc.words(ex.answer) + [EOS] for ex in examples]
    width = PROMPT_LEN + max(len(a) for a in answers)
    ids = np.full((len(examples), width), PAD, dtype=np.int64)
    labels = np.full((len(examples), width), -100, dtype=np.int64)
    for i, (ex, ans) in enumerate(zip(examples, answers, strict=True)):
        p = enc.prompt(ex.question)
        ids[i, : len(p)] = p
        ids[i, len(p) : len(p) + len(ans)] = ans
        labels[i, len(p) : len(p) + len(ans)] = ans
    mask = (ids != PAD).astype(np.int64)
    rgb = np.stack([np.asarray(ex.image.convert("RGB"), dtype=np.uint8) for ex in examples]).transpose(0, 3, 1, 2)
    return TensorData(
        torch.from_numpy(np.ascontiguousarray(rgb)),
        torch.from_numpy(ids),
        torch.from_numpy(labels),
        torch.from_numpy(mask),
    )


def normalize_pixels(rgb: Any) -> Any:
    """uint8 (N,3,H,W) -> the CLIP-normalised float32 pixel values the processor produces."""
    import torch

    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (rgb.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class TrainSpec:
    """One training run's optimiser settings (part of the zoo's config hash)."""

    steps: int
    lr: float
    batch: int = 32
    warmup: int = 20
    weight_decay: float = 0.0
    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 16


def add_lora(model: Any, spec: TrainSpec, seed: int) -> Any:
    """Wrap ``model`` with peft LoRA adapters on every linear layer of vision tower, projector and LLM.

    peft draws the ``lora_A`` initialisation from torch's global generator, which a fresh (spawned) process seeds
    at random: it is drawn here under ``seed`` instead (the caller's generator state is left as it was), so that
    the same zoo config trains the same LoRA experts."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft (0.21) itself reads transformers' deprecated ``is_gradient_checkpointing`` property inside
        # get_peft_model; nothing here uses it. Only that one message is filtered, only around this call.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def train(
    model: Any,
    data: TensorData,
    spec: TrainSpec,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``data`` (uniformly sampled batches); returns loss/time statistics."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.999))

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        return max(0.0, (spec.steps - step) / max(1, spec.steps - spec.warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    n = len(data)
    for step in range(spec.steps):
        idx = torch.randint(0, n, (spec.batch,), generator=g)
        ids, labels, mask = data.ids[idx], data.labels[idx], data.mask[idx]
        last = int(mask.sum(0).nonzero().max()) + 1  # drop all-padding columns on the right
        out = model(
            input_ids=ids[:, :last],
            attention_mask=mask[:, :last],
            pixel_values=normalize_pixels(data.pixel[idx]),
            labels=labels[:, :last],
        )
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1)
        if log is not None and (step + 1) % max(1, spec.steps // 4) == 0:
            log(f"step {step + 1}/{spec.steps} loss {np.mean(losses[-20:]):.3f}")
    model.eval()
    tail = losses[-max(1, min(20, len(losses))) :]
    return {
        "loss_final": float(np.mean(tail)) if tail else math.nan,
        "seconds": time.perf_counter() - t0,
        "steps": spec.steps,
    }
