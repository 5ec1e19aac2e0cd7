"""Lazy, memory-mapped reading of Hugging Face checkpoints.

A :class:`Checkpoint` is opened from a local folder or a hub id already in the local Hugging Face cache
(offline). It lists every tensor (name, dtype, shape, file) from the safetensors headers alone and reads one
tensor at a time as a view of the memory-mapped file: nothing is loaded until asked for, and the page cache, not
the process, holds the file bytes. ``pytorch_model*.bin`` checkpoints are read only through
``torch.load(weights_only=True, mmap=True)``.

Headers are validated on open (offsets inside the file, no overlap, known dtypes), so a truncated or corrupt
file is refused with its path before any merging starts.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omnimerge.checkpoint.names import canonical_map
from omnimerge.errors import CheckpointError, quoted

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _code, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.safetensors\.index\.json$"
                         r"|.*\.bin\.index\.json$")


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize if hasattr(dtype, "itemsize") else torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives: file, byte range of its data (absolute offsets), dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    begin: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
MAX_JSON_BYTES = 100_000_000  # configs and indexes


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return False
    return True


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Read and validate a safetensors header; return tensor metadata (absolute offsets) and __metadata__.

    As strict as the safetensors library: a header of at most 100 MB that is one UTF-8 JSON object without
    duplicate keys, each tensor a known dtype, a shape of non-negative integers and integer data offsets whose
    span is exactly the shape's byte size; the tensors tile the data area from its start to the end of the
    file, without gaps or overlaps; ``__metadata__`` maps strings to strings."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a {size}-byte file; "
                    f"at most {MAX_HEADER_BYTES})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: corrupt safetensors file (its header does not start with '{{')")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: key {quoted(e.key)} appears twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors file (its header is not valid UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) and _utf8(k) and _utf8(v) for k, v in meta.items()):
        raise CheckpointError(f"{path}: corrupt safetensors header: '__metadata__' must map strings to strings")
    data_start = 8 + n
    out: dict[str, TensorMeta] = {}
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {quoted(name)}"
        if not _utf8(name):
            raise CheckpointError(f"{where}: the name is not a valid UTF-8 string")
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: corrupt header entry (expected an object with dtype, shape and "
                                  f"data_offsets, found {quoted(info, 60)})")
        code, shape_v, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {quoted(code, 40)}")
        if not isinstance(shape_v, list) or not all(_uint(s) for s in shape_v):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, found "
                                  f"{quoted(shape_v, 60)}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_uint(x) for x in offs):
            raise CheckpointError(f"{where}: data_offsets must be two non-negative integers, found "
                                  f"{quoted(offs, 60)}")
        b, e = offs
        shape = tuple(shape_v)
        tm = TensorMeta(name, SAFETENSORS_DTYPES[code], shape, path, data_start + b, data_start + e)
        if e < b or tm.nbytes != e - b:
            raise CheckpointError(
                f"{where}: declares shape {quoted(list(shape), 60)} {code} ({tm.nbytes} bytes) but its "
                f"data_offsets span {e - b} bytes"
            )
        if data_start + e > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {quoted(name)} ends at byte {data_start + e} but the "
                f"file has {size} bytes"
            )
        spans.append((b, e, name))
        out[name] = tm
    spans.sort()
    at, prev = 0, ""
    for b, e, name in spans:
        if b < at:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: tensors {quoted(prev)} and {quoted(name)} overlap"
            )
        if b > at:
            raise CheckpointError(f"{path}: corrupt safetensors file: a gap of {b - at} bytes before tensor "
                                  f"{quoted(name)} (the safetensors library refuses it)")
        at, prev = e, name
    if data_start + at != size:
        raise CheckpointError(f"{path}: corrupt safetensors file: {size - data_start - at} bytes after the last "
                              f"tensor's data (the safetensors library refuses it)")
    return out, dict(meta)


def regular_file(path: Path, folder: Path) -> Path:
    """``path`` if it is a regular file inside the checkpoint ``folder`` (after symlinks); a symlink may lead out
    only into the Hugging Face cache's ``blobs/`` of the same repository (``snapshots/<rev>/x ->
    ../../blobs/<hash>``). FIFOs, devices and links to outside content are refused."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or folder is never read)")
    real = Path(os.path.realpath(path))
    home = Path(os.path.realpath(folder))
    if real.is_relative_to(home):
        return path
    if home.parent.name == "snapshots" and real.is_relative_to(home.parent.parent / "blobs"):
        return path
    raise CheckpointError(f"{path}: a symlink to {real}, outside the checkpoint folder {folder} (refused)")


