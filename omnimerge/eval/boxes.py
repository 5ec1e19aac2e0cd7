"""Bounding boxes in generated text: parsing the forms models write, bringing them to the image's [0, 1]
coordinates by the model family's convention (:data:`omnimerge.eval.protocol.BOX_FORMATS`), and IoU.

The convention comes from the model family (its config's ``model_type``), never from a per-answer heuristic:
lmms-eval reads every box as already normalised (so Qwen2-VL and InternVL, which answer on a 0–1000 grid, score
near 0 there), and MLLMerging's patch and InternVL's own evaluator guess per answer (divide by 1000 when a value
exceeds 1, or when the four numbers sum to ≥ 4).
"""

from __future__ import annotations

import json
import math
import re

from omnimerge.eval.protocol import BOX_FORMATS

__all__ = [
    "QWEN25VL_MAX_PIXELS",
    "QWEN25VL_MIN_PIXELS",
    "Box",
    "iou",
    "parse_box",
    "smart_resize",
    "to_unit_box",
]

Box = tuple[float, float, float, float]

#: Qwen2.5-VL checkpoints' processor limits (``preprocessor_config.json`` of Qwen/Qwen2.5-VL-*-Instruct)
QWEN25VL_MIN_PIXELS = 56 * 56
QWEN25VL_MAX_PIXELS = 28 * 28 * 16384

_NUM = r"(-?\d+(?:\.\d+)?)"
_SEP = r"\s*,\s*"
_PATTERNS = (
    # (x1,y1),(x2,y2): Qwen2-VL's <|box_start|>(x1,y1),(x2,y2)<|box_end|>
    re.compile(rf"\(\s*{_NUM}{_SEP}{_NUM}\s*\)\s*,?\s*\(\s*{_NUM}{_SEP}{_NUM}\s*\)"),
    # [x1, y1, x2, y2], and [[x1, y1, x2, y2]] (InternVL's <box>[[...]]</box>), whose inner list this matches
    re.compile(rf"\[\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\]"),
    # (x1, y1, x2, y2)
    re.compile(rf"\(\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\)"),
)
_JSON_KEYS = ("bbox_2d", "bbox", "box", "bbox_xyxy")


def _json_box(text: str) -> Box | None:
    """The first box of a JSON answer (Qwen2.5-VL: ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}``, or a list of
    such objects, possibly inside a ```json fence)."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    for item in items:
        if not isinstance(item, dict):
            continue
        for key in _JSON_KEYS:
            val = item.get(key)
            if isinstance(val, list) and len(val) == 4 and all(isinstance(v, int | float) for v in val):
                return (float(val[0]), float(val[1]), float(val[2]), float(val[3]))
    return None


def parse_box(text: str) -> Box | None:
    """The first box in ``text`` as four numbers (x1, y1, x2, y2) in the model's own units, or None.

    Accepted: a JSON object with ``bbox_2d`` (or ``bbox``/``box``), ``(x1,y1),(x2,y2)``, ``[x1, y1, x2, y2]``,
    ``[[x1, y1, x2, y2]]`` and ``(x1, y1, x2, y2)``; special tokens around them (``<|box_start|>``, ``<box>``)
    are ignored. When several appear, the one that starts first wins."""
    found = _json_box(text)
    if found is not None:
        return found
    best: tuple[int, Box] | None = None
    for pat in _PATTERNS:
        m = pat.search(text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), tuple(float(g) for g in m.groups()))  # type: ignore[assignment]
    return None if best is None else best[1]


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = QWEN25VL_MIN_PIXELS,
    max_pixels: int = QWEN25VL_MAX_PIXELS,
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL/Qwen2.5-VL's processor resizes an image to: both sides multiples of
    ``factor``, the area within [min_pixels, max_pixels], the aspect ratio kept as closely as possible (sides
    rounded to the nearest multiple; scaled down, floored, above max_pixels; scaled up, ceiled, below
    min_pixels). A pure function, so boxes in resized pixels can be rescored without the model."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_unit_box(box: Box, box_format: str, model_size: tuple[int, int] | None = None) -> Box:
    """``box`` in the family's units brought to [0, 1] of the image (x over width, y over height).

    ``qwen2vl`` and ``internvl``: a 0–1000 grid, divided by 1000; ``normalized``: unchanged; ``qwen25vl``: pixels
    of the image as the model saw it, divided by that (width, height) — ``model_size``, from
    ``Generation.image_sizes`` or :func:`smart_resize` of the original size."""
    x1, y1, x2, y2 = box
    if box_format in ("qwen2vl", "internvl"):
        return (x1 / 1000.0, y1 / 1000.0, x2 / 1000.0, y2 / 1000.0)
    if box_format == "normalized":
        return box
    if box_format == "qwen25vl":
        if model_size is None:
            raise ValueError("qwen25vl boxes need the size of the image as the model saw it")
        w, h = model_size
        return (x1 / w, y1 / h, x2 / w, y2 / h)
    raise ValueError(f"unknown box format {box_format!r}; expected one of {', '.join(BOX_FORMATS)}")


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when either is empty or inverted."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union
