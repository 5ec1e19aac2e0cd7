"""Non-weight files of a checkpoint (config, tokenizer, processor, chat template, remote code), input
hashing, and the model card written beside a merged model.

Input digests are written as ``algorithm:hex``: ``xxh3_128`` by default (XXH3, 128 bits, ~16 GB/s from the page
cache: an identity fingerprint of every input file that costs ~0.06 CPU-s per GB), or ``sha256`` on request
(cryptographic, ~0.5 GB/s on CPUs without SHA extensions). Hugging Face cache blobs of LFS files are named by
their sha256, so those digests are free and always given as sha256."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnimerge.checkpoint.reader import WEIGHT_FILE, regular_file
from omnimerge.errors import OutputError, RecipeError

#: digest algorithms for the model card: the name used in ``algorithm:hex``
HASH_ALGORITHMS = ("xxh3_128", "sha256")
_HASH_ALIASES = {"xxh3": "xxh3_128", "xxh3_128": "xxh3_128", "sha256": "sha256"}


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file all or nothing: ``write(tmp)`` fills a temporary file beside ``path`` (same suffix, so writers
    that pick a format from it, like matplotlib's, pick the right one), which is then renamed to ``path``; on
    any failure the temporary file is removed and the error raised as it is."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hash_algorithm(value: bool | str | None) -> str | None:
    """Normalise a ``hash_inputs`` setting: True -> 'xxh3_128', False/None/'none' -> None, or a name."""
    if value is True:
        return "xxh3_128"
    if value is False or value is None or str(value).lower() in ("none", "no", "off", "false"):
        return None
    algo = _HASH_ALIASES.get(str(value).lower())
    if algo is None:
        raise RecipeError(f"hash_inputs: unknown digest '{value}' (expected one of xxh3, sha256, none)")
    return algo


def file_digest(path: Path, algorithm: str, window: int = 64 << 20) -> str:
    """``algorithm:hex`` of a file's bytes, read through memory-mapped windows (no copy through user space; one
    window mapped at a time, so the process's resident set does not grow with the file)."""
    if algorithm == "sha256":
        h: Any = hashlib.sha256()
    else:
        import xxhash

        h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        window -= window % mmap.ALLOCATIONGRANULARITY
        for off in range(0, size, window):
            with mmap.mmap(fh.fileno(), min(window, size - off), access=mmap.ACCESS_READ, offset=off) as mm:
                view = memoryview(mm)
                try:
                    h.update(view)
                finally:
                    view.release()
    return f"{algorithm}:{h.hexdigest()}"

_SKIP = {"README.md", "omnimerge_recipe.yaml", ".gitattributes"}
_DTYPE_NAMES = {"float32", "float16", "bfloat16", "float64"}


