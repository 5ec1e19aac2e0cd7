"""No code from inputs, ever: a checkpoint whose ``config.json`` carries ``auto_map`` and an unknown
``model_type``, with a Python file beside it that writes a marker file when imported, is merged (full and
``output: lora``), inspected and merged in ``mode: modality`` with ``y`` on standard input (the answer to
transformers' "run the custom code?" prompt). The marker must never appear; each run ends in a clean merge or
one line with exit status 2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.hostile import one_line_error, toy_family, toy_recipe

EVIL = """\
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import PretrainedConfig, PreTrainedModel
class EvilConfig(PretrainedConfig):
    model_type = "evil_remote"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""


def _remote_code_family(tmp_path: Path) -> tuple[Path, Path]:
    """The toy family with every member turned into a remote-code checkpoint; returns (family, marker)."""
    fam = toy_family(tmp_path / "models")
    marker = tmp_path / "MARKER"
    for member in ("base", "expert0", "expert1", "expert2"):
        d = fam / member
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="evil_remote", architectures=["EvilModel"],
                   auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                             "AutoModelForCausalLM": "evil.EvilModel"})
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return fam, marker


@pytest.fixture
def yes_on_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 20))


def _clean_merge_or_one_line(res, out: Path) -> None:  # type: ignore[no-untyped-def]
    assert "Traceback" not in res.text, res.text
    assert "trust_remote_code" not in res.text and "[y/N]" not in res.text, res.text
    if res.code == 0:
        assert out.is_dir()
    else:
        one_line_error(res)


@pytest.mark.parametrize("output", ["full", "lora"])
def test_merge_never_runs_checkpoint_code(tmp_path: Path, cli, yes_on_stdin: None, output: str) -> None:  # type: ignore[no-untyped-def]
    fam, marker = _remote_code_family(tmp_path)
    extra = {"output": "lora", "rank": 4} if output == "lora" else {}
    out = tmp_path / "out"
    res = cli("merge", toy_recipe(tmp_path, fam, **extra), "-o", out, "-q")
    assert not marker.exists(), "the checkpoint's Python file was imported"
    _clean_merge_or_one_line(res, out)
    assert res.code == 0, res.text  # the merge itself needs no model code
    assert (out / "evil.py").is_file() or output == "lora"  # remote-code files are copied, never imported


def test_inspect_never_runs_checkpoint_code(tmp_path: Path, cli, yes_on_stdin: None) -> None:  # type: ignore[no-untyped-def]
    fam, marker = _remote_code_family(tmp_path)
    res = cli("inspect", fam / "base", "--tensors")
    assert not marker.exists()
    assert res.code == 0 and "evil_remote" in res.out, res.text


def test_modality_mode_never_runs_checkpoint_code(tmp_path: Path, cli, yes_on_stdin: None) -> None:  # type: ignore[no-untyped-def]
    fam, marker = _remote_code_family(tmp_path)
    out = tmp_path / "out"
    res = cli("merge", toy_recipe(tmp_path, fam, mode="modality"), "-o", out, "-q")
    assert not marker.exists()
    _clean_merge_or_one_line(res, out)


def test_lora_output_with_y_on_real_stdin_subprocess(tmp_path: Path) -> None:
    """The reported attack exactly: the CLI in its own process, ``y`` piped into its standard input."""
    fam, marker = _remote_code_family(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "omnimerge.cli", "merge",
                        str(toy_recipe(tmp_path, fam, output="lora", rank=4)), "-o", str(out), "-q"],
                       input="y\ny\n", capture_output=True, text=True, env=env, timeout=120)
    assert not marker.exists(), p.stdout + p.stderr
    assert p.returncode == 0, p.stderr
    assert "[y/N]" not in p.stdout + p.stderr and (out / "adapter_config.json").is_file()
