"""Weights download throughput, side by side in one run: weights.py from a tar URL (its httpx fallback) and from
a hub repo (huggingface_hub), against a plain single-stream httpx download of the same bytes.

Builds a diffusers-like folder of random data (sharded transformer files of 64 MiB) in a temporary directory, serves
it from 127.0.0.1 as a tar with Range support and as a repo of the stand-in hub (tests/fake_hub.py, HF_ENDPOINT),
then times (median of --runs) fetch_weights into a fresh cache each run, and the single stream of the tar to disk.

    python benchmarks/download.py --size-mb 1024 [--conn-limit-mbps 50] [--json out.json]

--conn-limit-mbps caps each connection's bandwidth (as CDNs and object stores do per stream), which is where
parallel downloads pay off; loopback without a cap measures CPU cost.
"""

from __future__ import annotations

import argparse
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

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import downloads  # noqa: E402
import weights  # noqa: E402
from fake_hub import FakeHub  # noqa: E402

FILE_MB = 64  # size of each weight file


def build_folder(folder: Path, size_mb: int) -> None:
    """A diffusers-like folder of ~size_mb MiB of random data: one component, sharded, with its index."""
    (folder / "transformer").mkdir(parents=True)
    index = {
        "_class_name": "CogVideoXImageToVideoPipeline",
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text("{}")
    shards = [f"diffusion_pytorch_model-{i + 1:05d}.safetensors" for i in range(-(-size_mb // FILE_MB))]
    for i, name in enumerate(shards):
        (folder / "transformer" / name).write_bytes(os.urandom(min(FILE_MB, size_mb - i * FILE_MB) << 20))
    weight_map = {"weight": shards[0], **{f"w{i}": name for i, name in enumerate(shards)}}
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )


def build_tar(folder: Path, path: Path) -> int:
    """Tar the folder's contents; return the tar's size in bytes."""
    with tarfile.open(path, "w") as tar:
        for item in sorted(folder.rglob("*")):
            tar.add(item, arcname=item.relative_to(folder).as_posix(), recursive=False)
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

    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="weights-bench-") as tmp_name, FakeHub() as hub:
        tmp = Path(tmp_name)
        print(f"Building a {args.size_mb} MiB folder, its tar and a hub repo of it in {tmp} ...", flush=True)
        build_folder(tmp / "folder", args.size_mb)
        nbytes = build_tar(tmp / "folder", tmp / "weights.tar")
        server = QuietServer(("127.0.0.1", 0), make_handler(tmp / "weights.tar", args.conn_limit_mbps * 1e6))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/weights.tar"
        hub.add_repo("bench/model", tmp / "folder")
        hub.limit_bytes_per_s = args.conn_limit_mbps * 1e6
        os.environ["HF_ENDPOINT"] = hub.url

        def fetch(source: str) -> Callable[[], Path]:
            def once() -> Path:
                weights.fetch_weights(source, tmp / "dest", "BENCH_WEIGHTS_URL")  # fresh: the last run's was removed
                return tmp / "dest"

            return once

        def plain() -> Path:
            plain_download(url, tmp / "plain.tar")
            return tmp / "plain.tar"

        rates = {
            "tar: weights.py httpx fallback (parallel ranges, extracting)": fetch(url),
            f"hub: weights.py huggingface_hub ({weights.HUB_WORKERS} files at once)": fetch("hf://bench/model"),
            "httpx single stream of the tar (to disk)": plain,
        }
        rates = {label: median_mb_per_s(label, args.runs, nbytes, once) for label, once in rates.items()}
        server.shutdown()

    concurrency = os.environ.get("WEIGHTS_CONCURRENCY") or downloads.DEFAULT_CONCURRENCY
    chunk = os.environ.get("WEIGHTS_CHUNK_SIZE") or downloads.DEFAULT_CHUNK_SIZE
    cap = f"{args.conn_limit_mbps:g} MB/s per connection" if args.conn_limit_mbps else "no cap"
    single = list(rates.values())[-1]
    print(
        f"\n{nbytes / 1e6:.0f} MB over loopback ({cap}; fallback c={concurrency}, chunk {chunk}), median of "
        f"{args.runs}:"
    )
    for label, rate in rates.items():
        print(f"  {label:<64} {rate:8.0f} MB/s  {rate / single:5.2f} x")
    if args.json:
        result = {
            "bytes": nbytes,
            "runs": args.runs,
            "concurrency": int(concurrency),
            "chunk_size": chunk,
            "conn_limit_mb_per_s": args.conn_limit_mbps,
            "mb_per_s": rates,
            "ratio_to_single_stream": {label: rate / single for label, rate in rates.items()},
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
