"""Recipes and options: a YAML alias bomb is refused fast, before anything is built, with one short line; huge
numbers, infinite sizes and invalid devices give one line; values quoted in messages are truncated."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.hostile import no_leftovers, one_line_error, toy_family, toy_recipe

BOMB = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, c in zip([""] + list("abcdefgh"), "abcdefghi", strict=True)
)


def test_alias_bomb_is_refused_fast(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    assert len(BOMB) < 600
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB)
    t0 = time.perf_counter()
    res = cli("merge", p, "-o", tmp_path / "out")
    line = one_line_error(res, "alias bomb")
    assert time.perf_counter() - t0 < 2.0
    assert len(line) < 300, line


def test_alias_bomb_under_a_recipe_key(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """The bomb as the value of a real key: the validation message does not echo the 9^9 expansion."""
    fam = toy_family(tmp_path / "models")
    r = yaml.safe_load(toy_recipe(tmp_path, fam).read_text())
    text = yaml.safe_dump(r) + BOMB.replace("i: &i", "select: &i")
    p = tmp_path / "r.yaml"
    p.write_text(text)
    one_line_error(cli("merge", p, "-o", tmp_path / "out"))


def test_small_aliases_still_work(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / "models")
    p = tmp_path / "r.yaml"
    p.write_text(f"base_model: {fam / 'base'}\nmodels:\n  - model: {fam / 'expert0'}\n    parameters: &w "
                 f"{{weight: 1.0}}\n  - model: {fam / 'expert1'}\n    parameters: *w\n"
                 f"merge_method: task_arithmetic\nparameters: {{scaling: 0.3}}\n")
    assert cli("merge", p, "-o", tmp_path / "out", "-q").code == 0


@pytest.mark.parametrize("args,needle", [
    (["--set", "parameters.scaling=" + "9" * 400], "scaling"),
    (["--set", "parameters.scaling=" + "9" * 5000], "scaling"),
    (["--set", "parameters.scaling=1e400"], "scaling"),
    (["--set", "parameters.scaling=.nan"], "scaling"),
    (["--shard-size", "infGB"], "shard_size"),
    (["--shard-size", "nanGB"], "shard_size"),
    (["--shard-size", "-5GB"], "shard_size"),
    (["--shard-size", "9" * 400], "shard_size"),
    (["--set", "shard_size=" + "9" * 400], "shard_size"),
    (["--device", "foo"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--device", "meta"], "--device"),
    (["--device", "[bold]x" * 50], "--device"),
], ids=lambda v: str(v)[:30])
def test_bad_numbers_and_options(tmp_path: Path, cli, args: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / "models")
    out = tmp_path / "out"
    line = one_line_error(cli("merge", toy_recipe(tmp_path, fam), "-o", out, "-q", *args), needle)
    assert len(line) < 400, line
    no_leftovers(out)


def test_400_digit_scaling_in_the_file(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / "models")
    p = toy_recipe(tmp_path, fam)
    p.write_text(p.read_text().replace("scaling: 0.3", "scaling: " + "9" * 400))
    line = one_line_error(cli("merge", p, "-o", tmp_path / "out", "-q"), "scaling")
    assert len(line) < 400


def test_non_utf8_path_in_the_recipe(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """A lone surrogate (how a non-UTF-8 file name reaches Python) is refused before the merge, not after it
    when the model card is written."""
    fam = toy_family(tmp_path / "models")
    p = tmp_path / "r.yaml"
    models = "".join(f'  - model: "{fam / e}"\n' for e in ("expert0", "expert1\\udcff", "expert2"))
    p.write_text(f'base_model: "{fam / "base"}"\nmodels:\n{models}merge_method: task_arithmetic\n')
    out = tmp_path / "out"
    one_line_error(cli("merge", p, "-o", out, "-q"), "models[1].model", "not a valid UTF-8 string")
    no_leftovers(out)
