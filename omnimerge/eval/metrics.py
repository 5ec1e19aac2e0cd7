"""Per-example scorers shared by the task pool, each a pure function of the prediction and the references.

Written for omnimerge from the metrics' definitions (the official VQA evaluation, Methani et al.'s relaxed
accuracy as used by ChartQA, ANLS as defined for DocVQA); where lmms-eval 0.7 or VLMEvalKit deviate from those
definitions the function says so and which one it follows.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

__all__ = [
    "anls",
    "exact_match",
    "levenshtein",
    "mean_stderr",
    "normalize_exact",
    "normalize_vqa_answer",
    "relaxed_accuracy",
    "vqa_accuracy",
]

# --- VQA answer normalisation (the official VQA / EvalAI answer processing) ------------------------------------

#: contractions written with their apostrophes; every spelling that drops some of them is mapped back to this
#: form (the official table lists the common apostrophe-less spellings of exactly these words; its
#: capitalised entries (I'm, I've, I'd've) can never match after lower-casing and are left out here too)
_CONTRACTIONS_TEXT = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock 'ow's'at shan't she'd've she's should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's "
    "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've"
)
_CONTRACTIONS = _CONTRACTIONS_TEXT.split()


def _contraction_map() -> dict[str, str]:
    out: dict[str, str] = {}
    for word in _CONTRACTIONS:
        parts = word.split("'")
        gaps = len(parts) - 1
        for mask in range(2**gaps - 1):  # every subset of the apostrophes kept, except all of them
            spelled = parts[0]
            for k in range(gaps):
                spelled += ("'" if mask >> k & 1 else "") + parts[k + 1]
            out.setdefault(spelled, word)
    return out


_CONTRACTION_MAP = _contraction_map()
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                   "eight", "nine", "ten"))}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
_VQA_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (the official regex's effective behaviour)
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation (as EvalAI applies it): lower-case; drop ``,`` and ``?``, split
    ``'s``; punctuation removed where it touches a space (or everywhere when the answer has a digit-comma-digit),
    else replaced by a space; periods not followed by a digit removed; number words zero–ten (and "none") to
    digits; articles dropped; apostrophe-less contractions restored (``dont`` → ``don't``)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        if has_digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for w in out.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTION_MAP.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: for each of the (usually 10) human answers left out in turn, min(1, matches of the
    normalised prediction among the other answers / 3); the mean over the leave-one-out subsets."""
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    hits = sum(g == pred for g in gts)
    total = 0.0
    for g in gts:
        others = hits - (g == pred)
        total += min(1.0, others / 3.0)
    return total / len(gts)


# --- exact match -----------------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_exact(text: str) -> str:
    """Lower-case, ASCII punctuation removed, whitespace collapsed (GQA, OCR-VQA)."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 when the normalised prediction equals a normalised reference (max over references), else 0."""
    pred = normalize_exact(prediction)
    return float(any(normalize_exact(r) == pred for r in references))


# --- relaxed accuracy (ChartQA) ---------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: when both parse as numbers (a trailing ``%`` divides by 100) and the target
    is non-zero, correct within ``tolerance`` relative error; otherwise case-insensitive string equality (both
    stripped). As in lmms-eval and VLMEvalKit, a zero target falls back to string equality."""
    pred, tgt = prediction.strip(), target.strip()
    p, t = _to_float(pred), _to_float(tgt)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(pred.lower() == tgt.lower())


# --- ANLS (DocVQA) ----------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question: max over answers of 1 − d/max(len) on
    lower-cased, whitespace-collapsed strings, 0 where that similarity is below ``threshold``. The lengths are
    those of the normalised strings, as in the DocVQA definition (lmms-eval takes the raw strings' lengths, which
    differs only when normalising changes a length, i.e. with extra whitespace)."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ans in answers:
        gt = " ".join(ans.strip().lower().split())
        length = max(len(gt), len(pred))
        sim = 1.0 if length == 0 else 1.0 - levenshtein(gt, pred) / length
        best = max(best, sim)
    return best if best >= threshold else 0.0


# --- aggregation -------------------------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); 0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
