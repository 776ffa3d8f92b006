"""Throughput of weights.py's httpx fallback versus a plain single-stream httpx download.

Builds a tar of random data in a temporary directory, serves it from 127.0.0.1 with Range
support, then times (median of --runs) download_weights into a fresh dest each run and a
single-stream httpx download of the same file streamed to disk.

    python benchmarks/download.py --size-mb 256 [--conn-limit-mbps 50] [--json out.json]

--conn-limit-mbps caps each connection's bandwidth (as CDNs and object stores do per
stream), which is where parallel ranges pay off; loopback without a cap measures CPU cost.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import weights  # noqa: E402

FILE_MB = 64  # size of each weight file inside the tar


def build_tar(path: Path, size_mb: int) -> int:
    """Write a diffusers-like tar of ~size_mb MiB of random data; return its size in bytes."""
    with tarfile.open(path, "w") as tar:
        index = json.dumps({"_class_name": "BenchmarkPipeline"}).encode()
        info = tarfile.TarInfo("model_index.json")
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))
        for i, start in enumerate(range(0, size_mb, FILE_MB)):
            data = os.urandom(min(FILE_MB, size_mb - start) << 20)
            info = tarfile.TarInfo(f"transformer/diffusion_pytorch_model-{i:05d}.safetensors")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def make_handler(path: Path, limit_bps: float) -> type[BaseHTTPRequestHandler]:
    size = path.stat().st_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            start, end = 0, size - 1
            if rng := self.headers.get("Range"):
                first, _, last = rng.removeprefix("bytes=").partition("-")
                start, end = int(first), int(last) if last else size - 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            with path.open("rb") as f:
                if not limit_bps:
                    self.connection.sendfile(f, start, end - start + 1)
                    return
                began, sent, step = time.monotonic(), 0, 256 << 10
                while sent < end - start + 1:
                    sent += self.connection.sendfile(f, start + sent, min(step, end - start + 1 - sent))
                    time.sleep(max(0.0, began + sent / limit_bps - time.monotonic()))

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the fallback's probe hangs up after the first byte


def plain_download(url: str, out: Path) -> None:
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as response, out.open("wb") as f:
        response.raise_for_status()
        for piece in response.iter_raw():
            f.write(piece)


def median_mb_per_s(label: str, runs: int, nbytes: int, once: Callable[[], Path]) -> float:
    """Time `once` (which returns what it wrote, removed untimed afterwards) `runs` times."""
    rates = []
    for i in range(runs):
        start = time.perf_counter()
        out = once()
        rates.append(nbytes / 1e6 / (time.perf_counter() - start))
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
        print(f"  {label} run {i + 1}: {rates[-1]:.0f} MB/s", flush=True)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="tar size in MiB (default 1024)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", help="WEIGHTS_CONCURRENCY for the fallback (default: weights.py's)")
    parser.add_argument("--chunk-size", help="WEIGHTS_CHUNK_SIZE for the fallback, e.g. 16M")
    parser.add_argument("--conn-limit-mbps", type=float, default=0.0, help="per-connection cap in MB/s (0: none)")
    parser.add_argument("--tmp-dir", help="where to build, serve and extract (default: system temp)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    # Measure the httpx fallback even where pget is installed.
    os.environ["PATH"] = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if not (Path(p) / "pget").exists()
    )
    if args.concurrency:
        os.environ["WEIGHTS_CONCURRENCY"] = args.concurrency
    if args.chunk_size:
        os.environ["WEIGHTS_CHUNK_SIZE"] = args.chunk_size
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="weights-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"Building a {args.size_mb} MiB tar in {tmp} ...", flush=True)
        nbytes = build_tar(tmp / "weights.tar", args.size_mb)
        server = QuietServer(("127.0.0.1", 0), make_handler(tmp / "weights.tar", args.conn_limit_mbps * 1e6))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/weights.tar"

        def fallback() -> Path:
            weights.download_weights(url, tmp / "dest")  # fresh: the previous run's dest was removed
            return tmp / "dest"

        def plain() -> Path:
            plain_download(url, tmp / "plain.tar")
            return tmp / "plain.tar"

        fast = median_mb_per_s("fallback", args.runs, nbytes, fallback)
        slow = median_mb_per_s("single stream", args.runs, nbytes, plain)
        server.shutdown()

    concurrency = os.environ.get("WEIGHTS_CONCURRENCY") or weights.DEFAULT_CONCURRENCY
    chunk = os.environ.get("WEIGHTS_CHUNK_SIZE") or weights.DEFAULT_CHUNK_SIZE
    cap = f"{args.conn_limit_mbps:g} MB/s per connection" if args.conn_limit_mbps else "no cap"
    print(f"\n{nbytes / 1e6:.0f} MB tar over loopback ({cap}), median of {args.runs}:")
    print(f"  {'weights.py fallback (c=' + concurrency + ', chunk ' + chunk + ', extract)':<48} {fast:8.0f} MB/s")
    print(f"  {'httpx single stream (to disk)':<48} {slow:8.0f} MB/s")
    print(f"  {'ratio':<48} {fast / slow:8.2f} x")
    if args.json:
        result = {
            "bytes": nbytes,
            "runs": args.runs,
            "concurrency": int(concurrency),
            "chunk_size": chunk,
            "conn_limit_mb_per_s": args.conn_limit_mbps,
            "fallback_mb_per_s": fast,
            "single_stream_mb_per_s": slow,
            "ratio": fast / slow,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
