"""The field's answer metrics, as the OptMerge evaluation code computes them (see mllmerging.md §4.3).

* :func:`exact_match` - VLMEvalKit's ``accuracy`` for GQA / OCR-VQA: lower-case, strip punctuation, collapse
  whitespace, compare (max over references).
* :func:`relaxed_accuracy` - ChartQA: a numeric answer is right within 5 % relative error, otherwise exact match.
* :func:`vqa_soft_accuracy` - VQAv2 / VizWiz / TextVQA: mean over the 10 leave-one-annotator-out subsets of
  ``min(1, #matching other annotators / 3)``.
* :func:`anls` - DocVQA / ST-VQA: average normalised Levenshtein similarity, 0 below the 0.5 threshold.
* :func:`parse_box`, :func:`iou`, :func:`acc_at_iou` - RefCOCO grounding as in lmms-eval's Qwen2-VL task: take
  the first four numbers, read them on the 0-1000 grid when any exceeds 1, correct iff IoU >= 0.5.
* :func:`binomial_se` - the standard error printed beside every score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_PUNCT = re.compile(r"[^\w\s]")
_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower-case, remove punctuation, collapse whitespace (VLMEvalKit ``accuracy`` normalisation)."""
    return _WS.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def exact_match(pred: str, refs: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    p = normalize(pred)
    return float(any(p == normalize(r) for r in refs))


def _to_float(text: str) -> float | None:
    t = text.strip().rstrip("%").replace(",", "").strip()
    try:
        return float(t)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, ref: str, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: numbers within ``tolerance`` relative error; otherwise exact match."""
    p, r = _to_float(pred), _to_float(ref)
    if p is not None and r is not None:
        if r == 0.0:
            return float(p == 0.0)
        return float(abs(p - r) / abs(r) <= tolerance)
    return float(normalize(pred) == normalize(ref))


def _vqa_norm(text: str) -> str:
    words = normalize(text).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_accuracy(pred: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy: mean over annotators j of min(1, #{k != j: answer_k == pred} / 3)."""
    if not human_answers:
        raise ValueError("vqa_soft_accuracy needs at least one human answer")
    p = _vqa_norm(pred)
    gts = [_vqa_norm(a) for a in human_answers]
    accs = []
    for j in range(len(gts)):
        others = gts[:j] + gts[j + 1 :]
        accs.append(min(1.0, sum(g == p for g in others) / 3.0))
    return sum(accs) / len(accs)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, refs: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question: max over references of
    ``1 - lev(p, r) / max(len(p), len(r))``, set to 0 when the normalised distance is >= ``threshold``."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    p = " ".join(pred.lower().split())
    best = 0.0
    for r in refs:
        r = " ".join(r.lower().split())
        denom = max(len(p), len(r))
        nl = 0.0 if denom == 0 else levenshtein(p, r) / denom
        best = max(best, 0.0 if nl >= threshold else 1.0 - nl)
    return best


Box = tuple[float, float, float, float]


def parse_box(text: str, grid: float = 1000.0) -> Box | None:
    """The first four numbers of ``text`` as a normalised box (x1, y1, x2, y2) in [0, 1].

    As in lmms-eval's Qwen2-VL RefCOCO task: if any value exceeds 1 the numbers are on the 0-``grid`` grid and
    are divided by ``grid``. Fewer than four numbers: ``None`` (counted as wrong).
    """
    nums = [float(x) for x in _NUMBER.findall(text)[:4]]
    if len(nums) < 4:
        return None
    if any(v > 1.0 for v in nums):
        nums = [v / grid for v in nums]
    x1, y1, x2, y2 = nums
    return (x1, y1, x2, y2)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 for degenerate boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return 0.0 if union <= 0 else inter / union


def acc_at_iou(pred: str, gold: Box, threshold: float = 0.5, grid: float = 1000.0) -> float:
    """1.0 if the box parsed from ``pred`` overlaps ``gold`` with IoU >= ``threshold``."""
    box = parse_box(pred, grid)
    return float(box is not None and iou(box, gold) >= threshold)


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent examples: sqrt(p(1-p)/n)."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(0.0, p * (1.0 - p)) / n)


def score(task: str, pred: str, answer: str, meta: dict) -> float:
    """The headline metric of ``task`` for one prediction (see omnimerge.bench.data.TASK_METRIC)."""
    if task in ("vqa", "ocr"):
        return exact_match(pred, answer)
    if task == "geometry":
        return float(normalize(pred) == normalize(answer))
    if task == "chart":
        return relaxed_accuracy(pred, answer)
    if task == "grounding":
        return acc_at_iou(pred, tuple(meta["box"]))
    raise ValueError(f"unknown task {task!r}")
