"""Download a diffusers weights tarball into a local cache, atomically and safely.

``download_weights(url, dest)`` fetches the tar at ``url`` (with ``pget`` when it is on
PATH, otherwise with parallel HTTP range requests on httpx), extracts it into a
temporary sibling of ``dest``, validates the tree, writes a completion marker and
renames it into place. Environment: WEIGHTS_CACHE_DIR, WEIGHTS_CONCURRENCY,
WEIGHTS_CHUNK_SIZE (e.g. "16M"); pget also reads its own PGET_* variables.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import secrets
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from collections import Counter, deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import httpx
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

MARKER = ".weights-complete.json"
RETRIES = 5  # attempts per request
RETRY_BASE_S = 0.5  # exponential backoff: 0.5 s, 1 s, 2 s, 4 s
PROGRESS_EVERY_S = 5.0
DEFAULT_CONCURRENCY = "8"
DEFAULT_CHUNK_SIZE = "16M"
_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class WeightsError(RuntimeError):
    """The weights could not be downloaded, extracted or validated."""


class _Retryable(Exception):
    """A transient server answer (5xx, 429) or short body, worth another attempt."""


def cache_dir() -> Path:
    """Root of the weights cache: $WEIGHTS_CACHE_DIR, default ./model_cache."""
    return Path(os.environ.get("WEIGHTS_CACHE_DIR", "model_cache"))


def download_weights(url: str, dest: str | Path) -> dict[str, float]:
    """Make ``dest`` a complete diffusers folder extracted from the tar at ``url``.

    Returns metrics: download_s, bytes, mb_per_s (1 MB = 1e6 bytes) and cached
    (1.0 when ``dest`` was already complete for ``url`` and nothing was fetched).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{dest}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for another process to finish %s", dest)
        lock.acquire()
    try:
        prefix = f".{dest.name}.tmp-"
        for stale in dest.parent.iterdir():
            if stale.name.startswith(prefix):
                log.warning("Removing stale temporary directory %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        marker = _read_marker(dest)
        if marker.get("url") == url:
            log.info("Weights for %s already in %s", url, dest)
            return {"download_s": 0.0, "bytes": float(marker.get("bytes", 0)), "mb_per_s": 0.0, "cached": 1.0}
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.exists():
            log.warning("Removing incomplete or outdated %s", dest)
            shutil.rmtree(dest)
        return _install(url, dest)
    finally:
        lock.release()


def _read_marker(dest: Path) -> dict:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) and (dest / "model_index.json").is_file() else {}


def _install(url: str, dest: Path) -> dict[str, float]:
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    start = time.monotonic()
    try:
        received = _fetch_pget(url, tmp) if shutil.which("pget") else _fetch_httpx(url, tmp)
        root = _layout_root(url, tmp)
        files, size = _validate(url, root)
        nbytes = received if received is not None else size
        info = {"url": url, "bytes": nbytes, "files": files, "completed_at": time.time()}
        (root / MARKER).write_text(json.dumps(info))
        os.replace(root, dest)
    except OSError as exc:
        cause = "disk full" if exc.errno == errno.ENOSPC else str(exc)
        raise WeightsError(f"Cannot install weights from {url} into {dest}: {cause}.") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - start
    rate = nbytes / 1e6 / seconds if seconds > 0 else 0.0
    log.info(
        "Installed %s into %s: %.1f MB, %d files in %.1f s (%.1f MB/s)", url, dest, nbytes / 1e6, files, seconds, rate
    )
    return {"download_s": seconds, "bytes": float(nbytes), "mb_per_s": rate, "cached": 0.0}


def _layout_root(url: str, tmp: Path) -> Path:
    """Return the folder holding model_index.json: ``tmp`` or its single top-level directory."""
    entries = list(tmp.iterdir()) if tmp.is_dir() else []
    root = tmp
    if len(entries) == 1 and not entries[0].is_symlink() and (entries[0] / "model_index.json").is_file():
        root = entries[0]
    if not (root / "model_index.json").is_file():
        raise WeightsError(f"Weights archive {url} is not a diffusers folder: model_index.json missing.")
    return root


