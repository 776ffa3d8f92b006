"""The HTTP transport (downloads.fetch_file) against misbehaving servers on 127.0.0.1: stalls, trickles, redirect
loops, odd headers, and a cancel while a read is blocked. Every failure is one phrase, never a library's class."""

from __future__ import annotations

import ctypes
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cog import CancelationException

import downloads
from downloads import DownloadError
from errors import WeightsError
from weights import Source, fetch_weights


class Misbehaving(http.server.ThreadingHTTPServer):
    """Each path a behaviour: /stall (headers, then silence), /trickle (a byte every 0.2 s), /loop (redirects to
    itself), /odd-range (a Content-Range total of '²'), /huge-range (5,000 digits)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                try:
                    self.respond()
                except OSError:
                    pass

            def respond(self) -> None:
                if self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path in ("/odd-range", "/huge-range"):
                    total = "²" if self.path == "/odd-range" else "9" * 5000
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes 0-0/{total}")
                    self.send_header("Content-Length", "1")
                    self.end_headers()
                    self.wfile.write(b"x")
                    return
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.flush()
                if self.path == "/stall":
                    server.release.wait(60)
                for _ in range(1000):
                    if server.release.is_set():
                        return
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"


@pytest.fixture
def server() -> Iterator[Misbehaving]:
    srv = Misbehaving()
    yield srv
    srv.release.set()
    srv.shutdown()


def fetch(url: str, dest: Path, limit: float = 60.0) -> int:
    return downloads.fetch_file(url, dest, max_bytes=10**6, time_limit=lambda size: limit, make_room=lambda n: None)


def test_a_stalled_server_is_retried_then_given_up(
    server: Misbehaving, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(downloads, "_TIMEOUT", downloads.httpx.Timeout(0.3, connect=5.0))
    monkeypatch.setattr(downloads, "RETRY_BASE_S", 0.01)
    with pytest.raises(DownloadError) as error:
        fetch(server.url("/stall"), tmp_path / "f")
    assert str(error.value) == f"no data for {downloads.STALL_S:.0f} s (gave up after {downloads.RETRIES} attempts)"


def test_a_trickle_hits_the_overall_time_limit(server: Misbehaving, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as error:
        fetch(server.url("/trickle"), tmp_path / "f", limit=1.0)
    assert str(error.value) == "the download took too long (the server is too slow or stalled)"


def test_a_cancel_lands_while_a_read_is_blocked(server: Misbehaving, tmp_path: Path) -> None:
    """Cog raises its cancel in the prediction's thread at a bytecode boundary: the caller must not sit in a socket
    read. The server stalls for a minute; the cancelled call returns long before (the join below only guards the
    suite against a hang)."""
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fetch(server.url("/stall"), tmp_path / "f")
        except BaseException as exc:  # noqa: BLE001 - the cancel is what the test looks for
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)  # inside the download
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(CancelationException))
    thread.join(30)
    assert not thread.is_alive() and isinstance(outcome.get("error"), CancelationException), outcome


@pytest.mark.parametrize(
    ("path", "message"),
    [("/loop", "too many redirects")],
)
def test_permanent_failures_are_one_phrase(server: Misbehaving, tmp_path: Path, path: str, message: str) -> None:
    with pytest.raises(DownloadError) as error:
        fetch(server.url(path), tmp_path / "f")
    assert str(error.value) == message


@pytest.mark.parametrize("path", ["/odd-range", "/huge-range"])
def test_a_content_range_that_is_not_a_number_means_size_unknown(
    server: Misbehaving, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with downloads._client(1) as client:
        assert downloads._probe(client, server.url(path)) == (None, False)


BAD_SOURCES = {
    "crlf": "https://example.com/a\r\nX: 1/w.tar",
    "port": "https://example.com:99999/w.tar",
    "idna": "https://xn--/w.tar",
    "100 KB": "https://example.com/" + "a" * 100_000,
    "hub id": "hf://owner/na--me",
    "long hub id": "hf://owner/" + "n" * 200,
    "dotdot revision": "hf://owner/name@..",
}


@pytest.mark.parametrize("source", BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_a_bad_weights_variable_fails_setup_in_one_sentence(source: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as error:
        fetch_weights(source, tmp_path / "model", "TEST_WEIGHTS_URL")
    assert str(error.value).startswith("TEST_WEIGHTS_URL is ") and "use an http(s):// URL" in str(error.value)
    with pytest.raises(ValueError):
        Source.parse(source, file=True)
