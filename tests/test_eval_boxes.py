"""Box parsing in every form models write, the family conventions, Qwen2.5-VL's resize, and Acc@0.5."""

from __future__ import annotations

import itertools

import pytest

from omnimerge.eval.boxes import iou, parse_box, smart_resize, to_unit_box


@pytest.mark.parametrize(("text", "box"), [
    ("<|object_ref_start|>the man<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>",
     (100, 200, 500, 600)),
    ("<ref>the man</ref><box>[[100, 200, 500, 600]]</box>", (100, 200, 500, 600)),
    ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "man"}]\n```', (10, 20, 30, 40)),
    ('{"bbox_2d": [10.5, 20, 30, 40]}', (10.5, 20, 30, 40)),
    ("[0.1, 0.2, 0.5, 0.6]", (0.1, 0.2, 0.5, 0.6)),
    ("The box is (0.1, 0.2, 0.5, 0.6).", (0.1, 0.2, 0.5, 0.6)),
    ("first [1, 2, 3, 4] then (5,6),(7,8)", (1, 2, 3, 4)),   # the first box in the text wins
    ("(5,6),(7,8) then [1, 2, 3, 4]", (5, 6, 7, 8)),
])
def test_parse_box_forms(text: str, box: tuple[float, ...]) -> None:
    assert parse_box(text) == tuple(float(v) for v in box)


@pytest.mark.parametrize("text", ["no box here", "[1, 2, 3]", "(1, 2)", '{"label": "x"}', ""])
def test_parse_box_failures(text: str) -> None:
    assert parse_box(text) is None


def _transformers_smart_resize():  # type: ignore[no-untyped-def]
    """transformers' own smart_resize, taken from its source file (its module imports torchvision, which this
    environment lacks, so the function is compiled alone)."""
    import ast
    import importlib.util
    import math
    from pathlib import Path

    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.submodule_search_locations
    src = Path(spec.submodule_search_locations[0]) / "models" / "qwen2_vl" / "image_processing_qwen2_vl.py"
    tree = ast.parse(src.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    ns: dict = {"math": math}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(src), "exec"), ns)
    return ns["smart_resize"]


def test_smart_resize_matches_transformers() -> None:
    reference = _transformers_smart_resize()
    sizes = [15, 28, 100, 333, 640, 1000, 1920, 4032]
    limits = [(56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 1280 * 28 * 28), (3136, 12845056)]
    for (h, w), (lo, hi) in itertools.product(itertools.product(sizes, sizes), limits):
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, min_pixels=lo, max_pixels=hi) == reference(h, w, min_pixels=lo, max_pixels=hi)


def test_smart_resize_by_hand() -> None:
    # 100 x 200: sides rounded to multiples of 28 (3.57 -> 4, 7.14 -> 7): 112 x 196, inside the limits
    assert smart_resize(100, 200) == (112, 196)
    # 1000 x 1000 above 512 * 28 * 28 pixels: scaled by sqrt(1e6 / 401408) = 1.578, floored: 22 * 28 = 616
    assert smart_resize(1000, 1000, max_pixels=512 * 28 * 28) == (616, 616)
    # 20 x 20 below 56 * 56: scaled up by 2.8 and ceiled to 56
    assert smart_resize(20, 20) == (56, 56)


def test_unit_boxes_by_family() -> None:
    assert to_unit_box((100, 200, 500, 1000), "qwen2vl") == (0.1, 0.2, 0.5, 1.0)
    assert to_unit_box((100, 200, 500, 1000), "internvl") == (0.1, 0.2, 0.5, 1.0)
    assert to_unit_box((0.1, 0.2, 0.5, 1.0), "normalized") == (0.1, 0.2, 0.5, 1.0)
    assert to_unit_box((98, 56, 196, 112), "qwen25vl", (196, 112)) == (0.5, 0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown box format"):
        to_unit_box((0, 0, 1, 1), "pixels")


def test_iou() -> None:
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)   # overlap 1x2, union 4 + 4 - 2
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((2, 2, 0, 0), (0, 0, 2, 2)) == 0.0                   # an inverted box is empty
