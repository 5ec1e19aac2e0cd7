"""Procedural, seeded data for the five capability tasks and the captioning mixture of the same world.

Every image is 32 x 32 RGB on a black background, drawn with Pillow from parameters sampled by a numpy
``Generator`` seeded by ``(seed, task, split, index)``: the same arguments always give the same example.

Splits are disjoint by construction: each example has a *content key* (all sampled parameters, jitter included,
plus the question), and the example is accepted for a split only when a hash of its key falls in that split's
buckets (train 0-7, validation 8, test 9 of 10). An example of the test split can therefore never occur, even by
chance, in the training split.

Tasks (coarse and aligned with the 8-px patches of the vision tower; see docs/benchmark.md):

* ``vqa``: 1-4 objects (circle/square/triangle, 6 colours) in the cells of a 2 x 2 grid. Questions: how many
  objects, the shape in a cell, the colour in a cell, is a cell empty. (Questions that search the image for a
  colour, "is there a red object", "where is the red object", were dropped: no model of the zoo learnt them,
  every expert stayed at the majority answer, and they made VQA's calibration margin a coin flip.)
* ``geometry``: a triangle or square (number of sides), an angle between two rays (acute/obtuse), or two squares
  of different size (which is larger).
* ``chart``: a bar chart of 4 bars. Questions: which bar is highest, the value of a bar.
* ``ocr``: a rendered string of two characters (digits and the letters A-F).
* ``grounding``: two coloured rectangles; the answer is the box of the described one, written as
  ``x1 y1 x2 y2`` on Qwen2-VL's 0-1000 grid (9 levels, 125 apart).

``caption`` examples ("describe the image .") describe the same images in words (objects, bars, text, boxes):
the base model is pretrained on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from omnimerge.bench import TASKS

IMAGE_SIZE = 32
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 220, 40),
    "cyan": (40, 220, 220),
    "magenta": (220, 60, 220),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top-left", "top-right", "bottom-left", "bottom-right")
OCR_CHARS = tuple("0123456789ABCDEF")
GRID = tuple(str(125 * i) for i in range(9))  # 0..1000, the 9-level coordinate grid (4 px per level)
SPLITS = ("train", "validation", "test")
_SPLIT_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
#: answer length in tokens per task (decoding budget; answers end with </s>)
ANSWER_TOKENS = {"vqa": 1, "geometry": 1, "chart": 1, "ocr": 2, "grounding": 4}
#: the field's metric used for each task's headline score
TASK_METRIC = {
    "vqa": "exact_match",
    "geometry": "accuracy",
    "chart": "relaxed_accuracy",
    "ocr": "exact_match",
    "grounding": "acc_iou50",
}
TASK_TITLES = {"vqa": "VQA", "geometry": "Geometry", "chart": "Chart", "ocr": "OCR", "grounding": "Grounding"}
CAPTION_PROMPT = "describe the image ."


@dataclass
class Example:
    """One sample: a 32 x 32 image, a question, the gold answer (space-separated words) and metric metadata."""

    task: str
    image: Image.Image
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""


def vocabulary() -> list[str]:
    """Every word the tasks, captions and prompts use (the tokenizer's word list, without special tokens)."""
    words: list[str] = []

    def add(*ws: str) -> None:
        for w in ws:
            for t in w.split():
                if t not in words:
                    words.append(t)

    add(CAPTION_PROMPT, "how many objects ?", "what shape is the", "what color is the", "is the empty", "yes no")
    add("where is the")  # grounding's question
    add("how many sides ?", "what angle is it ?", "which is larger ?", "acute obtuse left right big small angle")
    add("which bar is highest ?", "what is the value of", "bars", "read the text ?", "text", "box")
    add(*COLORS, *SHAPES, *CELLS, *OCR_CHARS, *GRID, "b1 b2 b3 b4", "1 2 3 4")
    return words


# ---------------------------------------------------------------------------------------------------------------
# rendering helpers


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    from pathlib import Path

    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono-Bold.ttf"
    if path.exists():
        return ImageFont.truetype(str(path), 24)
    return ImageFont.load_default(size=24)  # pragma: no cover - Pillow's embedded font


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    return img, ImageDraw.Draw(img)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        d.rectangle([cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1], fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def _pick(rng: np.random.Generator, seq: tuple | list) -> Any:
    return seq[int(rng.integers(len(seq)))]


# ---------------------------------------------------------------------------------------------------------------
# task generators: each returns (image, question, answer, meta, key, caption)


def _gen_vqa(rng: np.random.Generator) -> tuple:
    n = int(rng.integers(1, 5))
    cells = sorted(rng.choice(4, size=n, replace=False).tolist())
    objs = []
    for c in cells:
        objs.append((c, _pick(rng, SHAPES), _pick(rng, list(COLORS)), int(rng.integers(-1, 2)), int(rng.integers(-1, 2))))
    img, d = _canvas()
    for c, shape, color, jx, jy in objs:
        cx, cy = 8 + 16 * (c % 2) + jx, 8 + 16 * (c // 2) + jy
        _draw_shape(d, shape, cx, cy, 6, COLORS[color])
    qtype = int(rng.integers(4))
    if qtype == 0:
        q, a = "how many objects ?", str(n)
    elif qtype == 3:
        cell = int(rng.integers(4))
        q, a = f"is the {CELLS[cell]} empty ?", "no" if cell in cells else "yes"
    else:
        o = objs[int(rng.integers(n))]
        if qtype == 1:
            q, a = f"what shape is the {CELLS[o[0]]} ?", o[1]
        else:
            q, a = f"what color is the {CELLS[o[0]]} ?", o[2]
    caption = " ".join(f"{o[2]} {o[1]} {CELLS[o[0]]}" for o in objs)
    return img, q, a, {"qtype": ["count", "shape", "color", "empty"][qtype]}, repr((objs, q)), caption


def _gen_geometry(rng: np.random.Generator) -> tuple:
    qtype = int(rng.integers(3))
    img, d = _canvas()
    color = COLORS[_pick(rng, list(COLORS))]
    if qtype == 0:
        sides = int(rng.integers(3, 5))
        r = float(rng.integers(11, 15))
        rot = float(rng.uniform(-0.25, 0.25)) + (np.pi / 4 if sides == 4 else 0.0)
        cx, cy = 16 + int(rng.integers(-2, 3)), 16 + int(rng.integers(-2, 3))
        pts = [
            (cx + r * np.sin(rot + 2 * np.pi * k / sides), cy - r * np.cos(rot + 2 * np.pi * k / sides))
            for k in range(sides)
        ]
        d.polygon(pts, fill=color)
        q, a, cap = "how many sides ?", str(sides), "triangle" if sides == 3 else "square"
        key = (qtype, sides, r, round(rot, 3), cx, cy, color)
    elif qtype == 1:
        acute = bool(rng.integers(2))
        ang = float(rng.uniform(25, 65) if acute else rng.uniform(115, 155)) * np.pi / 180
        mid = float(rng.uniform(-0.4, 0.4))  # bisector direction around "up"
        vx, vy = 16 + int(rng.integers(-2, 3)), 24 + int(rng.integers(-2, 2))
        for t in (mid - ang / 2, mid + ang / 2):
            d.line([(vx, vy), (vx + 15 * np.sin(t), vy - 15 * np.cos(t))], fill=color, width=3)
        q, a = "what angle is it ?", "acute" if acute else "obtuse"
        cap = f"{a} angle"
        key = (qtype, acute, round(ang, 3), round(mid, 3), vx, vy, color)
    else:
        big_left = bool(rng.integers(2))
        rb, rs = int(rng.integers(5, 8)), int(rng.integers(2, 4))
        jy1, jy2 = int(rng.integers(-3, 4)), int(rng.integers(-3, 4))
        rl, rr = (rb, rs) if big_left else (rs, rb)
        d.rectangle([8 - rl, 16 + jy1 - rl, 8 + rl, 16 + jy1 + rl], fill=color)
        d.rectangle([24 - rr, 16 + jy2 - rr, 24 + rr, 16 + jy2 + rr], fill=color)
        q, a = "which is larger ?", "left" if big_left else "right"
        cap = "big left small right" if big_left else "small left big right"
        key = (qtype, big_left, rb, rs, jy1, jy2, color)
    return img, q, a, {"qtype": ["sides", "angle", "larger"][qtype]}, repr(key), cap


def _gen_chart(rng: np.random.Generator) -> tuple:
    while True:
        h = [int(x) for x in rng.integers(1, 5, size=4)]
        if h.count(max(h)) == 1:
            break
    color = _pick(rng, list(COLORS))
    img, d = _canvas()
    for i, v in enumerate(h):
        x0 = 8 * i + 1
        d.rectangle([x0, 31 - 7 * v, x0 + 4, 31], fill=COLORS[color])
    if rng.integers(2) == 0:
        q, a, qt = "which bar is highest ?", f"b{h.index(max(h)) + 1}", "highest"
    else:
        k = int(rng.integers(4))
        q, a, qt = f"what is the value of b{k + 1} ?", str(h[k]), "value"
    cap = "bars " + " ".join(str(v) for v in h)
    return img, q, a, {"qtype": qt}, repr((h, color, q)), cap


def _gen_ocr(rng: np.random.Generator) -> tuple:
    chars = [_pick(rng, OCR_CHARS) for _ in range(2)]
    color = (255, 255, 255) if rng.integers(2) == 0 else COLORS[_pick(rng, list(COLORS))]
    jit = [(int(rng.integers(-1, 2)), int(rng.integers(-2, 3))) for _ in range(2)]
    img, d = _canvas()
    font = _font()
    for i, (ch, (jx, jy)) in enumerate(zip(chars, jit, strict=True)):
        d.text((16 * i + 8 + jx, 16 + jy), ch, fill=color, font=font, anchor="mm")
    ans = " ".join(chars)
    return img, "read the text ?", ans, {"qtype": "read"}, repr((chars, color, jit)), f"text {ans}"


def _gen_grounding(rng: np.random.Generator) -> tuple:
    while True:
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(50):
            w, h = int(rng.integers(3, 6)) * 4, int(rng.integers(3, 6)) * 4  # 12-20 px, on the 4-px grid
            x1, y1 = int(rng.integers(0, (32 - w) // 4 + 1)) * 4, int(rng.integers(0, (32 - h) // 4 + 1)) * 4
            b = (x1, y1, x1 + w, y1 + h)
            if all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in boxes):
                boxes.append(b)
            if len(boxes) == 2:
                break
        if len(boxes) == 2:
            break
    cols = [str(c) for c in rng.choice(list(COLORS), size=2, replace=False)]
    img, d = _canvas()
    for b, c in zip(boxes, cols, strict=True):
        d.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], fill=COLORS[c])
    t = int(rng.integers(2))

    def words(b: tuple[int, int, int, int]) -> str:
        return " ".join(GRID[v // 4] for v in b)

    q = f"where is the {cols[t]} box ?"
    box = [v / IMAGE_SIZE for v in boxes[t]]
    # the caption names each box's colour and coarse place (the cell of its centre), not its coordinates
    cap = " ".join(f"{c} box {_cell_of(b)}" for b, c in zip(boxes, cols, strict=True))
    return img, q, words(boxes[t]), {"qtype": "box", "box": box}, repr((boxes, cols, q)), cap


def _cell_of(b: tuple[int, int, int, int]) -> str:
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    return CELLS[(2 if cy >= IMAGE_SIZE / 2 else 0) + (1 if cx >= IMAGE_SIZE / 2 else 0)]


GENERATORS = {
    "vqa": _gen_vqa,
    "geometry": _gen_geometry,
    "chart": _gen_chart,
    "ocr": _gen_ocr,
    "grounding": _gen_grounding,
}


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % 10


def iter_examples(task: str, split: str, seed: int = 0, caption: bool = False) -> Iterator[Example]:
    """The infinite, deterministic stream of ``task`` examples of ``split``.

    With ``caption=True`` the examples are captioning samples of the same images (question
    ``describe the image .``, answer = the caption); their split buckets are the same.
    """
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    buckets = _SPLIT_BUCKETS[split]
    rng = np.random.default_rng([seed, TASKS.index(task), 101 if caption else 7])
    while True:
        img, q, a, meta, key, cap = GENERATORS[task](rng)
        if _bucket(key) not in buckets:
            continue
        if caption:
            yield Example(task, img, CAPTION_PROMPT, cap, {"qtype": "caption"}, key)
        else:
            yield Example(task, img, q, a, meta, key)


def make_split(task: str, split: str, n: int, seed: int = 0, caption: bool = False) -> list[Example]:
    """The first ``n`` examples of ``iter_examples(task, split, seed, caption)``."""
    it = iter_examples(task, split, seed, caption)
    return [next(it) for _ in range(n)]


def shuffled_answers(examples: list[Example], seed: int = 0) -> list[Example]:
    """Copies of ``examples`` whose answers are permuted among examples of the same question type.

    The answers keep their format and marginal distribution but carry no information about the image: training
    on them teaches a model the answer *format* of each question, not the skill (the base's format warm-up).
    """
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault((ex.task, str(ex.meta.get("qtype"))), []).append(i)
    out = list(examples)
    for idx in groups.values():
        perm = rng.permutation(len(idx))
        for i, j in zip(idx, perm, strict=True):
            src = examples[idx[int(j)]]
            out[i] = Example(examples[i].task, examples[i].image, examples[i].question, src.answer,
                             dict(examples[i].meta), examples[i].key)
    return out
