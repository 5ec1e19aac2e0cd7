"""One validating reader, as strict as the safetensors library: every malformed header, index, config, adapter
config and ``.bin`` is refused with one line naming the file (and the tensor or key), never read into a
silently wrong output; only regular files inside the checkpoint folder are read."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omnimerge.checkpoint.reader import Checkpoint
from omnimerge.errors import CheckpointError
from tests.hostile import no_leftovers, one_line_error, st_bytes, toy_family, toy_recipe

T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
U = {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}
DATA = bytes(24)

BAD_HEADERS = {
    "negative offset": ({"w": {**T, "data_offsets": [-8, 8]}, "u": U}, "data_offsets"),
    "offset out of range": ({"w": {**T, "data_offsets": [0, 16]}, "u": {**U, "data_offsets": [16, 10**30]}},
                            "u"),
    "overlap": ({"w": T, "u": {**U, "data_offsets": [8, 16]}}, "overlap"),
    "gap": ({"w": T, "u": {**U, "shape": [1], "data_offsets": [20, 24]}}, "gap"),
    "negative shape": ({"w": {**T, "shape": [-2, -2]}, "u": U}, "shape"),
    "float shape": ({"w": {**T, "shape": [2.0, 2]}, "u": U}, "shape"),
    "string shape": ({"w": {**T, "shape": "2,2"}, "u": U}, "shape"),
    "bool shape": ({"w": {**T, "shape": [True, 2]}, "u": U}, "shape"),
    "size mismatch": ({"w": {**T, "shape": [3, 2]}, "u": U}, "span 16 bytes"),
    "trailing bytes": ({"w": T, "u": {**U, "shape": [1], "data_offsets": [16, 20]}}, "after the last"),
    "dtype not a string": ({"w": {**T, "dtype": 7}, "u": U}, "dtype"),
    "unknown dtype": ({"w": {**T, "dtype": "Q4"}, "u": U}, "dtype"),
    "entry not an object": ({"w": [1, 2], "u": U}, "corrupt header entry"),
    "missing field": ({"w": {"dtype": "F32", "shape": [2, 2]}, "u": U}, "corrupt header entry"),
    "metadata not strings": ({"__metadata__": {"format": 1}, "w": T, "u": U}, "__metadata__"),
    "offsets of three": ({"w": {**T, "data_offsets": [0, 8, 16]}, "u": U}, "data_offsets"),
}


def _ckpt(tmp_path: Path, body: bytes) -> Path:
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors").write_bytes(body)
    return d


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_refused_like_safetensors(tmp_path: Path, case: str) -> None:
    header, needle = BAD_HEADERS[case]
    d = _ckpt(tmp_path, st_bytes(header, DATA))
    with pytest.raises(CheckpointError) as ei:
        Checkpoint(d)
    msg = str(ei.value)
    assert "\n" not in msg and str(d / "model.safetensors") in msg and needle in msg, msg
    # the library refuses it too (its error types vary)
    with pytest.raises(Exception), safe_open(str(d / "model.safetensors"), "pt") as f:  # noqa: B017,PT011
        for k in f.keys():  # noqa: SIM118
            f.get_tensor(k)


@pytest.mark.parametrize("raw,needle", [
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
     b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}', "appears twice"),
    (b'{"\\ud800": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}', "UTF-8"),
    (b'{"w\xff": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}', "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "'{'"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "JSON"),
    (b'{"w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 1' + b"0" * 5000 + b']}}', "JSON"),
], ids=["duplicate-name", "lone-surrogate", "non-utf8", "nested-array", "nested-object", "huge-number"])
def test_bad_header_json(tmp_path: Path, raw: bytes, needle: str) -> None:
    d = _ckpt(tmp_path, st_bytes(raw, DATA))
    with pytest.raises(CheckpointError, match=needle):
        Checkpoint(d)


def test_huge_header_length_refused_without_reading(tmp_path: Path) -> None:
    d = _ckpt(tmp_path, struct.pack("<Q", 100_000_001) + b"{" + b" " * 64)
    with pytest.raises(CheckpointError, match="header of 100000001 bytes"):
        Checkpoint(d)


def test_duplicate_tensor_name_in_a_merge_is_one_line(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / "models")
    f = fam / "expert1" / "model.safetensors"
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    raw = f.read_bytes()[8:8 + n].decode()
    name = next(iter(json.loads(raw)))
    entry = json.dumps({name: json.loads(raw)[name]})[1:-1]
    dup = ("{" + entry + ", " + raw[1:]).encode()  # the first entry again, in front: the second would win
    f.write_bytes(st_bytes(dup, f.read_bytes()[8 + n:]))
    out = tmp_path / "out"
    one_line_error(cli("merge", toy_recipe(tmp_path, fam), "-o", out, "-q"), str(f), "appears twice")
    no_leftovers(out)


# --- indexes ---------------------------------------------------------------------------------------------------------
def _sharded(tmp_path: Path, weight_map: dict[str, str]) -> Path:
    d = tmp_path / "sh"
    d.mkdir()
    (d / "a.safetensors").write_bytes(st_bytes({"w": T, "u": U}, DATA))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


@pytest.mark.parametrize("target,needle", [
    ("/etc/passwd", "outside"), ("../sh2/a.safetensors", "outside"), ("sub/../../x.safetensors", "outside"),
    ("", "outside"), (7, "file name"),
])
def test_index_pointing_outside_refused(tmp_path: Path, target: object, needle: str) -> None:
    d = _sharded(tmp_path, {"w": "a.safetensors", "u": target})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match=needle) as ei:
        Checkpoint(d)
    assert "model.safetensors.index.json" in str(ei.value)


def test_index_tensor_no_shard_holds_is_an_error(tmp_path: Path) -> None:
    d = _sharded(tmp_path, {"w": "a.safetensors", "u": "a.safetensors", "ghost": "a.safetensors"})
    with pytest.raises(CheckpointError, match="'ghost'.*does not hold it"):
        Checkpoint(d)


def test_index_fine(tmp_path: Path) -> None:
    d = _sharded(tmp_path, {"w": "a.safetensors", "u": "a.safetensors"})
    assert set(Checkpoint(d).tensors) == {"w", "u"}


# --- regular files only ------------------------------------------------------------------------------------------------
def test_fifo_weight_file_refused_not_blocking(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        Checkpoint(d)


def test_fifo_config_refused(tmp_path: Path) -> None:
    d = _ckpt(tmp_path, st_bytes({"w": T, "u": U}, DATA))
    os.mkfifo(d / "config.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        Checkpoint(d)


def test_symlinked_chat_template_outside_refused(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / "models")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    os.symlink(secret, fam / "base" / "chat_template.jinja")
    out = tmp_path / "out"
    one_line_error(cli("merge", toy_recipe(tmp_path, fam), "-o", out, "-q"), "chat_template.jinja", "outside")
    no_leftovers(out)


@pytest.mark.parametrize(("name", "chat_template"), [("tokenizer.json", None), ("tokenizer_config.json", None),
                                                     ("chat_template.jinja", "auto")])
def test_symlinked_tokenizer_file_of_an_expert_refused(tmp_path: Path, cli, name: str,  # type: ignore[no-untyped-def]
                                                       chat_template: str | None) -> None:
    """An expert's tokenizer file (read to build a union vocabulary, or to choose a chat template) that links to a
    file outside its checkpoint is refused before transformers opens it; nothing is written."""
    import yaml

    from tests import vocab_family

    fam = tmp_path / "models"
    vocab_family.build(fam)
    secret = tmp_path / "secret.json"
    secret.write_bytes((fam / "b" / name).read_bytes())
    (fam / "b" / name).unlink()
    os.symlink(secret, fam / "b" / name)
    recipe = {"merge_method": "task_arithmetic", "base_model": "models/base", "tokenizer": {"source": "union"},
              "select": {"include": [".*"]}, "models": [{"model": "models/b", "parameters": {"weight": 1.0}}]}
    if chat_template:
        recipe["chat_template"] = chat_template
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    one_line_error(cli("merge", tmp_path / "r.yaml", "-o", out, "-q"), name, "outside")
    no_leftovers(out)


def test_hf_cache_layout_symlinks_accepted(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / "models")
    repo = tmp_path / "hub" / "models--x--base"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in (fam / "base").iterdir():
        blob = blobs / f"blob-{p.name}"
        p.rename(blob)
        os.symlink(Path("..") / ".." / "blobs" / blob.name, snap / p.name)
    res = cli("merge", toy_recipe(tmp_path, fam, base_model=str(snap)), "-o", tmp_path / "out", "-q")
    assert res.code == 0, res.text


# --- .bin, configs, adapter configs ------------------------------------------------------------------------------------
def test_bin_with_non_string_keys_refused(tmp_path: Path) -> None:
    d = tmp_path / "b"
    d.mkdir()
    torch.save({1: torch.zeros(2), "ok": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tensor names must be strings, found the key 1"):
        Checkpoint(d)


@pytest.mark.parametrize("body,needle", [(b"\xff\xfe{}", "UTF-8"), (b"[" * 100_000, "JSON"), (b"[1]", "object")])
def test_bad_config_json(tmp_path: Path, body: bytes, needle: str) -> None:
    d = _ckpt(tmp_path, st_bytes({"w": T, "u": U}, DATA))
    (d / "config.json").write_bytes(body)
    with pytest.raises(CheckpointError, match=needle):
        Checkpoint(d)


def _adapter(tmp_path: Path, **cfg: object) -> Path:
    from safetensors.torch import save_file

    d = tmp_path / "ad"
    d.mkdir(exist_ok=True)
    m = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{m}.lora_A.weight": torch.zeros(2, 8), f"{m}.lora_B.weight": torch.zeros(8, 2)},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                       "target_modules": ["q_proj"], **cfg}))
    return d


@pytest.mark.parametrize("cfg,needle", [
    ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern['q_proj']' must be a positive integer, got '2'"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']' must be a positive integer, got 0"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern['q_proj']' must be a positive number"),
    ({"alpha_pattern": {"q_proj": 0}}, "alpha_pattern['q_proj']' must be a positive number"),
    ({"r": 2.5}, "'r' must be a positive integer"),
    ({"lora_alpha": float("inf")}, "'lora_alpha' must be a positive number"),
    ({"rank_pattern": [1]}, "must be a mapping"),
])
def test_bad_adapter_config(tmp_path: Path, cfg: dict[str, object], needle: str) -> None:
    from omnimerge.checkpoint.lora import AdapterFiles

    d = _adapter(tmp_path, **cfg)
    with pytest.raises(CheckpointError) as ei:
        AdapterFiles(d)
    assert needle in str(ei.value) and "adapter_config.json" in str(ei.value), str(ei.value)


def test_good_adapter_config(tmp_path: Path) -> None:
    from omnimerge.checkpoint.lora import AdapterFiles

    assert len(AdapterFiles(_adapter(tmp_path, rank_pattern={"q_proj": 2})).modules) == 1


def test_adapter_fifo_weights_refused(tmp_path: Path) -> None:
    from omnimerge.checkpoint.lora import AdapterFiles

    d = _adapter(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    os.mkfifo(d / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        AdapterFiles(d)
