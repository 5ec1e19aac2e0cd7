"""Expert sources: where an expert's task vector for one tensor comes from.

A full fine-tuned checkpoint gives ``tau = W_i - W0``. A PEFT adapter gives ``scale * B @ A`` for its target
modules (see :mod:`omnimerge.checkpoint.lora`). The engine only sees this interface, one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from omnimerge.checkpoint.reader import Checkpoint, is_adapter_dir, resolve_model_path
from omnimerge.errors import CheckpointError, TensorMismatchError
from omnimerge.types import LowRank


class ExpertSource(Protocol):
    """What the engine needs from an expert."""

    ref: str
    path: Path
    label: str
    kind: str  # "full" or "adapter"
    config: dict[str, Any]

    def validate(self, base: Checkpoint, selected: list[str]) -> list[str]:
        """Check the expert against the base before any work; ``selected`` are the base's on-disk names of the
        merged tensors. Raise a :class:`CheckpointError` naming the problem; return notes (warnings)."""
        ...

    def task_vector(
        self, base_name: str, canonical: str, base: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor | None, LowRank | None]:
        """The expert's task vector for one base tensor (``base`` is W0 in ``dtype`` on ``device``).

        Returns ``(tau, factors)``: ``tau`` is a fresh tensor the caller may modify, or ``None`` when the expert
        leaves the tensor unchanged (tau = 0); ``factors`` is an exact low-rank form of tau when known.
        """
        ...

    def input_files(self) -> list[Path]: ...

    def close(self) -> None: ...


class FullSource:
    """A full fine-tuned checkpoint with the same architecture as the base."""

    kind = "full"

    def __init__(self, ckpt: Checkpoint, label: str) -> None:
        self.ckpt = ckpt
        self.ref = ckpt.ref
        self.path = ckpt.path
        self.label = label
        self.config = ckpt.config

    def validate(self, base: Checkpoint, selected: list[str]) -> list[str]:
        notes: list[str] = []
        bt, et = base.model_type, self.ckpt.model_type
        if bt and et and bt != et:
            arch_e = ", ".join(self.ckpt.architectures) or et
            arch_b = ", ".join(base.architectures) or bt
            raise CheckpointError(
                f"expert '{self.ref}' is a '{et}' model ({arch_e}) but the base '{base.ref}' is a '{bt}' model "
                f"({arch_b}): experts must share the base's architecture"
            )
        missing = []
        for name, bm in base.tensors.items():
            canon = base.canonical_of(name)
            en = self.ckpt.find(canon)
            if en is None:
                missing.append(name)
                continue
            em = self.ckpt.tensors[en]
            if em.shape != bm.shape:
                raise TensorMismatchError(
                    f"expert '{self.ref}': tensor '{en}' has shape {list(em.shape)}, the base's '{name}' has "
                    f"{list(bm.shape)}"
                )
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise TensorMismatchError(
                f"expert '{self.ref}' ({self.ckpt.path}) has no tensor '{missing[0]}'{more} that the base has"
            )
        base_canon = set(base.canonical)
        extra = [n for c, n in self.ckpt.canonical.items() if c not in base_canon]
        if extra:
            notes.append(
                f"expert '{self.label}' has {len(extra)} tensor(s) the base lacks (not in the output), "
                f"e.g. '{extra[0]}'"
            )
        return notes

    def weight(self, base_name: str, canonical: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The expert's own tensor for one base tensor, as a fresh tensor in ``dtype`` on ``device``."""
        name = self.ckpt.find(canonical)
        if name is None:  # validated earlier; kept for safety
            raise TensorMismatchError(f"expert '{self.ref}' has no tensor '{base_name}'")
        return self.ckpt.read(name).to(device=device, dtype=dtype, copy=True)

    def task_vector(
        self, base_name: str, canonical: str, base: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor | None, LowRank | None]:
        return self.weight(base_name, canonical, dtype, device).sub_(base), None

    def input_files(self) -> list[Path]:
        return list(self.ckpt.files) + [p for p in (self.path / "config.json",) if p.is_file()]

    def close(self) -> None:
        self.ckpt.close()


def open_expert(ref: str, base: Checkpoint, base_dir: Path | None, label: str) -> ExpertSource:
    """Open a recipe's model entry: a full checkpoint or a PEFT adapter folder."""
    path = resolve_model_path(ref, base_dir)
    if is_adapter_dir(path):
        try:
            from omnimerge.checkpoint.lora import open_adapter
        except ImportError:  # pragma: no cover - LoRA support is part of the package
            raise CheckpointError(f"model '{ref}' is a PEFT adapter, which this build cannot read") from None
        return open_adapter(path, ref, base, label)
    return FullSource(Checkpoint(path, ref), label)
