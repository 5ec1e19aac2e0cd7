"""Online composition (NaiveMC): keep every modality's LoRA apart and apply all of them at once.

The baseline of the OptMerge paper's modality table (§3.9 / §5.2 of the reference: "NaiveMC (online, 3x
storage)"), from ModelCompose: Chen et al., *Model Composition for Multimodal Large Language Models*, ACL 2024
(arXiv 2402.12750). Nothing is merged offline: each expert's LoRA on the shared LLM is kept under its own
adapter name and at forward time every adapter's ``B_i A_i x`` is evaluated and added. Since a LoRA layer
computes ``W0 x + sum_i s_i B_i A_i x``, applying all adapters at once **equals** a model whose weights are
``W0 + sum_i s_i B_i A_i`` — a linear merge of the *products* ``dW_i = s_i B_i A_i`` (task arithmetic with
lambda = 1 on dW), unlike the factor-wise static merges of the paper's modality code, which merge A and B
separately.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omnimerge.methods.base import TensorContext, merge_method
from omnimerge.methods.linear import WEIGHT, weighted_sum


@merge_method(
    "online_composition",
    params=[WEIGHT],
    summary="Online composition (NaiveMC): keep every expert's LoRA apart and activate all of them at once "
    "(= W0 + sum_i w_i dW_i). Modality mode; adapter experts.",
    paper="Chen et al., Model Composition for Multimodal Large Language Models (ModelCompose: NaiveMC / DAMC), "
    "ACL 2024 (arXiv 2402.12750)",
    url="https://arxiv.org/abs/2402.12750",
    output_kind="online",
)
def online_composition(
    base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *, weight: Sequence[float]
) -> torch.Tensor:
    """Online composition of LoRA experts (NaiveMC; ModelCompose, Chen et al. ACL 2024, arXiv 2402.12750).

    Output kind ``online``: with ``mode: modality`` the output keeps every expert's LoRA adapter apart
    (``OUT/adapters/<expert>/``, one PEFT adapter each, ``w_i`` folded into its ``lora_B``), the modality models
    beside them, and a manifest that says to activate all adapters at once
    (:func:`omnimerge.modality.load_online`). A LoRA layer with several active adapters computes
    ``W0 x + sum_i w_i s_i B_i A_i x``, so the composition equals the dense model ``W0 + sum_i w_i dW_i``
    with ``dW_i = s_i B_i A_i``; this function returns that dense delta ``sum_i w_i tau_i`` (what the composition
    computes, used when a dense equivalent is wanted, e.g. for evaluation). Costs T adapters of storage and
    T LoRA products per layer at inference (the paper's "3x storage").
    """
    return weighted_sum(task_vectors, weight)
