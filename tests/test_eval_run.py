"""`omnimerge eval`: the task pool joined with a backend, on tiny random-weight VLMs and tiny datasets in the
hub's formats.

* a checkpoint evaluated on three tasks (three data layouts) gives per-task, per-capability and overall results;
  its predictions are what the backend generates for the tasks' requests, and `omnimerge score` on the written
  predictions reproduces results.json exactly;
* a backend that answers with the references scores 1 (and one that answers nonsense scores 0): the scores come
  from the task's metric, not from the runner;
* a recipe evaluated in memory gives the same predictions as its merged checkpoint written to disk;
* several models: one folder each and one results.md with a row per model; `--limit` samples with its seed;
* bad inputs are one line, exit 2, found before the model is loaded, and leave no output folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(1)

import eval_fixtures as F  # noqa: E402
from tiny_vlms import save_family, save_tiny_vlm  # noqa: E402

from omnimerge.eval.backends import TransformersBackend  # noqa: E402
from omnimerge.eval.protocol import Generation, Request  # noqa: E402
from omnimerge.eval.registry import get_task  # noqa: E402
from omnimerge.eval.runner import evaluate, expand_tasks, load_tasks  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalrun")
    base = save_tiny_vlm("qwen2_vl", root / "base")
    experts = save_family(base, root / "family")
    return {
        "base": base, "e0": experts[0], "e1": experts[1],
        "chartqa": F.save_disk(F.dataset("chartqa"), root / "chartqa", "test"),
        "vqav2": F.save_parquet(F.dataset("vqav2"), root / "vqav2" / "validation.parquet"),
        "refcoco": F.save_jsonl(F.rows("refcoco"), root / "refcoco" / "val.jsonl"),
    }


def _data(w: dict[str, Path], tasks: tuple[str, ...] = ("chartqa", "vqav2", "refcoco")) -> dict[str, Path]:
    return {t: w[t] for t in tasks}


def _data_args(w: dict[str, Path]) -> list[str]:
    return [a for t in ("chartqa", "vqav2", "refcoco") for a in ("--data", f"{t}={w[t]}")]


def _predictions(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_eval_end_to_end_matches_backend_and_rescoring(cli, world: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "base-eval"
    r = cli("eval", world["base"], "--tasks", "chartqa,vqav2,refcoco", *_data_args(world), "--out", out,
            "--batch-size", "3", "--no-progress")
    assert r.code == 0, r.text
    res = json.loads((out / "results.json").read_text())
    assert res["box_format"] == "qwen2vl" and res["backend"] == "TransformersBackend" and res["model"] == "base"
    loaded = load_tasks(["chartqa", "vqav2", "refcoco"], data=_data(world))
    assert list(res["tasks"]) == ["chartqa", "vqav2", "refcoco"]
    for name, data in loaded.items():
        assert res["tasks"][name]["n"] == len(data.examples) > 0
        assert res["tasks"][name]["capability"] == {"chartqa": "Chart", "vqav2": "VQA", "refcoco": "Grounding"}[name]
    assert set(res["capabilities"]) == {"Chart", "VQA", "Grounding"}
    assert "parse_failure_rate" in res["tasks"]["refcoco"]
    assert "overall" in r.out and "chartqa:" in r.out

    # the predictions are the backend's answers to the tasks' requests, in the split's order
    rows = _predictions(out / "predictions.jsonl")
    backend = TransformersBackend.from_source(world["base"], batch_size=5, progress=False)
    expect: list[tuple[str, int, str]] = []
    for name, data in loaded.items():
        task = data.task
        gens = backend.generate([task.request(ex, "qwen2vl") for ex in data.examples])
        expect += [(name, ex.doc_id, g.text) for ex, g in zip(data.examples, gens, strict=True)]
    assert [(x["task"], x["doc_id"], x["prediction"]) for x in rows] == expect
    assert all(x["image_sizes"] and len(x["image_sizes"][0]) == 2 for x in rows)

    # another harness's view: scoring the written predictions gives the same numbers
    r2 = cli("score", out / "predictions.jsonl", *_data_args(world), "--box-format", "qwen2vl",
             "--out", tmp_path / "rescored")
    assert r2.code == 0, r2.text
    again = json.loads((tmp_path / "rescored" / "results.json").read_text())
    for name in res["tasks"]:
        for key in ("value", "n", "stderr", "parse_failures"):
            assert again["tasks"][name][key] == res["tasks"][name][key], (name, key)
    assert again["overall"]["value"] == res["overall"]["value"]


class _Scripted:
    """A backend that answers each request from a table keyed by prompt (the Backend protocol, no model)."""

    box_format = "normalized"

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls = 0

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        self.calls += 1
        return [Generation(self.answers.get(r.prompt, "zzz"), tuple(im.size for im in r.images)) for r in requests]


def test_scores_come_from_the_tasks_metric(world: dict[str, Path]) -> None:
    loaded = load_tasks(["chartqa", "vqav2"], data=_data(world, ("chartqa", "vqav2")))
    oracle: dict[str, str] = {}
    for data in loaded.values():
        for ex in data.examples:
            oracle[data.task.prompt(ex, "normalized")] = str(ex.references[0])
    good = evaluate(None, ["chartqa", "vqav2"], data=_data(world, ("chartqa", "vqav2")), backend=_Scripted(oracle), progress=False)
    assert good["tasks"]["chartqa"]["value"] == 1.0
    # VQAv2's accuracy: min(1, matches / 3) averaged over the 10 choose 9 annotator subsets, so the first
    # reference scores what the metric gives it, computed here by the task itself
    vqa = get_task("vqav2")
    want = sum(vqa.score(ex, str(ex.references[0])).value for ex in loaded["vqav2"].examples)
    assert good["tasks"]["vqav2"]["value"] == pytest.approx(want / len(loaded["vqav2"].examples))
    assert good["tasks"]["vqav2"]["value"] > 0.5
    bad = evaluate(None, ["chartqa", "vqav2"], data=_data(world, ("chartqa", "vqav2")), backend=_Scripted({}), progress=False)
    assert bad["tasks"]["chartqa"]["value"] == 0.0 and bad["tasks"]["vqav2"]["value"] == 0.0
    assert bad["overall"]["value"] == 0.0 < good["overall"]["value"]


def test_chunks_bound_the_requests_per_call(world: dict[str, Path]) -> None:
    from omnimerge.eval.runner import run_task

    data = load_tasks(["chartqa"], data=_data(world, ("chartqa",)))["chartqa"]
    backend = _Scripted({})
    entry, rows = run_task(backend, data, "normalized", chunk=3)
    assert backend.calls == -(-len(data.examples) // 3) and entry["n"] == len(rows) == len(data.examples)


def test_recipe_in_memory_equals_its_written_merge(cli, world: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = {"base_model": str(world["base"]), "models": [{"model": str(world["e0"])}, {"model": str(world["e1"])}],
              "merge_method": "task_arithmetic", "parameters": {"scaling": 0.7}}
    (tmp_path / "ta.yaml").write_text(yaml.safe_dump(recipe))
    m = cli("merge", tmp_path / "ta.yaml", "-o", tmp_path / "merged", "-q")
    assert m.code == 0, m.text
    r1 = cli("eval", tmp_path / "ta.yaml", "--tasks", "chartqa", *_data_args(world)[:2], "--out", tmp_path / "mem",
             "--no-progress")
    r2 = cli("eval", tmp_path / "merged", "--tasks", "chartqa", *_data_args(world)[:2], "--out", tmp_path / "disk",
             "--no-progress")
    assert r1.code == 0 and r2.code == 0, r1.text + r2.text
    mem, disk = _predictions(tmp_path / "mem" / "predictions.jsonl"), _predictions(tmp_path / "disk" / "predictions.jsonl")
    assert [x["prediction"] for x in mem] == [x["prediction"] for x in disk]
    assert json.loads((tmp_path / "mem" / "results.json").read_text())["model"] == "ta"


def test_several_models_one_table_and_limit(cli, world: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cmp"
    r = cli("eval", world["base"], world["e0"], "--tasks", "vqav2", "--data", f"vqav2={world['vqav2']}",
            "--limit", "2", "--seed", "3", "--out", out, "--no-progress")
    assert r.code == 0, r.text
    assert (out / "base" / "results.json").is_file() and (out / "expert0" / "results.json").is_file()
    table = (out / "results.md").read_text().splitlines()
    assert table[:4] == ["| model | VQA | Avg. |", "|---|---:|---:|", table[2], table[3]]
    assert [line.split(" | ")[0] for line in table[2:4]] == ["| base", "| expert0"]
    a = _predictions(out / "base" / "predictions.jsonl")
    b = _predictions(out / "expert0" / "predictions.jsonl")
    assert len(a) == len(b) == 2 and [x["doc_id"] for x in a] == [x["doc_id"] for x in b]
    again = load_tasks(["vqav2"], data={"vqav2": world["vqav2"]}, limit=2, seed=3)["vqav2"]
    assert [x["doc_id"] for x in a] == [e.doc_id for e in again.examples]


def test_task_shorthands() -> None:
    assert expand_tasks(["ocr"]) == ["textvqa", "ocrvqa", "ocrbench", "docvqa"]
    assert expand_tasks(["paper"])[:3] == ["vizwiz", "gqa", "mathvista"] and len(expand_tasks(["paper"])) == 10
    assert expand_tasks(["chartqa", " ", "Grounding"]) == ["chartqa", "refcoco", "refcoco_plus", "refcocog"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--tasks", "chartqa,frobnicate"], "unknown task 'frobnicate'"),
    (["--tasks", ","], "no task to evaluate"),
    (["--tasks", "chartqa", "--data", "gqa=/nowhere"], "not among the tasks evaluated"),
    (["--tasks", "chartqa", "--data", "chartqa"], "expected TASK=VALUE"),
    (["--tasks", "chartqa", "--limit", "0"], "limit must be at least 1"),
    (["--tasks", "chartqa", "--box-format", "pixels"], "unknown box format 'pixels'"),
    (["--tasks", "chartqa", "--split", "test", "--split", "chartqa=test"], "not both"),
    (["--tasks", "chartqa", "--dtype", "int4"], "--dtype"),
])
def test_bad_inputs_before_the_model_loads(cli, tmp_path: Path, args: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "never"
    r = cli("eval", tmp_path / "no-such-model", *args, "--out", out)   # the model is not even looked at
    assert r.code == 2, r.text
    assert needle in r.err and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not out.exists()


def test_bad_data_and_bad_model_are_one_line(cli, world: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wrong = F.save_disk(F.dataset("vqav2"), tmp_path / "wrong", "test")   # a VQAv2 table given as ChartQA
    r = cli("eval", tmp_path / "no-such-model", "--tasks", "chartqa", "--data", f"chartqa={wrong}",
            "--out", tmp_path / "o1")
    assert r.code == 2 and "chartqa" in r.err and "no field 'answer'" in r.err, r.err
    r = cli("eval", tmp_path / "no-such-model", "--tasks", "chartqa", "--data", f"chartqa={world['chartqa']}",
            "--out", tmp_path / "o2")
    assert r.code == 2 and "no-such-model" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "internvl", "llava"])
def test_each_family_end_to_end(family: str, world: dict[str, Path], tmp_path: Path) -> None:
    """Through each family's processor and chat template; the family's box convention from its config."""
    model = save_tiny_vlm(family, tmp_path / family)
    res = evaluate(model, ["refcoco", "chartqa"], data=_data(world, ("refcoco", "chartqa")), out=tmp_path / "out",
                   batch_size=4, progress=False)
    fmt = {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen25vl", "internvl": "internvl", "llava": "normalized"}[family]
    assert res["box_format"] == fmt
    rows = _predictions(tmp_path / "out" / "predictions.jsonl")
    assert len(rows) == res["tasks"]["refcoco"]["n"] + res["tasks"]["chartqa"]["n"]
    assert all(isinstance(x["prediction"], str) and x["prompt"] for x in rows)
    # the prompt asks for boxes in the family's own convention
    ex = load_tasks(["refcoco"], data=_data(world, ("refcoco",)))["refcoco"].examples[0]
    assert rows[0]["prompt"] == get_task("refcoco").prompt(ex, fmt)
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "results.png").is_file()
