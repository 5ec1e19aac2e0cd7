"""Multi-seed aggregation of the benchmark (``omnimerge bench --seeds``): parsing, statistics, orderings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omnimerge.bench import TASKS
from omnimerge.bench.seeds import (
    aggregate_mini,
    aggregate_modality,
    mini_markdown,
    modality_markdown,
    parse_seeds,
)


def test_parse_seeds() -> None:
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3") == [3]
    assert parse_seeds("0-3, 7") == [0, 1, 2, 3, 7]
    for bad in ("", "a", "1,1", "-1", "0,x", "1.5"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_cli_rejects_bad_seeds_in_one_line(cli) -> None:  # type: ignore[no-untyped-def]
    res = cli("bench", "--seeds", "0,zero", "--out", "unused")
    assert res.code == 2
    assert "--seeds" in res.err and "'zero'" in res.err and "Traceback" not in res.text
    assert len(res.err.strip().splitlines()) == 1


# one family, three methods and the base, over three seeds: per-seed means are chosen so that A > B on every
# seed, C swaps with B on seed 2, and everything beats the base except C on seed 0
MEANS = {"Base": [0.30, 0.32, 0.31], "A": [0.60, 0.62, 0.58], "B": [0.50, 0.52, 0.40], "C": [0.29, 0.51, 0.45]}


def _mini_seed(k: int, shortfall: bool = False) -> dict:
    rows = []
    for name, per in MEANS.items():
        m = per[k]
        rows.append({"name": name, "kind": "reference" if name == "Base" else "method", "mean": m, "mean_se": 0.01,
                     "normalized": m / 0.9, "scores": {t: {"score": m} for t in TASKS},
                     "scaling": None if name == "Base" else 0.5})
    zoo = {"base": {t: {"score": 0.3} for t in TASKS}}
    for t in TASKS:
        zoo[f"full/{t}"] = {u: {"score": (0.9 - 0.1 * k if u == t else 0.2)} for u in TASKS}
    return {"families": {"full": {"rows": rows}}, "zoo_scores": zoo,
            "zoo_calibration": {"ok": not shortfall, "failures": ["full/vqa: gain +20 (< 25)"] if shortfall else []},
            "calibration_status": "shortfall" if shortfall else "ok", "failed_methods": []}


def test_aggregate_mini_statistics_and_orderings() -> None:
    per = [_mini_seed(0), _mini_seed(1), _mini_seed(2, shortfall=True)]
    agg = aggregate_mini(per, [0, 1, 2])
    json.dumps(agg)  # results.json must be serialisable
    rows = {r["name"]: r for r in agg["families"]["full"]["rows"]}
    b = rows["B"]["mean"]
    assert b["mean"] == pytest.approx(np.mean(MEANS["B"]))
    assert b["sd"] == pytest.approx(np.std(MEANS["B"], ddof=1))
    assert (b["min"], b["max"]) == (0.40, 0.52) and b["per_seed"] == MEANS["B"]
    o = agg["families"]["full"]["orderings"]
    assert o["wins"]["A"]["B"] == 3 and o["wins"]["B"]["A"] == 0
    assert o["wins"]["B"]["C"] == 2 and o["wins"]["C"]["B"] == 1
    assert o["pairs"] == 3 and o["consistent_pairs"] == 2  # A-B, A-C hold on every seed; B-C does not
    assert o["best_per_seed"] == ["A", "A", "A"]
    assert o["beats_base_seeds"] == {"A": 3, "B": 3, "C": 2}
    assert o["ranks_per_seed"][2] == {"A": 1, "C": 2, "B": 3}
    gain = agg["calibration"]["gains"]["full/vqa"]["gain_over_base"]
    assert (gain["min"], gain["max"]) == (pytest.approx(0.4), pytest.approx(0.6))
    assert agg["per_seed_calibration_ok"] == [True, True, False]
    md = mini_markdown(agg)
    assert "shortfall on seed(s) 2" in md and "2 of 3 method pairs keep their order on every seed" in md
    assert "C (2/3)" in md and "+40.0 / +50.0 / +60.0" in md


def test_aggregate_mini_reports_a_failed_method() -> None:
    per = [_mini_seed(0), _mini_seed(1)]
    bad = next(r for r in per[1]["families"]["full"]["rows"] if r["name"] == "C")
    for k in ("mean", "mean_se", "normalized", "scores"):
        bad.pop(k)
    bad["failed"] = "ValueError: boom"
    agg = aggregate_mini(per, [0, 1])
    row = next(r for r in agg["families"]["full"]["rows"] if r["name"] == "C")
    assert row["failed"] == "seed 1: ValueError: boom" and "mean" not in row
    assert "C" not in agg["families"]["full"]["orderings"]["wins"]
    assert "**failed**: seed 1: ValueError: boom" in mini_markdown(agg)


def _modality_seed(joint: dict[str, float], best: float) -> dict:
    cols = ("audio", "vision", "video")
    rows = [{"name": n, "kind": "expert" if n.endswith("expert") else "method", "lambda": None,
             "columns": {c: {"score": 0.9, "se": 0.01} for c in cols} | {"joint": {"score": j, "se": 0.02}}}
            for n, j in joint.items()]
    return {"rows": rows, "best_single": {c: 0.9 for c in cols} | {"joint": best}, "seconds": 1.0}


def test_aggregate_modality_signs_per_seed() -> None:
    per = [_modality_seed({"audio expert": 0.5, "m1": 0.6, "m2": 0.45}, 0.5),
           _modality_seed({"audio expert": 0.55, "m1": 0.6, "m2": 0.58}, 0.55)]
    agg = aggregate_modality(per, [0, 1])
    rows = {r["name"]: r for r in agg["rows"]}
    assert rows["m1"]["beats_best_single_seeds"] == 2 and rows["m2"]["beats_best_single_seeds"] == 1
    assert rows["m1"]["joint_minus_best_single"]["per_seed"] == [pytest.approx(0.1), pytest.approx(0.05)]
    md = modality_markdown(agg)
    assert "on every seed: m1;" in md and "m2 (1/2)" in md and "60.0 ± 2.0, 60.0 ± 2.0" in md
