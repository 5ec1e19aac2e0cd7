"""Quick-mode end to end: zoo build + bench (two methods, both families) + the CLI's eval command.

The quick zoo trains for a few steps only, so its scores mean nothing; the test checks that every stage runs on
real transformers checkpoints and writes its outputs with the right shape.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from omnimerge.bench import TASKS  # noqa: E402

METHODS = ["task_arithmetic", "weight_average"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLCONFIGDIR", str(tmp_path_factory.mktemp("mpl")))
    from rich.console import Console

    from omnimerge.bench.runner import run_bench

    root = tmp_path_factory.mktemp("zoo")
    out = tmp_path_factory.mktemp("bench")
    console = Console(record=True, width=160)
    res = run_bench(out, methods=METHODS, quick=True, zoo_root=root, console=console)
    return out, {"results": res, "zoo_root": root, "console": console.export_text()}


def test_zoo_layout_and_calibration_record(quick_run: tuple[Path, dict]) -> None:
    _, run = quick_run
    root: Path = run["zoo_root"]
    info = json.loads((root / "zoo.json").read_text())
    assert (root / "base" / "model.safetensors").exists()
    assert (root / "base" / "tokenizer.json").exists() and (root / "base" / "processor_config.json").exists()
    for t in TASKS:
        assert (root / "full" / t / "model.safetensors").exists()
        assert (root / "lora" / t / "adapter_config.json").exists()
        assert (root / "lora" / t / "adapter_model.safetensors").exists()
        assert (root / "lora-merged" / t / "model.safetensors").exists()
    assert (root / "mixture" / "model.safetensors").exists()
    names = {"base", "mixture", *(f"{f}/{t}" for f in ("full", "lora") for t in TASKS)}
    assert set(info["scores"]) == names
    for scores in info["scores"].values():
        assert set(scores) == set(TASKS)
        for s in scores.values():
            assert 0.0 <= s["score"] <= 1.0 and s["n"] == info["config"]["n_test"]
    assert "ok" in info["calibration"]
    assert "zoo calibration, full family" in run["console"]
    assert "zoo calibration, lora family" in run["console"]


def test_results_files_have_the_right_shape(quick_run: tuple[Path, dict]) -> None:
    out, run = quick_run
    res = json.loads((out / "results.json").read_text())
    assert set(res["families"]) == {"full", "lora"}
    for _fam, fr in res["families"].items():
        names = [r["name"] for r in fr["rows"]]
        assert names[:3] == ["Base", "Individual experts", "Mixture training"]
        assert sorted(names[3:]) == sorted(METHODS)
        for r in fr["rows"]:
            assert set(r["scores"]) == set(TASKS)
            assert 0.0 <= r["mean"] <= 1.0 and r["mean_se"] >= 0.0
        ta = next(r for r in fr["rows"] if r["name"] == "task_arithmetic")
        assert ta["scaling"] in res["config"]["lambda_grid"]  # lambda chosen on validation from the grid
        assert set(ta["val_curve"]) == {f"{x:g}" for x in res["config"]["lambda_grid"]}
        wa = next(r for r in fr["rows"] if r["name"] == "weight_average")
        assert wa["scaling"] is None  # no lambda grid for a method without 'scaling'
        indiv = next(r for r in fr["rows"] if r["name"] == "Individual experts")
        assert indiv["normalized"] == pytest.approx(1.0) or math.isnan(indiv["normalized"])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (3 + len(METHODS))
    assert {"family", "method", "avg", "avg_se", "normalized", *TASKS} <= set(rows[0])
    md = (out / "results.md").read_text()
    assert md.count("| Method | λ |") == 2 and "task_arithmetic" in md and "± " in md
    for fam in ("full", "lora"):
        for kind in ("bars", "radar"):
            png = out / f"{kind}_{fam}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert res["timings"]["bench"] > 0
    assert "quick mode" in run["console"]


def test_eval_command_on_a_zoo_checkpoint(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from omnimerge.bench.cli import register

    app = typer.Typer()
    register(app)
    js = tmp_path / "scores.json"
    r = CliRunner().invoke(app, ["eval", str(quick_run[1]["zoo_root"] / "full" / "ocr"), "--suite", "mini",
                                 "--n", "8", "--json", str(js)])
    assert r.exit_code == 0, r.output
    scores = json.loads(js.read_text())
    assert set(scores["scores"]) == set(TASKS) and scores["scores"]["ocr"]["n"] == 8


def test_row_normalised_accuracy_and_discrimination_check() -> None:
    from omnimerge.bench.runner import _row, discrimination

    def res(vals: list[float]) -> dict:
        return {t: {"score": v, "se": 0.01, "n": 500} for t, v in zip(TASKS, vals, strict=True)}

    experts = dict(zip(TASKS, [0.8, 1.0, 0.5, 0.9, 0.6], strict=True))
    row = _row("m", "method", res([0.4, 0.5, 0.5, 0.45, 0.3]), experts)
    assert row["normalized"] == pytest.approx((0.5 + 0.5 + 1.0 + 0.5 + 0.5) / 5)
    assert row["mean"] == pytest.approx(0.43)
    assert row["mean_se"] == pytest.approx((5 * 0.01**2) ** 0.5 / 5)
    base = _row("Base", "reference", res([0.3] * 5), experts)
    ok = discrimination({"families": {"full": {"rows": [base, row]}}})
    assert ok["ok"] and ok["summary"]["full"]["best"] == "m"
    assert ok["summary"]["full"]["gain_over_base"] == pytest.approx(0.13)
    weak = _row("w", "method", res([0.35] * 5), experts)
    bad = discrimination({"families": {"full": {"rows": [base, weak]}}})
    assert not bad["ok"] and "over the base" in bad["failures"][0]
