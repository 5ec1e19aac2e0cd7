"""``omnimerge search`` on the task pool (the paper's benchmarks through the ``omnimerge eval`` loop), on a tiny
random-weight Qwen2-VL family and a ChartQA-format dataset with a validation and a test split: the search runs
and writes its outputs; the winner's reported test score is what ``omnimerge eval best.yaml`` measures on the
test split; a search split that is also the reporting split is refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

torch.set_num_threads(1)

from tiny_vlms import save_family, save_tiny_vlm  # noqa: E402

from omnimerge.search.run import run_search  # noqa: E402


def _chartqa(root: Path, base: Path) -> Path:
    """ChartQA-format splits whose answers are what the base model says: the base scores 1, a merge that moves
    the weights far scores less, so the scores compared below are not all zero."""
    from omnimerge.eval.backends import TransformersBackend
    from omnimerge.eval.registry import get_task

    feats = Features({"type": Value("string"), "question": Value("string"), "answer": Value("string"),
                      "image": Image()})

    def rows(n: int, off: int) -> list[dict]:
        return [{"type": "human_test" if i % 2 else "augmented_test", "question": f"What is bar {i + off}?",
                 "answer": "?", "image": PILImage.new("RGB", (40 + i, 30), (9 * i % 255, 40, 90))}
                for i in range(n)]

    splits = {"val": rows(10, 0), "test": rows(5, 100)}
    DatasetDict({k: Dataset.from_list(v, features=feats) for k, v in splits.items()}).save_to_disk(
        str(root / "draft"))
    task, backend = get_task("chartqa"), TransformersBackend.from_source(base, batch_size=8, progress=False)
    for split, rs in splits.items():
        data = task.load(root / "draft", split=split)
        gens = backend.generate([task.request(ex, backend.box_format) for ex in data.examples])
        for ex, g in zip(data.examples, gens, strict=True):
            rs[ex.doc_id]["answer"] = g.text.strip() or "-"
    DatasetDict({k: Dataset.from_list(v, features=feats) for k, v in splits.items()}).save_to_disk(
        str(root / "chartqa"))
    return root / "chartqa"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search-tasks")
    base = save_tiny_vlm("qwen2_vl", root / "base")
    e0, e1 = save_family(base, root / "family", scale=0.5)
    return {"root": root, "base": base, "e0": e0, "e1": e1, "data": _chartqa(root, base)}


def _recipe(path: Path, fam: dict[str, Path], **objective: object) -> Path:
    recipe = {
        "base_model": str(fam["base"]), "models": [{"model": str(fam["e0"])}, {"model": str(fam["e1"])}],
        "merge_method": "task_arithmetic", "parameters": {"scaling": 1.0},
        "search": {"objective": {"tasks": ["chartqa"], "split": "val", "limit": 4, "fresh": 3,
                                 "data": {"chartqa": str(fam["data"])}, "batch_size": 4, **objective},
                   "weights": [0.0, 0.6], "sampler": "random", "top": 2},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_task_pool_search_reports_what_eval_measures(family: dict[str, Path], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    summary = run_search(_recipe(tmp_path / "s.yaml", family), 3, out, seed=1, echo=lambda _m: None)
    for f in ("best.yaml", "trials.csv", "summary.json", "history.png", "coefficients.png"):
        assert (out / f).is_file(), f
    with open(out / "trials.csv") as fh:
        assert len([r for r in csv.DictReader(fh) if r["state"] == "COMPLETE"]) == 3
    s = json.loads((out / "summary.json").read_text())
    assert s["sizes"] == {"validation": 4, "fresh": 3, "test": 5}
    best = s["best"]
    assert best["validation"]["tasks"]["chartqa"]["n"] == 4 and best["test"]["tasks"]["chartqa"]["n"] == 5
    assert summary["best"]["test"] == best["test"]
    # the base answers its own answers: the method at weights 0 would score 1; the trials' scores vary
    with open(out / "trials.csv") as fh:
        vals = {round(float(r["value"]), 6) for r in csv.DictReader(fh) if r["state"] == "COMPLETE"}
    assert len(vals) > 1 or vals != {0.0}
    # the reported test score is what omnimerge eval measures for best.yaml on the test split
    r = cli("eval", out / "best.yaml", "--tasks", "chartqa", "--data", f"chartqa={family['data']}",
            "--split", "test", "--out", tmp_path / "ev", "--no-progress")
    assert r.code == 0, r.text
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())["tasks"]["chartqa"]
    assert ev["n"] == 5
    assert 0.0 < best["test"]["tasks"]["chartqa"]["score"] < 1.0   # neither the base nor all wrong: a real check
    assert ev["value"] == pytest.approx(best["test"]["tasks"]["chartqa"]["score"], abs=1e-12)


def test_search_split_must_not_be_the_reporting_split(family: dict[str, Path], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("search", _recipe(tmp_path / "bad.yaml", family, split="test"), "--trials", "2",
            "--out", tmp_path / "o")
    assert r.code == 2 and "also its reporting split" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = cli("search", _recipe(tmp_path / "bad2.yaml", family, limit=10, fresh=1), "--trials", "2",
            "--out", tmp_path / "o2")
    assert r.code == 2 and "usable examples" in r.err, r.err
