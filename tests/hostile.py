"""Helpers for the hostile-input tests (``test_hostile_*.py``): a damageable copy of the golden toy family,
recipes, and the one-line-failure check."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import golden_root


def toy_family(dst: Path) -> Path:
    """A copy of the golden full-T3 toy family (``base``, ``expert0..2``) under ``dst``, which tests may damage."""
    shutil.copytree(golden_root() / "full-T3" / "models", dst)
    return dst


def toy_recipe(tmp_path: Path, family: Path, name: str = "recipe.yaml", **kw: Any) -> Path:
    r: dict[str, Any] = {
        "base_model": str(family / "base"),
        "models": [{"model": str(family / f"expert{i}")} for i in range(3)],
        "merge_method": "task_arithmetic",
        "parameters": {"scaling": 0.3},
    }
    r.update(kw)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(r))
    return p


def one_line_error(res: Any, *fragments: str) -> str:
    """The run failed with exit status 2 and exactly one ``error:`` line (no traceback); returns that line."""
    assert res.code == 2, res.text
    assert "Traceback" not in res.text, res.text
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error:")]
    assert len(err) == 1, res.err
    # rich wraps a long line at the console width only when told to: soft_wrap keeps it one line
    assert len(lines) == 1, res.err
    for f in fragments:
        assert f in err[0], f"{f!r} not in {err[0]!r}"
    return err[0]


def no_leftovers(out: Path) -> None:
    """Nothing at ``out`` and no temporary folder beside it."""
    assert not out.exists(), f"{out} exists after a failed run"
    if out.parent.exists():
        left = [p.name for p in out.parent.iterdir() if "omnimerge-tmp" in p.name or ".omt-" in p.name]
        assert not left, left


def st_bytes(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    """A safetensors file from a header (a dict, dumped as JSON, or raw bytes) and its data area."""
    import json
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data
