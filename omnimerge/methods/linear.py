"""Linear methods: weight averaging (model soup), task arithmetic and mergekit's linear merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from omnimerge.errors import MethodParameterError
from omnimerge.methods.base import Capabilities, Param, TensorContext, merge_method, scaling_param

WEIGHT = Param("weight", 1.0, "per-model weight w_i", float, per_model=True)


def weighted_sum(
    task_vectors: Sequence[torch.Tensor], weight: Sequence[float], inplace: bool = False
) -> torch.Tensor:
    """sum_i w_i * tau_i, accumulated in place (no stacked copy of the task vectors); ``inplace``: accumulate
    into ``task_vectors[0]`` (which is then overwritten) instead of a new tensor."""
    if weight[0] != 1.0:
        acc = task_vectors[0].mul_(weight[0]) if inplace else task_vectors[0] * weight[0]
    else:
        acc = task_vectors[0] if inplace else task_vectors[0].clone()
    for tv, w in zip(task_vectors[1:], weight[1:], strict=True):
        acc.add_(tv, alpha=w)
    return acc


def _sum_weights(weight: Sequence[float]) -> float:
    total = float(sum(weight))
    if total == 0.0:  # the recipe is checked before any work (check_weight_sum); this guards direct calls
        raise MethodParameterError("weight_average: the per-model weights sum to zero (the average is undefined)")
    return total


def weight_average_of_weights(
    weights: Sequence[torch.Tensor], ctx: TensorContext, *, weight: Sequence[float]
) -> torch.Tensor:
    """The same average computed from the experts' weights themselves: W = sum_i w_i W_i / sum_i w_i.

    This is the reference's computation (MLLMerging ``baseline_merging.py:weight_average_merging``, the fp32 sum
    of the fine-tuned weights divided by T): it needs no base and no task vectors, so the engine uses it
    whenever every expert is a full checkpoint, reading T tensors instead of T + 1, and it matches the
    reference's output bit for bit (W0 + mean tau_i differs from it by float32 rounding, ~1 ulp).
    ``weights`` are fresh tensors in the compute dtype; returns the merged **weight**, not a delta.
    """
    total = _sum_weights(weight)
    return weighted_sum(weights, weight, inplace=True).div_(total)


def _average_linear(kw: Mapping[str, Any]) -> tuple[float, str] | None:
    """delta = (sum_i tau_i) / T for unit weights. Unit weights only: torch's add(alpha=w) can fuse a
    multiply-add that a plain kernel would not reproduce bit for bit."""
    return (float(sum(kw["weight"])), "div") if all(w == 1.0 for w in kw["weight"]) else None


def _task_arithmetic_linear(kw: Mapping[str, Any]) -> tuple[float, str] | None:
    """delta = lambda sum_i tau_i for unit weights (see _average_linear)."""
    if not all(w == 1.0 for w in kw["weight"]):
        return None
    return float(kw["scaling"]), "mul" if kw["scaling"] != 1.0 else "none"


def check_weight_sum(params: Mapping[str, Any]) -> None:
    """Before any work: weight averaging divides by sum_i w_i, which must not be zero."""
    if float(sum(params["weight"])) == 0.0:
        raise MethodParameterError(
            f"models[].parameters: weight_average divides by the sum of the per-model weights, and "
            f"{list(params['weight'])} sums to zero")


@merge_method(
    "weight_average",
    params=[WEIGHT],
    summary="Average of the experts' weights: W = sum_i w_i W_i / sum_i w_i.",
    paper="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
    url="https://arxiv.org/abs/2203.05482",
    capabilities=Capabilities(elementwise=True, linear=_average_linear, from_weights=weight_average_of_weights),
    check=check_weight_sum,
)
def weight_average(
    base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *, weight: Sequence[float]
) -> torch.Tensor:
    """Weighted average of the experts.

    W = sum_i w_i W_i / sum_i w_i, i.e. delta = sum_i w_i tau_i / sum_i w_i (uniform weights: the mean task
    vector). No lambda. OptMerge paper, Table 2/3 "Weight Average" (MLLMerging baseline_merging.py).
    """
    total = _sum_weights(weight)
    acc = weighted_sum(task_vectors, weight, inplace=True)
    return acc.div_(total)


@merge_method(
    "task_arithmetic",
    params=[scaling_param(0.3), WEIGHT],
    summary="Task arithmetic: W = W0 + lambda * sum_i w_i tau_i.",
    paper="Ilharco et al., Editing models with task arithmetic, ICLR 2023 (arXiv 2212.04089)",
    url="https://arxiv.org/abs/2212.04089",
    capabilities=Capabilities(elementwise=True, linear=_task_arithmetic_linear),
)
def task_arithmetic(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    scaling: float,
    weight: Sequence[float],
) -> torch.Tensor:
    """Task arithmetic.

    tau_m = sum_i w_i tau_i with tau_i = W_i - W0;  W = W0 + lambda tau_m.
    OptMerge paper baseline "Task Arithmetic" (default lambda 0.3 as in MLLMerging baseline_merging.py).
    """
    acc = weighted_sum(task_vectors, weight, inplace=True)
    return acc.mul_(scaling) if scaling != 1.0 else acc


NORMALIZE = Param("normalize", True, "divide by the sum of the per-model weights", bool)


def _linear_of_weights(weights: Sequence[torch.Tensor], ctx: TensorContext, *, weight: Sequence[float],
                       normalize: bool) -> torch.Tensor:
    """W = sum_t w_t W_t [/ sum_t w_t]: the merged weight from the experts' weights alone."""
    acc = weighted_sum(weights, weight, inplace=True)
    return acc.div_(_sum_weights(weight)) if normalize else acc


def _check_linear(params: Mapping[str, Any]) -> None:
    if params["normalize"] and float(sum(params["weight"])) == 0.0:
        raise MethodParameterError(
            f"models[].parameters: linear with normalize: true divides by the sum of the per-model weights, "
            f"and {list(params['weight'])} sums to zero")


@merge_method(
    "linear",
    params=[WEIGHT, NORMALIZE],
    summary="mergekit's linear merge: W = sum_t w_t W_t / sum_t w_t over the experts (normalize: false, the sum).",
    paper="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482); mergekit `linear`",
    url="https://arxiv.org/abs/2203.05482",
    capabilities=Capabilities(elementwise=True, from_weights=_linear_of_weights),
    check=_check_linear,
)
def linear(
    base: torch.Tensor, task_vectors: Sequence[torch.Tensor], ctx: TensorContext, *, weight: Sequence[float],
    normalize: bool,
) -> torch.Tensor:
    """Weighted average of the experts' weights (mergekit ``linear``, on the experts only).

    W = sum_t w_t W_t / sum_t w_t, or sum_t w_t W_t with ``normalize: false``. As a delta:
    sum_t w_t tau_t / sum_t w_t, or sum_t w_t tau_t + (sum_t w_t - 1) W0. In a mergekit recipe the base model
    is one more input with its own weight; here the base is not averaged in (list it as a model to do so).
    """
    acc = weighted_sum(task_vectors, weight, inplace=True)
    if normalize:
        return acc.div_(_sum_weights(weight))
    total = float(sum(weight))
    return acc.add_(base, alpha=total - 1.0) if total != 1.0 else acc
