"""HTTP downloads: a tar streamed into a folder, or one file; retried, resumed and checked.

``fetch_tar(url, dest)`` uses ``pget -x`` when it is on PATH, otherwise parallel HTTP range requests on httpx
streamed straight into a safe tar extraction. ``fetch_file(url, dest, ...)`` downloads one file (a LoRA) with an
overall time limit, refusing one over ``max_bytes``, and returns as soon as the calling thread is interrupted (Cog's
cancel). Both retry transient errors (5xx, 429, dropped connections, a stall of STALL_S without a byte) and resume
where they stopped; permanent ones (DNS, TLS, refused connection, unsupported scheme, too many redirects, a 4xx) fail
at once; a body longer than its declared length is refused. Environment: WEIGHTS_CONCURRENCY, WEIGHTS_CHUNK_SIZE (e.g.
"16M"); pget also reads its own PGET_* variables. Errors are DownloadError, whose message is a fragment for the caller
to put in context (it names no URL).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import httpx

from reporting import logger

log = logger.getChild(__name__)  # "predict.downloads": shown in Cog's logs with the predict logger's
T = TypeVar("T")

RETRIES = 5  # attempts per request
RETRY_BASE_S = 0.5  # exponential backoff: 0.5 s, 1 s, 2 s, 4 s
STALL_S = 20.0  # an attempt fails when no byte arrives for this long (then it is retried)
POLL_S = 0.25  # how often a waiting caller wakes up, so that a cancel lands within it
PROGRESS_EVERY_S = 5.0
DEFAULT_CONCURRENCY = "8"
DEFAULT_CHUNK_SIZE = "16M"
_TIMEOUT = httpx.Timeout(STALL_S, connect=10.0)
_DIGITS = re.compile(r"[0-9]{1,18}")  # a byte count as HTTP writes it (str.isdigit() also accepts '²')
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class DownloadError(RuntimeError):
    """A download failed for good, or what arrived is unusable (truncated, unsafe, too large)."""


class _Retryable(Exception):
    """A transient server answer (5xx, 429) or short body, worth another attempt."""


def fetch_tar(url: str, dest: Path) -> int | None:
    """Extract the tar at ``url`` into the new folder ``dest``; return the bytes received (None: pget didn't say)."""
    received = None
    if shutil.which("pget"):
        _tar_pget(url, dest)
    else:
        received = _tar_httpx(url, dest)
    _check_tree(dest)
    return received


def fetch_file(
    url: str,
    dest: Path,
    *,
    max_bytes: int,
    time_limit: Callable[[int | None], float],
    make_room: Callable[[int], None],
) -> int:
    """Download ``url`` into the file ``dest`` (created); return its size.

    A body over ``max_bytes`` is refused (before any byte when the server declares its size). The whole download
    must end within ``time_limit(size)`` seconds (size None while unknown). ``make_room(n)`` is called before the
    first byte is written, with the declared size (or ``max_bytes`` if none). The calling thread only waits: an
    exception raised in it (Cog's cancel) stops the download within POLL_S, the connection being closed behind it.
    """
    stop = threading.Event()
    start = time.monotonic()
    deadline = [start + time_limit(None)]  # until the size is known

    def download() -> int:
        with _client(1) as client:
            size, ranged = _probe(client, url)
            if size is not None and size > max_bytes:
                raise DownloadError(f"the file is {size:,} bytes, over the limit of {max_bytes:,}")
            deadline[0] = start + time_limit(size)
            make_room(size if size is not None else max_bytes)
            received = 0
            with dest.open("wb") as out:
                for piece in _get(client, url, 0, size, ranged=ranged and size is not None):
                    if stop.is_set():
                        raise DownloadError("stopped")
                    received += len(piece)
                    if received > max_bytes:
                        raise DownloadError(f"the file is over the limit of {max_bytes:,} bytes")
                    out.write(piece)
        return received

    return interruptible(download, deadline=deadline, stop=stop)


def interruptible(work: Callable[[], T], *, deadline: list[float], stop: threading.Event | None = None) -> T:
    """Run ``work`` in a thread while this one waits in slices of POLL_S, so that an exception raised in this thread
    (Cog's cancel), or the deadline passing, returns at once; ``stop`` then tells the worker to end at its next read
    (a stalled read ends within STALL_S). ``deadline[0]`` is a time.monotonic() the worker may move."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="download", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(POLL_S)
            if worker.is_alive() and time.monotonic() > deadline[0]:
                raise DownloadError("the download took too long (the server is too slow or stalled)")
    except BaseException:
        if stop is not None:
            stop.set()
        raise
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def describe(exc: BaseException) -> str:
    """One phrase for an HTTP failure, without a library's class name where a plainer word exists."""
    if isinstance(exc, httpx.TooManyRedirects):
        return "too many redirects"
    if isinstance(exc, httpx.UnsupportedProtocol):
        return "the URL's scheme is not http or https"
    if isinstance(exc, httpx.InvalidURL | UnicodeError):
        return "the URL is not valid"
    if isinstance(exc, httpx.ConnectTimeout):
        return "the connection timed out"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "name or service" in text or "nodename" in text or "getaddrinfo" in text or "resolution" in text:
            return "the host name could not be resolved"
        if "ssl" in text or "certificate" in text or "tls" in text:
            return "the TLS connection failed"
        if "refused" in text:
            return "the connection was refused"
        return "the connection failed"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no data for {STALL_S:.0f} s"
    if isinstance(exc, httpx.TransportError):
        return "the connection was dropped"
    return type(exc).__name__


def _permanent(exc: httpx.TransportError) -> bool:
    """A failure another attempt cannot mend: DNS, TLS, refused connection, unsupported scheme or proxy."""
    return isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol | httpx.ProxyError | httpx.LocalProtocolError)


