"""Sharded safetensors output written in place, tensor by tensor, with no shard buffer.

Every output tensor's name, dtype and shape are known before merging starts, so the shard layout (which file,
which byte range) is planned up front: each shard file is created with its final header and its full size
reserved (``posix_fallocate``: a full disk is found before any work, where the file system supports it), and
each tensor's bytes are written at their offset (``os.pwrite``) as soon as they are computed, from any thread,
in any order. Unmerged tensors are copied byte for byte with ``os.copy_file_range`` (kernel-side, no user-space
copy). :meth:`ShardedWriter.finalize` refuses to finish unless every planned tensor was written: no tensor is
ever silently missing from the output, and it flushes the shards to disk (``fsync``) before the output is
committed. A background thread starts that flush early (``fdatasync`` every ``flush_bytes`` written), so the
disk writes overlap with the merge instead of all waiting for the end.

The writer works inside a temporary folder; :func:`commit_dir` renames it into place only on success, and
:func:`discard_dir` removes it on failure, so a failed merge leaves nothing at the output path.

**Resuming.** With ``journal=True`` the writer appends one line per finished tensor to :data:`JOURNAL_FILE` in
its folder: the tensor's name and the xxh3-128 digest of its bytes (hashed as the bytes are written; a tensor
patched after writing is hashed from the file). A run killed at any point (SIGKILL, out of memory, power loss)
leaves its temporary folder, with :data:`RESUME_FILE` holding the fingerprint of what it merged; a later run of
the same merge with ``--resume`` claims the folder (:class:`AtomicOutput`), reopens the shards whose header is
the planned one (``reuse=True``), and keeps exactly the journaled tensors whose bytes still hash to the recorded
digest (:attr:`ShardedWriter.resumed`); everything else is written again, so the output is byte-identical to an
uninterrupted run's. Tensors copied byte for byte from an input are not journaled (copying them again costs a
kernel-side copy).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnimerge.checkpoint.reader import DTYPE_CODES, element_size
from omnimerge.errors import OutputError, quoted


@dataclass
class _Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int = 0
    offset: int = 0  # absolute offset in the shard file
    nbytes: int = 0
    written: bool = False


@dataclass
class _Shard:
    path: Path
    names: list[str] = field(default_factory=list)
    size: int = 0
    fd: int = -1
    unflushed: int = 0  # bytes written since the last fdatasync


#: in a temporary output folder: one JSON line ``[name, xxh3-128 hex digest]`` per finished tensor
JOURNAL_FILE = ".omnimerge-journal"
#: in a temporary output folder: the fingerprint of the merge writing it (what a resumed run must match)
RESUME_FILE = ".omnimerge-resume.json"
_HASH_CHUNK = 16 << 20

#: bytes written to a shard between background flushes
FLUSH_BYTES = int(os.environ.get("OMNIMERGE_FLUSH_BYTES", 64 << 20))


class _Flusher:
    """Starts the output's disk writes while the merge runs: ``fdatasync`` of a shard on a background thread
    once ``flush_bytes`` were written to it (the kernel would otherwise hold them until the final fsync)."""

    def __init__(self, shards: list[_Shard], flush_bytes: int) -> None:
        self.shards = shards
        self.flush_bytes = flush_bytes
        self.cond = threading.Condition()
        self.error: OSError | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="omnimerge-flush", daemon=True)
        self.thread.start()

    def wrote(self, shard: _Shard, n: int) -> None:
        with self.cond:
            shard.unflushed += n
            if shard.unflushed >= self.flush_bytes:
                self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and not any(s.unflushed >= self.flush_bytes for s in self.shards):
                    self.cond.wait()
                if self.stopped:
                    return
                todo = [s for s in self.shards if s.unflushed >= self.flush_bytes]
                for s in todo:
                    s.unflushed = 0
            for s in todo:
                try:
                    os.fdatasync(s.fd)
                except OSError as e:  # reported by finalize (its fsync fails the same way)
                    self.error = e

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join()


MAX_SHARD_BYTES = 10**15


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB', 1000000 -> bytes."""
    bad = OutputError(f"shard_size: cannot read {quoted(size, 40)} as a size (e.g. 5GB, 500MB, 2GiB; at most "
                      f"1PB)")
    if isinstance(size, bool):
        raise bad
    if isinstance(size, int):
        if not 0 < size <= MAX_SHARD_BYTES:
            raise bad
        return size
    s = str(size).strip().upper().replace(" ", "")
    if len(s) > 40:
        raise bad
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    value: float | None = None
    for u, mult in units.items():
        if s.endswith(u):
            try:
                value = float(s[: -len(u)]) * mult
            except ValueError:
                raise bad from None
            break
    if value is None:
        try:
            value = float(s)
        except ValueError:
            raise bad from None
    if not math.isfinite(value) or not 0 < value <= MAX_SHARD_BYTES:
        raise bad
    return int(value)


