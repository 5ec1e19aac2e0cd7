"""Geometry: MathVista (testmini), MATH-Vision (testmini), Geometry3K.

Prompts follow **lmms-eval**: MathVista's zero-shot "format-prompt" (``mathvista_testmini_format``: question,
``(Unit: …)``, ``A. …`` choices, then the answer-format instruction), MATH-Vision's ``mathvision_testmini``
prompt (step by step, answer in ``\\boxed{}``, letter for multiple choice) and Geometry3K's letter prompt.
Generation lengths are capped far below lmms-eval's 16384 tokens (MathVista 256, MATH-Vision 1024,
Geometry3K 128): the prompts ask for a direct answer (MATH-Vision for a short derivation), and a search loop
cannot afford 16k-token generations.

Scoring is **rule-based**, offline, no LLM judge by default. The paper (VLMEvalKit) and lmms-eval's MathVista
use a GPT judge to extract answers; lmms-eval's MathVista without one only accepts an answer that is exactly a
choice or a number and otherwise picks the choice nearest the *empty* extraction, so it cannot be run offline.
Here: a choice is recognised by its letter (``B``, ``(B)``, ``B.``, ``Answer: B``, ``the answer is B``,
``\\boxed{B}``; capital letters only, so the article "a" is not read as option A, a bug of lmms-eval's
Geometry3K extractor) or by its text appearing in the answer (when exactly one choice does); a number is the
``\\boxed{}`` content, else what follows "the answer is", else the last number; MathVista then normalises as
lmms-eval does (``int(float(x))`` for integers, rounding to the row's precision for floats) and compares strings.
An optional judge can be plugged in (``MathVista(judge=callable)``): it gets (question, response) and returns
the extracted answer; it is never needed offline and never used by default.

The paper's Geometry number is the mean over subsets (``mllmerging.md`` §4.3): MathVista rows
"geometry reasoning", "algebraic reasoning" (skills) and "geometry problem solving" (task); MATH-Vision subjects
"metric geometry - angle/area/length" and "solid geometry". The results keep the overall accuracy as each
task's ``value`` and add this ``paper_value``; :func:`omnimerge.eval.results.aggregate` uses it for the
Geometry capability when present.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from omnimerge.eval.protocol import Generation
from omnimerge.eval.registry import Example, Score, Task, generation_text, register

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")  # thousands separators allowed: "1,000"
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


_ANSWER_IS = re.compile(r"(?:final answer|correct answer|answer)\s*(?:is|:|=)\s*:?", re.I)


def _answer_tail(text: str) -> str:
    """What the answer was said to be: the boxed content, else the line after the last "answer is/:"."""
    b = boxed(text)
    if b is not None:
        return b
    marks = list(_ANSWER_IS.finditer(text))
    if marks:
        return text[marks[-1].end():].strip().split("\n")[0].strip()
    return text.strip()


def choice_letter(text: str, n_choices: int) -> str | None:
    """The option letter an answer gives (A… for ``n_choices`` options), or None.

    In order: the whole answer is a letter (any case: ``b``, ``(B)``, ``B.``); it starts with one (``B. 24``,
    ``(B) 24``); it says "answer/option/choice (is) B"; else the last capital letter standing alone that does
    not start a lower-case phrase (``so D`` counts, the article in ``A triangle`` does not)."""
    valid = LETTERS[:n_choices]
    if not valid:
        return None
    cls = f"[{valid}]"
    candidates = [_answer_tail(text), text.strip()]
    for cand in candidates:
        cand = cand.strip().strip("*$").strip()
        m = re.fullmatch(rf"\(?([{valid}{valid.lower()}])\)?[.:)]?", cand)
        if m:
            return m.group(1).upper()
        for pat, flags in ((rf"^\(?({cls})[.:)]\s", 0), (rf"^\(({cls})\)", 0),
                           (r"\b(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(?([A-Za-z])\b\)?", re.I)):
            m = re.search(pat, cand, flags)
            if m and m.group(1) in valid:
                return m.group(1)
    loose = re.findall(rf"(?<![\w'])\(?({cls})\)?(?![\w'])(?!\s+(?!is\b|was\b)[a-z])", text)
    return loose[-1] if loose else None


def choice_by_text(text: str, choices: list[str]) -> int | None:
    """The index of the only choice whose text appears in the answer (longest wins when one contains another)."""
    low = text.lower()
    hits = [i for i, c in enumerate(choices) if c and c.strip().lower() in low]
    hits = [i for i in hits if not any(j != i and choices[i].strip().lower() in choices[j].strip().lower()
                                       and j in hits for j in hits)]
    return hits[0] if len(hits) == 1 else None


def chosen_letter(text: str, choices: list[str], by_text_of: str | None = None) -> str | None:
    """The option letter an answer picks: the letter it gives (:func:`choice_letter`), else that of the only
    choice whose text appears in ``by_text_of`` (default: the answer; :func:`choice_by_text`), else None."""
    letter = choice_letter(text, len(choices))
    if letter is None:
        idx = choice_by_text(text if by_text_of is None else by_text_of, choices)
        letter = LETTERS[idx] if idx is not None else None
    return letter


def last_number(text: str) -> str | None:
    """The number an answer gives: the boxed content or what follows "the answer is", else the last number."""
    tail = _answer_tail(text)
    for src in (tail, text):
        nums = _NUMBER.findall(src)
        if nums:
            return (nums[0] if src is tail and tail != text.strip() else nums[-1]).replace(",", "")
    return None


def _choices(value: Any) -> list[str]:
    return [str(c) for c in value] if value else []


@register
class MathVista(Task):
    name = "mathvista"
    capability = "Geometry"
    hub_id = "AI4Math/MathVista"
    split = "testmini"
    fields = ("question", "answer", "question_type", "answer_type")
    image_fields = ("decoded_image", "image")
    max_new_tokens = 256
    metric = "accuracy"
    strata = "metadata.task"
    paper_groups = ("skill:geometry reasoning", "skill:algebraic reasoning", "task:geometry problem solving")
    provenance = ("lmms-eval mathvista_testmini_format prompt; rule-based extraction (no judge), lmms-eval's "
                  "normalisation and comparison; paper subset mean as VLMEvalKit/MLLMerging results.py")

    def __init__(self, judge: Callable[[str, str], str] | None = None) -> None:
        self.judge = judge

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        groups = [f"question_type:{row['question_type']}"]
        if meta.get("task"):
            groups.append(f"task:{meta['task']}")
        groups += [f"skill:{s}" for s in meta.get("skills") or []]
        precision = row.get("precision")
        info = {"choices": _choices(row.get("choices")), "question_type": str(row["question_type"]),
                "answer_type": str(row["answer_type"]), "unit": row.get("unit") or "",
                "precision": int(precision) if precision is not None else None}
        return [Example(self.name, doc_id, None, str(row["question"]), (str(row["answer"]),), info=info,
                        groups=tuple(groups), stratum=str(meta.get("task")) if meta.get("task") else None)]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        info = example.info
        question = example.question + (f" (Unit: {info['unit']})" if info["unit"] else "")
        parts = [question]
        if info["choices"]:
            parts.append("\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(info["choices"])))
        if info["question_type"] == "multi_choice":
            parts.append("Answer with the option's letter from the given choices directly.")
        elif info["answer_type"] == "integer":
            parts.append("Answer the question using a single integer number.")
        elif info["answer_type"] == "float":
            p = info["precision"] or 1
            places = {1: "one decimal place", 2: "two decimal places"}.get(p, f"{p} decimal places")
            parts.append(f"Answer the question using a single floating-point number with {places}.")
        elif info["answer_type"] == "list":
            parts.append("Answer the question using a Python list.")
        return "\n".join(parts)

    def extract(self, example: Example, text: str) -> str | None:
        """The answer in the form the reference is written (a choice's text, a normalised number, a list)."""
        info = example.info
        text = text.strip()
        if not text:
            return None
        if self.judge is not None:
            text = self.judge(self.prompt(example), text).strip() or text
        if info["question_type"] == "multi_choice":
            choices = info["choices"]
            if text in choices:
                return text
            letter = chosen_letter(text, choices)
            return choices[LETTERS.index(letter)] if letter is not None else None
        if info["answer_type"] == "list":
            m = re.search(r"\[[^\[\]]*\]", text)
            if not m:
                return None
            return "[" + ", ".join(_PLAIN_NUMBER.findall(m.group(0))) + "]"
        num = last_number(text)
        if num is None:
            return None
        try:
            if info["answer_type"] == "integer":
                return str(int(float(num)))
            if info["answer_type"] == "float":
                return str(round(float(num), info["precision"] or 0))
        except ValueError:
            return None
        return num

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        got = self.extract(example, generation_text(generation))
        if got is None:
            return Score(0.0, parsed=False)
        return Score(float(got.strip() == str(example.references[0]).strip()), extracted=got)


_MATHVISION_GEOMETRY = ("metric geometry - angle", "metric geometry - area", "metric geometry - length",
                        "solid geometry")


def _norm_math(s: str) -> str:
    s = s.strip().lower().strip("$").strip()
    for junk in ("\\text", "\\mathrm", "\\mbox", "\\left", "\\right", "^{\\circ}", "^\\circ", "°", "\\%", "%",
                 "\\,", "\\!", " "):
        s = s.replace(junk, "")
    s = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    return s.strip("{}().").rstrip(".")


def _as_number(s: str) -> float | None:
    s = _norm_math(s)
    m = re.fullmatch(r"\(?(-?[\d.]+)\)?/\(?(-?[\d.]+)\)?", s)
    try:
        if m:
            return float(m.group(1)) / float(m.group(2))
        return float(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


@register
class MathVision(Task):
    name = "mathvision"
    capability = "Geometry"
    hub_id = "MathLLMs/MathVision"
    split = "testmini"
    fields = ("question", "options", "answer")
    image_fields = ("decoded_image", "image")
    max_new_tokens = 1024
    metric = "accuracy"
    strata = "subject"
    paper_groups = tuple(f"subject:{s}" for s in _MATHVISION_GEOMETRY)
    provenance = ("lmms-eval mathvision_testmini prompt and rule-based scoring idea (boxed answer, letter or "
                  "option value); no judge (the paper used VLMEvalKit's GPT judge); paper subset mean")

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        subject = row.get("subject")
        return [Example(self.name, doc_id, None, str(row["question"]), (str(row["answer"]),),
                        info={"choices": _choices(row.get("options"))},
                        groups=(f"subject:{subject}",) if subject else (),
                        stratum=str(subject) if subject else None)]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        choices = example.info["choices"]
        text = 'Please solve the problem step by step and put your answer in one "\\boxed{}".'
        if choices:
            listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
            return (text + f"{example.question}\nChoices: {listed}"
                    + "\nAnswer the question with the option's letter from the given choices directly.")
        return text + example.question

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        text = generation_text(generation).strip()
        if not text:
            return Score(0.0, parsed=False)
        gt = str(example.references[0]).strip()
        choices = example.info["choices"]
        if choices:
            letter = chosen_letter(text, choices, by_text_of=_answer_tail(text))
            if letter is None:
                return Score(0.0, parsed=False)
            return Score(float(letter == gt.upper()), extracted=letter)
        got = _answer_tail(text)
        a, b = _as_number(got), _as_number(gt)
        if a is not None and b is not None:
            return Score(float(round(a, 2) == round(b, 2)), extracted=got)
        return Score(float(_norm_math(got) == _norm_math(gt)), extracted=got)


@register
class Geometry3K(Task):
    name = "geometry3k"
    capability = "Geometry"
    hub_id = "Yang130/geometry3k_4choices_mixed"
    split = "test"
    fields = ("problem", "choices", "ground_truth")
    image_fields = ("images", "image")
    max_new_tokens = 128
    metric = "accuracy"
    provenance = "lmms-eval geometry3k (prompt, exact letter match); own letter extraction (capitals only)"

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        return [Example(self.name, doc_id, None, str(row["problem"]), (str(row["ground_truth"]).strip().upper(),),
                        info={"choices": _choices(row.get("choices"))})]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(example.info["choices"]))
        return f"{example.question}\n{listed}\nAnswer with the option's letter from the given choices directly."

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        text = generation_text(generation)
        choices = example.info["choices"]
        letter = chosen_letter(text, choices)
        if letter is None:
            return Score(0.0, parsed=False)
        return Score(float(letter == example.references[0]), extracted=letter)
