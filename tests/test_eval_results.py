"""The paper's aggregation, the output files, and ``omnimerge score`` end to end on predictions from another
harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnimerge.eval import PAPER_TASKS, aggregate, render_markdown
from omnimerge.eval.results import write_outputs
from tests import eval_fixtures as F


def _entry(value: float, stderr: float = 0.0, paper: float | None = None) -> dict:
    e = {"value": value, "stderr": stderr, "n": 10}
    if paper is not None:
        e["paper_value"] = paper
    return e


def test_aggregation_is_the_papers() -> None:
    vals = dict(zip(PAPER_TASKS, [0.3, 0.5, 0.6, 0.2, 0.7, 0.8, 0.4, 0.9, 0.8, 0.7], strict=True))
    tasks = {n: _entry(v) for n, v in vals.items()}
    tasks["mathvista"] = _entry(0.6, paper=0.5)      # the geometry-subset mean replaces the overall accuracy
    agg = aggregate(tasks)
    caps = agg["capabilities"]
    assert caps["VQA"]["value"] == pytest.approx((0.3 + 0.5) / 2)
    assert caps["Geometry"]["value"] == pytest.approx((0.5 + 0.2) / 2)
    assert caps["Chart"]["value"] == pytest.approx(0.7)
    assert caps["OCR"]["value"] == pytest.approx((0.8 + 0.4) / 2)
    assert caps["Grounding"]["value"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    ten = [0.3, 0.5, 0.5, 0.2, 0.7, 0.8, 0.4, 0.9, 0.8, 0.7]
    assert agg["overall"]["value"] == pytest.approx(sum(ten) / 10)   # the mean over tasks, not capabilities
    assert agg["overall"]["paper_avg"] == pytest.approx(sum(ten) / 10)
    assert aggregate(tasks, paper_geometry=False)["capabilities"]["Geometry"]["value"] == pytest.approx(0.4)
    del tasks["refcocog"]
    assert aggregate(tasks)["overall"]["paper_avg"] is None


def test_capability_standard_error_combines_independent_tasks() -> None:
    agg = aggregate({"vizwiz": _entry(0.4, 0.03), "gqa": _entry(0.6, 0.04)})
    assert agg["capabilities"]["VQA"]["stderr"] == pytest.approx(0.05 / 2)   # sqrt(0.03² + 0.04²) / 2


def test_write_outputs(tmp_path: Path) -> None:
    res = {"model": "merged-ties", "box_format": "qwen2vl",
           "tasks": {"chartqa": {**_entry(0.5, 0.1), "metric": "relaxed_accuracy"}},
           **aggregate({"chartqa": _entry(0.5, 0.1)})}
    other = {**res, "model": "base", "capabilities": {"Chart": {"value": 0.25, "stderr": 0.1}},
             "overall": {"value": 0.25, "stderr": 0.1}}
    paths = write_outputs(tmp_path / "out", res, [{"task": "chartqa", "doc_id": 0, "score": 1.0}], others=[other])
    assert json.loads(paths["results"].read_text())["model"] == "merged-ties"
    assert [json.loads(x) for x in paths["predictions"].read_text().splitlines()] == [
        {"task": "chartqa", "doc_id": 0, "score": 1.0}]
    md = paths["markdown"].read_text().splitlines()
    assert md[0] == "| model | Chart | Avg. |"
    assert md[2] == "| base | 25.00 | 25.00 |" and md[3] == "| merged-ties | 50.00 | 50.00 |"
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "predictions.jsonl", "results.json", "results.md", "results.png"]   # no temporary file left


def test_markdown_marks_missing_capabilities() -> None:
    a = {"model": "a", "tasks": {"chartqa": _entry(0.5)}, **aggregate({"chartqa": _entry(0.5)})}
    b = {"model": "b", "tasks": {"gqa": _entry(0.4)}, **aggregate({"gqa": _entry(0.4)})}
    lines = render_markdown([a, b]).splitlines()
    assert lines[0] == "| model | VQA | Chart | Avg. |"
    assert lines[2] == "| a | – | 50.00 | 50.00 |" and lines[3] == "| b | 40.00 | – | 40.00 |"


# --- omnimerge score ---------------------------------------------------------------------------------------------

@pytest.fixture
def harness(tmp_path: Path) -> dict[str, Path]:
    """Data in three layouts and a predictions file as another harness writes it (no prompts, no scores)."""
    chart = F.save_disk(F.dataset("chartqa"), tmp_path / "chartqa", "test")
    ref = F.save_parquet(F.dataset("refcoco"), tmp_path / "refcoco" / "val.parquet")
    vista = F.save_jsonl(F.rows("mathvista"), tmp_path / "mathvista" / "testmini.jsonl")
    rows = [
        {"task": "chartqa", "doc_id": 0, "prediction": "45"},
        {"task": "chartqa", "doc_id": 2, "prediction": "30%"},
        {"task": "chartqa", "doc_id": 3, "prediction": "Blue"},
        {"task": "refcoco", "doc_id": 0, "expression": 0,
         "prediction": "<|object_ref_start|>man on left<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"},
        {"task": "refcoco", "doc_id": 0, "expression": 1, "prediction": "I do not know"},
        {"task": "refcoco", "doc_id": 1, "prediction": "(0,0),(500,500)"},   # a single expression: index implied
        {"task": "mathvista", "doc_id": 0, "prediction": "D"},
        {"task": "mathvista", "doc_id": 1, "prediction": "12"},
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"chart": chart, "ref": ref, "vista": vista, "preds": preds, "out": tmp_path / "scored"}


def _score(cli, h: dict[str, Path], *extra: str):  # type: ignore[no-untyped-def]
    return cli("score", h["preds"], "--data", f"chartqa={h['chart']}", "--data", f"refcoco={h['ref']}",
               "--data", f"mathvista={h['vista']}", "--box-format", "qwen2vl", "--out", h["out"], *extra)


def test_score_end_to_end(cli, harness: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    r = _score(cli, harness, "--model", "expert-x")
    assert r.code == 0, r.text
    res = json.loads((harness["out"] / "results.json").read_text())
    t = res["tasks"]
    assert t["chartqa"]["value"] == pytest.approx(2 / 3) and t["chartqa"]["n"] == 3
    assert t["refcoco"]["value"] == pytest.approx(2 / 3) and t["refcoco"]["parse_failure_rate"] == pytest.approx(1 / 3)
    assert t["mathvista"]["value"] == 1.0 and t["mathvista"]["paper_value"] == 1.0
    assert res["capabilities"]["Grounding"]["value"] == pytest.approx(2 / 3)
    assert res["overall"]["value"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert res["box_format"] == "qwen2vl" and res["model"] == "expert-x"
    rows = [json.loads(x) for x in (harness["out"] / "predictions.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert rows[3]["expression"] == 0 and rows[5]["expression"] == 0 and "expression" not in rows[0]
    assert rows[3]["prompt"].endswith("describes: man on left")   # filled in from the task for the family
    assert rows[3]["references"] == [[20.0, 10.0, 100.0, 50.0]]
    md = (harness["out"] / "results.md").read_text()
    assert md.splitlines()[0] == "| model | Geometry | Chart | Grounding | Avg. |"
    assert "| expert-x | 100.00 | 66.67 | 66.67 | 77.78 |" in md
    assert (harness["out"] / "results.png").is_file()
    assert "chartqa: relaxed_accuracy 66.67" in r.out


def test_score_same_predictions_other_box_format(cli, harness: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    r = cli("score", harness["preds"], "--data", f"chartqa={harness['chart']}", "--data",
            f"refcoco={harness['ref']}", "--data", f"mathvista={harness['vista']}", "--out", harness["out"])
    assert r.code == 0, r.text
    res = json.loads((harness["out"] / "results.json").read_text())
    assert res["tasks"]["refcoco"]["value"] == 0.0   # 0-1000 boxes read as normalised: lmms-eval's failure


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("rows", "message"), [
    ([{"task": "mmmu", "doc_id": 0, "prediction": "x"}], "unknown task 'mmmu'"),
    ([{"task": "chartqa", "doc_id": 9, "prediction": "x"}], "chartqa has no example doc_id 9"),
    ([{"task": "chartqa", "prediction": "x"}], "the row has no 'doc_id'"),
    ([{"task": "chartqa", "doc_id": 0, "prediction": "x"}] * 2, "a second prediction for chartqa doc_id 0"),
    ([{"task": "refcoco", "doc_id": 0, "prediction": "x"}], "row 0 holds 2 examples; the prediction needs "
                                                           "'expression'"),
    ([{"task": "refcoco", "doc_id": 0, "expression": 5, "prediction": "x"}], "no example doc_id 0, expression 5"),
])
def test_score_bad_predictions(cli, harness: dict[str, Path], rows: list[dict], message: str) -> None:  # type: ignore[no-untyped-def]
    _write(harness["preds"], rows)
    r = _score(cli, harness)
    assert r.code == 2 and message in r.text and "Traceback" not in r.text
    assert len(r.err.strip().splitlines()) == 1
    assert not harness["out"].exists()   # nothing written


def test_score_bad_arguments(cli, harness: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("score", tmp_path / "none.jsonl", "--out", harness["out"])
    assert r.code == 2 and "no such predictions file" in r.text
    r = cli("score", harness["preds"], "--data", "chartqa", "--out", harness["out"])
    assert r.code == 2 and "expected TASK=VALUE" in r.text
    r = cli("score", harness["preds"], "--data", f"chartqa={tmp_path / 'nowhere'}", "--out", harness["out"])
    assert r.code == 2 and "no such file or folder" in r.text
    r = _score(cli, harness, "--box-format", "pixels")
    assert r.code == 2 and "unknown box format 'pixels'" in r.text
    assert not harness["out"].exists()


def test_score_accepts_task_names_as_typed(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = F.save_disk(F.dataset("refcoco_plus"), tmp_path / "rp", "val")
    preds = _write(tmp_path / "p.jsonl", [{"task": "RefCOCO+", "doc_id": 1, "prediction": "[0, 0, 0.5, 1]"}])
    r = cli("score", preds, "--data", f"refcoco+={ref}", "--out", tmp_path / "o")
    assert r.code == 0, r.text
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(res["tasks"]) == ["refcoco_plus"] and res["tasks"]["refcoco_plus"]["value"] == 1.0
