"""VQA: VQAv2, GQA, VizWiz.

Prompts, generation lengths and data follow **lmms-eval** (``vqav2_val``, ``gqa``, ``vizwiz_vqa_val``): its
prompts are the ones most model cards report with, and they ask for a short answer, which the exact-match
scorers need. Scoring: VQAv2 and VizWiz use the official VQA soft accuracy with the official answer
normalisation (lmms-eval and VLMEvalKit's ``vqa_score`` agree; lmms-eval's VQAv2 copy skips the first
lower-casing/``'s`` step, which only matters for answers the normaliser would change anyway). GQA uses
exact match after lower-casing, removing punctuation and collapsing whitespace: lmms-eval's ``exact_match``
(ignore case and punctuation) plus whitespace collapsing, which is what MLLMerging's edited VLMEvalKit
``accuracy`` (the paper's numbers) does; VLMEvalKit upstream only strips and lower-cases.

The VizWiz prompt is lmms-eval's (with its "Unanswerable" hint); the paper ran VLMEvalKit's, the bare question
(Qwen2-VL's custom prompt adds "Please try to answer the question with short words or phrases if possible."),
which changes the numbers of models that rarely answer "unanswerable" unprompted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omnimerge.eval.data import DataError, ImageRef, Rows, image_refs, open_split
from omnimerge.eval.metrics import exact_match, vqa_accuracy
from omnimerge.eval.protocol import Generation
from omnimerge.eval.registry import Example, Score, Task, generation_text, register

SHORT = "\nAnswer the question using a single word or phrase."


def answer_strings(answers: Any) -> tuple[str, ...]:
    """VQAv2 stores answers as {answer, answer_confidence, answer_id}; VizWiz and TextVQA as strings."""
    out = []
    for a in answers or []:
        out.append(str(a["answer"]) if isinstance(a, dict) else str(a))
    return tuple(out)


class SoftVQA(Task):
    """A question with annotators' answers, scored by the official VQA soft accuracy (VQAv2, VizWiz, TextVQA);
    ``group_field`` and ``strata`` name the row fields of the breakdown groups and the ``limit`` strata."""

    metric = "vqa_accuracy"
    group_field: str | None = None

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        group = row.get(self.group_field) if self.group_field else None
        strat = row.get(self.strata) if self.strata else None
        return [Example(self.name, doc_id, None, str(row["question"]), answer_strings(row["answers"]),
                        groups=(str(group),) if group is not None else (),
                        stratum=None if strat is None else str(strat))]

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        text = generation_text(generation).strip()
        return Score(vqa_accuracy(text, example.references), extracted=text)


@register
class VQAv2(SoftVQA):
    name = "vqav2"
    capability = "VQA"
    hub_id = "lmms-lab/VQAv2"
    split = "validation"
    fields = ("question", "answers")
    max_new_tokens = 16
    strata = "question_type"
    group_field = "answer_type"
    provenance = "lmms-eval vqav2_val (prompt, 16 tokens); official VQA accuracy"

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        return example.question + SHORT


@register
class VizWiz(SoftVQA):
    name = "vizwiz"
    capability = "VQA"
    hub_id = "lmms-lab/VizWiz-VQA"
    split = "val"
    fields = ("question", "answers")
    max_new_tokens = 16
    strata = "category"
    group_field = "category"
    provenance = "lmms-eval vizwiz_vqa_val (prompt with the 'Unanswerable' hint); official VQA accuracy"

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        return (example.question.capitalize()
                + "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT)


@register
class GQA(Task):
    """GQA testdev-balanced. On the hub the images are a separate config (``testdev_balanced_images``, joined
    on ``imageId``); a local copy either has an ``image`` column or comes with that image table
    (``image_source``, rows with ``id`` and ``image``)."""

    name = "gqa"
    capability = "VQA"
    hub_id = "lmms-lab/GQA"
    hub_config = "testdev_balanced_instructions"
    image_config = "testdev_balanced_images"
    split = "testdev"
    fields = ("question", "answer")
    max_new_tokens = 16
    metric = "exact_match"
    strata = "types.structural"
    provenance = "lmms-eval gqa (prompt, 16 tokens); exact match as MLLMerging's VLMEvalKit (case, punctuation)"

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        types = row.get("types") if isinstance(row.get("types"), dict) else {}
        structural = types.get("structural") if types else None
        return [Example(self.name, doc_id, None, str(row["question"]), (str(row["answer"]),),
                        info={"image_id": row.get("imageId")},
                        groups=(str(structural),) if structural else (),
                        stratum=str(structural) if structural else None)]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        return example.question + SHORT

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        text = generation_text(generation).strip()
        return Score(exact_match(text, example.references), extracted=text)

    def _has_images(self, cols: Sequence[str]) -> bool:
        return "image" in cols or "imageId" in cols

    def _image_lookup(self, rows: Rows, image_cols: Sequence[str],
                      image_source: str | os.PathLike[str] | None) -> Callable[[Example], tuple[ImageRef, ...]]:
        if "image" in rows.columns:
            return super()._image_lookup(rows, image_cols, image_source)
        if image_source is not None:
            table = open_split(image_source, self.split)
        elif rows.origin.startswith(self.hub_id):
            table = open_split(self.hub_id, self.split, config=self.image_config)
        else:
            raise DataError(f"gqa: {rows.origin} has no 'image' field; give the image table (rows with 'id' and "
                            "'image', the hub's testdev_balanced_images) as its images source")
        for f in ("id", "image"):
            if f not in table.columns:
                raise DataError(f"gqa: image table {table.origin} has no field '{f}' "
                                f"(fields: {', '.join(table.columns)})")
        ids = {str(r["id"]): i for i, r in enumerate(table.iter_rows(exclude=["image"]))}

        def lookup(ex: Example) -> tuple[ImageRef, ...]:
            i = ids.get(str(ex.info.get("image_id")))
            return () if i is None else image_refs(table.get(i, ["image"])["image"], table.base_dir)

        return lookup