def _write_all(fd: int, data: memoryview, offset: int, where: str) -> None:
    view = data
    while len(view):
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as e:
            raise _as_output_error(e, where) from None
        if n <= 0:
            raise OutputError(f"{where}: write returned {n}")
        view = view[n:]
        offset += n


def _as_output_error(e: OSError, where: str) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{where}: the disk is full (no space left while writing the merged model)")
    return OutputError(f"{where}: cannot write ({e.strerror or e})")


def run_error(e: OSError, target: Path) -> OutputError:
    """An OSError met anywhere in a merge that writes ``target``, as a one-line user error naming the file."""
    return OutputError(f"{getattr(e, 'filename', None) or target}: {e.strerror or e}")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class ShardedWriter:
    """Writes a planned set of tensors into safetensors shards under ``folder``.

    Args:
        folder: where the shards go (a temporary folder; see :func:`commit_dir`).
        plan: (name, dtype, shape) of every output tensor, in output order.
        max_shard_bytes: shard size limit (a single larger tensor gets a shard of its own).
        prefix: file name stem (``model`` gives ``model.safetensors`` / ``model-00001-of-00003.safetensors``).
        metadata: the safetensors ``__metadata__`` (``format: pt`` is added).
        flush_bytes: start writing a shard to disk in the background after this many bytes (0: only at the end).
        sync: flush the shards to disk before finishing (``fsync``). Without it the output is complete in the
            page cache when the merge returns and reaches the disk later, as with most tools: a power loss soon
            after may leave it truncated.
        journal: record each tensor :meth:`completed` in :data:`JOURNAL_FILE` (what a resumed run keeps).
        reuse: ``folder`` holds an unfinished earlier run of the same plan: reopen its shards whose header is the
            planned one and keep its journaled tensors whose bytes verify (:attr:`resumed`).
    """

    whole_tensors = False  # (a Sink: takes blocks and patches)

    def __init__(
        self,
        folder: Path,
        plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
        flush_bytes: int = FLUSH_BYTES,
        sync: bool = True,
        journal: bool = False,
        reuse: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self._lock = threading.Lock()
        self._flusher: _Flusher | None = None
        self.planned: dict[str, _Planned] = {}
        #: tensors kept from the unfinished earlier run (``reuse``): journaled and verified
        self.resumed: set[str] = set()
        self._journal = journal
        self._journal_fd = -1
        self._streams: dict[str, tuple[Any, int]] = {}  # name -> (xxh3 state, next byte) of in-order parts
        self._digests: dict[str, str] = {}  # name -> digest of the bytes written
        self._unhashed: set[str] = set()  # patched or written out of order: hashed from the file when complete
        reused: set[int] = set()
        groups: list[list[_Planned]] = [[]]
        current = 0
        for name, dtype, shape in plan:
            if name in self.planned:
                raise OutputError(f"tensor '{name}' planned twice for the output")
            if dtype not in DTYPE_CODES:
                raise OutputError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors")
            p = _Planned(name, dtype, tuple(shape))
            numel = 1
            for s in p.shape:
                numel *= s
            p.nbytes = numel * element_size(dtype)
            if groups[-1] and current + p.nbytes > max_shard_bytes:
                groups.append([])
                current = 0
            groups[-1].append(p)
            current += p.nbytes
            self.planned[name] = p
        n = len(groups)
        self.shards: list[_Shard] = []
        for i, g in enumerate(groups):
            fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            shard = _Shard(self.folder / fname)
            header: dict[str, object] = {"__metadata__": self.metadata}
            pos = 0
            for p in g:
                p.shard = i
                header[p.name] = {
                    "dtype": DTYPE_CODES[p.dtype],
                    "shape": list(p.shape),
                    "data_offsets": [pos, pos + p.nbytes],
                }
                pos += p.nbytes
                shard.names.append(p.name)
            hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
            hb += b" " * (-(len(hb) + 8) % 8)  # data start 8-byte aligned, as safetensors does
            data_start = 8 + len(hb)
            for p in g:
                p.offset += data_start + int(header[p.name]["data_offsets"][0])  # type: ignore[index]
            shard.size = data_start + pos
            self.shards.append(shard)
            head = len(hb).to_bytes(8, "little") + hb
            if reuse and self._reopen(shard, head):
                reused.add(i)
            else:
                self._create(shard, head)
        self.sync = sync
        if journal:
            self._open_journal(reused if reuse else set())
        self._flusher = _Flusher(self.shards, flush_bytes) if flush_bytes > 0 and sync else None

    def _create(self, shard: _Shard, head: bytes) -> None:
        try:
            shard.fd = os.open(shard.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            if shard.size and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(shard.fd, 0, shard.size)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    os.ftruncate(shard.fd, shard.size)  # file system without fallocate
            else:
                os.ftruncate(shard.fd, shard.size)
        except OSError as e:
            raise _as_output_error(e, str(shard.path)) from None
        _write_all(shard.fd, memoryview(head), 0, str(shard.path))

    def _reopen(self, shard: _Shard, head: bytes) -> bool:
        """Open an earlier run's shard for writing if it has the planned size and header (else False)."""
        try:
            st = os.lstat(shard.path)
        except OSError:
            return False
        import stat

        if not stat.S_ISREG(st.st_mode) or st.st_size != shard.size:
            return False
        try:
            fd = os.open(shard.path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return False
        if os.pread(fd, len(head), 0) != head:
            os.close(fd)
            return False
        shard.fd = fd
        return True

    # -- the journal ---------------------------------------------------------------------------------------------
    def _open_journal(self, reused: set[int]) -> None:
        """Keep the journaled tensors of the reused shards whose bytes verify, rewrite the journal with only
        those, and open it for appending."""
        path = self.folder / JOURNAL_FILE
        kept: list[tuple[str, str]] = []
        if reused:
            try:
                lines = path.read_bytes().split(b"\n")
            except OSError:
                lines = []
            seen: set[str] = set()
            for line in lines:
                try:
                    name, digest = json.loads(line)
                except (ValueError, TypeError):  # the torn last line of a killed run, or garbage
                    continue
                if not isinstance(name, str) or not isinstance(digest, str) or name in seen:
                    continue
                p = self.planned.get(name)
                if p is None or p.shard not in reused or self._file_digest(p) != digest:
                    continue
                seen.add(name)
                kept.append((name, digest))
                p.written = True
                self.resumed.add(name)
        tmp = path.with_name(path.name + ".new")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(self._journal_line(n, d).decode("utf-8") for n, d in kept)
            os.replace(tmp, path)
            self._journal_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise _as_output_error(e, str(path)) from None

    @staticmethod
    def _journal_line(name: str, digest: str) -> bytes:
        return (json.dumps([name, digest], ensure_ascii=True) + "\n").encode("ascii")

    def _file_digest(self, p: _Planned) -> str:
        """The xxh3-128 digest of tensor ``p``'s bytes as they are in its shard."""
        import xxhash

        h = xxhash.xxh3_128()
        fd, done = self.shards[p.shard].fd, 0
        while done < p.nbytes:
            chunk = os.pread(fd, min(_HASH_CHUNK, p.nbytes - done), p.offset + done)
            if not chunk:
                break
            h.update(chunk)
            done += len(chunk)
        return h.hexdigest()

    def completed(self, name: str) -> None:
        """Tensor ``name`` is final (written, and patched if it was): record it in the journal. Raw copies are
        not recorded (a resumed run copies them again). Thread-safe."""
        if self._journal_fd < 0:
            return
        p = self._slot(name)
        with self._lock:
            digest = self._digests.pop(name, None)
            unhashed = name in self._unhashed
            self._unhashed.discard(name)
            self._streams.pop(name, None)
        if not p.written:
            return
        if unhashed:
            digest = self._file_digest(p)
        if digest is None:
            return
        line = self._journal_line(name, digest)
        with self._lock:
            if self._journal_fd >= 0:
                _write_all(self._journal_fd, memoryview(line), 0, str(self.folder / JOURNAL_FILE))

    def _hash_whole(self, name: str, data: memoryview) -> None:
        if self._journal_fd >= 0:
            import xxhash

            digest = xxhash.xxh3_128(data).hexdigest()
            with self._lock:
                self._digests[name] = digest
                self._unhashed.discard(name)
                self._streams.pop(name, None)

    def _hash_part(self, name: str, data: memoryview, at: int, last: bool) -> None:
        if self._journal_fd < 0:
            return
        import xxhash

        with self._lock:
            if name in self._unhashed:
                return
            state = self._streams.get(name)
            if at == 0:
                state = (xxhash.xxh3_128(), 0)
            elif state is None or state[1] != at:  # out of order: hash the finished tensor from the file
                self._unhashed.add(name)
                self._streams.pop(name, None)
                return
            h = state[0]
            self._streams[name] = (h, at + len(data))
        h.update(data)  # (one tensor's parts come from one thread)
        if last:
            with self._lock:
                if name not in self._unhashed and self._streams.pop(name, None) is not None:
                    self._digests[name] = h.hexdigest()

    # -- writing ---------------------------------------------------------------------------------------------
    def _slot(self, name: str, nbytes: int | None = None) -> _Planned:
        p = self.planned.get(name)
        if p is None:
            raise OutputError(f"tensor '{name}' is not part of the planned output")
        if nbytes is not None and nbytes != p.nbytes:
            raise OutputError(f"tensor '{name}': {nbytes} bytes to write, {p.nbytes} planned")
        return p

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (cast to its planned dtype if needed) at its planned place. Thread-safe."""
        p = self._slot(name)
        t = tensor
        if t.dtype != p.dtype:
            t = t.to(p.dtype)
        if tuple(t.shape) != p.shape:
            raise OutputError(f"tensor '{name}': shape {list(t.shape)} to write, {list(p.shape)} planned")
        data = tensor_bytes(t)
        shard = self.shards[p.shard]
        _write_all(shard.fd, data, p.offset, str(shard.path))
        p.written = True
        self._hash_whole(name, data)
        if self._flusher is not None:
            self._flusher.wrote(shard, len(data))

    def write_part(self, name: str, part: torch.Tensor, start: int, last: bool) -> None:
        """Write the flat elements ``[start, start + part.numel())`` of tensor ``name`` (``part`` already in the
        planned dtype); ``last`` marks the tensor complete. For streaming one tensor block by block."""
        p = self._slot(name)
        if part.dtype != p.dtype:
            raise OutputError(f"tensor '{name}': part of dtype {part.dtype} to write, {p.dtype} planned")
        esize = element_size(p.dtype)
        data = tensor_bytes(part)
        if start < 0 or start * esize + len(data) > p.nbytes:
            raise OutputError(f"tensor '{name}': part [{start}, +{part.numel()}) lies outside the tensor")
        shard = self.shards[p.shard]
        _write_all(shard.fd, data, p.offset + start * esize, str(shard.path))
        self._hash_part(name, data, start * esize, last)
        if last:
            p.written = True
        if self._flusher is not None:
            self._flusher.wrote(shard, len(data))

    def patch(self, name: str, index: Any, values: torch.Tensor) -> None:
        """Overwrite the flat elements ``index`` (ascending, int64 numpy array) of an already written tensor
        with ``values`` (planned dtype): read-modify-write of the 64K-element windows that hold them."""
        import numpy as np

        p = self._slot(name)
        if values.dtype != p.dtype:
            raise OutputError(f"tensor '{name}': patch of dtype {values.dtype}, {p.dtype} planned")
        esize = element_size(p.dtype)
        numel = p.nbytes // esize if esize else 0
        if len(index) == 0:
            return
        if int(index[0]) < 0 or int(index[-1]) >= numel:
            raise OutputError(f"tensor '{name}': patch index outside the tensor's {numel} elements")
        with self._lock:
            self._unhashed.add(name)
            self._digests.pop(name, None)
        shard = self.shards[p.shard]
        win = 1 << 16
        wins = index // win
        cuts = np.flatnonzero(np.diff(wins)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [len(index)]))
        for a, z in zip(starts.tolist(), ends.tolist(), strict=True):
            w0 = int(wins[a]) * win
            w1 = min(numel, w0 + win)
            off = p.offset + w0 * esize
            buf = bytearray(os.pread(shard.fd, (w1 - w0) * esize, off))
            t = torch.frombuffer(buf, dtype=p.dtype)
            t[torch.from_numpy(index[a:z] - w0)] = values[a:z]
            _write_all(shard.fd, memoryview(buf), off, str(shard.path))
            if self._flusher is not None:
                self._flusher.wrote(shard, len(buf))

    def copy_raw(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` from an input file descriptor into the tensor's slot, byte for byte."""
        p = self._slot(name, nbytes)
        shard = self.shards[p.shard]
        dst, where = shard.fd, str(shard.path)
        done = 0
        use_cfr = hasattr(os, "copy_file_range")
        while done < nbytes:
            try:
                if use_cfr:
                    n = os.copy_file_range(src_fd, dst, nbytes - done, src_offset + done, p.offset + done)
                else:
                    raise OSError(errno.ENOSYS, "no copy_file_range")
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _as_output_error(e, where) from None
                use_cfr = False
                chunk = os.pread(src_fd, min(nbytes - done, 64 << 20), src_offset + done)
                if not chunk:
                    raise OutputError(f"{where}: input ended early while copying tensor '{name}'") from None
                _write_all(dst, memoryview(chunk), p.offset + done, where)
                n = len(chunk)
            if n <= 0:
                raise OutputError(f"{where}: input ended early while copying tensor '{name}'")
            done += n
        p.written = True
        with self._lock:  # not journaled (see completed)
            self._digests.pop(name, None)
            self._unhashed.discard(name)
        if self._flusher is not None:
            self._flusher.wrote(shard, nbytes)

    # -- finishing ---------------------------------------------------------------------------------------------
    def finish(self) -> list[Path]:
        """The :class:`~omnimerge.sinks.Sink` name of :meth:`finalize`."""
        return self.finalize()

    def finalize(self) -> list[Path]:
        """Check that every planned tensor was written, flush, close; write the index for sharded output."""
        self._stop_flusher()
        missing = [p.name for p in self.planned.values() if not p.written]
        if missing:
            self.close()
            raise OutputError(
                f"internal error: {len(missing)} planned tensor(s) were never written, e.g. '{missing[0]}'"
            )
        for s in self.shards if self.sync else ():
            try:
                os.fsync(s.fd)
            except OSError as e:
                raise _as_output_error(e, str(s.path)) from None
        self.close()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(p.nbytes for p in self.planned.values())},
                "weight_map": {n: s.path.name for s in self.shards for n in s.names},
            }
            idx_path = self.folder / f"{self.prefix}.safetensors.index.json"
            try:
                idx_path.write_text(json.dumps(index, indent=2) + "\n")
            except OSError as e:
                raise _as_output_error(e, str(idx_path)) from None
        return [s.path for s in self.shards]

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None

    def close(self) -> None:
        self._stop_flusher()  # before the descriptors close: the flusher must not sync a closed (or reused) fd
        with self._lock:
            if self._journal_fd >= 0:
                os.close(self._journal_fd)
                self._journal_fd = -1
        for s in self.shards:
            if s.fd >= 0:
                os.close(s.fd)
                s.fd = -1


def check_output_apart(target: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output that is, contains, or lies inside an input folder (compared as resolved real paths, so
    symlinks and ``..`` do not hide it): replacing or writing into it would destroy the input, with
    ``--overwrite`` or not. ``inputs``: (what it is, e.g. "base model", its folder)."""
    out = Path(os.path.realpath(target))
    for what, folder in inputs:
        real = Path(os.path.realpath(folder))
        if out == real:
            rel = "is"
        elif real.is_relative_to(out):
            rel = "contains"
        elif out.is_relative_to(real):
            rel = "lies inside"
        else:
            continue
        raise OutputError(f"{target}: the output {rel} the {what} {folder} (inputs are never replaced or written "
                          f"into: choose another output folder)")


TMP_MARK = ".omnimerge-tmp-"
#: inside a temporary output folder: the PID of the run that owns it (removed before the folder is committed)
OWNER_FILE = ".omnimerge-owner"
_NAME_MAX = 255


def _short(name: str, room: int) -> str:
    """``name`` cut to at most ``room`` bytes of UTF-8 (on a character boundary)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return name
    return raw[:room].decode("utf-8", "ignore")


def temp_prefix(target: Path) -> str:
    """The name prefix of ``target``'s temporary folders: ``.<name>.omnimerge-tmp-`` with the name cut so that
    prefix + mkdtemp's 8 random characters fit any file system's 255-byte name limit."""
    return f".{_short(target.name, _NAME_MAX - 1 - len(TMP_MARK) - 8)}{TMP_MARK}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def dead_temp_dirs(target: Path) -> list[tuple[Path, int]]:
    """The temporary folders beside ``target`` left by dead runs of this host (their owner PID is gone), with
    that PID, oldest first; a folder whose owner still runs, or that has no owner file, is not one."""
    parent, prefix = target.parent, temp_prefix(target)
    found: list[tuple[float, Path, int]] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for p in entries:
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        try:
            text = (p / OWNER_FILE).read_text(encoding="ascii").split()
            host, pid = text[0], int(text[1])
            when = (p / OWNER_FILE).stat().st_mtime
        except (OSError, ValueError, IndexError, UnicodeDecodeError):
            continue
        if host != _host() or _pid_alive(pid):
            continue
        found.append((when, p, pid))
    return [(p, pid) for _, p, pid in sorted(found)]


def remove_stale_temp_dirs(target: Path, echo: Callable[[str], None] | None = None, why: str = "") -> list[Path]:
    """Remove the temporary folders beside ``target`` left by dead runs (see :func:`dead_temp_dirs`), saying so
    (``why``: added to the message)."""
    removed: list[Path] = []
    for p, pid in dead_temp_dirs(target):
        _remove_dead(p, pid, echo, why)
        if not p.exists():
            removed.append(p)
    return removed


def _remove_dead(p: Path, pid: int, echo: Callable[[str], None] | None, why: str = "") -> None:
    resumable = (p / RESUME_FILE).is_file()
    shutil.rmtree(p, ignore_errors=True)
    if not p.exists() and echo:
        hint = why or (" (--resume would have continued it)" if resumable else "")
        echo(f"removed {p}: the temporary folder of an earlier run (pid {pid}) that did not finish{hint}")


def read_fingerprint(folder: Path) -> dict[str, str] | None:
    """The fingerprint an unfinished run recorded in ``folder`` (None: none, or unreadable)."""
    try:
        raw = (folder / RESUME_FILE).read_bytes()
        if len(raw) > 1 << 16:
            return None
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return None
    return data


def _host() -> str:
    return os.uname().nodename.replace(" ", "_") or "-"


def _claim(folder: Path, target: Path) -> Path | None:
    """Take over a dead run's temporary folder: renamed (atomically: of two runs claiming it, one wins) to a
    fresh temporary name, with this process as its owner; None if another run took it first."""
    import secrets

    new = folder.with_name(temp_prefix(target) + secrets.token_hex(4))
    try:
        os.rename(folder, new)
    except OSError:
        return None
    try:
        (new / OWNER_FILE).write_text(f"{_host()} {os.getpid()}\n", encoding="ascii")
    except OSError as e:
        raise OutputError(f"{new}: cannot take over the unfinished output ({e.strerror or e})") from None
    return new


def make_temp_dir(target: Path, created: list[Path] | None = None) -> Path:
    """A fresh temporary folder beside ``target`` (same file system, so the final rename is atomic), holding its
    owner's PID in :data:`OWNER_FILE`. Parent folders it had to make are appended to ``created``."""
    import tempfile

    parent = target.parent
    try:
        missing = []
        p = parent
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        parent.mkdir(parents=True, exist_ok=True)
        if created is not None:
            created.extend(missing)  # innermost first
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=parent))
        (tmp / OWNER_FILE).write_text(f"{_host()} {os.getpid()}\n", encoding="ascii")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should look like any folder
        return tmp
    except OSError as e:
        raise OutputError(f"{parent}: cannot create the output folder ({e.strerror or e})") from None


