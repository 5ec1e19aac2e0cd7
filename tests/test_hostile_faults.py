"""Faults: SIGTERM and SIGHUP clean up like SIGINT (no temporary folder, no parent folders made for the
output); a dead run's temporary folder (its owner PID gone, e.g. after SIGKILL) is removed by the next run to
the same output, which says so; a live run's folder is left alone; a 245-byte output name works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.hostile import toy_family, toy_recipe

# the CLI in a child process that signals itself once every tensor is in the temporary folder, just before the
# writer finishes: the worst moment (the folder is complete but not yet committed)
CHILD = """\
import os, signal, sys, time
import omnimerge.checkpoint.writer as w
orig = w.ShardedWriter.finish
SIG = getattr(signal, sys.argv[1])
# a run in the background (nohup, `cmd &`) inherits an ignored SIGHUP or SIGINT, which the CLI and Python
# rightly leave ignored: start from the dispositions of a foreground run
if SIG in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(SIG, signal.SIG_DFL)
elif SIG == signal.SIGINT:
    signal.signal(SIG, signal.default_int_handler)
def finish(self):
    os.kill(os.getpid(), SIG)
    time.sleep(30)  # the signal arrives first
    return orig(self)
w.ShardedWriter.finish = finish
sys.argv = ["omnimerge"] + sys.argv[2:]
from omnimerge.cli import main
main()
"""


def _child(tmp_path: Path, sig: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, sig, *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_cleans_up(tmp_path: Path, sig: str) -> None:
    fam = toy_family(tmp_path / "models")
    out = tmp_path / "made" / "for" / "out"
    p = _child(tmp_path, sig, "merge", str(toy_recipe(tmp_path, fam)), "-o", str(out), "-q")
    assert p.returncode == 128 + getattr(signal, sig), p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "made").exists(), "the parent folders made for the output are left"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["models", "recipe.yaml"]


def test_dead_runs_folder_removed_by_next_run(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / "models")
    out = tmp_path / "out"
    r = toy_recipe(tmp_path, fam)
    p = _child(tmp_path, "SIGKILL", "merge", str(r), "-o", str(out), "-q")
    assert p.returncode == -signal.SIGKILL
    left = [x for x in tmp_path.iterdir() if "omnimerge-tmp" in x.name]
    assert len(left) == 1 and (left[0] / ".omnimerge-owner").is_file()  # what SIGKILL leaves
    res = cli("merge", r, "-o", out, "-q")
    assert res.code == 0, res.text
    flat = "".join(res.err.split())  # rich wraps long lines
    assert "".join(f"removed {left[0]}: the temporary folder of an earlier run".split()) in flat, res.err
    assert not left[0].exists()
    assert not (out / ".omnimerge-owner").exists()
    assert not [x for x in tmp_path.iterdir() if "omnimerge-tmp" in x.name]


def test_live_runs_folder_left_alone(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from omnimerge.checkpoint.writer import OWNER_FILE, make_temp_dir

    fam = toy_family(tmp_path / "models")
    out = tmp_path / "out"
    busy = make_temp_dir(out)  # owned by this (live) process: another run's work in progress
    assert (busy / OWNER_FILE).read_text().split()[1] == str(os.getpid())
    res = cli("merge", toy_recipe(tmp_path, fam), "-o", out, "-q")
    assert res.code == 0, res.text
    assert busy.is_dir()


def test_245_byte_output_name(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    fam = toy_family(tmp_path / "models")
    out = tmp_path / ("é" * 122 + "x")  # 245 bytes of UTF-8
    assert len(out.name.encode()) == 245
    res = cli("merge", toy_recipe(tmp_path, fam), "-o", out, "-q")
    assert res.code == 0, res.text
    assert load_file(str(out / "model.safetensors"))
    res = cli("merge", toy_recipe(tmp_path, fam), "-o", out, "-q", "--overwrite")  # the old-folder name too
    assert res.code == 0, res.text


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_signal_at_random_points_of_a_long_merge(tmp_path: Path, sig: str) -> None:
    """A merge that takes seconds, signalled at seeded random moments: the output is either complete and
    byte-identical to an uninterrupted run's, or absent with nothing beside it (after SIGKILL: at most the dead
    run's folder, which ``--resume`` completes byte-identically from the tensors it verified; the CI-sized
    version with kills at chosen moments is tests/test_resume.py)."""
    import random
    import time

    import torch
    from safetensors.torch import save_file

    root = tmp_path / "fam"
    g = torch.Generator().manual_seed(0)
    for member in ("base", "e0", "e1", "e2"):
        (root / member).mkdir(parents=True)
        save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 1024, generator=g) for i in range(8)},
                  str(root / member / "model.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base_model: {root / 'base'}\nmodels:\n" + "".join(f"  - model: {root / e}\n" for e in
                      ("e0", "e1", "e2")) + "merge_method: ties\nparameters: {scaling: 0.5, density: 0.3}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "omnimerge.cli", "merge", str(recipe), "-q", "--hash", "sha256"]
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    subprocess.run([*cmd, "-o", str(ref)], check=True, env=env, timeout=300, capture_output=True)
    took = time.perf_counter() - t0
    rnd = random.Random(sig)
    interrupted = resumed = 0
    for k in range(4):
        out = tmp_path / f"out{k}"
        p = subprocess.Popen([*cmd, "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        at = rnd.uniform(0.3, took)
        time.sleep(at)
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=120)
        assert b"Traceback" not in err, err
        beside = [x for x in tmp_path.iterdir() if x.name.startswith(f".out{k}")]
        if out.exists():
            for f in ("model.safetensors",):
                assert (out / f).read_bytes() == (ref / f).read_bytes()
            assert not beside
            continue
        interrupted += 1
        if sig == "SIGTERM":  # (-15: signalled while Python was still starting, before the CLI could catch it)
            assert p.returncode in (128 + signal.SIGTERM, -signal.SIGTERM) and not beside, (p.returncode, beside)
        else:
            assert len(beside) <= 1
            r = subprocess.run([*cmd, "-o", str(out), "--resume"], env=env, timeout=300, capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stderr
            resumed += "kept from the unfinished earlier run" in " ".join(r.stdout.split())
            assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
            assert not [x for x in tmp_path.iterdir() if x.name.startswith(f".out{k}")]
    assert interrupted, "no run was interrupted: the merge is too short for this test"
    assert sig == "SIGTERM" or resumed, "no killed run had a finished tensor to keep"
