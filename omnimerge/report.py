"""What a merge did: :class:`MergeReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnimerge.plan import Job


@dataclass
class MergeReport:
    """What a merge did."""

    output: Path | None  # None: merged in memory
    method: str
    parameters: dict[str, Any]
    seconds: float
    merged: int
    copied: int
    input_bytes: int
    output_bytes: int
    shards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    components: dict[str, dict[str, int]] = field(default_factory=dict)
    #: with ``output: lora``: the merged adapter's rank and number of LoRA modules (else None / 0)
    lora_rank: int | None = None
    lora_modules: int = 0
    lora_modules_to_save: list[str] = field(default_factory=list)
    lora_relative_error: dict[str, float] = field(default_factory=dict)  # ||dW - BA||_F / ||dW||_F per kind
    lora_module_errors: dict[str, float] = field(default_factory=dict)
    #: per strategy, the number of merged tensors that took it (``fused``, ``from_weights``, ``blockwise``,
    #: ``whole``)
    strategies: dict[str, int] = field(default_factory=dict)
    #: with the recipe's ``task_models``: the tasks, their rescalers, the masks' bytes and the T experts' bytes
    task_models: dict[str, Any] = field(default_factory=dict)
    #: with ``--resume``: the tensors kept from the unfinished earlier run (verified, not merged again)
    resumed: int = 0

    def summary(self) -> str:
        mb = self.input_bytes / 1e6
        what = (
            f"merged {self.merged} tensors into a rank-{self.lora_rank} PEFT adapter ({self.lora_modules} "
            f"LoRA modules)"
            if self.lora_rank is not None
            else f"merged {self.merged} tensors, copied {self.copied} from the base"
        )
        where = self.output if self.output is not None else "memory"
        if self.task_models:
            tm = self.task_models
            what += (f", with per-task masks for {len(tm['tasks'])} tasks ({tm['mask_bytes'] / 1e6:.1f} MB; the "
                     f"{len(tm['tasks'])} experts: {tm['experts_bytes'] / 1e6:.1f} MB)")
        if self.resumed:
            what += f" ({self.resumed} kept from the unfinished earlier run)"
        return f"{self.method}: {what}, {self.seconds:.2f} s ({mb / max(self.seconds, 1e-9):.0f} MB/s of input) -> {where}"


def component_counts(jobs: list[Job]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for j in jobs:
        c = out.setdefault(j.component, {"tensors": 0, "merged": 0, "parameters": 0})
        c["tensors"] += 1
        c["merged"] += int(j.merged)
        c["parameters"] += j.meta.numel
    return out
