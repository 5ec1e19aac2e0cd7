"""Reading a task's split from where users have it, and sampling it.

Sources, tried in this order:

- a folder written by ``datasets.save_to_disk``: a ``DatasetDict`` is read at the requested split, a ``Dataset``
  is that split;
- a parquet file (that split), or a folder of parquet files named ``<split>-*.parquet`` / ``<split>.parquet``
  (the hub's layout, also under ``data/``), read memory-mapped, without copying into the HF cache;
- a JSONL file (that split), one row per line, image fields holding paths relative to the JSONL file;
- otherwise a hub id (``owner/name``), read with ``datasets.load_dataset`` through the local Hugging Face cache:
  offline (``HF_HUB_OFFLINE=1``) a dataset that is not cached is a one-line error saying so; online it is
  downloaded into the cache.

Images are kept undecoded (bytes or a path) until a request needs them, so loading and rescoring a split does
not decode every image.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnimerge.errors import OmniMergeError

__all__ = [
    "DataError",
    "ImageRef",
    "Rows",
    "decode_image",
    "image_refs",
    "image_size",
    "open_split",
    "stratified_sample",
]


class DataError(OmniMergeError):
    """An evaluation dataset cannot be found or read, or lacks what its task needs."""


@dataclass(frozen=True)
class ImageRef:
    """An undecoded image: its encoded bytes, the path of its file, or a loader that reads it again from the
    (memory-mapped) dataset when needed, so a loaded split does not hold every image's bytes."""

    data: bytes | None = None
    path: str | None = None
    loader: Callable[[], ImageRef] | None = field(default=None, compare=False, repr=False)
    where: str | None = None

    def open(self):  # type: ignore[no-untyped-def]
        from PIL import Image

        if self.loader is not None:
            return self.loader().open()
        if self.data is not None:
            return Image.open(io.BytesIO(self.data))
        assert self.path is not None
        return Image.open(self.path)

    def describe(self) -> str:
        return self.path or self.where or f"<{len(self.data or b'')} bytes>"


def decode_image(ref: ImageRef):  # type: ignore[no-untyped-def]
    """The image, fully decoded, in RGB (raises OSError/ValueError when it cannot be decoded)."""
    with ref.open() as im:
        im.load()
        return im.convert("RGB")


def image_size(ref: ImageRef) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    with ref.open() as im:
        return im.size


def _to_ref(value: Any, base_dir: Path | None) -> ImageRef | None:
    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return ImageRef(data=bytes(data), path=path)
        if path:
            return _to_ref(str(path), base_dir)
        return None
    if isinstance(value, bytes | bytearray):
        return ImageRef(data=bytes(value))
    if isinstance(value, str | os.PathLike):
        p = Path(value)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return ImageRef(path=str(p))
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return ImageRef(data=buf.getvalue())
    return None


def image_refs(value: Any, base_dir: Path | None) -> tuple[ImageRef, ...]:
    """The images a field holds (one, or a list of them) as undecoded references."""
    values = value if isinstance(value, list | tuple) else [value]
    out = []
    for v in values:
        ref = _to_ref(v, base_dir)
        if ref is not None:
            out.append(ref)
    return tuple(out)


