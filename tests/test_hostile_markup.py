"""User text is never markup: paths, tensor names and config values with rich markup in them (``[/x]``,
``[bold]``) are printed as they are, in errors, notes, the summary and ``inspect``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.hostile import one_line_error, toy_family, toy_recipe

WEIRD = "we[/x]ird [bold]name[/bold]"


def test_merge_with_markup_in_every_path(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / WEIRD)
    shutil.move(fam / "expert1", fam / f"expert1{WEIRD}")
    models = [{"model": str(fam / n)} for n in ("expert0", f"expert1{WEIRD}", "expert2")]
    out = tmp_path / f"out{WEIRD}"
    res = cli("merge", toy_recipe(tmp_path, fam, models=models), "-o", out)
    assert res.code == 0, res.text
    assert "Traceback" not in res.text
    flat = lambda t: "".join(t.split())  # noqa: E731 - rich wraps long lines at spaces
    assert flat(f"-> {out}") in flat(res.out), res.out
    assert (out / "model.safetensors").is_file()


def test_error_with_markup_in_the_path(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / f"gone{WEIRD}"
    fam = toy_family(tmp_path / "models")
    out = tmp_path / "out"
    line = one_line_error(cli("merge", toy_recipe(tmp_path, fam, models=[{"model": str(missing)}]), "-o", out))
    assert f"gone{WEIRD}" in line, line


def test_inspect_with_markup_in_names_and_config(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    import torch
    from safetensors.torch import save_file

    d = tmp_path / f"ck{WEIRD}"
    d.mkdir(parents=True)
    save_file({f"model.layers.0.{WEIRD}.weight": torch.zeros(4, 4)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "[red]x[/red][/]", "architectures": ["[/q]"]}))
    res = cli("inspect", d, "--tensors")
    assert res.code == 0, res.text
    flat = "".join(res.out.split())
    assert "model_type=[red]x[/red][/]" in flat and "architectures=[/q]" in flat, res.out
    assert "".join(str(d).split()) in flat and "[bold]name[/bold].weight" in flat, res.out
