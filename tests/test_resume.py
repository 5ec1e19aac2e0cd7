"""``--resume``: a merge killed at any point continues from the tensors its journal lists and whose bytes verify,
and the output is byte-identical to an uninterrupted run's; what cannot be trusted (a changed recipe or input, a
damaged tensor, a torn journal line) is merged again, saying so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import save_file

from omnimerge.checkpoint.writer import JOURNAL_FILE, OWNER_FILE, RESUME_FILE, ShardedWriter
from tests.conftest import REPO
from tests.hostile import one_line_error

# the CLI in a child process that kills itself (SIGKILL: no cleanup at all) once K tensors are final, or, with
# K = 0, just before the writer finishes (every tensor journaled, the output not yet committed)
CHILD = """\
import os, signal, sys
import omnimerge.checkpoint.writer as w
K = int(sys.argv[1])
done = [0]
orig = w.ShardedWriter.completed
def completed(self, name):
    orig(self, name)
    done[0] += 1
    if done[0] == K:
        os.kill(os.getpid(), signal.SIGKILL)
w.ShardedWriter.completed = completed
if K == 0:
    def finish(self):
        os.kill(os.getpid(), signal.SIGKILL)
    w.ShardedWriter.finish = finish
sys.argv = ["omnimerge"] + sys.argv[2:]
from omnimerge.cli import main
main()
"""
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
LAYERS = 6


def _family(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for member in ("base", "e0", "e1", "e2"):
        t = {"model.embed_tokens.weight": torch.randn(64, 96, generator=g)}
        for i in range(LAYERS):
            t[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(192, 96, generator=g)
            t[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(96, 192, generator=g)
            t[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(96, generator=g)
        (root / member).mkdir(parents=True)
        save_file(t, str(root / member / "model.safetensors"))
    return root


def _recipe(path: Path, fam: Path, method: str = "ties", scaling: float = 0.5) -> Path:
    path.write_text(f"base_model: {fam / 'base'}\nmodels:\n" + "".join(f"  - model: {fam / e}\n" for e in
                    ("e0", "e1", "e2")) + f"merge_method: {method}\nparameters: {{scaling: {scaling}}}\n"
                    "shard_size: 200KB\n")
    return path


def _killed(k: int, recipe: Path, out: Path, *extra: str) -> None:
    p = subprocess.run([sys.executable, "-c", CHILD, str(k), "merge", str(recipe), "-o", str(out), "-q", *extra],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()


def _beside(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.omnimerge-tmp-")]


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}


@pytest.fixture()
def setup(tmp_path: Path, cli):  # type: ignore[no-untyped-def]
    fam = _family(tmp_path / "fam")
    recipe = _recipe(tmp_path / "r.yaml", fam)
    ref = tmp_path / "ref"
    res = cli("merge", recipe, "-o", ref, "-q")
    assert res.code == 0, res.text
    return fam, recipe, _shards(ref)


@pytest.mark.parametrize("k", [1, 7, 15, 0])
def test_killed_merge_resumes_byte_identically(tmp_path: Path, cli, setup, k: int) -> None:  # type: ignore[no-untyped-def]
    _fam, recipe, ref = setup
    assert len(ref) > 2  # several shards, an index
    out = tmp_path / "out"
    _killed(k, recipe, out)
    (left,) = _beside(out)
    assert {JOURNAL_FILE, RESUME_FILE, OWNER_FILE} <= {p.name for p in left.iterdir()}
    journaled = [json.loads(line)[0] for line in (left / JOURNAL_FILE).read_text().splitlines()]
    res = cli("merge", recipe, "-o", out, "-q", "--resume")
    assert res.code == 0, res.text
    assert _shards(out) == ref
    assert not _beside(out)
    assert not {JOURNAL_FILE, RESUME_FILE, OWNER_FILE} & {p.name for p in out.iterdir()}
    kept = len(journaled)  # raw copies (norms, embeddings) are copied again, not journaled
    if k == 0:  # killed with every tensor final: each merged one is kept
        assert kept == 2 * LAYERS
    assert f"{kept} of {3 * LAYERS + 1} tensors it wrote are verified and kept" in " ".join(res.err.split())
    if kept:
        assert f"({kept} kept from the unfinished earlier run)" in " ".join(res.out.split())
        assert f"Resumed: {kept} tensors were kept" in (out / "README.md").read_text()


def test_damaged_tensor_and_torn_journal_line_are_merged_again(tmp_path: Path, cli, setup) -> None:  # type: ignore[no-untyped-def]
    _fam, recipe, ref = setup
    out = tmp_path / "out"
    _killed(9, recipe, out)
    (left,) = _beside(out)
    journal = (left / JOURNAL_FILE).read_text().splitlines()
    name = json.loads(journal[0])[0]
    # damage the first journaled tensor's bytes where they lie in their shard
    for path in sorted(left.glob("model*.safetensors")):
        raw = bytearray(path.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        if name in header:
            at = 8 + n + header[name]["data_offsets"][0]
            raw[at:at + 4] = bytes(4 * [0x7F])
            path.write_bytes(bytes(raw))
            break
    else:
        raise AssertionError(f"{name} is in no shard")
    with open(left / JOURNAL_FILE, "a") as f:
        f.write('["model.layers.5.mlp.up_proj.wei')  # what a kill in mid-line leaves
    res = cli("merge", recipe, "-o", out, "-q", "--resume")
    assert res.code == 0, res.text
    assert _shards(out) == ref
    assert f"{len(journal) - 1} of {3 * LAYERS + 1} tensors" in " ".join(res.err.split())


def test_changed_recipe_is_not_resumed(tmp_path: Path, cli, setup) -> None:  # type: ignore[no-untyped-def]
    fam, recipe, _ref = setup
    out = tmp_path / "out"
    _killed(7, recipe, out)
    other = _recipe(tmp_path / "r2.yaml", fam, scaling=0.7)
    res = cli("merge", other, "-o", out, "-q", "--resume")
    assert res.code == 0, res.text
    flat = " ".join(res.err.split())
    assert "not resumed: its parameters, recipe differ from this run's" in flat, res.err
    assert "kept" not in res.out
    fresh = tmp_path / "fresh"
    assert cli("merge", other, "-o", fresh, "-q").code == 0
    assert _shards(out) == _shards(fresh)


def test_changed_input_is_not_resumed(tmp_path: Path, cli, setup) -> None:  # type: ignore[no-untyped-def]
    fam, recipe, _ref = setup
    out = tmp_path / "out"
    _killed(7, recipe, out)
    f = fam / "e1" / "model.safetensors"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # e.g. the expert was saved again
    res = cli("merge", recipe, "-o", out, "-q", "--resume")
    assert res.code == 0, res.text
    assert "not resumed: its input files differ" in " ".join(res.err.split()), res.err


def test_without_resume_the_dead_runs_folder_is_removed_and_says_resume_would_continue(
        tmp_path: Path, cli, setup) -> None:  # type: ignore[no-untyped-def]
    _fam, recipe, ref = setup
    out = tmp_path / "out"
    _killed(7, recipe, out)
    res = cli("merge", recipe, "-o", out, "-q")
    assert res.code == 0, res.text
    assert "(--resume would have continued it)" in " ".join(res.err.split())
    assert _shards(out) == ref and not _beside(out)


def test_resume_with_nothing_to_resume_is_a_plain_merge(tmp_path: Path, cli, setup) -> None:  # type: ignore[no-untyped-def]
    _fam, recipe, ref = setup
    out = tmp_path / "out"
    res = cli("merge", recipe, "-o", out, "-q", "--resume")
    assert res.code == 0 and "resuming" not in res.err, res.text
    assert _shards(out) == ref


def test_interrupted_resume_run_keeps_its_folder_for_the_next(tmp_path: Path, setup, cli) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM cleans up a plain run (tests/test_hostile_faults.py); a run given --resume keeps its unfinished
    folder instead, says where, and the next --resume completes it."""
    _fam, recipe, ref = setup
    out = tmp_path / "out"
    child = CHILD.replace("os.kill(os.getpid(), signal.SIGKILL)", "os.kill(os.getpid(), signal.SIGTERM); "
                          "import time; time.sleep(30)").replace(
        "import os, signal, sys", "import os, signal, sys\nsignal.signal(signal.SIGTERM, signal.SIG_DFL)")
    p = subprocess.run([sys.executable, "-c", child, "5", "merge", str(recipe), "-o", str(out), "-q", "--resume"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "Traceback" not in p.stderr
    (left,) = _beside(out)
    assert "kept the unfinished output in" in " ".join(p.stderr.split()), p.stderr
    res = cli("merge", recipe, "-o", out, "-q", "--resume")
    assert res.code == 0, res.text
    assert "resuming an unfinished earlier run" in res.err
    assert _shards(out) == ref and not _beside(out)


def test_the_newest_matching_folder_is_resumed_and_others_removed(tmp_path: Path, cli, setup) -> None:  # type: ignore[no-untyped-def]
    fam, recipe, ref = setup
    out = tmp_path / "out"
    _killed(3, _recipe(tmp_path / "r2.yaml", fam, scaling=0.9), out)
    (other,) = _beside(out)
    held = other.rename(tmp_path / "held")  # (the next run would remove it: two are left only by races)
    _killed(5, recipe, out)
    held.rename(other)
    assert len(_beside(out)) == 2
    res = cli("merge", recipe, "-o", out, "-q", "--resume")
    assert res.code == 0, res.text
    assert "not resumed: its parameters, recipe differ" in " ".join(res.err.split())
    assert _shards(out) == ref and not _beside(out)


def test_resume_refused_where_it_cannot_apply(tmp_path: Path, cli, setup) -> None:  # type: ignore[no-untyped-def]
    fam, _recipe_path, _ref = setup
    r = tmp_path / "lora.yaml"
    r.write_text(_recipe(tmp_path / "x.yaml", fam).read_text() + "output: lora\nrank: 4\n")
    res = cli("merge", r, "-o", tmp_path / "o", "-q", "--resume")
    one_line_error(res, "--resume", "output: lora")
    assert not (tmp_path / "o").exists()


# -- the writer's journal ---------------------------------------------------------------------------------------
def _plan() -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [("a", torch.float32, (4, 8)), ("b", torch.bfloat16, (1000,)), ("c", torch.float32, (3,))]


def _journal(folder: Path) -> dict[str, str]:
    return dict(json.loads(line) for line in (folder / JOURNAL_FILE).read_text().splitlines())


def test_journal_digests_are_the_final_bytes_however_written(tmp_path: Path) -> None:
    import numpy as np

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 8, generator=g), torch.randn(1000, generator=g).to(torch.bfloat16)
    w = ShardedWriter(tmp_path, _plan(), 10**9, journal=True)
    w.write("a", a)
    # b in order, then patched: hashed from the file
    w.write_part("b", b[:600], 0, False)
    w.write_part("b", b[600:], 600, True)
    idx = np.array([3, 700], dtype=np.int64)
    patched = b.clone()
    patched[torch.from_numpy(idx)] = torch.tensor([5.0, -5.0], dtype=torch.bfloat16)
    w.patch("b", idx, patched[torch.from_numpy(idx)])
    w.completed("a")
    w.completed("b")
    j = _journal(tmp_path)
    assert j == {"a": xxhash.xxh3_128(a.numpy().tobytes()).hexdigest(),
                 "b": xxhash.xxh3_128(patched.view(torch.int16).numpy().tobytes()).hexdigest()}
    w.close()


def test_out_of_order_parts_are_hashed_from_the_file(tmp_path: Path) -> None:
    b = torch.arange(1000, dtype=torch.float32).to(torch.bfloat16)
    w = ShardedWriter(tmp_path, _plan(), 10**9, journal=True)
    w.write_part("b", b[500:], 500, False)
    w.write_part("b", b[:500], 0, True)
    w.completed("b")
    w.completed("c")  # never written: not journaled
    assert _journal(tmp_path) == {"b": xxhash.xxh3_128(b.view(torch.int16).numpy().tobytes()).hexdigest()}
    w.close()


def test_reuse_keeps_only_verified_tensors_of_shards_with_the_planned_header(tmp_path: Path) -> None:
    a = torch.ones(4, 8)
    b = torch.zeros(1000, dtype=torch.bfloat16)
    plan = _plan()
    w = ShardedWriter(tmp_path, plan, 200, journal=True)  # a | b | c: three shards
    w.write("a", a)
    w.write("b", b)
    w.completed("a")
    w.completed("b")
    w.close()
    assert len(w.shards) == 3
    w2 = ShardedWriter(tmp_path, plan, 200, journal=True, reuse=True)
    assert w2.resumed == {"a", "b"}
    w2.close()
    # a shard rewritten with another header (another plan) is recreated and its tensors are not kept
    other = [("a", torch.float32, (4, 8)), ("b", torch.float32, (500,)), ("c", torch.float32, (3,))]
    w3 = ShardedWriter(tmp_path, other, 200, journal=True, reuse=True)
    assert w3.resumed == {"a"}
    assert _journal(tmp_path) == {"a": xxhash.xxh3_128(a.numpy().tobytes()).hexdigest()}
    w3.close()