class _MappedFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        # ACCESS_COPY: a private, writable-looking mapping (torch.frombuffer needs one); pages stay shared with
        # the page cache because nothing ever writes to them.
        self.mm = mmap.mmap(self.fd, size, access=mmap.ACCESS_COPY) if size else None

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
        os.close(self.fd)


def resolve_model_path(ref: str, base_dir: Path | None = None) -> Path:
    """A local folder for ``ref``: a path (relative to ``base_dir`` if given), or a hub id in the local cache."""
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [p]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
        if c.is_file() and WEIGHT_FILE.match(c.name):  # a single weights file: its folder is the checkpoint
            return c.resolve().parent
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?", ref) is not None
    if looks_like_hub_id and not ref.startswith((".", "/")):
        repo, _, rev = ref.partition("@")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, revision=rev or None, local_files_only=True))
        except Exception:  # noqa: BLE001 - every failure means "not in the cache"
            raise CheckpointError(
                f"model '{ref}': no such local folder, and the hub id is not in the local Hugging Face cache "
                f"(omnimerge works offline: download it first, e.g. `huggingface-cli download {repo}`)"
            ) from None
    where = f" (relative to {base_dir})" if base_dir and not p.is_absolute() else ""
    raise CheckpointError(f"model '{ref}': no such folder{where}")


def read_json(path: Path, folder: Path | None = None) -> dict[str, Any]:
    """A JSON object from ``path`` (a regular file, inside ``folder`` when given), UTF-8, at most 100 MB."""
    if folder is not None:
        regular_file(path, folder)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES // 1_000_000} MB (refused)")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply, or a number too long)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


