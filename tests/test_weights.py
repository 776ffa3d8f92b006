"""The weights cache from a tar URL (weights.fetch_weights over downloads.py), against a local server with faults."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import downloads
import weights
from errors import WeightsError
from harness import serve_directory
from weights import MARKER

ROOT = Path(__file__).resolve().parent.parent

REAL_WHICH = shutil.which
BIG = bytes(range(256)) * 2048  # 512 KiB, several 64 KiB chunks
FILES = {
    "model_index.json": b'{"_class_name": "VideoToVideoSDPipeline", "unet": ["diffusers", "UNet3DConditionModel"]}',
    "unet/config.json": b'{"in_channels": 16}',
    "unet/diffusion_pytorch_model.safetensors": BIG,
}


@dataclass
class Route:
    data: bytes
    ranges: bool = True
    status: int | None = None  # always answer this status
    fail_first: int = 0  # answer 500 to the first N requests
    drop_after: int | None = None  # first body request from byte 0: close after N bytes
    short_by: int = 0  # announce N more bytes than sent, on every request
    delay: float = 0.0  # seconds to wait before each body
    probe_delay: float = 0.0  # seconds to wait before answering the Range: bytes=0-0 probe


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = {}
        self.log: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.active = self.max_active = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up early (the probe, injected faults) are expected

    def requests(self, path: str) -> list[str | None]:
        with self.lock:
            return [rng for p, rng in self.log if p == path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv, rng = self.server, self.headers.get("Range")
        with srv.lock:
            srv.log.append((self.path, rng))
            n_requests = sum(1 for p, _ in srv.log if p == self.path)
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        try:
            self._answer(srv.routes.get(self.path), rng, n_requests)
        finally:
            with srv.lock:
                srv.active -= 1

    def _answer(self, route: Route | None, rng: str | None, n_requests: int) -> None:
        if route is None or route.status or n_requests <= route.fail_first:
            status = 404 if route is None else route.status or 500
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, start = route.data, 0
        if rng == "bytes=0-0":
            time.sleep(route.probe_delay)
        if route.ranges and rng:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start, end = int(first), int(last) if last else len(data) - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            data = data[start : end + 1]
        else:
            self.send_response(200)
            if route.ranges:
                self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) + route.short_by))
        self.end_headers()
        if rng != "bytes=0-0":
            time.sleep(route.delay)
            if route.drop_after is not None and start == 0:
                data, route.drop_after = data[: route.drop_after], None
                self.close_connection = True
        self.wfile.write(data)
        if route.short_by:
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTS_CHUNK_SIZE", "64K")
    monkeypatch.setenv("WEIGHTS_CONCURRENCY", "4")
    monkeypatch.setattr(downloads, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(downloads.shutil, "which", lambda cmd, *a, **k: None)  # no pget


def download_weights(url: str, dest: Path | str) -> dict[str, float]:
    return weights.fetch_weights(url, Path(dest), "TEST_WEIGHTS_URL")


def make_tar(
    files: dict[str, bytes] = FILES,
    prefix: str = "",
    extra: tuple[tarfile.TarInfo, ...] = (),
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
        for name, content in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 3 if kind == tarfile.REGTYPE else 0
    return info


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_installed(dest: Path, url: str) -> None:
    marker = json.loads((dest / MARKER).read_text())
    assert marker["source"] == url and marker["files"] == len(FILES)
    assert {k: v for k, v in tree(dest).items() if k != MARKER} == FILES
    assert not [p for p in dest.parent.iterdir() if ".tmp-" in p.name]


def assert_nothing_installed(dest: Path) -> None:
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if ".tmp-" in p.name]


def serve(server: Server, path: str = "/w.tar", **kwargs: object) -> str:
    server.routes[path] = Route(**kwargs)  # type: ignore[arg-type]
    return server.url(path)


def test_downloads_extracts_and_marks(server: Server, tmp_path: Path) -> None:
    data = make_tar()
    url = serve(server, data=data)
    dest = tmp_path / "cache" / "model"
    metrics = download_weights(url, dest)
    assert_installed(dest, url)
    assert metrics["cached"] == 0.0 and metrics["bytes"] == len(data)
    assert metrics["download_s"] > 0 and metrics["mb_per_s"] > 0


def test_a_cold_start_is_in_the_cog_servers_log(cog_server: Any) -> None:
    """The session's i2v server fetched its weights into a fresh cache at setup: what and how fast is in the log the
    server itself writes (weights.py and downloads.py log through the predict logger), not only in pytest's capture."""
    server = cog_server("i2v")
    lines = [json.loads(line) for line in Path(server.log.name).read_text().splitlines() if line.startswith("{")]
    setup = [line["fields"]["message"] for line in lines if line.get("target") == "coglet::setup"]  # the worker's
    fetched = [message for message in setup if message.startswith("Downloading http://127.0.0.1:")]
    assert fetched and "bytes" in fetched[0], setup
    installed = [message for message in setup if message.startswith("Installed http://127.0.0.1:")]
    assert installed and re.search(r": [\d.]+ MB, \d+ files in [\d.]+ s \([\d.]+ MB/s\)$", installed[0]), installed


