"""The spectral methods' per-layer benchmark (benchmarks/bench_spectral.py, owned by the spectral work) run
from this harness, so that its table lands in docs/performance.md with the rest."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def per_layer(args: list[str], log=print) -> dict:  # type: ignore[no-untyped-def]
    script = REPO / "benchmarks" / "bench_spectral.py"
    if not script.is_file():
        return {"skipped": "benchmarks/bench_spectral.py not found"}
    cmd = [sys.executable, str(script), *args]
    log("spectral per-layer benchmark: " + " ".join(cmd[1:]))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    out = p.stdout.strip()
    lines = [ln for ln in out.splitlines() if not ln.startswith("RESULT ")]
    return {"command": "python benchmarks/bench_spectral.py " + " ".join(args), "returncode": p.returncode,
            "seconds": time.perf_counter() - t, "output": "\n".join(lines)[-12000:],
            "stderr_tail": p.stderr[-2000:] if p.returncode else ""}
