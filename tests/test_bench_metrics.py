"""The benchmark's metrics on hand-made examples (no torch needed)."""

from __future__ import annotations

import math

import pytest

from omnimerge.bench.metrics import (
    acc_at_iou,
    anls,
    binomial_se,
    exact_match,
    iou,
    levenshtein,
    normalize,
    parse_box,
    relaxed_accuracy,
    score,
    vqa_soft_accuracy,
)


def test_normalize_and_exact_match() -> None:
    assert normalize("  The  Red, square! ") == "the red square"
    assert exact_match("RED.", "red") == 1.0
    assert exact_match("red square", "red  square") == 1.0
    assert exact_match("red", ["blue", "Red"]) == 1.0  # max over references
    assert exact_match("red", ["blue", "green"]) == 0.0
    assert exact_match("a f", "A F") == 1.0  # OCR: case-insensitive
    assert exact_match("af", "A F") == 0.0  # but the characters must be separated the same way
    assert exact_match("", "red") == 0.0


def test_relaxed_accuracy_five_percent() -> None:
    assert relaxed_accuracy("100", "100") == 1.0
    assert relaxed_accuracy("104.9", "100") == 1.0
    assert relaxed_accuracy("105", "100") == 1.0  # exactly 5 %: inclusive
    assert relaxed_accuracy("105.1", "100") == 0.0
    assert relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("94.9", "100") == 0.0
    assert relaxed_accuracy("4", "3") == 0.0  # small integers: no tolerance in practice
    assert relaxed_accuracy("12%", "12.5") == 1.0  # 4 % off, percent sign stripped
    assert relaxed_accuracy("1,000", "1000") == 1.0
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.01", "0") == 0.0
    assert relaxed_accuracy("B2", "b2") == 1.0  # non-numeric: exact match after normalisation
    assert relaxed_accuracy("b3", "b2") == 0.0


def test_vqa_soft_accuracy_ten_annotators() -> None:
    # 10 humans all said "2": a match gets min(1, 9/3) = 1 for each of the 10 subsets
    assert vqa_soft_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_soft_accuracy("two", ["2"] * 10) == 1.0  # number words normalised
    # 3 of 10 said "red": subsets leaving out a "red" annotator see 2 matches (2/3), the 7 others see 3 (1)
    humans = ["red"] * 3 + ["blue"] * 7
    assert vqa_soft_accuracy("red", humans) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert vqa_soft_accuracy("green", ["green"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_soft_accuracy("The Red!", humans) == vqa_soft_accuracy("red", humans)
    assert vqa_soft_accuracy("yellow", humans) == 0.0
    with pytest.raises(ValueError):
        vqa_soft_accuracy("x", [])


def test_anls() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert anls("hello", "hello") == 1.0
    assert anls("HELLO", "hello") == 1.0
    assert anls("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert anls("abc", "xyz") == 0.0  # distance 1.0 >= 0.5: 0
    assert anls("ab", "abcd") == 0.0  # normalised distance exactly 0.5: thresholded to 0
    assert anls("abc", "abcd") == pytest.approx(0.75)
    assert anls("abc", ["zzzz", "abcd"]) == pytest.approx(0.75)  # max over references
    assert anls("", "") == 1.0


def test_box_parsing_grid_and_iou() -> None:
    assert parse_box("125 250 500 625") == (0.125, 0.25, 0.5, 0.625)  # Qwen2-VL 0-1000 grid
    assert parse_box("(125,250),(500,625)") == (0.125, 0.25, 0.5, 0.625)
    assert parse_box("[0.1, 0.2, 0.3, 0.4]") == (0.1, 0.2, 0.3, 0.4)  # already normalised
    assert parse_box("0 0 1 1") == (0.0, 0.0, 1.0, 1.0)
    assert parse_box("125 250 500") is None
    assert parse_box("red box") is None
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)
    assert iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))
    assert iou((0.5, 0.5, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5)) == 0.0  # degenerate
    gold = (0.0, 0.0, 0.5, 0.5)
    assert acc_at_iou("0 0 500 500", gold) == 1.0
    assert acc_at_iou("0 0 500 250", gold) == 1.0  # IoU exactly 0.5 counts
    assert acc_at_iou("0 0 500 125", gold) == 0.0  # IoU 0.25
    assert acc_at_iou("garbage", gold) == 0.0


def test_task_scores_and_standard_error() -> None:
    assert score("vqa", "red", "red", {}) == 1.0
    assert score("geometry", "obtuse", "acute", {}) == 0.0
    assert score("chart", "3", "3", {}) == 1.0
    assert score("ocr", "4 A", "4 a", {}) == 1.0
    assert score("grounding", "125 250 500 625", "125 250 500 625", {"box": [0.125, 0.25, 0.5, 0.625]}) == 1.0
    with pytest.raises(ValueError):
        score("nope", "", "", {})
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(1.0, 100) == 0.0
    assert math.isnan(binomial_se(0.5, 0))
