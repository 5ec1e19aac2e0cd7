"""Chart: ChartQA (test: 1,250 human-written + 1,250 augmented questions).

Prompt and generation length follow **lmms-eval** (``chartqa``: "Answer the question with a single word.",
16 tokens); VLMEvalKit's ``ChartQA_TEST`` asks for "a single word or phrase" instead. Relaxed accuracy as both
implement it (numbers within 5 % relative error, a trailing ``%`` divided by 100; otherwise case-insensitive
equality), with per-split breakdowns (``human_test``, ``augmented_test``) as lmms-eval reports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omnimerge.eval.metrics import relaxed_accuracy
from omnimerge.eval.protocol import Generation
from omnimerge.eval.registry import Example, Score, Task, generation_text, register


@register
class ChartQA(Task):
    name = "chartqa"
    capability = "Chart"
    hub_id = "lmms-lab/ChartQA"
    split = "test"
    fields = ("question", "answer")
    max_new_tokens = 16
    metric = "relaxed_accuracy"
    strata = "type"
    provenance = "lmms-eval chartqa (prompt, 16 tokens); relaxed accuracy as lmms-eval and VLMEvalKit"

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        kind = row.get("type")
        return [Example(self.name, doc_id, None, str(row["question"]), (str(row["answer"]),),
                        groups=(str(kind),) if kind else (), stratum=str(kind) if kind else None)]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        return example.question + "\nAnswer the question with a single word."

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        text = generation_text(generation).strip()
        return Score(max(relaxed_accuracy(text, r) for r in example.references), extracted=text)
