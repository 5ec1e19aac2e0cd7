"""The task pool: what a task is, the registry of tasks by the names users type, and the capability groups.

A :class:`Task` declares its dataset (hub id, config, standard split), the fields it reads, how a row becomes
examples (RefCOCO rows with several referring expressions, OCR-VQA rows with several questions: one example
each), the prompt, the generation length, and how a generation is scored. ``Task.load`` reads a split from any
source :mod:`omnimerge.eval.data` accepts; ``Task.request`` makes the :class:`~omnimerge.eval.protocol.Request`
a backend answers; ``Task.score`` scores the :class:`~omnimerge.eval.protocol.Generation` (or raw text).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omnimerge.errors import OmniMergeError
from omnimerge.eval.data import (
    DataError,
    ImageRef,
    Rows,
    decode_image,
    image_refs,
    image_size,
    open_split,
    stratified_sample,
)
from omnimerge.eval.protocol import BOX_FORMATS, Generation, Request

__all__ = [
    "CAPABILITIES",
    "PAPER_TASKS",
    "Example",
    "Score",
    "Task",
    "TaskData",
    "capability_of",
    "get_task",
    "register",
    "task_names",
]

#: the paper's capability groups, in its table's column order, and the pool's tasks in each
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "VQA": ("vizwiz", "gqa", "vqav2"),
    "Geometry": ("mathvista", "mathvision", "geometry3k"),
    "Chart": ("chartqa",),
    "OCR": ("textvqa", "ocrvqa", "ocrbench", "docvqa"),
    "Grounding": ("refcoco", "refcoco_plus", "refcocog"),
}
#: the ten sets whose unweighted mean is the paper's "Avg." column, in its order
PAPER_TASKS = ("vizwiz", "gqa", "mathvista", "mathvision", "chartqa", "textvqa", "ocrvqa", "refcoco",
               "refcoco_plus", "refcocog")


@dataclass(frozen=True)
class Example:
    """One scored item: row ``doc_id`` of the split as loaded (and, for rows holding several, the ``sub``-th
    referring expression or question), the text its prompt is built from, its references, what scoring needs
    (``info``), the breakdown groups it belongs to, and its images (undecoded until a request needs them) with
    their original (width, height) where read."""

    task: str
    doc_id: int
    sub: int | None
    question: str
    references: tuple[Any, ...]
    info: Mapping[str, Any] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    stratum: str | None = None
    images: tuple[ImageRef, ...] = ()
    image_sizes: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Score:
    """A generation's score in [0, 1]; ``parsed`` is False when no answer (a box, a choice, a number) could be
    extracted from the text (then the score is 0); ``extracted`` is the answer that was scored."""

    value: float
    parsed: bool = True
    extracted: str | None = None
    extra: Mapping[str, float] = field(default_factory=dict)


@dataclass
class TaskData:
    """A task's examples as loaded: the split, where it came from, its size as stored, how many examples the
    rows expand to, and the examples kept (sampled with ``limit``; those whose image could not be decoded are
    counted in ``skipped``, with the reason of the first)."""

    task: Task
    split: str
    source: str
    n_rows: int
    n_examples: int
    examples: list[Example]
    skipped: int = 0
    skip_reason: str | None = None
    skipped_ids: set[tuple[int, int | None]] = field(default_factory=set)
    limit: int | None = None
    seed: int = 0

    def find(self, doc_id: int, sub: int | None) -> Example | None:
        """The example of row ``doc_id`` (expression/question ``sub``), or None."""
        if not hasattr(self, "_index"):
            self._index = {(e.doc_id, e.sub): e for e in self.examples}
        return self._index.get((doc_id, sub))


class Task:
    """One benchmark: subclasses set the class attributes and implement :meth:`examples_from_row`,
    :meth:`prompt` and :meth:`score`."""

    name: ClassVar[str]
    capability: ClassVar[str]
    hub_id: ClassVar[str]
    hub_config: ClassVar[str | None] = None
    split: ClassVar[str]
    #: the fields every row must have (checked before anything else; a missing one is a one-line error)
    fields: ClassVar[tuple[str, ...]]
    #: image fields, tried in order (the first one present is used; a list field gives several images)
    image_fields: ClassVar[tuple[str, ...]] = ("image",)
    max_new_tokens: ClassVar[int]
    #: the metric's name in results.json
    metric: ClassVar[str]
    #: the field the ``limit`` sample is stratified by (None: a plain random sample)
    strata: ClassVar[str | None] = None
    #: the predictions.jsonl key of the sub-example index, for rows that hold several examples
    sub_key: ClassVar[str | None] = None
    #: scoring needs each image's original size (grounding), so rescoring reads image headers
    needs_image_size: ClassVar[bool] = False
    #: breakdown groups whose mean accuracy is the paper's number for this task (MathVista, MATH-Vision)
    paper_groups: ClassVar[tuple[str, ...]] = ()
    #: where the task follows lmms-eval and where VLMEvalKit (one line; the module docstring says why)
    provenance: ClassVar[str] = ""

    # --- per task ---------------------------------------------------------------------------------------------

    def examples_from_row(self, doc_id: int, row: Mapping[str, Any]) -> list[Example]:
        raise NotImplementedError

    def prompt(self, example: Example, box_format: str | None = None) -> str:
        raise NotImplementedError

    def score(self, example: Example, generation: Generation | str, box_format: str = "normalized") -> Score:
        raise NotImplementedError

    def breakdown_extra(self, scores: Sequence[tuple[Example, Score]]) -> dict[str, Any]:
        """Task-specific aggregate fields for results.json (e.g. grounding's parse-failure rate)."""
        return {}

    # --- shared -----------------------------------------------------------------------------------------------

    def request(self, example: Example, box_format: str | None = None) -> Request:
        """The request for ``example``: its images decoded (RGB), the prompt, the generation length.
        ``box_format`` picks the grounding prompt of the model family (other tasks ignore it)."""
        images = tuple(decode_image(ref) for ref in example.images)
        return Request(images=images, prompt=self.prompt(example, box_format), max_new_tokens=self.max_new_tokens)

    def load(
        self,
        source: str | os.PathLike[str] | None = None,
        split: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        images: str = "decode",
        image_source: str | os.PathLike[str] | None = None,
    ) -> TaskData:
        """The task's examples from ``source`` (default: its hub id through the local HF cache) at ``split``
        (default: its standard evaluation split); ``limit``: a seeded random sample of that many examples,
        stratified by :attr:`strata` where the dataset has that field. ``images``: ``"decode"`` decodes every
        kept example's images once to skip (and count) those that cannot be; ``"header"`` only reads their
        sizes; ``"none"`` leaves them alone (rescoring tasks that do not need them)."""
        if images not in ("decode", "header", "none"):
            raise ValueError(f"images must be 'decode', 'header' or 'none', got {images!r}")
        split = split or self.split
        src = str(source) if source is not None else self.hub_id
        config = self.hub_config if source is None or str(source) == self.hub_id else None
        rows = open_split(src, split, config=config)
        if len(rows) == 0:
            raise DataError(f"{self.name}: split '{split}' of {rows.origin} is empty")
        self._check_fields(rows, images != "none")
        image_cols = [c for c in self.image_fields if c in rows.columns]
        examples: list[Example] = []
        for doc_id, row in enumerate(rows.iter_rows(exclude=image_cols)):
            examples.extend(self.examples_from_row(doc_id, row))
        if not examples:
            raise DataError(f"{self.name}: split '{split}' of {rows.origin} holds no examples")
        n_examples = len(examples)
        if limit is not None:
            if limit < 1:
                raise DataError(f"{self.name}: limit must be at least 1, got {limit}")
            keep = stratified_sample([e.stratum for e in examples], limit, seed)
            examples = [examples[i] for i in keep]
        data = TaskData(self, split, rows.origin, len(rows), n_examples, examples, limit=limit, seed=seed)
        if images != "none":
            self._attach_images(data, rows, image_cols, images, image_source)
        return data

    def _check_fields(self, rows: Rows, need_images: bool) -> None:
        cols = rows.columns
        for f in self.fields:
            if f.split(".")[0] not in cols:
                raise DataError(f"{self.name}: {rows.origin} has no field '{f}' (fields: {', '.join(cols)})")
        if need_images and not self._has_images(cols):
            wanted = " or ".join(f"'{f}'" for f in self.image_fields)
            raise DataError(f"{self.name}: {rows.origin} has no image field {wanted} (fields: {', '.join(cols)})")

    def _has_images(self, cols: Sequence[str]) -> bool:
        return any(f in cols for f in self.image_fields)

    def _image_lookup(self, rows: Rows, image_cols: Sequence[str],
                      image_source: str | os.PathLike[str] | None) -> Callable[[Example], tuple[ImageRef, ...]]:
        col = image_cols[0]
        cache: dict[int, tuple[ImageRef, ...]] = {}

        def lookup(ex: Example) -> tuple[ImageRef, ...]:
            if ex.doc_id not in cache:
                cache.clear()  # examples come in doc_id order: keep only the current row
                cache[ex.doc_id] = image_refs(rows.get(ex.doc_id, [col])[col], rows.base_dir)
            return cache[ex.doc_id]

        return lookup

    def _attach_images(self, data: TaskData, rows: Rows, image_cols: Sequence[str], mode: str,
                       image_source: str | os.PathLike[str] | None) -> None:
        lookup = self._image_lookup(rows, image_cols, image_source)
        kept: list[Example] = []
        for ex in data.examples:
            refs = lookup(ex)[:1]  # every task of the pool asks about one image
            try:
                if not refs:
                    raise ValueError("no image")
                if mode == "decode":
                    sizes = tuple(decode_image(r).size for r in refs)
                else:
                    sizes = tuple(image_size(r) for r in refs)
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for bad or missing image data
                data.skipped += 1
                data.skipped_ids.add((ex.doc_id, ex.sub))
                if data.skip_reason is None:
                    data.skip_reason = f"row {ex.doc_id} ({refs[0].describe() if refs else 'empty'}): {e}"
                continue
            kept.append(_replace(ex, images=tuple(_lazy(r, lookup, ex, k) for k, r in enumerate(refs)),
                                 image_sizes=sizes))
        if not kept:
            raise DataError(f"{self.name}: no image of {rows.origin} could be decoded ({data.skip_reason})")
        data.examples = kept


def _lazy(ref: ImageRef, lookup: Callable[[Example], tuple[ImageRef, ...]], ex: Example, k: int) -> ImageRef:
    """A file path is kept as it is; image bytes are not held, but read again from the dataset when needed."""
    if ref.data is None:
        return ref
    return ImageRef(loader=lambda: lookup(ex)[k], where=f"row {ex.doc_id}")


def _replace(ex: Example, **changes: Any) -> Example:
    from dataclasses import replace

    return replace(ex, **changes)


_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to the pool under its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    from omnimerge.eval import tasks  # noqa: F401  (registers the pool)


def task_names() -> list[str]:
    """Every task of the pool, in the paper's capability order."""
    _ensure_loaded()
    order = [t for group in CAPABILITIES.values() for t in group]
    return sorted(_REGISTRY, key=lambda n: (order.index(n) if n in order else len(order), n))


def get_task(name: str) -> Task:
    """The task called ``name`` (as users type it: ``chartqa``, ``refcoco_plus``, ...)."""
    _ensure_loaded()
    key = name.strip().lower().replace("-", "_").replace("+", "_plus")
    if key not in _REGISTRY:
        raise OmniMergeError(f"unknown task '{name}'; known tasks: {', '.join(task_names())}")
    return _REGISTRY[key]()


def capability_of(task: str) -> str | None:
    """The capability group a task belongs to (None for a task outside the paper's groups)."""
    for cap, names in CAPABILITIES.items():
        if task in names:
            return cap
    return None


def check_box_format(box_format: str) -> str:
    """``box_format`` if it is one of :data:`BOX_FORMATS`, else a one-line error."""
    if box_format not in BOX_FORMATS:
        raise OmniMergeError(f"unknown box format '{box_format}'; expected one of {', '.join(BOX_FORMATS)}")
    return box_format


def generation_text(generation: Generation | str) -> str:
    return generation if isinstance(generation, str) else generation.text