def _client(concurrency: int) -> httpx.Client:
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    headers = {"Accept-Encoding": "identity"}
    return httpx.Client(timeout=_TIMEOUT, limits=limits, headers=headers, follow_redirects=True)


def _unsafe(problem: str, name: object) -> DownloadError:
    return DownloadError(f"the archive is unsafe: {problem} ({str(name)!r})")


def _tar_pget(url: str, tmp: Path) -> None:
    cmd = ["pget"]
    if concurrency := os.environ.get("WEIGHTS_CONCURRENCY"):
        cmd += ["-c", concurrency]
    if chunk_size := os.environ.get("WEIGHTS_CHUNK_SIZE"):
        cmd += ["-m", chunk_size]
    cmd += ["-x", url, str(tmp)]
    log.info("Downloading %s with pget into %s", url, tmp)
    tail: deque[str] = deque(maxlen=3)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            _stream_lines(proc.stdout, tail)
        except BaseException:  # a cancelled prediction (Cog's CancelationException) must not leave pget running
            proc.kill()
            raise
    if proc.returncode != 0:
        detail = tail[-1] if tail else f"exit code {proc.returncode}"
        raise DownloadError(f"pget failed ({detail})")


def _stream_lines(stream: Any, tail: deque[str]) -> None:
    """Log pget's output as it comes: its progress (lines ended by \r or \n) at most every PROGRESS_EVERY_S,
    every other line as it is; keep the last lines in `tail` for an error message."""
    buffer, logged = b"", 0.0
    while chunk := stream.read1(65536):
        *lines, buffer = re.split(rb"[\r\n]", buffer + chunk)
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            tail.append(line)
            now = time.monotonic()
            progress = "%" in line or "/s" in line
            if not progress or now - logged >= PROGRESS_EVERY_S:
                logged = now if progress else logged
                log.info("pget: %s", line)
    if line := buffer.decode(errors="replace").strip():
        tail.append(line)
        log.info("pget: %s", line)


