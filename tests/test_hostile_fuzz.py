"""Fuzzing as tests (hypothesis): safetensors headers, indexes, recipes and adapter configs. Whatever is
generated, the outcome is a clean result or one :class:`OmniMergeError` line (exit 2 in the CLI): never another
exception, a hang, or an output that the safetensors library cannot read.

Profiles (tests/conftest.py): ``ci`` (default, 50 examples per property) and ``long`` (2000):
``HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_hostile_fuzz.py``."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors import safe_open

import omnimerge
from omnimerge.checkpoint.lora import AdapterFiles
from omnimerge.checkpoint.reader import Checkpoint
from omnimerge.errors import OmniMergeError
from tests.hostile import st_bytes

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "I8", "Q4", "f32", ""]
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8, "I8": 1}
junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(-3, 3), max_size=3))
names = st.text(st.characters(codec="utf-8") | st.sampled_from(["\ud800", "[", "/", "."]), max_size=12) | \
    st.sampled_from(["[/x]", "..", "[bold]", "\udcff"])


@st.composite
def headers(draw: Any) -> tuple[dict[str, Any], int]:
    """Mostly well-formed headers with one or two things wrong (or none), and a data area size."""
    n = draw(st.integers(1, 4))
    entries: dict[str, Any] = {}
    at = 0
    for i in range(n):
        dtype = draw(st.sampled_from(DTYPES[:8]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = SIZES[dtype] * (torch.Size(shape).numel())
        entries[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    size = at
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(entries)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "name", "metadata", "size"]))
        if field == "entry":
            entries[name] = draw(junk)
        elif field == "name":
            entries[draw(names)] = entries.pop(name)
        elif field == "metadata":
            entries["__metadata__"] = draw(st.one_of(junk, st.dictionaries(st.text(max_size=3), junk, max_size=2)))
        elif field == "size":
            size = max(0, size + draw(st.integers(-8, 8)))
        elif isinstance(entries[name], dict):
            entries[name][field] = draw(st.one_of(junk, st.lists(st.integers(-(2**65), 2**65), max_size=3),
                                                  st.sampled_from(DTYPES)))
    return entries, size


def _refused_or_readable(folder: Path) -> None:
    """Checkpoint(folder) refuses with one line, or what it reads is exactly what the safetensors library reads."""
    try:
        ck = Checkpoint(folder)
    except OmniMergeError as e:
        assert "\n" not in str(e) and str(folder) in str(e)
        event("refused")
        return
    event("read")
    with ck:
        for f in ck.files:
            with safe_open(str(f), "pt") as lib:
                for name in lib.keys():  # noqa: SIM118
                    theirs, ours = lib.get_tensor(name), ck.read(name)
                    assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
                    assert _raw(theirs) == _raw(ours)  # the same bytes (NaN payloads included)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@given(headers())
def test_fuzz_safetensors_header(h: tuple[dict[str, Any], int]) -> None:
    entries, size = h
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        raw = json.dumps(entries, ensure_ascii=True).encode()
        (d / "model.safetensors").write_bytes(st_bytes(raw, bytes(range(256)) * (size // 256) + bytes(size % 256)))
        _refused_or_readable(d)


@given(st.binary(max_size=200), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_fuzz_safetensors_raw_bytes(header: bytes, n: int, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        length = n if n % 3 else len(header)  # mostly the true length
        (d / "model.safetensors").write_bytes(struct.pack("<Q", length) + header + data)
        _refused_or_readable(d)


SHARDS = st.sampled_from(["s1.safetensors", "s2.safetensors", "../s1.safetensors", "/etc/hostname",
                          "sub/../s1.safetensors", "s3.safetensors", "s1.safetensors/", "./s2.safetensors"])


@st.composite
def weight_maps(draw: Any) -> dict[str, Any]:
    """The true map, with 0-2 entries changed, added or removed."""
    wm: dict[str, Any] = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["set", "add", "drop"]))
        key = draw(st.sampled_from(sorted(wm))) if wm and op != "add" else draw(names)
        if op == "drop":
            wm.pop(key, None)
        else:
            wm[key] = draw(SHARDS | names | junk)
    return wm


@given(weight_maps(), st.booleans() | st.just(True))
def test_fuzz_index(weight_map: dict[str, Any], wrap: bool) -> None:
    with tempfile.TemporaryDirectory() as td:
        d = Path(td) / "ck"
        d.mkdir()
        f32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        (d / "s1.safetensors").write_bytes(st_bytes({"a": f32, "b": {**f32, "data_offsets": [4, 8]}}, bytes(8)))
        (d / "s2.safetensors").write_bytes(st_bytes({"c": f32}, bytes(4)))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": weight_map} if wrap else weight_map))
        try:
            ck = Checkpoint(d)
        except OmniMergeError as e:
            assert "\n" not in str(e)
            event("refused")
            return
        event("opened")
        with ck:
            for name, shard in weight_map.items():  # every listed tensor is where the index says, inside d
                assert ck.tensors[name].file == d / shard
                assert ck.tensors[name].file.resolve().is_relative_to(d.resolve())


# --- recipes and adapter configs: through omnimerge.merge on a tiny family --------------------------------------------
def _family(root: Path) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for i, member in enumerate(("base", "e0", "e1")):
        (root / member).mkdir(parents=True)
        save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(4, 4, generator=g) * (1 + i),
                   "model.norm.weight": torch.ones(4)}, str(root / member / "model.safetensors"))
        (root / member / "config.json").write_text('{"model_type": "llama"}')
    return root


values = st.recursive(junk | st.text(max_size=20), lambda c: st.lists(c, max_size=3) |
                      st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
METHODS = ["task_arithmetic", "ties", "linear", "dare_ties", "nope", "della", "breadcrumbs"]


def _mostly(good: Any, bad: Any) -> Any:
    return st.one_of(good, good, good, bad)


@given(st.fixed_dictionaries({}, optional={
    "merge_method": _mostly(st.sampled_from(METHODS), values),
    "parameters": _mostly(st.dictionaries(st.sampled_from(["scaling", "density", "weight", "seed", "lambda"]),
                                          _mostly(st.floats(0, 1), values | st.floats() | st.integers()),
                                          max_size=3), values),
    "dtype": _mostly(st.sampled_from(["float32", "bfloat16"]), values | st.just("int8")),
    "out_dtype": _mostly(st.sampled_from(["float16", "float32"]), values),
    "select": _mostly(st.just({"include": ["language_model"]}), values),
    "modifiers": _mostly(st.just([{"dare": {"drop_rate": 0.5, "seed": 1}}]), values),
    "shard_size": _mostly(st.sampled_from(["1KB", "5GB", 100]), values | st.sampled_from(["infGB", "-1", "0"])),
    "output": _mostly(st.just("full"), values | st.just("lora")), "rank": _mostly(st.integers(1, 4), values),
    "extra_key": values}))
def test_fuzz_recipe(fields: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as td:
        fam = _family(Path(td) / "fam")
        recipe = {"base_model": str(fam / "base"), "models": [{"model": str(fam / "e0")}, {"model": str(fam / "e1")}],
                  "merge_method": "task_arithmetic", **fields}
        try:
            text = yaml.safe_dump(recipe)
        except yaml.YAMLError:
            return
        (Path(td) / "r.yaml").write_text(text)
        out = Path(td) / "out"
        try:
            omnimerge.merge(str(Path(td) / "r.yaml"), out, progress=False, hash_inputs="none", sync=False)
        except OmniMergeError as e:
            assert "\n" not in str(e) and len(str(e)) < 2000, str(e)[:300]
            assert not out.exists()
            event(f"refused: {type(e).__name__}")
            return
        event("merged")
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), "pt") as lib:
                for k in lib.keys():  # noqa: SIM118
                    lib.get_tensor(k)


@given(st.fixed_dictionaries({"r": st.integers(-1, 4) | values, "lora_alpha": st.floats() | values},
                             optional={"rank_pattern": values | st.dictionaries(names, values | st.integers()),
                                       "alpha_pattern": values | st.dictionaries(names, values | st.floats()),
                                       "use_rslora": values, "use_dora": values, "bias": values,
                                       "init_lora_weights": values, "target_modules": values,
                                       "peft_type": st.sampled_from(["LORA", "lora", "IA3"]) | values}))
def test_fuzz_adapter_config(cfg: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        m = "base_model.model.model.layers.0.mlp.up_proj"
        save_file({f"{m}.lora_A.weight": torch.ones(2, 4), f"{m}.lora_B.weight": torch.ones(4, 2)},
                  str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **cfg}))
        try:
            ad = AdapterFiles(d)
        except OmniMergeError as e:
            assert "\n" not in str(e)
            event("refused")
            return
        event("accepted")
        for mod in ad.modules.values():
            assert mod.r >= 1 and mod.alpha > 0 and mod.scale > 0
