"""Shared test helpers (moved from tests/e2e/test_sweeps.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mlflow import MlflowClient

from helpers import ROOT


def client_for(uri: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(uri)
    return client, client.get_experiment_by_name("runner").experiment_id


def cli(tmp_path: Path, *args: str, uri: str | None = None, background: bool = False):
    store = [
        f"tracking.uri={uri or f'sqlite:///{tmp_path}/mlflow.db'}",
        f"tracking.artifact_location={tmp_path}/art",
        f"data.cache_dir={tmp_path}/data",
        f"cache.dir={tmp_path}/cache",
        f"hydra.run.dir={tmp_path}/run",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    command = [sys.executable, "-m", "runner", *args, *store]
    if background:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@contextlib.contextmanager
def running_mlflow_server(db: Path, *args: str, env: dict | None = None, start_s: float = 90) -> Iterator[str]:
    """`mlflow server` on a free loopback port over the SQLite file `db` (more server `args`), its address
    once /health answers; stopped (SIGTERM, then SIGKILL after 30 s) at the end."""
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--workers",
            "1",
            *args,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_s
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