def _tar_httpx(url: str, tmp: Path) -> int:
    """Stream the tar at ``url`` into ``tmp``; return the number of bytes received."""
    concurrency = int(os.environ.get("WEIGHTS_CONCURRENCY") or DEFAULT_CONCURRENCY)
    chunk_size = _parse_size(os.environ.get("WEIGHTS_CHUNK_SIZE") or DEFAULT_CHUNK_SIZE)
    with (
        _client(concurrency) as client,
        ThreadPoolExecutor(concurrency, thread_name_prefix="weights") as pool,
    ):
        size, ranged = _probe(client, url)
        log.info("Downloading %s (%s bytes, ranges: %s) into %s", url, size, ranged, tmp)
        stop = threading.Event()
        chunks: Generator[bytes | bytearray, None, None]
        if ranged and size:
            chunks = _parallel(
                client, url, size=size, chunk_size=chunk_size, concurrency=concurrency, pool=pool, stop=stop
            )
        else:
            chunks = _get(client, url, 0, size, ranged=False)
        reader = _Reader(url, chunks, size)
        try:
            _extract(reader, tmp)
            while reader.read(1 << 20):  # trailing padding after the end-of-archive block
                pass
        finally:
            stop.set()
            chunks.close()
            pool.shutdown(cancel_futures=True)
    if size is not None and reader.received != size:
        raise DownloadError(f"the archive is truncated: received {reader.received} of {size} bytes")
    return reader.received


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    unit = _UNITS.get(text[-1:], 1)
    return int(text[:-1] if unit > 1 else text) * unit


def _probe(client: httpx.Client, url: str) -> tuple[int | None, bool]:
    """Return (body size if known, whether byte ranges are served)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            with client.stream("GET", url, headers={"Range": "bytes=0-0"}) as response:
                if response.status_code == 206:
                    total = response.headers.get("Content-Range", "").rpartition("/")[2].strip()
                    return (int(total), True) if _DIGITS.fullmatch(total) else (None, False)
                _check_status(response, 200)
                length = response.headers.get("Content-Length", "").strip()
                return (int(length) if _DIGITS.fullmatch(length) else None), False
        except (httpx.TransportError, _Retryable) as exc:
            _backoff(url, attempt, exc)
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:  # redirects, a bad URL or host name
            raise DownloadError(describe(exc)) from exc


def _parallel(
    client: httpx.Client,
    url: str,
    *,
    size: int,
    chunk_size: int,
    concurrency: int,
    pool: ThreadPoolExecutor,
    stop: threading.Event,
) -> Generator[bytearray, None, None]:
    """Yield the body in order, fetching at most ``concurrency`` ranges ahead of the reader."""
    starts = iter(range(0, size, chunk_size))
    window: deque[Future[bytearray]] = deque()

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            length = min(chunk_size, size - start)
            window.append(pool.submit(_fetch_range, client, url, start=start, length=length, stop=stop))

    for _ in range(concurrency):
        submit()
    while window:
        data = window.popleft().result()
        submit()
        yield data


def _fetch_range(client: httpx.Client, url: str, *, start: int, length: int, stop: threading.Event) -> bytearray:
    buf = bytearray(length)  # preallocated: appending would reallocate and copy over and over
    view, pos = memoryview(buf), 0
    for piece in _get(client, url, start, length, ranged=True):
        if stop.is_set():
            break
        if pos + len(piece) > length:
            raise DownloadError("the server sent more than the requested range")
        view[pos : pos + len(piece)] = piece
        pos += len(piece)
    return buf


def _get(
    client: httpx.Client, url: str, start: int, length: int | None, *, ranged: bool
) -> Generator[bytes, None, None]:
    """Yield ``length`` body bytes from ``start``, retrying and resuming after transient errors.

    With ranges a retry asks for the rest only; without, the body is re-requested and the
    bytes already yielded are skipped.
    """
    got = attempt = 0
    while True:
        attempt += 1
        end = "" if length is None else start + length - 1
        headers = {"Range": f"bytes={start + got}-{end}"} if ranged else {}
        skip = 0 if ranged else got
        try:
            with client.stream("GET", url, headers=headers) as response:
                _check_status(response, 206 if ranged else 200)
                for piece in response.iter_raw():
                    if skip:
                        dropped = min(skip, len(piece))
                        skip, piece = skip - dropped, piece[dropped:]
                    if piece:
                        got += len(piece)
                        if length is not None and got > length:
                            raise DownloadError(f"the server sent more than the {length:,} bytes it declared")
                        yield piece
            if length is None or got == length:
                return
            raise _Retryable(f"short body, {got} of {length} bytes")
        except (httpx.TransportError, _Retryable) as exc:
            _backoff(url, attempt, exc)
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
            raise DownloadError(describe(exc)) from exc


def _check_status(response: httpx.Response, expected: int) -> None:
    status = response.status_code
    if status == expected:
        return
    if status >= 500 or status == 429:
        raise _Retryable(f"HTTP {status}")
    unexpected = f", expected {expected}" if status < 400 else ""
    raise DownloadError(f"HTTP {status} {response.reason_phrase}{unexpected}")


def _backoff(url: str, attempt: int, exc: Exception) -> None:
    cause = str(exc) if isinstance(exc, _Retryable) else describe(exc)
    if isinstance(exc, httpx.TransportError) and _permanent(exc):
        raise DownloadError(cause) from exc
    if attempt >= RETRIES:
        raise DownloadError(f"{cause} (gave up after {attempt} attempts)") from exc
    delay = RETRY_BASE_S * 2 ** (attempt - 1)
    log.warning("Retrying %s in %.1f s after %s", url, delay, cause)
    time.sleep(delay)


class _Reader:
    """Minimal file object over ordered byte chunks, as read by tarfile's stream mode."""

    def __init__(self, url: str, chunks: Iterator[bytes | bytearray], size: int | None) -> None:
        self._url, self._chunks, self._size = url, chunks, size
        self._view, self._pos = memoryview(b""), 0
        self.received = 0
        self._start = self._logged = time.monotonic()

    def read(self, size: int = -1) -> bytes:
        while self._pos >= len(self._view):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._view, self._pos = memoryview(chunk), 0
            self._progress(len(chunk))
        end = len(self._view) if size < 0 else self._pos + size
        data = self._view[self._pos : end].tobytes()
        self._pos += len(data)
        return data

    def _progress(self, n: int) -> None:
        self.received += n
        now = time.monotonic()
        if now - self._logged >= PROGRESS_EVERY_S:
            self._logged, elapsed = now, now - self._start
            total = f" of {self._size / 1e6:.0f}" if self._size else ""
            mb = self.received / 1e6
            log.info("Downloading %s: %.0f%s MB in %.0f s (%.1f MB/s)", self._url, mb, total, elapsed, mb / elapsed)


