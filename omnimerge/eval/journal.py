"""The answers of an evaluation as it runs, so that an interrupted one can be resumed (``omnimerge eval --resume``).

With an output folder, :func:`~omnimerge.eval.runner.evaluate` appends one JSON line per answered chunk to
``OUT/.omnimerge-eval-journal.jsonl`` (after a first line with the run's fingerprint: the model's files, every
task's data and examples, and the settings that change what a model answers: device, dtype, batch size,
processor options, chunk size, backend, omnimerge's version). A resumed run with the same fingerprint keeps each
task's answered chunks from its first example on, scores them again (scoring is deterministic: only the answers
are reused), and generates the rest. Chunks are the unit because a backend batches within one chunk: the same
chunks give the same batches, so the results equal an uninterrupted run's. The journal is removed once
``results.json`` is written.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omnimerge.errors import OutputError
from omnimerge.eval.registry import TaskData

JOURNAL = ".omnimerge-eval-journal.jsonl"
_MODEL_FILES = (".safetensors", ".json", ".bin", ".yaml", ".yml", ".model", ".txt", ".jinja")


def _digest(obj: Any) -> str:
    import xxhash

    return xxhash.xxh3_128(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _files_of(path: Path) -> list[list[Any]]:
    """(name, size, mtime) of a model folder's files (or of one file)."""
    if path.is_file():
        st = path.stat()
        return [[str(path.resolve()), st.st_size, st.st_mtime_ns]]
    out = []
    for p in sorted(path.iterdir()) if path.is_dir() else []:
        if p.is_file() and p.suffix in _MODEL_FILES:
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return [[str(path.resolve())], *out]


def fingerprint(model: Any, base: Any, merge_parameters: Any, loaded: Mapping[str, TaskData],
                settings: Mapping[str, Any]) -> dict[str, str]:
    """What determines the answers, digested per part (the parts that differ are named when a journal is not
    resumed)."""
    from omnimerge import __version__

    def identity(ref: Any) -> Any:
        if ref is None or isinstance(ref, Mapping):
            return ref
        p = Path(os.fspath(ref)).expanduser()
        if p.exists():
            ident: list[Any] = _files_of(p)
            if p.suffix in (".yaml", ".yml") and p.is_file():  # a recipe: its text (its inputs' files are not
                ident.append(p.read_text(encoding="utf-8", errors="replace"))  # followed: see the docs)
            return ident
        return str(ref)  # a hub id in the local cache

    tasks = {name: [d.source, d.split, d.limit, d.seed, d.n_rows,
                    _digest([[e.doc_id, e.sub] for e in d.examples])] for name, d in loaded.items()}
    return {
        "omnimerge version": __version__,
        "model": _digest([identity(model), identity(base), merge_parameters]),
        "tasks and their data": _digest(tasks),
        "settings": _digest(dict(settings)),
    }


class EvalJournal:
    """Reads an earlier run's journal in ``out`` (:meth:`done`) and appends this run's chunks (:meth:`add`)."""

    def __init__(self, out: Path, fp: Mapping[str, str], resume: bool,
                 echo: Callable[[str], None] | None = None) -> None:
        self.path = out / JOURNAL
        self.fp = dict(fp)
        self.echo = echo
        self._fd = -1
        #: per task: the rows of its answered chunks, contiguous from the first example; and their box format
        self.chunks: dict[str, dict[int, list[dict[str, Any]]]] = {}
        self.box_format: str | None = None
        self.backend: str | None = None
        self._kept: list[tuple[str, int, list[dict[str, Any]]]] = []  # chunks taken over (written again)
        if self.path.is_file():
            if resume:
                self._read()
            elif echo:
                echo(f"{self.path}: an unfinished evaluation's answers are replaced (--resume would have continued "
                     f"it)")

    def _read(self) -> None:
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError:
            return
        head: Any = None
        with contextlib.suppress(ValueError, IndexError):
            head = json.loads(lines[0])
        old = head.get("fingerprint") if isinstance(head, dict) else None
        if old != self.fp:
            if self.echo:
                if isinstance(old, dict):
                    changed = sorted(k for k in set(old) | set(self.fp) if old.get(k) != self.fp.get(k))
                    why = f"its {', '.join(changed)} differ from this run's"
                else:
                    why = "it has no readable fingerprint"
                self.echo(f"{self.path}: not resumed ({why}); evaluating from the start")
            return
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                task, start, rows = entry["task"], int(entry["start"]), entry["rows"]
            except (ValueError, TypeError, KeyError):  # the torn last line of an interrupted run, or garbage
                continue
            if not isinstance(task, str) or not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                continue
            self.chunks.setdefault(task, {})[start] = rows
            self.box_format = entry.get("box_format", self.box_format)
            self.backend = entry.get("backend", self.backend)

    def done(self, task: str, sub_key: str | None, examples: list[Any], chunk: int) -> list[dict[str, Any]]:
        """The rows of ``task``'s examples answered by the earlier run: whole chunks from the first example on,
        each row checked against the example it answers (``doc_id``, and ``sub_key`` for rows that hold several
        examples)."""
        got = self.chunks.get(task, {})
        rows: list[dict[str, Any]] = []
        for start in range(0, len(examples), chunk):
            part = got.get(start)
            want = examples[start:start + chunk]
            if part is None or len(part) != len(want):
                break
            if any(r.get("doc_id") != e.doc_id or (sub_key is not None and r.get(sub_key) != e.sub)
                   or not isinstance(r.get("prediction"), str) for r, e in zip(part, want, strict=True)):
                break
            rows.extend(part)
            self._kept.append((task, start, part))
        return rows

    def start(self) -> None:
        """Begin this run's journal: the earlier run's chunks taken over are written again after the fingerprint
        (so that this run, interrupted in turn, loses nothing)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".new")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"fingerprint": self.fp}, sort_keys=True) + "\n")
                for task, start, rows in self._kept:
                    f.write(self._line(task, start, rows, self.box_format, self.backend))
            os.replace(tmp, self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write the evaluation journal ({e.strerror or e})") from None

    def add(self, task: str, start: int, rows: list[dict[str, Any]], box_format: str, backend: str) -> None:
        if self._fd < 0:
            self.start()
        data = self._line(task, start, rows, box_format, backend).encode("ascii")
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write the evaluation journal ({e.strerror or e})") from None

    @staticmethod
    def _line(task: str, start: int, rows: list[dict[str, Any]], box_format: str | None,
              backend: str | None) -> str:
        return json.dumps({"task": task, "start": start, "box_format": box_format, "backend": backend,
                           "rows": rows}, ensure_ascii=True) + "\n"

    def close(self, finished: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if finished:
            self.path.unlink(missing_ok=True)
            self.path.with_name(self.path.name + ".new").unlink(missing_ok=True)