def _validate(url: str, root: Path) -> tuple[int, int]:
    """Reject links leaving ``root`` and special files; return (regular files, their bytes)."""
    real_root = root.resolve()
    files = size = 0
    seen: Counter[int] = Counter()
    nlinks: dict[int, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                if not path.resolve().is_relative_to(real_root):
                    raise _unsafe(url, "symlink pointing outside the archive", path.relative_to(root))
            elif stat.S_ISREG(st.st_mode):
                files, size = files + 1, size + st.st_size
                if st.st_nlink > 1:
                    seen[st.st_ino] += 1
                    nlinks[st.st_ino] = st.st_nlink
            elif not stat.S_ISDIR(st.st_mode):
                raise _unsafe(url, "device, fifo or socket", path.relative_to(root))
    if any(seen[ino] < nlinks[ino] for ino in seen):
        raise _unsafe(url, "hard link to a file outside the archive", root)
    return files, size


def _unsafe(url: str, problem: str, name: object) -> WeightsError:
    return WeightsError(f"Weights archive {url} is unsafe: {problem} ({str(name)!r}).")


def _fetch_pget(url: str, tmp: Path) -> None:
    cmd = ["pget"]
    if concurrency := os.environ.get("WEIGHTS_CONCURRENCY"):
        cmd += ["-c", concurrency]
    if chunk_size := os.environ.get("WEIGHTS_CHUNK_SIZE"):
        cmd += ["-m", chunk_size]
    cmd += ["-x", url, str(tmp)]
    log.info("Downloading %s with pget into %s", url, tmp)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit code {proc.returncode}"
        raise WeightsError(f"Cannot download weights from {url}: pget failed ({detail}).")


def _fetch_httpx(url: str, tmp: Path) -> int:
    """Stream the tar at ``url`` into ``tmp``; return the number of bytes received."""
    concurrency = int(os.environ.get("WEIGHTS_CONCURRENCY") or DEFAULT_CONCURRENCY)
    chunk_size = _parse_size(os.environ.get("WEIGHTS_CHUNK_SIZE") or DEFAULT_CHUNK_SIZE)
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    headers = {"Accept-Encoding": "identity"}
    with (
        httpx.Client(timeout=_TIMEOUT, limits=limits, headers=headers, follow_redirects=True) as client,
        ThreadPoolExecutor(concurrency, thread_name_prefix="weights") as pool,
    ):
        size, ranged = _probe(client, url)
        log.info("Downloading %s (%s bytes, ranges: %s) into %s", url, size, ranged, tmp)
        stop = threading.Event()
        chunks: Generator[bytes | bytearray, None, None]
        if ranged and size:
            chunks = _parallel(client, url, size, chunk_size, concurrency, pool, stop)
        else:
            chunks = _get(client, url, 0, size, ranged=False)
        reader = _Reader(url, chunks, size)
        try:
            _extract(url, reader, tmp)
            while reader.read(1 << 20):  # trailing padding after the end-of-archive block
                pass
        finally:
            stop.set()
            chunks.close()
            pool.shutdown(cancel_futures=True)
    if size is not None and reader.received != size:
        raise WeightsError(f"Weights archive {url} is truncated: received {reader.received} of {size} bytes.")
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
                    total = response.headers.get("Content-Range", "").rpartition("/")[2]
                    return (int(total), True) if total.isdigit() else (None, False)
                _check_status(url, response, 200)
                length = response.headers.get("Content-Length", "")
                return (int(length) if length.isdigit() else None), False
        except (httpx.TransportError, _Retryable) as exc:
            _backoff(url, attempt, exc)


def _parallel(
    client: httpx.Client,
    url: str,
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
            window.append(pool.submit(_fetch_range, client, url, start, length, stop))

    for _ in range(concurrency):
        submit()
    while window:
        data = window.popleft().result()
        submit()
        yield data


def _fetch_range(client: httpx.Client, url: str, start: int, length: int, stop: threading.Event) -> bytearray:
    buf = bytearray(length)  # preallocated: appending would reallocate and copy over and over
    view, pos = memoryview(buf), 0
    for piece in _get(client, url, start, length, ranged=True):
        if stop.is_set():
            break
        if pos + len(piece) > length:
            raise WeightsError(f"Cannot download weights from {url}: server sent more than the requested range.")
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
                _check_status(url, response, 206 if ranged else 200)
                for piece in response.iter_raw():
                    if skip:
                        dropped = min(skip, len(piece))
                        skip, piece = skip - dropped, piece[dropped:]
                    if piece:
                        got += len(piece)
                        yield piece
            if length is None or got == length:
                return
            raise _Retryable(f"short body, {got} of {length} bytes")
        except (httpx.TransportError, _Retryable) as exc:
            _backoff(url, attempt, exc)


def _check_status(url: str, response: httpx.Response, expected: int) -> None:
    status = response.status_code
    if status == expected:
        return
    if status >= 500 or status == 429:
        raise _Retryable(f"HTTP {status}")
    unexpected = f", expected {expected}" if status < 400 else ""
    raise WeightsError(f"Cannot download weights from {url}: HTTP {status} {response.reason_phrase}{unexpected}.")


def _backoff(url: str, attempt: int, exc: Exception) -> None:
    cause = str(exc) if isinstance(exc, _Retryable) else f"{type(exc).__name__}: {exc}"
    if attempt >= RETRIES:
        raise WeightsError(f"Cannot download weights from {url}: {cause} (gave up after {attempt} attempts).") from exc
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


def _extract(url: str, fileobj: _Reader, tmp: Path) -> None:
    tmp.mkdir()
    try:
        with tarfile.open(
            fileobj=fileobj,  # type: ignore[arg-type]
            mode="r|",
            bufsize=1 << 20,
            tarinfo=_StrictTarInfo,
            copybufsize=1 << 20,
        ) as tar:
            tar.extractall(tmp, members=_checked(url, tar), filter="data")
    except tarfile.FilterError as exc:
        raise _unsafe(url, type(exc).__name__, exc.tarinfo.name) from exc
    except tarfile.TarError as exc:
        raise WeightsError(f"Weights archive {url} is truncated or corrupt: {exc}.") from exc


def _checked(url: str, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        name, link = member.name, member.linkname
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise _unsafe(url, "device, fifo or other special file", name)
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise _unsafe(url, "absolute path or '..' in member name", name)
        if member.issym() and _escapes(posixpath.join(posixpath.dirname(name), link)):
            raise _unsafe(url, f"symlink to {link!r} pointing outside the archive", name)
        if member.islnk() and _escapes(link):
            raise _unsafe(url, f"hard link to {link!r} pointing outside the archive", name)
        yield member


def _escapes(path: str) -> bool:
    norm = posixpath.normpath(path)
    return norm.startswith("/") or norm == ".." or norm.startswith("../")
