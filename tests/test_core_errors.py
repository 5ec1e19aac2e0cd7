"""Bad inputs: each gives one readable message naming the file/tensor, exit status 2, no traceback, and
nothing left at the output path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import golden_root

LM_Q = "model.language_model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def family(tmp_path: Path) -> Path:
    """A copy of the golden full-T3 toy family (base + 3 experts) that tests may damage."""
    src = golden_root() / "full-T3" / "models"
    dst = tmp_path / "models"
    shutil.copytree(src, dst)
    return dst


def recipe(tmp_path: Path, family: Path, **kw) -> Path:  # type: ignore[no-untyped-def]
    r = {
        "base_model": str(family / "base"),
        "models": [{"model": str(family / f"expert{i}")} for i in range(3)],
        "merge_method": "ties",
        "parameters": {"scaling": 0.3, "density": 0.2},
    }
    r.update(kw)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def assert_clean_failure(res, out: Path, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert res.code == 2, res.text
    assert "Traceback" not in res.text
    assert "error:" in res.err
    for f in fragments:
        assert f in res.err.replace("\n", " "), f"{f!r} not in {res.err!r}"
    assert not out.exists(), "a failed merge must leave nothing at the output path"
    leftovers = [p.name for p in out.parent.iterdir() if "omnimerge-tmp" in p.name]
    assert not leftovers, leftovers


def test_missing_model(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    r = recipe(tmp_path, family, models=[{"model": str(tmp_path / "nope")}])
    out = tmp_path / "out"
    assert_clean_failure(cli("merge", r, "-o", out), out, "nope", "no such folder")


def test_folder_without_weights(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    (family / "expert1" / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert_clean_failure(cli("merge", recipe(tmp_path, family), "-o", out), out, "expert1", "no weights found")


def test_truncated_safetensors(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    f = family / "expert2" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    assert_clean_failure(cli("merge", recipe(tmp_path, family), "-o", out), out, str(f), "truncated")


def test_corrupt_safetensors_header(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    f = family / "expert0" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json !!!"
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_clean_failure(cli("merge", recipe(tmp_path, family), "-o", out), out, str(f), "corrupt")


def _edit(path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_expert_missing_tensor(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    _edit(family / "expert1" / "model.safetensors", lambda sd: sd.pop(LM_Q))
    out = tmp_path / "out"
    assert_clean_failure(cli("merge", recipe(tmp_path, family), "-o", out), out, "expert1", LM_Q)


def test_shape_mismatch(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    _edit(family / "expert1" / "model.safetensors", lambda sd: sd.update({LM_Q: torch.zeros(8, 8)}))
    out = tmp_path / "out"
    assert_clean_failure(cli("merge", recipe(tmp_path, family), "-o", out), out, LM_Q, "[8, 8]", "[32, 32]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(tmp_path: Path, family: Path, cli, bad: float) -> None:  # type: ignore[no-untyped-def]
    def poison(sd):  # type: ignore[no-untyped-def]
        sd[LM_Q][3, 4] = bad

    _edit(family / "expert2" / "model.safetensors", poison)
    out = tmp_path / "out"
    assert_clean_failure(cli("merge", recipe(tmp_path, family), "-o", out), out, "expert2", LM_Q, "NaN or Inf")


def test_expert_of_another_architecture(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    (family / "expert0" / "config.json").write_text(json.dumps({"model_type": "llava",
                                                                 "architectures": ["LlavaForConditionalGeneration"]}))
    out = tmp_path / "out"
    assert_clean_failure(cli("merge", recipe(tmp_path, family), "-o", out), out, "expert0", "llava", "golden_toy")


def test_unknown_method(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    res = cli("merge", recipe(tmp_path, family, merge_method="tiez"), "-o", out)
    assert_clean_failure(res, out, "unknown method 'tiez'", "task_arithmetic")


def test_unknown_parameter(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    res = cli("merge", recipe(tmp_path, family, parameters={"densty": 0.2}), "-o", out)
    assert_clean_failure(res, out, "'densty'", "ties")


def test_weights_summing_to_zero(tmp_path: Path, family: Path, cli, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """weight_average divides by sum_i w_i: a zero sum is refused in one line before any tensor is read (it
    was a bare ValueError per tensor, a traceback at the CLI)."""
    import omnimerge.engine as engine

    models = [{"model": str(family / f"expert{i}"), "parameters": {"weight": w}} for i, w in enumerate([1, -1.5, 0.5])]
    started: list[int] = []
    monkeypatch.setattr(engine.MergeRun, "open", lambda self: started.append(1))
    out = tmp_path / "out"
    res = cli("merge", recipe(tmp_path, family, merge_method="weight_average", parameters={}, models=models), "-o", out)
    assert_clean_failure(res, out, "weight_average", "[1.0, -1.5, 0.5] sums to zero")
    assert not started, "the recipe must be refused before the inputs are opened"


@pytest.mark.parametrize("density", [0, 1.5, -0.1, "abc"])
def test_density_out_of_range(tmp_path: Path, family: Path, cli, density) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    res = cli("merge", recipe(tmp_path, family), "-o", out, "--set", f"parameters.density={density}")
    assert_clean_failure(res, out, "'density'", "(0, 1]")


def test_unknown_recipe_key(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    res = cli("merge", recipe(tmp_path, family, merge_methd="ties"), "-o", out)
    assert_clean_failure(res, out, "merge_methd", "unknown key")


def test_no_experts(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    res = cli("merge", recipe(tmp_path, family, models=[]), "-o", out)
    assert_clean_failure(res, out, "models")


def test_output_exists_without_overwrite(tmp_path: Path, family: Path, cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("merge", recipe(tmp_path, family), "-o", out)
    assert res.code == 2 and "already exists" in res.err and "--overwrite" in res.err
    assert (out / "keep.txt").read_text() == "mine"
    res = cli("merge", recipe(tmp_path, family), "-o", out, "--overwrite", "-q")
    assert res.code == 0, res.text
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_disk_full_during_write(tmp_path: Path, family: Path, cli, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def full_after_a_few(fd, data, offset):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_after_a_few)
    out = tmp_path / "out"
    res = cli("merge", recipe(tmp_path, family), "-o", out, "-q")
    assert_clean_failure(res, out, "disk is full")
    assert calls["n"] > 3


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """The installed `omnimerge` entry point itself: one error line, exit 2."""
    exe = Path(sys.executable).with_name("omnimerge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "omnimerge.cli"]
    res = subprocess.run([*cmd, "merge", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "missing.yaml" in res.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["merge", "RECIPE"], "Missing option '-o' / '--output'"),
    (["merge", "RECIPE", "-o", "OUT", "--no-such-flag"], "No such option: --no-such-flag"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_exit_2_without_traceback(tmp_path: Path, args: list[str], needle: str) -> None:
    """Command-line mistakes (the typer/click usage errors, raised from typer's vendored click since typer
    0.23) are shown as usage plus one error line, exit status 2; they once escaped as a traceback, status 1."""
    exe = Path(sys.executable).with_name("omnimerge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "omnimerge.cli"]
    r = tmp_path / "r.yaml"
    r.write_text("merge_method: ties\n")
    argv = [str(r) if a == "RECIPE" else str(tmp_path / "o") if a == "OUT" else a for a in args]
    res = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and needle in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def test_atomic_output_all_or_nothing(tmp_path: Path) -> None:
    """The output folder of every run (engine, both modality runs): committed whole, or nothing left behind."""
    from omnimerge.checkpoint.writer import AtomicOutput
    from omnimerge.errors import OutputError

    target = tmp_path / "out"

    def leftovers() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if p.name != "out")

    # an OSError becomes the one-line user error naming the output
    with pytest.raises(OutputError, match=r"out.*No space left"), AtomicOutput(target, overwrite=False) as out:
        (out.folder() / "model.safetensors").write_bytes(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not target.exists() and leftovers() == []
    with pytest.raises(KeyboardInterrupt), AtomicOutput(target, overwrite=False) as out:
        (out.folder() / "a").write_text("1")
        raise KeyboardInterrupt
    assert not target.exists() and leftovers() == []
    with AtomicOutput(target, overwrite=False) as out:
        (out.folder() / "a").write_text("1")
        out.commit()
    assert (target / "a").read_text() == "1" and leftovers() == []
    with pytest.raises(OutputError, match="already exists"), AtomicOutput(target, overwrite=False) as out:
        (out.folder() / "a").write_text("2")
        out.commit()
    assert (target / "a").read_text() == "1" and leftovers() == []
    with AtomicOutput(target, overwrite=True) as out:
        (out.folder() / "b").write_text("2")
        out.commit()
    assert sorted(p.name for p in target.iterdir()) == ["b"] and leftovers() == []
