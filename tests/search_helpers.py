"""Helpers of the search tests: a search recipe on the quick zoo, a local PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from omnimerge.bench import TASKS

REPO = Path(__file__).resolve().parents[1]


def search_recipe(path: Path, zoo: Any, **search: Any) -> Path:
    spec = {"objective": {"suite": "mini", "limit": 4, "fresh": 4, "test_limit": 4},
            "weights": [0.0, 1.0], "layer_groups": 4, "sampler": "tpe", "top": 2, **search}
    data = {"base_model": str(zoo.base_dir), "models": [{"model": str(zoo.full_dir(t)), "name": t} for t in TASKS],
            "merge_method": "task_arithmetic", "parameters": {"scaling": 1.0},
            "select": {"include": ["language_model", "vision_tower", "projector"]}, "dtype": "float32",
            "search": spec}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "omnimerge.cli", *map(str, args)]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MPLBACKEND="Agg")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server in a temporary folder (unix socket there, a free port), stopped at the end; yields
    its SQLAlchemy URL. Fails loudly when the server binaries are missing. As root, the server runs as the
    ``postgres`` user (initdb refuses root)."""
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not on PATH: PostgreSQL's server binaries are needed by this test")
    tmp = Path(tempfile.mkdtemp(prefix="omsearch-pg-"))  # short: a unix socket path is limited to ~107 bytes
    data, sock = tmp / "data", tmp / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(sock, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    try:
        subprocess.run([*prefix, "initdb", "-D", str(data), "-U", "omnimerge", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        subprocess.run([*prefix, "pg_ctl", "-D", str(data), "-l", str(tmp / "log"), "-w", "-o",
                        f"-k {sock} -p {port} -c listen_addresses=''", "start"], check=True, capture_output=True)
        try:
            yield f"postgresql+psycopg://omnimerge@/postgres?host={sock}&port={port}"
        finally:
            subprocess.run([*prefix, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
