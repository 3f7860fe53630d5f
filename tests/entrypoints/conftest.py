"""Servers for the entrypoint tests.

- `start_fake_server(...)`: the real app and AsyncEngine around tests.entrypoints.fake_engine, served
  by uvicorn in a thread of the test process (milliseconds per request, no model).
- `RealServer`: `python -m pagedserve.entrypoints.openai` in a subprocess on the real model, on a
  free port, ready once /health answers 200.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    def __init__(self, engine, **settings) -> None:
        import uvicorn

        from pagedserve.async_engine import AsyncEngine
        from pagedserve.entrypoints.openai.server import ServerSettings, build_app

        max_queued = settings.pop("max_queued_requests", None)
        self.engine = engine
        self.async_engine = AsyncEngine(engine, max_queued_requests=max_queued, log_stats_interval=0.5)
        self.app = build_app(self.async_engine, ServerSettings(**settings))
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=settings.get("shutdown_timeout", 30.0),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def start_fake_server() -> Iterator:
    servers: list[FakeServer] = []

    def start(engine=None, **settings) -> FakeServer:
        from tests.entrypoints.fake_engine import FakeEngine

        server = FakeServer(engine or FakeEngine(), **settings)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


class RealServer:
    """The server as users run it: a subprocess."""

    def __init__(
        self,
        model_dir: str | None,
        *flags: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        new_session: bool = False,
    ) -> None:
        """new_session: the server leads its own process group (os.killpg on proc.pid reaches it and its
        engine processes, as systemd's stop of a unit does)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pagedserve.entrypoints.openai"]
        if model_dir:
            cmd.append(model_dir)
        cmd += ["--port", str(self.port), "--log-level", "INFO", "--disable-access-log", *flags]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pagedserve-test-server-{self.port}.log"
        self.log = open(self.log_path, "w+b")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=new_session,
        )
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not become healthy:\n{self.output()}")
            time.sleep(0.25)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
