"""Per-expert statistics files for the data-aware methods (RegMean's Grams, Fisher's diagonal).

The convention (``../shared/golden/README.md``, "statistics"): one safetensors file per expert, one float32
tensor per merged weight keyed by that weight's tensor name, and the metadata key ``statistic`` saying what it
holds:

- ``regmean_gram``: G = XᵀX / N of the weight's input rows X (N × in), shape ``(in, in)``;
- ``fisher_diagonal``: the diagonal Fisher (mean over examples of the squared gradient), the weight's shape.

Files written by ``omnimerge stats`` also carry, in their metadata, ``weights_digest`` (a digest of the expert's
weight files the statistics were collected on; see :func:`weights_digest`) and ``manifest`` (JSON: the model,
the data, token counts, versions). A merge compares ``weights_digest``, when present, with the expert it is
given: statistics of another model are refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from omnimerge.checkpoint.files import DigestCache, file_digest
from omnimerge.errors import CheckpointError, quoted

__all__ = ["STATISTIC_KINDS", "StatisticsFile", "open_statistics", "weights_digest"]

#: the kinds of statistics a file may hold (metadata key ``statistic``)
STATISTIC_KINDS = ("regmean_gram", "fisher_diagonal")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_digest(files: list[Path], algorithm: str = "xxh3_128") -> str:
    """One digest of a model's weight files: ``algorithm:hex`` over the sorted ``name=digest`` lines of every
    weight file in ``files`` (config and tokenizer files do not count: editing them does not change what the
    statistics were collected on). File digests are cached by (path, size, mtime, inode)."""
    import xxhash

    cache = DigestCache()
    lines = []
    for f in sorted((Path(p) for p in files if Path(p).suffix in _WEIGHT_SUFFIXES), key=lambda p: p.name):
        d = cache.get(f, algorithm)
        if d is None:
            d = file_digest(f, algorithm)
            cache.put(f, algorithm, d)
        lines.append(f"{f.name}={d}")
    cache.save()
    return f"{algorithm}:" + xxhash.xxh3_128("\n".join(lines).encode()).hexdigest()


class StatisticsFile:
    """An opened statistics file: its kind, its tensors' shapes (from the header), its metadata; tensors are read
    on demand, as float32."""

    def __init__(self, path: Path, kind: str, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> None:
        self.path = path
        self.kind = kind
        self.shapes = shapes
        self.metadata = metadata
        self._canon: dict[str, str] | None = None

    def key_of(self, name: str, canonical: str) -> str | None:
        """The file's key for the tensor ``name`` (its canonical name ``canonical``), or None: the name itself,
        else a key whose canonical name matches (statistics collected under another transformers version's
        names)."""
        if name in self.shapes:
            return name
        if canonical in self.shapes:
            return canonical
        if self._canon is None:
            from omnimerge.checkpoint.names import canonical_name

            self._canon = {canonical_name(k): k for k in self.shapes}
        return self._canon.get(canonical)

    @property
    def manifest(self) -> dict[str, Any]:
        try:
            out = json.loads(self.metadata.get("manifest", "{}"))
        except json.JSONDecodeError:
            return {}
        return out if isinstance(out, dict) else {}

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)


def open_statistics(path: str | Path, kind: str, who: str) -> StatisticsFile:
    """Open ``path`` as a statistics file of ``kind`` (``who`` names the expert in errors); a missing file, a
    file that is not safetensors, a wrong or absent ``statistic`` key or a non-float tensor raises a one-line
    :class:`CheckpointError`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{who}: statistics file {p} does not exist (collect it with `omnimerge stats`)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes: dict[str, tuple[int, ...]] = {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(k)
                if sl.get_dtype() not in ("F32", "F64", "F16", "BF16"):
                    raise CheckpointError(f"{who}: statistics file {p}: tensor '{k}' has dtype {sl.get_dtype()}, "
                                          f"expected float32")
                shapes[k] = tuple(int(s) for s in sl.get_shape())
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{who}: statistics file {p} is not a readable safetensors file "
                              f"({' '.join(str(e).split())[:160]})") from None
    got = meta.get("statistic")
    if got != kind:
        found = f"'{quoted(got, 40)[1:-1]}'" if got is not None else "no 'statistic' metadata key"
        raise CheckpointError(f"{who}: statistics file {p} holds {found}; this method needs statistic '{kind}'")
    return StatisticsFile(p, kind, shapes, meta)
