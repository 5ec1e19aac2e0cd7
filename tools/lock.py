"""Write ``requirements.lock``: the exact versions of the environment the published numbers came from.

Refresh it from a fresh virtual environment that resolved today's releases within ``pyproject.toml``'s ranges::

    rm -rf /tmp/lockenv && python3 -m venv /tmp/lockenv
    /tmp/lockenv/bin/pip install torch==2.13.0          # the CPU build first (else pip takes a CUDA build)
    /tmp/lockenv/bin/pip install -e ".[dev]"
    /tmp/lockenv/bin/python tools/lock.py               # rewrites requirements.lock

then rebuild the zoos and re-run the benchmarks (their numbers depend on the library versions), and run the
tests (``tests/test_lock.py`` checks that the lock satisfies ``pyproject.toml``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEADER = """\
# Exact versions of the environment the published results (docs/*.md) came from; written by tools/lock.py.
# Install: pip install torch==2.13.0 && pip install -r requirements.lock -e ".[dev]"
# Refresh: see tools/lock.py (then rebuild the zoos and regenerate the docs).
"""


def freeze(python: str = sys.executable) -> list[str]:
    """``pip freeze --all`` of ``python``'s environment (setuptools included: torch requires it), without pip
    and the editable project, local labels dropped
    (``torch==2.13.0+cpu`` -> ``torch==2.13.0``, which the CPU build on disk satisfies)."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable",
                          "--disable-pip-version-check"],
                         check=True, capture_output=True, text=True).stdout
    lines = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e")) or "==" not in line:
            continue
        name, _, version = line.partition("==")
        if name.lower() in ("omnimerge", "pip"):
            continue
        lines.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(lines, key=str.lower)


def main() -> None:
    path = Path(__file__).resolve().parent.parent / "requirements.lock"
    path.write_text(HEADER + "\n".join(freeze()) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
