"""The scorers on hand-made predictions whose right scores are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from omnimerge.eval.metrics import (
    anls,
    exact_match,
    levenshtein,
    mean_stderr,
    normalize_vqa_answer,
    relaxed_accuracy,
    vqa_accuracy,
)

TEN = ["red"] * 6 + ["dark red"] * 2 + ["maroon", "Red"]  # "Red" normalises to "red": 7 x red


@pytest.mark.parametrize(("pred", "want"), [
    ("red", 1.0),          # 7 matches: every leave-one-out subset keeps >= 6 -> min(1, 6/3) = 1
    ("dark red", 0.6),     # 2 matches: the 2 "dark red" subsets keep 1 (1/3), the 8 others keep 2 (2/3) -> 0.6
    ("maroon", 0.3),       # 1 match: its own subset 0, the 9 others 1/3 -> 0.3
    ("blue", 0.0),
])
def test_vqa_soft_accuracy_leave_one_out(pred: str, want: float) -> None:
    assert vqa_accuracy(pred, TEN) == pytest.approx(want)


def test_vqa_accuracy_normalises_numbers_and_punctuation() -> None:
    answers = ["2", "2", "two", "3", "3", "3", "2", "4", "2", "2"]  # "two" -> "2": six x "2"
    assert vqa_accuracy("Two.", answers) == pytest.approx(1.0)
    # "3": three matches; their own subsets keep 2 (2/3), the other seven keep 3 (1) -> (2 + 7) / 10
    assert vqa_accuracy("3", answers) == pytest.approx(0.9)
    assert vqa_accuracy("four", answers) == pytest.approx(0.3)


@pytest.mark.parametrize(("raw", "norm"), [
    ("Yes, it is!", "yes it is"),
    ("The dog's ball", "dog 's ball"),      # article dropped, 's split off
    ("dont", "don't"),                       # apostrophe-less contraction restored
    ("couldnt've", "couldn't've"),
    ("3.5 m.", "3.5 m"),                      # a period before a digit stays, others go
    ("left - right", "left right"),          # punctuation touching a space is removed
    ("t-shirt", "t shirt"),                  # elsewhere it becomes a space
    ("None", "0"),
    ("an apple", "apple"),
])
def test_official_vqa_normalisation(raw: str, norm: str) -> None:
    assert normalize_vqa_answer(raw) == norm


@pytest.mark.parametrize(("pred", "target", "want"), [
    ("45", "45", 1.0),
    ("46", "45", 1.0),      # |46 - 45| / 45 = 2.2 % <= 5 %
    ("48", "45", 0.0),      # 6.7 %
    ("30%", "0.3", 1.0),    # a trailing % divides by 100
    ("0.3", "30%", 1.0),
    ("31%", "0.3", 1.0),    # 0.31 vs 0.3: 3.3 %
    ("36%", "0.3", 0.0),    # 20 %
    ("Red", "red", 1.0),    # not numbers: case-insensitive equality
    ("Reds", "red", 0.0),
    ("0", "0", 1.0),        # a zero target compares as strings
    ("0.0", "0", 0.0),
])
def test_relaxed_accuracy(pred: str, target: str, want: float) -> None:
    assert relaxed_accuracy(pred, target) == want


@pytest.mark.parametrize(("pred", "answers", "want"), [
    ("1/8/93", ["1/8/93"], 1.0),
    ("1/8/9", ["1/8/93"], 1 - 1 / 6),                     # one deletion over 6 characters
    ("P Carter", ["P. Carter", "p. carter"], 1 - 1 / 9),  # lower-cased: "p carter" vs "p. carter"
    ("Carter", ["p. carter"], 1 - 3 / 9),
    ("1/8", ["1/8/93"], 0.5),                            # exactly the threshold: kept
    ("xyz", ["1/8/93"], 0.0),                            # similarity 0 < 0.5
    ("  P.   CARTER ", ["p. carter"], 1.0),              # whitespace collapsed, case ignored
])
def test_anls(pred: str, answers: list[str], want: float) -> None:
    assert anls(pred, answers) == pytest.approx(want)


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_exact_match_ignores_case_punctuation_and_spacing() -> None:
    assert exact_match("White.", ["white"]) == 1.0
    assert exact_match("  jane   austen ", ["Jane Austen"]) == 1.0
    assert exact_match("the white", ["white"]) == 0.0
    assert exact_match("b", ["a", "B"]) == 1.0


def test_mean_and_standard_error() -> None:
    mean, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    # sample variance ((0.25^2) * 3 + 0.75^2) / 3 = 0.25; s.e. = sqrt(0.25 / 4)
    assert mean == 0.75 and se == pytest.approx(0.25)
    assert mean_stderr([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_stderr([]))
