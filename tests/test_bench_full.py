"""The full miniature benchmark, as `omnimerge bench` runs it (zoo build ≈ 12 min + bench ≈ 4 min on 2 cores).

Marked slow: CI runs the quick version (tests/test_bench_e2e.py); run this with `python -m pytest -q -m slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_full_bench_calibrates_and_discriminates(tmp_path: Path) -> None:
    from omnimerge.bench.runner import run_bench

    res = run_bench(tmp_path / "out", quick=False, enforce=True)
    assert res["checks"]["ok"], res["checks"]["failures"]
    for family in ("full", "lora"):
        s = res["checks"]["summary"][family]
        assert s["gain_over_base"] >= 0.10, (family, s)
        assert s["se_of_gain"] < s["gain_over_base"], (family, s)
    for name in ("results.json", "results.csv", "results.md"):
        assert (tmp_path / "out" / name).is_file()


@pytest.mark.slow
def test_full_modality_bench(tmp_path: Path) -> None:
    import json

    from omnimerge.bench.modality_cli import bench_modality

    bench_modality(tmp_path / "mod")
    res = json.loads((tmp_path / "mod" / "results.json").read_text())
    best_joint = res["best_single"]["joint"]
    merged = {r["name"]: r["columns"]["joint"]["score"] for r in res["rows"] if r["kind"] == "method"}
    assert merged["optmerge"] > best_joint, "the merged LLM should beat every single-modality expert jointly"
