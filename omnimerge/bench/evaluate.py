"""Evaluation: greedy decoding of each task's answer and the field's metric, with binomial standard errors.

Decoding forbids the special tokens ``<pad> <unk> <s> <image>`` (a merged model that emits ``<image>`` would
otherwise crash Llava's forward: "Image features and image tokens do not match") and stops at ``</s>`` or after the
task's answer budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omnimerge.bench import TASKS
from omnimerge.bench.data import ANSWER_TOKENS, Example, make_split
from omnimerge.bench.metrics import binomial_se, score
from omnimerge.bench.model import BOS, EOS, IMAGE, PAD, UNK, Encoder, pixel_array


@dataclass
class EvalSet:
    """The encoded prompts of one task's split."""

    task: str
    examples: list[Example]
    ids: Any  # (N, PROMPT_LEN) int64
    pixel: Any  # (N, 3, H, W) float32

    def __len__(self) -> int:
        return len(self.examples)


def build_evalset(task: str, split: str, n: int, seed: int, enc: Encoder) -> EvalSet:
    import torch

    exs = make_split(task, split, n, seed)
    ids = torch.tensor([enc.prompt(ex.question) for ex in exs], dtype=torch.long)
    return EvalSet(task, exs, ids, torch.from_numpy(pixel_array([ex.image for ex in exs])))


def build_suite(split: str, n: int, seed: int, enc: Encoder | None = None,
                tasks: Sequence[str] = TASKS) -> dict[str, EvalSet]:
    enc = enc or Encoder()
    return {t: build_evalset(t, split, n, seed, enc) for t in tasks}


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes (and its output carries) the KV cache: ``cache`` since
    transformers renamed it (``past_key_values`` is deprecated there, to be removed in 5.40), else
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_decode(model: Any, ids: Any, pixel: Any, max_new: int, batch: int = 250,
                  use_cache: bool = True) -> list[list[int]]:
    """Greedy decoding of ``max_new`` tokens, forbidding ``<pad> <unk> <s> <image>`` (KV cache by default)."""
    import torch

    out: list[list[int]] = []
    banned = [PAD, UNK, BOS, IMAGE]
    cache_kw = cache_argument(model)
    with torch.inference_mode():
        for s in range(0, ids.shape[0], batch):
            cur = ids[s : s + batch]
            pv = pixel[s : s + batch]
            mask = (cur != PAD).long()
            gen = []
            res = model(input_ids=cur, attention_mask=mask, pixel_values=pv, use_cache=use_cache)
            for k in range(max_new):
                logits = res.logits[:, -1, :].float()
                logits[:, banned] = -float("inf")
                nxt = logits.argmax(-1)
                gen.append(nxt)
                if k + 1 == max_new:
                    break
                mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
                if use_cache:
                    res = model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True,
                                **{cache_kw: getattr(res, cache_kw)})
                else:
                    cur = torch.cat([cur, nxt[:, None]], dim=1)
                    res = model(input_ids=cur, attention_mask=mask, pixel_values=pv, use_cache=False)
            out.extend(torch.stack(gen, 1).tolist())
    return out


def evaluate(
    model: Any,
    suite: dict[str, EvalSet],
    enc: Encoder | None = None,
    keep_predictions: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores of ``model`` on every task of ``suite``: ``{task: {"score", "se", "n"[, "predictions"]}}``."""
    enc = enc or Encoder()
    model.eval()
    res: dict[str, dict[str, Any]] = {}
    for task, es in suite.items():
        gen = greedy_decode(model, es.ids, es.pixel, ANSWER_TOKENS[task])
        preds = [enc.decode(g) for g in gen]
        scores = [score(task, p, ex.answer, ex.meta) for p, ex in zip(preds, es.examples, strict=True)]
        acc = float(np.mean(scores))
        res[task] = {"score": acc, "se": binomial_se(acc, len(scores)), "n": len(scores)}
        if keep_predictions:
            res[task]["predictions"] = preds
        if progress is not None:
            progress(task)
    return res


def mean_score(res: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """Mean over tasks and its standard error (independent tasks: sqrt(sum se^2) / T)."""
    vals = [r["score"] for r in res.values()]
    ses = [r["se"] for r in res.values()]
    return float(np.mean(vals)), float(np.sqrt(np.sum(np.square(ses))) / len(ses))


EOS_ID = EOS
