"""Drive the real Cog server (`python -m cog.server.http`, no Docker) against weights served from 127.0.0.1.

Used by the tests and by script/demo.
"""

from __future__ import annotations

import base64
import functools
import http.server
import importlib
import mimetypes
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-body are expected (the downloader's size probe reads 1 byte and closes)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_directory(directory: Path) -> http.server.ThreadingHTTPServer:
    """A plain static file server for `directory` on 127.0.0.1, in a background thread."""
    server = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


class CogServer:
    """`python -m cog.server.http` serving one predictor, as in the Cog image but without Docker."""

    def __init__(
        self,
        module: str,
        *,
        weights_url: str,
        cache: Path,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        """`env` adds to (or overrides) the server's environment; `cwd` is where it runs (and looks for .cog/)."""
        self.port, self.cache = free_port(), cache
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PORT": str(self.port),
            "COG_PREDICT_TYPE_STUB": f"{module}.py:Predictor",
            importlib.import_module(module).CHECKPOINT.variable: weights_url,
            "WEIGHTS_CACHE_DIR": str(cache),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=cwd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=300)

    def status(self) -> str:
        return self.client.get("/health-check").json()["status"]

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the Cog server exited"
            try:
                status = self.status()
            except httpx.TransportError:
                status = "DOWN"
            if status == "READY":
                return
            assert status in ("DOWN", "STARTING", "BUSY"), f"server status {status}"  # BUSY: finishing a prediction
            time.sleep(0.2)
        raise TimeoutError("the Cog server did not become READY")

    def predict(self, *, timeout: float = 300, **inputs: Any) -> dict:
        """A synchronous prediction; waits while the slot is still busy finishing the previous one (HTTP 409).

        `timeout`: seconds the prediction may take (the tests' tiny models take seconds; a real 50-step run with CPU
        offload on a slow GPU takes many minutes: script/demo gives it hours)."""
        deadline = time.monotonic() + 30
        post = functools.partial(self.client.post, "/predictions", json={"input": inputs}, timeout=timeout)
        while (response := post()).status_code == 409:
            assert time.monotonic() < deadline, "the server stayed busy"
            time.sleep(0.1)
        assert response.status_code == 200, response.text
        return response.json()

    def predict_async(self, prediction_id: str, webhook: str, **inputs: Any) -> None:
        """Start a prediction that reports its progress to `webhook` (Cog has no GET for a prediction's state)."""
        body = {"id": prediction_id, "input": inputs, "webhook": webhook}
        response = self.client.post("/predictions", json=body, headers={"Prefer": "respond-async"})
        assert response.status_code == 202, response.text

    def cancel(self, prediction_id: str) -> None:
        assert self.client.post(f"/predictions/{prediction_id}/cancel").status_code == 200

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