class _StrictTarInfo(tarfile.TarInfo):
    """Treats a stream ending without an end-of-archive block as truncated (tarfile accepts it)."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as exc:
            raise tarfile.ReadError("unexpected end of archive") from exc


def _extract(fileobj: _Reader, tmp: Path) -> None:
    tmp.mkdir()
    try:
        with tarfile.open(
            fileobj=fileobj,  # type: ignore[arg-type]
            mode="r|",
            bufsize=1 << 20,
            tarinfo=_StrictTarInfo,
            copybufsize=1 << 20,
        ) as tar:
            tar.extractall(tmp, members=_checked(tar), filter="data")
    except tarfile.FilterError as exc:
        raise _unsafe(type(exc).__name__, exc.tarinfo.name) from exc
    except tarfile.TarError as exc:
        raise DownloadError(f"the archive is truncated or corrupt: {exc}") from exc


def _checked(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        name, link = member.name, member.linkname
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise _unsafe("device, fifo or other special file", name)
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise _unsafe("absolute path or '..' in member name", name)
        if member.issym() and _escapes(posixpath.join(posixpath.dirname(name), link)):
            raise _unsafe(f"symlink to {link!r} pointing outside the archive", name)
        if member.islnk() and _escapes(link):
            raise _unsafe(f"hard link to {link!r} pointing outside the archive", name)
        yield member


def _escapes(path: str) -> bool:
    norm = posixpath.normpath(path)
    return norm.startswith("/") or norm == ".." or norm.startswith("../")


def _check_tree(root: Path) -> None:
    """Reject links leaving ``root`` and special files (what pget extracted passed none of our member checks)."""
    real_root = root.resolve()
    seen: Counter[int] = Counter()
    nlinks: dict[int, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                if not path.resolve().is_relative_to(real_root):
                    raise _unsafe("symlink pointing outside the archive", path.relative_to(root))
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    seen[st.st_ino] += 1
                    nlinks[st.st_ino] = st.st_nlink
            elif not stat.S_ISDIR(st.st_mode):
                raise _unsafe("device, fifo or socket", path.relative_to(root))
    if any(seen[ino] < nlinks[ino] for ino in seen):
        raise _unsafe("hard link to a file outside the archive", root.name)
