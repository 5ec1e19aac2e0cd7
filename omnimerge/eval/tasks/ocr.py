"""OCR: TextVQA (val), OCR-VQA (test), OCRBench, DocVQA (val).

- **TextVQA**: lmms-eval's ``textvqa_val`` prompt (capitalised question + "Answer the question using a single
  word or phrase.", no OCR tokens); the official VQA soft accuracy (lmms-eval and VLMEvalKit agree).
- **OCR-VQA**: lmms-eval has no task; this follows **VLMEvalKit** ``OCRVQA_TESTCORE`` (the paper's set): the
  question + "Answer the question using a single word or phrase.", exact match after lower-casing, removing
  punctuation and collapsing whitespace (MLLMerging's edited ``accuracy``), max over references. The hub copy
  (``howard-hou/OCR-VQA``) stores each image once with lists ``questions``/``answers``: one example per question
  (``question_index`` in predictions.jsonl); a flat ``question``/``answer`` table (VLMEvalKit's TSV converted)
  works too. The hub ``test`` split is the full OCR-VQA test set, not VLMEvalKit's TESTCORE subset.
- **OCRBench**: **lmms-eval** ``ocrbench``: the bare question, 128 tokens, an answer counts when a reference
  (lower-cased, full-width ASCII folded, newlines as spaces) is contained in the prediction; for HME100k
  (handwritten formulas) whitespace is removed instead of lower-casing. Accuracy = lmms-eval's final score / 1000,
  with a per-``question_type`` breakdown.
- **DocVQA**: **lmms-eval** ``docvqa_val`` prompt and 32 tokens; ANLS (threshold 0.5, max over answers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omnimerge.eval.metrics import anls, exact_match
from omnimerge.eval.protocol import Generation
from omnimerge.eval.registry import Example, Score, Task, generation_text, register
from omnimerge.eval.tasks.vqa import SHORT, SoftVQA


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return (str(value),)


@register
class TextVQA(SoftVQA):
    name = "textvqa"
    capability = "OCR"
    hub_id = "lmms-lab/textvqa"
    split = "validation"
    fields = ("question", "answers")
    max_new_tokens = 32
    provenance = "lmms-eval textvqa_val (prompt, no OCR tokens); official VQA accuracy"

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        return example.question.capitalize() + SHORT


@register
class OCRVQA(Task):
    name = "ocrvqa"
    capability = "OCR"
    hub_id = "howard-hou/OCR-VQA"
    split = "test"
    fields = ()  # either questions/answers lists or question/answer: checked in _check_fields
    max_new_tokens = 32
    metric = "exact_match"
    sub_key = "question_index"
    provenance = "VLMEvalKit OCRVQA_TESTCORE (prompt, normalised exact match as MLLMerging); lmms-eval has none"

    def _check_fields(self, rows, need_images):  # type: ignore[no-untyped-def]
        from omnimerge.eval.data import DataError

        cols = rows.columns
        if not ({"questions", "answers"} <= set(cols) or {"question", "answer"} <= set(cols)):
            missing = "questions" if "questions" not in cols and "question" not in cols else (
                "answers" if "questions" in cols else "answer")
            raise DataError(f"{self.name}: {rows.origin} has no field '{missing}' (expected questions/answers "
                            f"lists or question/answer; fields: {', '.join(cols)})")
        super()._check_fields(rows, need_images)

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        if "questions" in row and row.get("questions") is not None:
            qs, ans = list(row["questions"]), list(row.get("answers") or [])
            return [Example(self.name, doc_id, i, str(q), _strings(ans[i] if i < len(ans) else None))
                    for i, q in enumerate(qs)]
        return [Example(self.name, doc_id, None, str(row["question"]), _strings(row["answer"]))]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        return example.question + SHORT

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        text = generation_text(generation).strip()
        return Score(exact_match(text, example.references), extracted=text)


def _fold_fullwidth(text: str) -> str:
    """Full-width ASCII (U+FF01–FF5E) to ASCII and the ideographic space to a space; nothing else changed."""
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else (" " if c == "\u3000" else c)
                   for c in text)


def ocrbench_hit(prediction: str, answers: tuple[str, ...], source: str) -> float:
    """OCRBench's containment rule for one prediction."""
    if source == "HME100k":
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return float(any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers))
    pred = _fold_fullwidth(prediction).lower().strip().replace("\n", " ")
    return float(any(_fold_fullwidth(a).lower().strip().replace("\n", " ") in pred for a in answers))


@register
class OCRBench(Task):
    name = "ocrbench"
    capability = "OCR"
    hub_id = "echo840/OCRBench"
    split = "test"
    fields = ("question", "answer", "question_type", "dataset")
    max_new_tokens = 128
    metric = "accuracy"
    strata = "question_type"
    provenance = "lmms-eval ocrbench (bare question, 128 tokens, containment scoring)"

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        qtype = str(row["question_type"])
        return [Example(self.name, doc_id, None, str(row["question"]), _strings(row["answer"]),
                        info={"dataset": str(row["dataset"])}, groups=(qtype,), stratum=qtype)]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        return example.question.strip()

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        text = generation_text(generation).strip()
        return Score(ocrbench_hit(text, example.references, example.info["dataset"]), extracted=text)


@register
class DocVQA(Task):
    name = "docvqa"
    capability = "OCR"
    hub_id = "lmms-lab/DocVQA"
    hub_config = "DocVQA"
    split = "validation"
    fields = ("question", "answers")
    max_new_tokens = 32
    metric = "anls"
    strata = "question_types"
    provenance = "lmms-eval docvqa_val (prompt, 32 tokens); ANLS with normalised lengths (DocVQA definition)"

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        types = _strings(row.get("question_types"))
        return [Example(self.name, doc_id, None, str(row["question"]), _strings(row["answers"]),
                        groups=types, stratum=types[0] if types else None)]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        return example.question + SHORT

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        text = generation_text(generation).strip()
        return Score(anls(text, example.references), extracted=text)
