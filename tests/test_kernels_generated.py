"""The generated kernel module matches its generator (``tools/gen_kernels.py --check``, also run by CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gen():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_kernels", ROOT / "tools" / "gen_kernels.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_kernels_are_current() -> None:
    assert _gen().main(["--check"]) == 0


def test_stale_generated_kernels_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    gen = _gen()
    stale = tmp_path / "ties_fused.py"
    text = gen.generate()
    assert "_f32(e0[j]) - b" in text
    stale.write_text(text.replace("_f32(e0[j]) - b", "_f32(e0[j]) + b", 1))
    monkeypatch.setattr(gen, "OUT", stale)
    assert gen.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0  # regenerating fixes it