class Checkpoint:
    """A full model checkpoint folder, opened lazily.

    Attributes:
        path: the folder.
        config: its ``config.json`` (empty if absent).
        tensors: on-disk name -> :class:`TensorMeta`, in file order.
        canonical: canonical name -> on-disk name.
        files: the weight files.
    """

    def __init__(self, path: Path, ref: str | None = None) -> None:
        self.path = Path(path)
        self.ref = ref or str(path)
        cfg = self.path / "config.json"
        self.config: dict[str, Any] = read_json(cfg, self.path) if cfg.exists() else {}
        self.tensors: dict[str, TensorMeta] = {}
        self.metadata: dict[str, str] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._maps: dict[Path, _MappedFile] = {}
        self._lock = threading.Lock()
        #: on-disk name -> a function computing the tensor (see :meth:`replace`); read instead of the file
        self._replaced: dict[str, tuple[Callable[[], torch.Tensor], TensorMeta]] = {}
        self.files = self._find_files()
        for f in self.files:
            if f.suffix == ".safetensors":
                metas, md = parse_safetensors_header(f)
                self.metadata.update(md)
                for name, m in metas.items():
                    if name in self.tensors:
                        raise CheckpointError(f"{self.path}: tensor '{name}' appears in two weight files")
                    self.tensors[name] = m
            else:
                for name, t in self._load_bin(f).items():
                    if name in self.tensors:
                        raise CheckpointError(f"{self.path}: tensor '{name}' appears in two weight files")
                    self.tensors[name] = TensorMeta(name, t.dtype, tuple(t.shape), f)
        if not self.tensors:
            raise CheckpointError(f"{self.path}: the checkpoint holds no tensors")
        for tensor, shard in (getattr(self, "_index_map", None) or {}).items():
            m = self.tensors.get(tensor)
            if m is None or m.file != self.path / shard:
                raise CheckpointError(f"{self.path}: the index lists tensor {quoted(tensor)} in {quoted(shard)}, "
                                      f"but {'that shard does not hold it' if m is None else 'it is in ' + m.file.name}")
        self.canonical = canonical_map(list(self.tensors), str(self.path))
        self._canonical_of = {v: k for k, v in self.canonical.items()}

    # -- discovery ---------------------------------------------------------------------------------------
    def _find_files(self) -> list[Path]:
        d = self.path
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = d / index_name
            if index.exists() or index.is_symlink():
                wm = read_json(index, d).get("weight_map")
                if not isinstance(wm, dict) or not wm:
                    raise CheckpointError(f"{index}: no 'weight_map' in the index")
                for tensor, shard in wm.items():
                    if not isinstance(shard, str) or not _utf8(tensor) or not _utf8(shard):
                        raise CheckpointError(f"{index}: weight_map[{quoted(tensor)}] must be a file name, found "
                                              f"{quoted(shard)}")
                    parts = Path(shard).parts
                    if not shard or Path(shard).is_absolute() or ".." in parts or "\\" in shard:
                        raise CheckpointError(f"{index}: weight_map[{quoted(tensor)}] = {quoted(shard)} points "
                                              f"outside the checkpoint folder (refused)")
                names = list(dict.fromkeys(wm.values()))
                files = [d / n for n in names]
                missing = [quoted(n) for n, f in zip(names, files, strict=True) if not (f.exists() or f.is_symlink())]
                if missing:
                    raise CheckpointError(f"{index}: lists shard(s) that do not exist: {', '.join(missing[:5])}")
                for f in files:
                    regular_file(f, d)
                self._index_map = wm
                return files
        single = d / "model.safetensors"
        if single.exists() or single.is_symlink():
            return [regular_file(single, d)]
        st = sorted(p for p in d.glob("*.safetensors") if not p.name.startswith("adapter_"))
        if st:
            return [regular_file(p, d) for p in st]
        binf = d / "pytorch_model.bin"
        if binf.exists() or binf.is_symlink():
            return [regular_file(binf, d)]
        if (d / "adapter_config.json").is_file():
            raise CheckpointError(f"{d}: is a PEFT adapter, not a full checkpoint")
        raise CheckpointError(
            f"{d}: no weights found (expected model.safetensors, a sharded model.safetensors.index.json, "
            f"or pytorch_model.bin)"
        )

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bin:
            try:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - pickle / zip errors of many kinds
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{f}: cannot load as a PyTorch weights file (weights_only): "
                                      f"{first[:200]}") from None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{f}: expected a state dict of tensors")
            bad = next((k for k in sd if not isinstance(k, str) or not _utf8(k)), None)
            if bad is not None:
                raise CheckpointError(f"{f}: tensor names must be strings, found the key {quoted(bad)}")
            self._bin[f] = sd
        return self._bin[f]

    # -- facts ---------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str | None:
        mt = self.config.get("model_type")
        return str(mt) if mt else None

    @property
    def architectures(self) -> list[str]:
        a = self.config.get("architectures") or []
        return [str(x) for x in a] if isinstance(a, list) else []

    def meta(self, name: str) -> TensorMeta:
        return self.tensors[name]

    def canonical_of(self, name: str) -> str:
        """Canonical name of the on-disk tensor ``name``."""
        return self._canonical_of[name]

    def find(self, canonical: str) -> str | None:
        """On-disk name of the tensor with canonical name ``canonical`` (None if absent)."""
        return self.canonical.get(canonical)

    # -- reading -------------------------------------------------------------------------------------------
    def _mapped(self, f: Path) -> _MappedFile:
        m = self._maps.get(f)
        if m is None:
            with self._lock:
                m = self._maps.get(f)
                if m is None:
                    try:
                        m = _MappedFile(f)
                    except OSError as e:
                        raise CheckpointError(f"{f}: cannot open ({e.strerror or e})") from None
                    self._maps[f] = m
        return m

    def replace(self, name: str, shape: tuple[int, ...], produce: Callable[[], torch.Tensor]) -> None:
        """From now on, tensor ``name`` (of this checkpoint) has shape ``shape`` and is computed by ``produce()``
        (a fresh tensor of the stored dtype, or a wider one) when read: a per-input transform planned before the merge (e.g. an
        embedding re-indexed into the output vocabulary). :meth:`read_stored` still reads the file."""
        old = self._replaced[name][1] if name in self._replaced else self.tensors[name]
        self._replaced[name] = (produce, old)
        self.tensors[name] = TensorMeta(name, old.dtype, tuple(shape), old.file)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (a view of the mapped file for safetensors: do not modify it), or as
        computed for a replaced tensor (:meth:`replace`)."""
        replaced = self._replaced.get(name)
        if replaced is not None:
            return replaced[0]()
        return self.read_stored(name)

    def read_stored(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored in the file (ignores :meth:`replace`)."""
        m = self._replaced[name][1] if name in self._replaced else self.tensors.get(name)
        if m is None:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        if m.file.suffix != ".safetensors":
            return self._load_bin(m.file)[name]
        if m.numel == 0:
            return torch.empty(m.shape, dtype=m.dtype)
        mf = self._mapped(m.file)
        assert mf.mm is not None
        if m.begin % element_size(m.dtype):
            # unaligned data: copy the bytes out first
            buf = bytearray(mf.mm[m.begin : m.end])
            return torch.frombuffer(buf, dtype=m.dtype).reshape(m.shape)
        return torch.frombuffer(mf.mm, dtype=m.dtype, count=m.numel, offset=m.begin).reshape(m.shape)

    def raw_source(self, name: str) -> tuple[int, int, int] | None:
        """(fd, offset, nbytes) of a tensor's bytes in a safetensors file, for byte-exact copies; else None."""
        m = self.tensors[name]
        if m.file.suffix != ".safetensors" or name in self._replaced:
            return None
        return self._mapped(m.file).fd, m.begin, m.end - m.begin

    def _advise(self, name: str, advice: int, inner: bool, first: int = 0, stop: int | None = None) -> None:
        m = self.tensors.get(name)
        if m is None or m.file.suffix != ".safetensors" or m.numel == 0 or name in self._replaced:
            return
        mf = self._maps.get(m.file) if inner else self._mapped(m.file)
        if mf is None or mf.mm is None:
            return
        page = mmap.PAGESIZE
        es = element_size(m.dtype)
        b = m.begin + first * es
        e = m.end if stop is None else min(m.end, m.begin + stop * es)
        # release: only the pages wholly inside the range (neighbours may be in use); prefetch: all it touches
        start = -(-b // page) * page if inner else b // page * page
        end = e // page * page if inner else min(-(-e // page) * page, len(mf.mm))
        if end > start:
            try:  # noqa: SIM105 - advice only: a refusal is ignored
                mf.mm.madvise(advice, start, end - start)
            except (OSError, ValueError):
                pass

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read a tensor's bytes ahead (MADV_WILLNEED): disk reads overlap with compute."""
        if hasattr(mmap, "MADV_WILLNEED"):
            self._advise(name, mmap.MADV_WILLNEED, inner=False)

    def release(self, name: str, first: int = 0, stop: int | None = None) -> None:
        """Unmap a tensor's pages (its flat elements ``[first, stop)``; all by default) from this process once
        merged (MADV_DONTNEED): the page cache keeps the bytes, the resident set stays small. Safe because the
        private mapping is never written: a later read faults the same file bytes back in."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._advise(name, mmap.MADV_DONTNEED, True, first, stop)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        self._bin.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {len(self.tensors)} tensors)"


class RenamedCheckpoint(Checkpoint):
    """A view of another checkpoint's tensors under new names (``names``: new name -> the source's name), e.g.
    the layers of a layer-range slice renumbered to their place in the output. It shares the source's mapped
    files (nothing is copied or re-read); closing the view does not close the source."""

    def __init__(self, src: Checkpoint, names: dict[str, str], ref: str | None = None) -> None:  # noqa: D107
        self.path, self.ref, self.config, self.metadata = src.path, ref or src.ref, src.config, src.metadata
        missing = [old for old in names.values() if old not in src.tensors]
        if missing:
            raise CheckpointError(f"{src.path}: no tensor '{missing[0]}'")
        self.tensors = {new: src.tensors[old] for new, old in names.items()}
        self.files = src.files
        self._src, self._names = src, dict(names)
        self._bin, self._maps, self._lock = src._bin, src._maps, src._lock
        self._replaced = {}  # this view's own replaced tensors (see Checkpoint.replace)
        self.canonical = canonical_map(list(self.tensors), str(self.path))
        self._canonical_of = {v: k for k, v in self.canonical.items()}

    def read(self, name: str) -> torch.Tensor:
        if name in self._replaced:
            return super().read(name)
        if name not in self._names:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        return self._src.read(self._names[name])

    def close(self) -> None:
        return None


def open_checkpoint(ref: str, base_dir: Path | None = None) -> Checkpoint:
    """Open a full checkpoint by path or cached hub id."""
    return Checkpoint(resolve_model_path(ref, base_dir), ref)


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()