def test_second_call_is_cached_without_requests(server: Server, tmp_path: Path) -> None:
    url = serve(server, data=make_tar())
    dest = tmp_path / "model"
    download_weights(url, dest)
    before = len(server.log)
    metrics = download_weights(url, str(dest))
    assert len(server.log) == before
    assert metrics["cached"] == 1.0 and metrics["download_s"] == 0.0
    assert_installed(dest, url)


def test_parallel_ranges_cover_the_file(server: Server, tmp_path: Path) -> None:
    data = make_tar()
    url = serve(server, data=data, delay=0.05)
    download_weights(url, tmp_path / "model")
    ranges = [r for r in server.requests("/w.tar") if r != "bytes=0-0"]
    chunk = 64 * 1024
    expected = [f"bytes={s}-{min(s + chunk, len(data)) - 1}" for s in range(0, len(data), chunk)]
    assert sorted(ranges) == sorted(expected) and len(expected) > 4
    assert server.max_active >= 2


def test_resumes_dropped_range_from_last_byte(server: Server, tmp_path: Path) -> None:
    data = make_tar()
    url = serve(server, data=data, drop_after=1000)
    download_weights(url, tmp_path / "model")
    assert_installed(tmp_path / "model", url)
    ranges = server.requests("/w.tar")
    assert ranges.count("bytes=0-65535") == 1 and "bytes=1000-65535" in ranges


@pytest.mark.parametrize("drop_after", [None, 100_000])
def test_server_without_ranges_single_stream(server: Server, tmp_path: Path, drop_after: int | None) -> None:
    url = serve(server, data=make_tar(), ranges=False, drop_after=drop_after)
    download_weights(url, tmp_path / "model")
    assert_installed(tmp_path / "model", url)
    # probe + one stream (+ one restart after the drop); no ranged body requests
    assert len(server.requests("/w.tar")) == (2 if drop_after is None else 3)


def test_retries_server_errors(server: Server, tmp_path: Path) -> None:
    url = serve(server, data=make_tar(), fail_first=2)
    download_weights(url, tmp_path / "model")
    assert_installed(tmp_path / "model", url)


def test_gives_up_after_repeated_server_errors(server: Server, tmp_path: Path) -> None:
    url = serve(server, data=make_tar(), status=503)
    with pytest.raises(WeightsError, match=r"HTTP 503 \(gave up after 5 attempts\)") as exc:
        download_weights(url, tmp_path / "model")
    assert url in str(exc.value)
    assert len(server.requests("/w.tar")) == downloads.RETRIES


@pytest.mark.parametrize("status", [404, 403])
def test_client_errors_fail_at_once(server: Server, tmp_path: Path, status: int) -> None:
    url = serve(server, data=b"", status=status)
    with pytest.raises(WeightsError, match=f"HTTP {status}") as exc:
        download_weights(url, tmp_path / "model")
    assert url in str(exc.value)
    assert len(server.requests("/w.tar")) == 1
    assert_nothing_installed(tmp_path / "model")


