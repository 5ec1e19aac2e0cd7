"""Run a command as a child process and measure it: wall time (from the parent, process start included),
peak RSS (``ru_maxrss`` from ``wait4``: anonymous + file-backed pages, i.e. touched mmap'd input pages count
too) and the peak anonymous RSS (``RssAnon`` sampled from ``/proc/PID/status`` every 50 ms)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass


@dataclass
class Measured:
    wall: float
    max_rss: int  # bytes
    peak_anon: int  # bytes (sampled)
    returncode: int
    stdout: str
    stderr: str
    cpu: float  # user + sys seconds


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_measured(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Measured:
    """Measure ``argv`` through a small launcher process: a child's ``ru_maxrss`` includes the resident set of
    the process it was forked from (Linux keeps the pre-exec high-water mark), so the child is started from a
    fresh Python without torch (~10 MB), not from this harness."""
    import json
    import sys

    lp = subprocess.run([sys.executable, "-S", __file__, json.dumps({"argv": argv, "cwd": cwd})],
                        capture_output=True, text=True, env=env)
    if lp.returncode != 0:
        raise RuntimeError(f"launcher failed: {lp.stderr[-2000:]}")
    d = json.loads(lp.stdout.strip().splitlines()[-1])
    return Measured(**d)


def _run_here(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Measured:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=out_w, stderr=err_w, env=env, cwd=cwd)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks[fd].append(b)
        os.close(fd)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    for r in readers:
        r.start()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kb(p.pid, "RssAnon:"))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        wall=wall,
        max_rss=ru.ru_maxrss * 1024,
        peak_anon=peak[0] * 1024,
        returncode=p.returncode,
        stdout=b"".join(chunks[out_r]).decode(errors="replace"),
        stderr=b"".join(chunks[err_r]).decode(errors="replace"),
        cpu=ru.ru_utime + ru.ru_stime,
    )


def loadavg() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError):
        return float("nan")


if __name__ == "__main__":  # the launcher (see run_measured)
    import json
    import sys
    from dataclasses import asdict

    req = json.loads(sys.argv[1])
    print(json.dumps(asdict(_run_here(req["argv"], cwd=req.get("cwd")))))
