"""The plan of a merge: one :class:`Job` per base tensor, and where each tensor sits in its layer stack."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from omnimerge.checkpoint.reader import TensorMeta

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: a tensor of a layer stack: (stack prefix, layer index), on canonical names
LAYER = re.compile(r"^(.*?\blayers\.)(\d+)\.")


def layer_of(canonical: str) -> tuple[str, int] | None:
    """(layer-stack prefix, layer index) of a tensor by its canonical name, or None outside the layers."""
    m = LAYER.match(canonical)
    return (m.group(1), int(m.group(2))) if m is not None else None


@dataclass
class Job:
    """One output tensor."""

    name: str
    canonical: str
    component: str
    meta: TensorMeta
    merged: bool
    out_dtype: torch.dtype
    cost: int = 0  # bytes of working memory this job needs
    streaming: bool = False  # merged block by block (its cost does not grow with the tensor)
    layer: int | None = None  # its layer index in the base's layer stack (None outside the layers)
    num_layers: int = 0  # the depth of that stack
    kwargs: dict[str, Any] = field(default_factory=dict)  # the method's parameters for this tensor