def commit_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished temporary folder to ``target``; an existing target is replaced only if allowed."""
    for bookkeeping in (OWNER_FILE, JOURNAL_FILE, RESUME_FILE):
        (tmp / bookkeeping).unlink(missing_ok=True)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputError(f"{target}: already exists (use --overwrite to replace it)")
        old = target.with_name(f".{_short(target.name, _NAME_MAX - 40)}.omnimerge-old-{os.getpid()}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old, target)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, target)


def discard_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


class AtomicOutput:
    """The output folder of a run, all or nothing::

        with AtomicOutput(target, overwrite) as out:
            tmp = out.folder()      # a temporary folder beside target, made on first use
            ...                     # write everything under tmp
            out.commit()            # rename it to target (replacing an old one only with overwrite)

    Leaving the block without :meth:`commit` (an error, Ctrl-C) removes the temporary folder: a failed run leaves
    nothing behind. An OSError raised inside becomes the one-line :class:`OutputError` of :func:`run_error`.
    Close what writes into the folder (inside the block, e.g. in a ``finally``) before it is removed.

    ``resume``: :meth:`folder` given a fingerprint takes over the folder of a dead earlier run with the same
    fingerprint (:attr:`reused`; see the module's *Resuming*), and a failed or interrupted run keeps its folder
    for the next resumed run instead of removing it (saying where it is).
    """

    def __init__(self, target: Path, overwrite: bool, echo: Callable[[str], None] | None = None,
                 resume: bool = False) -> None:
        self.target = target
        self.overwrite = overwrite
        self.echo = echo
        self.resume = resume
        #: the folder is an unfinished earlier run's, taken over (``resume``)
        self.reused = False
        self._tmp: Path | None = None
        self._created: list[Path] = []  # parent folders made for the output, innermost first

    def __enter__(self) -> AtomicOutput:
        return self

    def folder(self, fingerprint: dict[str, str] | None = None) -> Path:
        """The temporary folder (made, or with ``resume`` taken over, on first use). ``fingerprint``: what this
        run merges (recorded in :data:`RESUME_FILE`, so that a resumed run can tell it is the same merge)."""
        if self._tmp is None:
            if self.resume and fingerprint is not None:
                self._tmp = self._take_over(fingerprint)
            remove_stale_temp_dirs(self.target, self.echo)
            if self._tmp is None:
                self._tmp = make_temp_dir(self.target, self._created)
                if fingerprint is not None:
                    try:
                        (self._tmp / RESUME_FILE).write_text(json.dumps(fingerprint, sort_keys=True) + "\n",
                                                             encoding="utf-8")
                    except OSError as e:
                        raise run_error(e, self.target) from None
        return self._tmp

    def _take_over(self, fingerprint: dict[str, str]) -> Path | None:
        """The newest dead run's folder with ``fingerprint``, claimed; the other dead runs' folders are removed,
        saying why they were not resumed."""
        claimed: Path | None = None
        for p, pid in reversed(dead_temp_dirs(self.target)):
            old = read_fingerprint(p)
            if old == fingerprint:
                if claimed is None:
                    claimed = _claim(p, self.target)
                    if claimed is not None:
                        self.reused = True
                        continue
                why = " (a newer unfinished run of the same merge is resumed instead)"
            elif old is None:
                why = " (it recorded nothing to resume from)"
            else:
                changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                why = f" (not resumed: its {', '.join(changed)} differ from this run's)"
            _remove_dead(p, pid, self.echo, why)
        return claimed

    def commit(self) -> None:
        commit_dir(self.folder(), self.target, self.overwrite)
        self._tmp = None
        self._created.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._tmp is not None:
            if self.resume and exc is not None and (self._tmp / RESUME_FILE).is_file():
                if self.echo:
                    self.echo(f"kept the unfinished output in {self._tmp}: run the same merge with --resume to "
                              f"continue it")
                self._tmp = None
                self._created.clear()
            else:
                discard_dir(self._tmp)
                self._tmp = None
        for d in self._created:  # folders made for a failed output go too (only if empty: never others' files)
            try:
                d.rmdir()
            except OSError:
                break
        self._created.clear()
        if isinstance(exc, OSError):
            raise run_error(exc, self.target) from None