def test_connection_refused_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A permanent failure: one attempt, one sentence naming the variable, no library class name."""
    srv = Server()  # bound, then closed: the port refuses connections
    url = srv.url("/w.tar")
    srv.server_close()
    waits: list[float] = []
    monkeypatch.setattr(downloads.time, "sleep", waits.append)
    with pytest.raises(WeightsError) as exc:
        download_weights(url, tmp_path / "model")
    assert str(exc.value) == f"Cannot set up the weights in TEST_WEIGHTS_URL ({url}): the connection was refused."
    assert waits == []  # no backoff: not retried
    assert_nothing_installed(tmp_path / "model")


def test_body_shorter_than_content_length(server: Server, tmp_path: Path) -> None:
    url = serve(server, data=make_tar(), ranges=False, short_by=5000)
    with pytest.raises(WeightsError, match="gave up after 5 attempts") as exc:
        download_weights(url, tmp_path / "model")
    assert url in str(exc.value)
    assert_nothing_installed(tmp_path / "model")


def _cut_at_member_boundary() -> bytes:
    data = make_tar()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return data[: last.offset]  # complete members only, no end-of-archive block


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_tar(server: Server, tmp_path: Path, cut: str) -> None:
    data = make_tar()[:300_000] if cut == "mid_member" else _cut_at_member_boundary()
    url = serve(server, data=data)
    with pytest.raises(WeightsError, match="truncated") as exc:
        download_weights(url, tmp_path / "model")
    assert url in str(exc.value)
    assert_nothing_installed(tmp_path / "model")
    server.routes["/w.tar"] = Route(data=make_tar())  # the next call repairs
    download_weights(url, tmp_path / "model")
    assert_installed(tmp_path / "model", url)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (member("../evil"), "'..' in member name"),
        (member("sub/../../evil"), "'..' in member name"),
        (member("/tmp/evil-abs"), "absolute path"),
        (member("etc", tarfile.SYMTYPE, "/etc"), "symlink to '/etc'"),
        (member("up", tarfile.SYMTYPE, "../../.."), "pointing outside"),
        (member("passwd", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
        (member("fifo", tarfile.FIFOTYPE), "special file"),
        (member("dev", tarfile.CHRTYPE), "special file"),
    ],
)
def test_unsafe_members_rejected(server: Server, tmp_path: Path, bad: tarfile.TarInfo, message: str) -> None:
    url = serve(server, data=make_tar(extra=(bad,)))
    dest = tmp_path / "a" / "b" / "model"
    with pytest.raises(WeightsError, match="unsafe") as exc:
        download_weights(url, dest)
    assert message in str(exc.value) and url in str(exc.value)
    assert_nothing_installed(dest)
    assert not list(tmp_path.rglob("evil*")) and not Path("/tmp/evil-abs").exists()


def test_single_top_level_directory_is_normalised(server: Server, tmp_path: Path) -> None:
    url = serve(server, data=make_tar(prefix="cogvideox-5b-i2v/"))
    download_weights(url, tmp_path / "model")
    assert_installed(tmp_path / "model", url)


def test_missing_model_index(server: Server, tmp_path: Path) -> None:
    files = {k: v for k, v in FILES.items() if k != "model_index.json"}
    url = serve(server, data=make_tar(files, prefix="top/"))
    with pytest.raises(WeightsError, match=r"not a diffusers folder: model_index\.json is missing") as exc:
        download_weights(url, tmp_path / "model")
    assert url in str(exc.value)
    assert_nothing_installed(tmp_path / "model")


def test_repairs_interrupted_install(server: Server, tmp_path: Path) -> None:
    url = serve(server, data=make_tar())
    dest = tmp_path / "model"
    stale = tmp_path / ".model.tmp-12345-deadbeef"
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "half.bin").write_bytes(b"partial")
    dest.mkdir()
    (dest / "model_index.json").write_text("{}")  # unmarked: looks half-done
    (dest / "junk.bin").write_bytes(b"junk")
    download_weights(url, dest)
    assert_installed(dest, url)
    assert not stale.exists()


def test_redownloads_when_marker_names_another_url(server: Server, tmp_path: Path) -> None:
    old = serve(server, "/old.tar", data=make_tar({**FILES, "old.bin": b"old"}))
    new = serve(server, "/new.tar", data=make_tar())
    dest = tmp_path / "model"
    download_weights(old, dest)
    assert (dest / "old.bin").exists()
    assert download_weights(new, dest)["cached"] == 0.0
    assert_installed(dest, new)


def test_disk_full_is_reported(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "makefile", full)
    url = serve(server, data=make_tar())
    with pytest.raises(WeightsError, match="disk full") as exc:
        download_weights(url, tmp_path / "model")
    assert url in str(exc.value)
    assert_nothing_installed(tmp_path / "model")


def test_concurrent_processes_download_once(server: Server, tmp_path: Path) -> None:
    url = serve(server, data=make_tar(), probe_delay=1.0)
    dest = tmp_path / "model"
    code = (
        "import logging, shutil, sys; shutil.which = lambda *a, **k: None; "
        "logging.basicConfig(level=logging.INFO); import weights; from pathlib import Path; "
        "print(weights.fetch_weights(sys.argv[1], Path(sys.argv[2]), 'TEST_WEIGHTS_URL')['cached'])"
    )
    cmd = [sys.executable, "-c", code, url, str(dest)]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(out.strip() for out, _ in results) == ["0.0", "1.0"]
    assert any("Waiting for another process" in err for _, err in results)
    assert server.requests("/w.tar").count("bytes=0-0") == 1
    assert_installed(dest, url)


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WEIGHTS_CACHE_DIR", raising=False)
    assert weights.cache_dir() == Path("model_cache")
    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path))
    assert weights.cache_dir() / "cogvideox-5b-i2v" == tmp_path / "cogvideox-5b-i2v"


# A stand-in that keeps pget v0.11.0's contract as its source (cmd/root, pkg/extract) has it: flags -c/-m/-x/-f among
# others, exactly two arguments, a destination that must not exist (without -f), exit status 1 on any error with the
# message last on stderr, and with -x files extracted as they stream: a failure leaves what was written in place.
FAKE_PGET = """#!{python}
import json, os, sys, tarfile
with open(os.environ["FAKE_PGET_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args, flags = [], set()
argv = iter(sys.argv[1:])
for arg in argv:
    if arg in ("-c", "-m", "-r", "--connect-timeout"):
        next(argv)
    elif arg in ("-x", "-f"):
        flags.add(arg)
    elif arg.startswith("-"):
        print(f"Error: unknown shorthand flag: {{arg!r}}", file=sys.stderr)
        sys.exit(1)
    else:
        args.append(arg)
if len(args) != 2:
    print(f"Error: accepts 2 arg(s), received {{len(args)}}", file=sys.stderr)
    sys.exit(1)
dest = args[1]
if os.path.exists(dest) and "-f" not in flags:
    print("pget: destination exists, use -f", file=sys.stderr)
    sys.exit(1)
for percent in (50, 100):
    print("%d%% 1.0 MiB / 2.0 MiB 12.3 MiB/s" % percent, end="\\r", flush=True)  # as pget's progress bar
if os.environ.get("FAKE_PGET_FAIL"):
    os.makedirs(os.path.join(dest, "unet"))  # extracted before the failure, left in place
    with open(os.path.join(dest, "unet", "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(b"half")
    print("pget: download failed: 404 Not Found", file=sys.stderr)
    sys.exit(1)
os.makedirs(dest)
with tarfile.open(os.environ["FAKE_PGET_TAR"]) as tar:
    tar.extractall(dest, filter="fully_trusted")
"""


@pytest.fixture
def fake_pget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a stand-in pget on PATH; returns the file where it logs its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "pget"
    script.write_text(FAKE_PGET.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(downloads.shutil, "which", REAL_WHICH)
    monkeypatch.setenv("FAKE_PGET_LOG", str(tmp_path / "pget-argv.jsonl"))
    return tmp_path / "pget-argv.jsonl"


def _pget_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    (tmp_path / "src.tar").write_bytes(data)
    monkeypatch.setenv("FAKE_PGET_TAR", str(tmp_path / "src.tar"))


def test_pget_is_used_and_result_validated(fake_pget: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pget_tar(tmp_path, monkeypatch, make_tar(prefix="top/"))
    url = "https://weights.example/cogvideox.tar"
    dest = tmp_path / "cache" / "model"
    metrics = download_weights(url, dest)
    [argv] = [json.loads(line) for line in fake_pget.read_text().splitlines()]
    assert argv[:4] == ["-c", "4", "-m", "64K"]
    assert argv[4:6] == ["-x", url]
    assert Path(argv[6]).parent == dest.parent and Path(argv[6]).name.startswith(".model.tmp-")
    assert_installed(dest, url)
    assert metrics["bytes"] == sum(len(v) for v in FILES.values())
    assert download_weights(url, dest)["cached"] == 1.0
    assert len(fake_pget.read_text().splitlines()) == 1


def test_pget_progress_streams_into_the_predict_log(
    fake_pget: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pget's progress lines reach the predict logger's output (Cog's log), as they come, one every few seconds."""
    _pget_tar(tmp_path, monkeypatch, make_tar(prefix="top/"))
    script = (
        "import sys, pathlib, reporting, weights; reporting.configure_logging(); "
        "weights.fetch_weights('https://weights.example/m.tar', pathlib.Path(sys.argv[1]), 'WEIGHTS_URL')"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-c", script, str(tmp_path / "model")]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "pget: 50% 1.0 MiB / 2.0 MiB 12.3 MiB/s" in out.splitlines()
    assert "pget: 100%" not in out  # throttled: the next progress line came within PROGRESS_EVERY_S
    assert "Installed https://weights.example/m.tar" in out


def test_pget_symlink_escape_rejected(fake_pget: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pget_tar(tmp_path, monkeypatch, make_tar(extra=(member("unet/etc", tarfile.SYMTYPE, "/etc"),)))
    url = "https://weights.example/evil.tar"
    with pytest.raises(WeightsError, match="unsafe: symlink pointing outside the archive") as exc:
        download_weights(url, tmp_path / "model")
    assert url in str(exc.value)
    assert_nothing_installed(tmp_path / "model")


def test_pget_failure_is_reported(fake_pget: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_PGET_FAIL", "1")
    url = "https://weights.example/missing.tar"
    with pytest.raises(WeightsError, match=r"pget failed \(pget: download failed: 404 Not Found\)") as exc:
        download_weights(url, tmp_path / "model")
    assert url in str(exc.value)
    assert_nothing_installed(tmp_path / "model")  # what pget extracted before failing is removed too
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")] == []


def test_served_directory_is_quiet_when_the_size_probe_hangs_up(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """script/demo serves its tiny weights with harness.serve_directory: the downloader's 1-byte size probe hangs up
    mid-body, which must not print a traceback in the middle of a successful run."""
    (tmp_path / "w.tar").write_bytes(make_tar())
    server = serve_directory(tmp_path)
    try:
        download_weights(f"http://127.0.0.1:{server.server_port}/w.tar", tmp_path / "model")
        time.sleep(0.2)  # the server thread notices the hang-up
    finally:
        server.shutdown()
    assert_installed(tmp_path / "model", f"http://127.0.0.1:{server.server_port}/w.tar")
    assert "Traceback" not in capfd.readouterr().err


def test_a_model_index_key_outside_the_snapshot_is_refused(tmp_path: Path) -> None:
    """A component named '..' would make the folder checks look outside the snapshot."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "..": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(WeightsError) as error:
        weights._check_folder(tmp_path)
    assert str(error.value) == "model_index.json names a component '..', which is not a folder name"
