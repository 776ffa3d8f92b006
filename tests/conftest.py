"""Fixtures: tiny offline weights served from 127.0.0.1 (as tars and as hub repos), in-process predictors, and the
real Cog server."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # read when huggingface_hub is imported: no extra requests

import base64
import functools
import http.server
import importlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest

import tiny_weights
from fake_hub import FakeHub
from harness import CogServer, serve_directory

MODULES = {"i2v": "predict_i2v", "i2v15": "predict_i2v15", "v2v": "predict_v2v", "t2v": "predict_t2v"}


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="session")
def weights_server(served_dir: Path) -> Iterator[str]:
    """A plain static file server on 127.0.0.1 for `served_dir`; yields its base URL."""
    server = serve_directory(served_dir)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models of the real architectures in the hub repos' layouts, built offline: {model: folder}."""
    builds = {
        "i2v": tiny_weights.build_i2v,
        "i2v15": tiny_weights.build_i2v15,
        "v2v": tiny_weights.build_v2v,
        "t2v": tiny_weights.build_t2v,
        "i2v-480p": functools.partial(tiny_weights.build_i2v, sample_height=60, sample_width=90),
    }
    return {model: build(tmp_path_factory.mktemp(f"tiny-{model}")) for model, build in builds.items()}


@pytest.fixture(scope="session")
def rife_url(weights_server: str, served_dir: Path) -> str:
    """Random RIFE weights in the published layout, served from 127.0.0.1 and named by RIFE_WEIGHTS_URL for every
    predictor set up in this session (in process and in the Cog servers, which inherit the environment)."""
    tiny_weights.build_rife(served_dir / "rife" / "RIFE_IFNet_v426_heavy.pth")
    url = f"{weights_server}/rife/RIFE_IFNet_v426_heavy.pth"
    os.environ["RIFE_WEIGHTS_URL"] = url
    return url


@pytest.fixture(scope="session")
def weights_urls(weights_server: str, served_dir: Path, tiny_folders: dict[str, Path], rife_url: str) -> dict[str, str]:
    """The tiny models tarred and served from 127.0.0.1: {model: url}. RIFE_WEIGHTS_URL is set too (rife_url)."""
    for model, folder in tiny_folders.items():
        tiny_weights.make_tar(folder, served_dir / f"{model}.tar")
    return {model: f"{weights_server}/{model}.tar" for model in tiny_folders}


HUB_REPOS = {
    "i2v": "THUDM/CogVideoX-5b-I2V",
    "i2v15": "THUDM/CogVideoX1.5-5B-I2V",
    "v2v": "cerspense/zeroscope_v2_XL",
    "t2v": "THUDM/CogVideoX-5b",
}


@pytest.fixture(scope="session")
def hub(tiny_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A stand-in of the Hugging Face hub on 127.0.0.1 serving the tiny models under the real repo names, each with
    a model card as the hub repos have one. Point HF_ENDPOINT at `hub.url`."""
    with FakeHub() as fake:
        for model, repo in HUB_REPOS.items():
            folder = tmp_path_factory.mktemp(f"hub-{model}")
            shutil.copytree(tiny_folders[model], folder, dirs_exist_ok=True)
            (folder / "README.md").write_text(f"---\nlicense: other\nlibrary_name: diffusers\n---\n# {repo}\n")
            fake.add_repo(repo, folder)
        yield fake


def load_predictor(model: str, url: str, cache: Path) -> Any:
    """Run the real setup() of a predictor in this process against the given weights URL and cache."""
    module = importlib.import_module(MODULES[model])
    os.environ["WEIGHTS_CACHE_DIR"] = str(cache)
    os.environ[module.CHECKPOINT.variable] = url
    predictor = module.Predictor()
    predictor.setup()
    return predictor


@pytest.fixture(scope="session")
def i2v(weights_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_predictor("i2v", weights_urls["i2v"], tmp_path_factory.mktemp("cache-i2v"))


@pytest.fixture(scope="session")
def v2v(weights_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_predictor("v2v", weights_urls["v2v"], tmp_path_factory.mktemp("cache-v2v"))


@pytest.fixture(scope="session")
def t2v(weights_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_predictor("t2v", weights_urls["t2v"], tmp_path_factory.mktemp("cache-t2v"))


@pytest.fixture(scope="session")
def cog_server(weights_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Factory: cog_server("i2v") starts (once per session) a READY server for that model."""
    servers: dict[str, CogServer] = {}

    def start(model: str) -> CogServer:
        if model not in servers:
            base = tmp_path_factory.mktemp(f"server-{model}")
            servers[model] = CogServer(
                MODULES[model], weights_url=weights_urls[model], cache=base / "cache", log=base / "server.log"
            )
            servers[model].wait_ready()
        return servers[model]

    yield start
    for server in servers.values():
        server.close()


class Webhooks:
    """Receives Cog's webhook calls on 127.0.0.1 and keeps the latest state of each prediction."""

    def __init__(self) -> None:
        self.states: dict[str, dict] = {}
        webhooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                state = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                webhooks.states[state["id"]] = state
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/webhook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, prediction_id: str, condition: Any, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while not condition(state := self.states.get(prediction_id, {})):
            assert time.monotonic() < deadline, f"timed out; last state: {state}"
            time.sleep(0.02)
        return state


@pytest.fixture(scope="session")
def webhooks() -> Iterator[Webhooks]:
    receiver = Webhooks()
    yield receiver
    receiver.server.shutdown()


def decode_data_url(url: str, path: Path) -> Path:
    header, payload = url.split(",", 1)
    assert header == "data:video/mp4;base64", header
    path.write_bytes(base64.b64decode(payload))
    return path


def read_mp4(path: Path) -> tuple[dict, np.ndarray]:
    """Decode an MP4 independently of the project's code: (ffmpeg's stream info, uint8 frames)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])
    return meta, frames


def write_video(path: Path, frames: np.ndarray, fps: float, output_params: list[str] | None = None) -> Path:
    """Encode a test video with imageio-ffmpeg (H.264 unless output_params say otherwise)."""
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        macro_block_size=1,
        output_params=output_params or [],
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


def rotate_video(source: Path, dest: Path, degrees: int = 90) -> Path:
    """Copy a video, adding display-rotation metadata as phones do (no re-encode)."""
    ffmpeg("-display_rotation", str(degrees), "-i", str(source), "-c", "copy", str(dest))
    return dest


def gradient_frames(count: int, height: int, width: int) -> np.ndarray:
    """A moving colour gradient: every frame differs, and orientation is recognisable (red grows to the right)."""
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    frames = []
    for i in range(count):
        red = np.broadcast_to(x, (height, width))
        green = np.broadcast_to(y, (height, width))
        blue = np.full((height, width), (i * 37) % 256)
        frames.append(np.stack([red, green, blue], axis=-1))
    return np.asarray(frames, dtype=np.uint8)


def assert_same_video(decoded: np.ndarray, frames: np.ndarray, min_correlation: float = 0.85) -> None:
    """The MP4 holds these frames, in order, up to H.264 4:2:0 loss (large on the tiny models' noise-like output)."""
    assert decoded.shape == frames.shape
    flat_decoded = decoded.reshape(len(decoded), -1).astype(float)
    flat = frames.reshape(len(frames), -1).astype(float)
    correlation = np.corrcoef(flat_decoded, flat)[: len(frames), len(frames) :]
    assert (np.diag(correlation) > min_correlation).all(), np.diag(correlation)
    assert (correlation.argmax(axis=1) == np.arange(len(frames))).all()  # each frame is its own best match
