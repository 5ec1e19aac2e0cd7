"""RegMean++ statistics (Nguyen et al., arXiv 2508.03121): the Grams of layer ℓ taken on inputs that passed
through the **already merged** layers 0 … ℓ−1, on each expert's own data.

For each decoder layer ℓ of the language model, in order, and each expert t: a hybrid model — the merged model
for every tensor before layer ℓ (the merged layers < ℓ; embeddings, vision tower, projector at the merged
model's values, i.e. the base's where they are not merged) and expert t's own weights from layer ℓ on — runs a
full forward on task t's data; hooks on layer ℓ's linear layers give G_t^ℓ (intra-layer inputs still come from
expert t's own layer ℓ, as the paper and FusionBench do). Layer ℓ is then merged with ``regmean``'s solve
(same α, ridge, condition limit) and put into the merged model. The per-expert Grams are returned; written with
:func:`omnimerge.stats.save_statistics` they are ordinary ``regmean_gram`` files (the manifest says
``regmean_plusplus`` and α), and ``merge_method: regmean`` with the same α reproduces the merge.

Cost: L × T full forwards (the hybrid prefix is re-run for every layer) with the base, every expert and the
merged model in memory: a tiny-model implementation; at 7B the layer-streamed form (cache each task's hidden
states after the merged layer ℓ, run only layer ℓ) is what scales, not implemented here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from omnimerge.checkpoint.names import canonical_name
from omnimerge.components import classify
from omnimerge.errors import OmniMergeError
from omnimerge.methods import TensorContext, get_method
from omnimerge.plan import layer_of
from omnimerge.stats import Batch, StatsResult, collect_grams


def _lm_layer(name: str, shape: Sequence[int]) -> int | None:
    canon = canonical_name(name)
    if classify(canon, tuple(shape)) != "language_model":
        return None
    where = layer_of(canon)
    return where[1] if where is not None else None


def _decoder_layer(name: str, shape: Sequence[int]) -> int | None:
    """The language model's layer index of any tensor inside it (norms and biases included), else None."""
    canon = canonical_name(name)
    if classify(canon, tuple(shape)) in ("vision_tower", "audio_tower", "video_tower", "projector"):
        return None
    where = layer_of(canon)
    return where[1] if where is not None else None


def regmean_plusplus_grams(base: torch.nn.Module, experts: Sequence[torch.nn.Module],
                           data: Sequence[Sequence[Batch]], *, alpha: float = 0.6, ridge: float = 1e-6,
                           max_condition: float = 1e8, log: Any = None) -> list[StatsResult]:
    """Per expert, its RegMean++ Grams of the language model's linear layers (see the module docstring).
    ``data[t]``: expert t's calibration batches (iterated once per layer)."""
    if len(experts) != len(data):
        raise OmniMergeError(f"regmean_plusplus: {len(experts)} experts but {len(data)} calibration sets")
    merged = {k: v.detach().clone() for k, v in base.state_dict().items()}
    own = [{k: v.detach().clone() for k, v in e.state_dict().items()} for e in experts]
    lin = {f"{n}.weight": m for n, m in experts[0].named_modules() if isinstance(m, torch.nn.Linear)}
    by_layer: dict[int, list[str]] = {}
    for w, m in lin.items():
        ell = _lm_layer(w, m.weight.shape)
        if ell is not None:
            by_layer.setdefault(ell, []).append(w)
    if not by_layer:
        raise OmniMergeError("regmean_plusplus: the model has no language-model linear layer")
    layer_of_tensor = {k: _decoder_layer(k, v.shape) for k, v in merged.items()}
    regmean = get_method("regmean")
    kw = regmean.resolve({"reduce_non_diagonal_ratio": alpha, "ridge": ridge, "max_condition": max_condition},
                         [{}] * len(experts))
    grams: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    tokens: list[dict[str, int]] = [{} for _ in experts]
    try:
        for ell in sorted(by_layer):
            names = by_layer[ell]
            include = "^(" + "|".join(re.escape(n) for n in names) + ")$"
            for t, model in enumerate(experts):
                hybrid = {k: (merged[k] if (layer_of_tensor[k] is None or layer_of_tensor[k] < ell) else v)
                          for k, v in own[t].items()}
                model.load_state_dict(hybrid)
                res = collect_grams(model, data[t], include=include)
                grams[t].update(res.tensors)
                tokens[t].update(res.manifest["tokens"])
            for w in names:  # the layer's RegMean solve, into the merged model
                w0 = merged[w].to(torch.float32)
                ctx = TensorContext(name=w, canonical=canonical_name(w), component="language_model",
                                    num_models=len(experts), layer=ell,
                                    statistics=[g[w] for g in grams], log=log or (lambda msg: None))
                ctx.stats = regmean.global_pass.init(len(experts), kw) if regmean.global_pass else None
                delta = regmean.fn(w0, [o[w].to(torch.float32) - w0 for o in own], ctx, **kw)
                merged[w] = (w0 + delta).to(merged[w].dtype)
    finally:
        for model, sd in zip(experts, own, strict=True):
            model.load_state_dict(sd)
    return [StatsResult("regmean_gram", g, {"tokens": n, "regmean_plusplus": True,
                                            "reduce_non_diagonal_ratio": alpha, "layers": len(by_layer)})
            for g, n in zip(grams, tokens, strict=True)]
