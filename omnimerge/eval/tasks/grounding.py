"""Grounding: RefCOCO, RefCOCO+, RefCOCOg (val): referring-expression comprehension, Acc@IoU≥0.5.

Data as **lmms-eval** has it (``refcoco_bbox_rec_val`` and siblings): each row holds one COCO box (``bbox``,
[x, y, w, h] in pixels) and the list of its referring expressions (``answer``); each expression is one example
(``expression``, 0-based, in predictions.jsonl; ``doc_id`` stays the row's index).

Prompt by the model family's box convention: ``normalized`` (LLaVA and others) gets lmms-eval's prompt, which
asks for floats in [0, 1]; ``qwen2vl`` gets the prompt of MLLMerging's patched lmms-eval (the paper's Qwen2-VL
numbers), ``internvl`` InternVL's own ``evaluate_grounding.py`` prompt with ``<ref>…</ref>``, and ``qwen25vl``
the form of Qwen2.5-VL's grounding examples (JSON ``bbox_2d`` in pixels). Boxes are parsed in every form
(:func:`omnimerge.eval.boxes.parse_box`) and scaled by the family's convention, never guessed per answer
(lmms-eval reads every box as normalised, MLLMerging divides by 1000 when a value exceeds 1, InternVL when the
four numbers sum to ≥ 4). An answer without a box scores 0 and counts as a parse failure (lmms-eval scores it as
the box [0, 0, 0, 0], i.e. 0 as well). Reported: Acc@0.5 (the paper's number), the parse-failure rate, mean IoU
and Acc at IoU 0.3/0.7.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omnimerge.eval.boxes import iou, parse_box, smart_resize, to_unit_box
from omnimerge.eval.protocol import Generation
from omnimerge.eval.registry import Example, Score, Task, check_box_format, generation_text, register

_LMMS_PROMPT = ("Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
                "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide "
                "the bounding box coordinate of the region this sentence describes: ")
_PAPER_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "


class _RefCOCO(Task):
    capability = "Grounding"
    split = "val"
    fields = ("answer", "bbox")
    max_new_tokens = 64
    metric = "acc@0.5"
    sub_key = "expression"
    needs_image_size = True
    provenance = ("lmms-eval refcoco*_bbox_rec data and one example per expression; prompt per family "
                  "(lmms-eval, MLLMerging's Qwen2-VL patch, InternVL's evaluator); family box scaling")
    #: Qwen2.5-VL processor limits used to recompute the resized size when a generation does not carry it
    min_pixels: int | None = None
    max_pixels: int | None = None

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        exprs = row["answer"]
        if isinstance(exprs, str):
            exprs = [exprs]
        x, y, w, h = (float(v) for v in row["bbox"])
        ref = (x, y, x + w, y + h)
        return [Example(self.name, doc_id, i, str(e), (list(ref),), info={"bbox": ref})
                for i, e in enumerate(exprs or [])]

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        fmt = check_box_format(box_format) if box_format else "normalized"
        if fmt == "qwen2vl":
            return _PAPER_PROMPT + example.question
        if fmt == "internvl":
            return _PAPER_PROMPT + f"<ref>{example.question}</ref>"
        if fmt == "qwen25vl":
            return f"Locate {example.question} in this image and output the bbox coordinates in JSON format."
        return _LMMS_PROMPT + example.question

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        check_box_format(box_format)
        if not example.image_sizes:
            raise ValueError(f"{self.name}: example {example.doc_id} was loaded without its image size")
        width, height = example.image_sizes[0]
        box = parse_box(generation_text(generation))
        if box is None:
            return Score(0.0, parsed=False, extra={"iou": 0.0})
        model_size = None
        if box_format == "qwen25vl":
            sizes = generation.image_sizes if isinstance(generation, Generation) else ()
            if sizes:
                model_size = sizes[0]
            else:
                kw = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v}
                rh, rw = smart_resize(height, width, **kw)
                model_size = (rw, rh)
        pred = to_unit_box(box, box_format, model_size)
        x1, y1, x2, y2 = example.info["bbox"]
        gt = (x1 / width, y1 / height, x2 / width, y2 / height)
        overlap = iou(pred, gt)
        return Score(float(overlap >= 0.5), extracted=", ".join(f"{v:.4g}" for v in pred), extra={"iou": overlap})

    def breakdown_extra(self, scores: Sequence[tuple[Example, Score]]) -> dict[str, Any]:
        n = len(scores)
        if not n:
            return {}
        ious = [s.extra.get("iou", 0.0) for _, s in scores]
        return {
            "parse_failure_rate": sum(not s.parsed for _, s in scores) / n,
            "mean_iou": sum(ious) / n,
            "acc@0.3": sum(v >= 0.3 for v in ious) / n,
            "acc@0.7": sum(v >= 0.7 for v in ious) / n,
        }


@register
class RefCOCO(_RefCOCO):
    name = "refcoco"
    hub_id = "lmms-lab/RefCOCO"


@register
class RefCOCOPlus(_RefCOCO):
    name = "refcoco_plus"
    hub_id = "lmms-lab/RefCOCOplus"


@register
class RefCOCOg(_RefCOCO):
    name = "refcocog"
    hub_id = "lmms-lab/RefCOCOg"