def field(row: dict[str, Any], name: str) -> Any:
    """A (possibly nested, dotted: ``metadata.task``) field of a row; None where absent."""
    cur: Any = row
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class Rows:
    """One split as stored: a ``datasets.Dataset`` or the rows of a JSONL file."""

    def __init__(self, origin: str, dataset: Any = None, records: list[dict[str, Any]] | None = None,
                 base_dir: Path | None = None) -> None:
        self.origin = origin
        self.base_dir = base_dir
        self._records = records
        self._ds = _undecoded(dataset) if dataset is not None else None
        self._views: dict[tuple[str, ...], Any] = {}

    @property
    def columns(self) -> list[str]:
        if self._ds is not None:
            return list(self._ds.column_names)
        cols: dict[str, None] = {}
        for r in self._records or []:
            cols.update(dict.fromkeys(r))
        return list(cols)

    def __len__(self) -> int:
        return len(self._ds) if self._ds is not None else len(self._records or [])

    def iter_rows(self, exclude: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Every row, in order, without the columns in ``exclude`` (the images, to keep this cheap)."""
        if self._ds is not None:
            drop = [c for c in exclude if c in self._ds.column_names]
            ds = self._ds.remove_columns(drop) if drop else self._ds
            if not ds.column_names:  # nothing but images: rows are empty dicts
                yield from ({} for _ in range(len(ds)))
                return
            yield from ds
            return
        for r in self._records or []:
            yield {k: v for k, v in r.items() if k not in exclude}

    def get(self, index: int, columns: Sequence[str]) -> dict[str, Any]:
        """The given columns of row ``index``."""
        if self._ds is not None:
            cols = tuple(c for c in columns if c in self._ds.column_names)
            if not cols:
                return {}
            if cols not in self._views:
                self._views[cols] = self._ds.select_columns(list(cols))
            return dict(self._views[cols][index])
        rec = (self._records or [])[index]
        return {c: rec.get(c) for c in columns}


def _undecoded(ds: Any) -> Any:
    """``ds`` with its image columns cast to undecoded (bytes, path) values (a change of the features only: the
    stored data is not rewritten)."""
    import datasets

    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feat, datasets.List | datasets.Sequence) and isinstance(feat.feature, datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _parquet_rows(files: list[Path], origin: str) -> Rows:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        tables = [pq.read_table(f, memory_map=True) for f in files]
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{origin}: cannot read parquet: {e}") from None
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    return Rows(origin, dataset=datasets.Dataset(table))


def read_jsonl_objects(path: Path, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file with their line numbers (blank lines skipped; the first ``limit`` only,
    reading no further); a line that is not a JSON object is a one-line error naming the file and line."""
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115  (closed by the with below; open errors named here)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON object: {e.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, found {type(rec).__name__}")
            records.append((lineno, rec))
            if limit is not None and len(records) >= limit:
                break
    return records


def _jsonl_rows(path: Path) -> Rows:
    return Rows(str(path), records=[rec for _, rec in read_jsonl_objects(path)], base_dir=path.parent)


def _split_parquets(folder: Path, split: str) -> list[Path]:
    files = sorted(folder.rglob("*.parquet"))
    pat = re.compile(rf"^{re.escape(split)}([-.].*)?\.parquet$")
    return [f for f in files if pat.match(f.name)]


def open_split(source: str | os.PathLike[str], split: str, config: str | None = None) -> Rows:
    """The rows of ``split`` of ``source`` (a local path or a hub id; see the module docstring)."""
    import datasets

    path = Path(source).expanduser()
    text = str(source)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            if _empty_save(path / split):  # datasets 5 cannot reload an empty save: it is an empty split
                return Rows(f"{path} [{split}]", records=[])
            dd = _load_from_disk(path)
            if split not in dd:
                raise DataError(f"{path}: no split '{split}' in the saved DatasetDict (splits: "
                                f"{', '.join(dd) or 'none'}); pass --split")
            return Rows(f"{path} [{split}]", dataset=dd[split])
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            if _empty_save(path):
                return Rows(str(path), records=[])
            return Rows(str(path), dataset=_load_from_disk(path))
        files = _split_parquets(path, split)
        if files:
            return _parquet_rows(files, f"{path} [{split}]")
        found = sorted(p.name for p in path.rglob("*.parquet"))[:5]
        raise DataError(f"{path}: not a dataset saved with save_to_disk, and no parquet file named "
                        f"'{split}-*.parquet' in it" + (f" (found: {', '.join(found)})" if found else ""))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return _parquet_rows([path], str(path))
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _jsonl_rows(path)
        raise DataError(f"{path}: unsupported data file (expected a save_to_disk folder, .parquet or .jsonl)")
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise DataError(f"{text}: no such file or folder (and not a hub id owner/name)")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", "") not in ("", "0")
    what = f"hub dataset {text}" + (f" (config {config})" if config else "") + f", split '{split}'"
    try:
        ds = datasets.load_dataset(text, name=config, split=split)
    except Exception as e:  # datasets raises many types (not found, offline, bad split); one line for all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (" — it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it on a "
                "machine with network (or unset HF_HUB_OFFLINE), or pass a local path" if offline else "")
        raise DataError(f"cannot load {what} (no local file or folder of that name either): {first[:300]}{hint}"
                        ) from None
    return Rows(f"{text} [{split}]", dataset=ds)


def _empty_save(folder: Path) -> bool:
    """A split saved by save_to_disk with no rows (its state lists no data file)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _load_from_disk(path: Path) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged save: name the folder and the reason
        raise DataError(f"{path}: cannot read the saved dataset: {str(e).splitlines()[0] if str(e) else e!r}") from None


def stratified_sample(strata: Sequence[str | None], limit: int, seed: int) -> list[int]:
    """``limit`` positions of ``strata`` drawn at random (numpy's PCG64 seeded with ``seed``), allocated to each
    stratum in proportion to its size (largest remainders get the leftover), returned in ascending order.
    With a single stratum (or none) this is a plain seeded random sample without replacement."""
    n = len(strata)
    if limit >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    groups: dict[str | None, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    keys = sorted(groups, key=lambda k: (k is None, str(k)))
    exact = [limit * len(groups[k]) / n for k in keys]
    alloc = [int(x) for x in exact]
    order = sorted(range(len(keys)), key=lambda j: (-(exact[j] - alloc[j]), j))
    for j in order[: limit - sum(alloc)]:
        alloc[j] += 1
    chosen: list[int] = []
    for k, m in zip(keys, alloc, strict=True):
        if m:
            members = np.asarray(groups[k])
            chosen.extend(int(x) for x in rng.choice(members, size=m, replace=False))
    return sorted(chosen)