def auxiliary_files(folder: Path) -> list[Path]:
    """Files to carry over from a checkpoint folder: everything but weights, the model card and hidden files."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name in _SKIP or p.is_dir() or WEIGHT_FILE.match(p.name):
            continue
        out.append(regular_file(p, folder))  # never a FIFO, nor a link to content outside the folder
    return out


def copy_auxiliary(src: Path, dst: Path, out_dtype: str | None) -> list[str]:
    """Copy config/tokenizer/processor/chat-template/remote-code files; record ``out_dtype`` in config.json."""
    copied = []
    for p in auxiliary_files(src):
        target = dst / p.name
        try:
            if p.name == "config.json" and out_dtype:
                cfg = json.loads(p.read_text(encoding="utf-8"))
                for key in ("torch_dtype", "dtype"):
                    if key in cfg or key == "dtype":
                        cfg[key] = out_dtype
                target.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            else:
                shutil.copyfile(p, target)
        except OSError as e:
            raise OutputError(f"{target}: cannot copy {p} ({e.strerror or e})") from None
        copied.append(p.name)
    return copied


def _cached_sha256(p: Path) -> str | None:
    """Hugging Face cache blobs of LFS files are named by their sha256: no need to read them (``sha256:hex``)."""
    try:
        real = p.resolve()
    except OSError:
        return None
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return f"sha256:{real.name}"
    return None


def cache_dir() -> Path:
    """omnimerge's cache folder: $OMNIMERGE_CACHE, else $XDG_CACHE_HOME/omnimerge, else ~/.cache/omnimerge."""
    env = os.environ.get("OMNIMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "omnimerge"


class DigestCache:
    """Remembers the digests of files by (algorithm, path, size, mtime, inode), so that merging the same inputs again
    (a lambda sweep, a method comparison) does not read them all once more just to hash them. A file that
    changed in any of these respects is hashed anew. Best effort: an unreadable cache is ignored."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "digest-cache.json"
        self.entries: dict[str, str] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self.entries = {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError):
            pass

    @staticmethod
    def key(p: Path, algorithm: str) -> str | None:
        try:
            st = p.stat()
        except OSError:
            return None
        return f"{algorithm}|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"

    def get(self, p: Path, algorithm: str) -> str | None:
        k = self.key(p, algorithm)
        return self.entries.get(k) if k else None

    def put(self, p: Path, algorithm: str, digest: str) -> None:
        k = self.key(p, algorithm)
        if k:
            self.entries[k] = digest
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass


class FileHasher:
    """Digests (``algorithm:hex``) of the input files, computed on a background thread while the merge runs
    (hub-cache blobs are named by their sha256; files hashed before are looked up in a :class:`DigestCache`)."""

    def __init__(self, files: list[Path], cache: DigestCache | None = None, algorithm: str = "xxh3_128") -> None:
        if algorithm not in HASH_ALGORITHMS:
            raise RecipeError(f"hash_inputs: unknown digest '{algorithm}' (expected one of {HASH_ALGORITHMS})")
        self.algorithm = algorithm
        self.files = list(dict.fromkeys(files))
        self.result: dict[str, str] = {}
        self.cache = cache if cache is not None else DigestCache()
        self._thread = threading.Thread(target=self._run, name="omnimerge-hash", daemon=True)
        self._stop = False

    def start(self) -> FileHasher:
        self._thread.start()
        return self

    def _run(self) -> None:
        for f in self.files:
            if self._stop:
                return
            digest = _cached_sha256(f) or self.cache.get(f, self.algorithm)
            if digest is None:
                try:
                    digest = file_digest(f, self.algorithm)
                    self.cache.put(f, self.algorithm, digest)
                except OSError:
                    digest = "unreadable"
            self.result[str(f)] = digest

    def join(self) -> dict[str, str]:
        self._thread.join()
        self.cache.save()
        return self.result

    def cancel(self) -> None:
        self._stop = True


def write_model_card(
    folder: Path,
    recipe_yaml: str,
    method: Any,
    inputs: list[tuple[str, str, list[tuple[str, str]]]],
    report: dict[str, Any],
    library: str = "transformers",
    differences: list[str] | None = None,
    carries: list[str] | None = None,
) -> None:
    """README.md with YAML front matter, the method and its paper, every input file's digest, the recipe.

    ``differences``: where the recipe was translated from another format (mergekit), how this merge computes
    differently from that tool (one line each). ``carries``: which tokenizer and chat template the output carries
    (where the recipe chose them)."""
    base_refs = [ref for role, ref, _ in inputs if role == "base"]
    lines = ["---", f"library_name: {library}", "tags:", "- omnimerge", "- merge"]
    if base_refs and re.fullmatch(r"[\w.\-]+/[\w.\-]+", base_refs[0]):
        lines += ["base_model:", f"- {base_refs[0]}"]
    lines += ["---", "", "# Merged adapter" if library == "peft" else "# Merged model", ""]
    lines += [
        f"Merged with [omnimerge](https://pypi.org/project/omnimerge/) using **{method.name}**: {method.summary}",
        "",
        f"Paper: {method.paper}" + (f" — {method.url}" if method.url else ""),
        "",
        f"Merged tensors: {report.get('merged', 0)}; copied from the base: {report.get('copied', 0)}; "
        f"time: {report.get('seconds', 0):.1f} s."
        + (f" Resumed: {report['resumed']} tensors were kept from an unfinished earlier run (verified against "
           f"its journal)." if report.get("resumed") else ""),
        "",
        "## Inputs",
        "",
        "| role | model | file | digest |",
        "|---|---|---|---|",
    ]
    for role, ref, files in inputs:
        for fname, digest in files:
            lines.append(f"| {role} | `{ref}` | `{fname}` | `{digest}` |")
    if carries:
        lines += ["", "## Tokenizer and chat template", ""] + [f"- {c}" for c in carries]
    if differences:
        lines += ["", "## Differences from the recipe's own tool", ""] + [f"- {d}" for d in differences]
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    try:
        (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
        (folder / "omnimerge_recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"{folder}: cannot write the model card ({e.strerror or e})") from None
