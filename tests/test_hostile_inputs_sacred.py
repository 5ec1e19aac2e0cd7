"""Inputs are sacred: the output may not be, contain, or lie inside any input folder (base, experts, adapters,
copy_files_from), compared as resolved real paths (symlinks, ``..``), with --overwrite or not; the refusal comes
before any work and leaves every input byte for byte as it was."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.hostile import one_line_error, toy_family, toy_recipe


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def fam(tmp_path: Path) -> Path:
    return toy_family(tmp_path / "models")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["base", "expert1", "family", "inside_base", "via_symlink", "via_dotdot",
                                   "copy_files_from"])
def test_output_overlapping_an_input_is_refused(tmp_path: Path, fam: Path, cli, where: str,  # type: ignore[no-untyped-def]
                                                overwrite: bool) -> None:
    kw = {}
    if where == "copy_files_from":
        other = toy_family(tmp_path / "other")
        kw["copy_files_from"] = str(other / "base")
    out = {
        "base": fam / "base",
        "expert1": fam / "expert1",
        "family": fam,  # contains every input
        "inside_base": fam / "base" / "merged",
        "via_symlink": tmp_path / "link",
        "via_dotdot": fam / "expert0" / ".." / "expert2",
        "copy_files_from": tmp_path / "other" / "base" / "sub",
    }[where]
    if where == "via_symlink":
        os.symlink(fam / "expert0", out)
    r = toy_recipe(tmp_path, fam, **kw)
    before = _digest(tmp_path)
    args = ["merge", r, "-o", out, "-q"] + (["--overwrite"] if overwrite else [])
    line = one_line_error(cli(*args), "the output")
    assert any(w in line for w in ("is the", "contains the", "lies inside the")), line
    assert _digest(tmp_path) == before, "an input changed"
    assert not [p for p in tmp_path.rglob("*omnimerge-tmp*")], "temporary folder left behind"


def test_output_beside_the_inputs_still_merges(tmp_path: Path, fam: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """A sibling whose name shares a prefix with an input (``base`` / ``base-merged``) is not inside it."""
    out = fam / "base-merged"
    res = cli("merge", toy_recipe(tmp_path, fam), "-o", out, "-q")
    assert res.code == 0, res.text
    assert (out / "model.safetensors").is_file()


def test_api_refuses_too(tmp_path: Path, fam: Path) -> None:
    import omnimerge
    from omnimerge.errors import OutputError

    with pytest.raises(OutputError, match="is the base model"):
        omnimerge.merge(toy_recipe(tmp_path, fam), fam / "base", overwrite=True)
    assert (fam / "base" / "model.safetensors").is_file()


def test_task_model_output_may_not_be_the_unified_merge_or_its_base(tmp_path: Path) -> None:
    from omnimerge.checkpoint.writer import check_output_apart
    from omnimerge.errors import OutputError

    merged, base = tmp_path / "merged", tmp_path / "base"
    merged.mkdir()
    base.mkdir()
    inputs = [("unified merge", merged), ("base model", base)]
    for bad, rel in ((merged, "is the unified merge"), (merged / "t", "lies inside the unified merge"),
                     (tmp_path, "contains the unified merge")):
        with pytest.raises(OutputError, match=rel):
            check_output_apart(bad, inputs)
    check_output_apart(tmp_path / "task-vqa", inputs)  # beside them: fine
