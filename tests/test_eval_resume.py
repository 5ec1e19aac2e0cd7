"""`omnimerge eval --resume`: an evaluation interrupted after some chunks continues from its journal; the
results and predictions equal an uninterrupted run's, only the missing chunks are generated, and a journal of
another evaluation (other data, another model) is not used, saying why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)

import eval_fixtures as F  # noqa: E402
from tiny_vlms import save_tiny_vlm  # noqa: E402

import omnimerge.eval.runner as runner  # noqa: E402
from omnimerge.eval.backends import TransformersBackend  # noqa: E402
from omnimerge.eval.journal import JOURNAL  # noqa: E402

TASKS = ["chartqa", "refcoco"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalresume")
    return {
        "model": save_tiny_vlm("qwen2_vl", root / "model"),
        "chartqa": F.save_disk(F.dataset("chartqa"), root / "chartqa", "test"),
        "refcoco": F.save_jsonl(F.rows("refcoco"), root / "refcoco" / "val.jsonl"),
    }


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(runner, "CHUNK", 2)
    return 2


class _Calls:
    """Counts the backend's generate calls, and raises KeyboardInterrupt (Ctrl-C) on call number ``stop``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop: int | None = None) -> None:
        self.n = 0
        orig = TransformersBackend.generate

        def generate(backend: Any, requests: Any) -> Any:
            self.n += 1
            if stop is not None and self.n == stop:
                raise KeyboardInterrupt
            return orig(backend, requests)

        monkeypatch.setattr(TransformersBackend, "generate", generate)


def _run(world: dict[str, Path], out: Path, notes: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    return runner.evaluate(world["model"], TASKS, out=out, data={t: world[t] for t in TASKS}, batch_size=2,
                           progress=False, echo=(notes.append if notes is not None else None), **kw)


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    strip = ("seconds", "requests_per_s")
    assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def _chunks(world: dict[str, Path], chunk: int, limit: int | None = None) -> int:
    loaded = runner.load_tasks(TASKS, data={t: world[t] for t in TASKS}, limit=limit)
    return sum(-(-len(d.examples) // chunk) for d in loaded.values())


def test_interrupted_evaluation_resumes_with_the_same_results(world, tmp_path: Path, monkeypatch, small_chunks) -> None:  # type: ignore[no-untyped-def]
    ref = _run(world, tmp_path / "ref")
    total = _chunks(world, small_chunks)
    assert total >= 4
    out = tmp_path / "out"
    notes: list[str] = []
    _Calls(monkeypatch, stop=3)
    with pytest.raises(KeyboardInterrupt):
        _run(world, out, notes)
    assert any("--resume to continue" in n for n in notes)
    assert (out / JOURNAL).is_file() and not (out / "results.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(runner, "CHUNK", small_chunks)
    calls = _Calls(monkeypatch)
    notes = []
    res = _run(world, out, notes, resume=True)
    assert calls.n == total - 2  # the two chunks answered before the interruption are not generated again
    assert any(f"resuming an interrupted evaluation: {2 * small_chunks} of" in n for n in notes), notes
    _same(res, ref)
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "ref" / "predictions.jsonl").read_text()
    assert not (out / JOURNAL).exists()


def test_every_answer_journaled_needs_no_model(world, tmp_path: Path, monkeypatch, small_chunks) -> None:  # type: ignore[no-untyped-def]
    ref = _run(world, tmp_path / "ref")
    out = tmp_path / "out"

    def fail(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "write_outputs", fail)
    with pytest.raises(OSError):
        _run(world, out)
    monkeypatch.undo()
    monkeypatch.setattr(runner, "CHUNK", small_chunks)
    import omnimerge.eval.models as models

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded although every answer was journaled")

    monkeypatch.setattr(models, "load_model", no_load)
    with open(out / JOURNAL, "a") as f:
        f.write('{"task": "chartqa", "start": 0, "rows": [{"doc_')  # a torn last line
    res = _run(world, out, resume=True)
    _same(res, ref)
    assert res["backend"] == "TransformersBackend"


def test_other_data_or_no_resume_starts_over(world, tmp_path: Path, monkeypatch, small_chunks) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    _Calls(monkeypatch, stop=3)
    with pytest.raises(KeyboardInterrupt):
        _run(world, out)
    monkeypatch.undo()
    monkeypatch.setattr(runner, "CHUNK", small_chunks)
    calls = _Calls(monkeypatch)
    notes: list[str] = []
    limited = _run(world, out, notes, resume=True, limit=4)
    assert any("not resumed (its tasks and their data differ" in n for n in notes), notes
    assert calls.n == _chunks(world, small_chunks, limit=4)  # everything generated
    _same(limited, _run(world, tmp_path / "fresh", limit=4))
    # a plain run over an interrupted one's journal starts over and says what --resume would have done
    _Calls(monkeypatch, stop=2)
    with pytest.raises(KeyboardInterrupt):
        _run(world, out)
    monkeypatch.undo()
    notes = []
    _run(world, out, notes)
    assert any("--resume would have continued it" in n for n in notes), notes


def test_cli_resume(cli, world, tmp_path: Path, monkeypatch, small_chunks) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    args = ["eval", world["model"], "--tasks", ",".join(TASKS), "--out", out, "--no-progress",
            "--batch-size", "2", *[a for t in TASKS for a in ("--data", f"{t}={world[t]}")]]
    _Calls(monkeypatch, stop=2)
    r = cli(*args)
    assert r.code == 130 and not (out / "results.json").exists(), r.text
    monkeypatch.undo()
    monkeypatch.setattr(runner, "CHUNK", small_chunks)
    r = cli(*args, "--resume")
    assert r.code == 0, r.text
    assert f"resuming an interrupted evaluation: {small_chunks} of" in " ".join(r.err.split())
    ref = tmp_path / "ref"
    assert cli(*[str(a) if a != out else ref for a in args]).code == 0
    _same(json.loads((out / "results.json").read_text()), json.loads((ref / "results.json").read_text()))
