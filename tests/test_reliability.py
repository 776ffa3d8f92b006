"""Reliability through the real Cog server: bad inputs, out-of-memory, cancellation, disk and memory hygiene.

The servers here load tests/faulty_predictors.py (the production predictors plus faults on magic prompts) with TMPDIR
pointing at a fresh folder, so every file the worker leaves behind is visible.
"""

from __future__ import annotations

import gc
import http.server
import re
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bad_inputs
import faulty_predictors
import numpy as np
import psutil
import pytest
import torch
from bad_inputs import I2V_BASE, I2V_SIZE, T2V_BASE, V2V_BASE, Case

from conftest import MODULES, decode_data_url, read_mp4
from errors import ServiceError
from harness import ROOT, CogServer

PRIMARY_INPUT = {"i2v": "image", "v2v": "video", "t2v": "video"}  # t2v: video-to-video unless a case drops it
REFERENCE_FILE = {"i2v": "photo.jpg", "v2v": "clip.mp4", "t2v": "clip.mp4"}
BASES = {"i2v": I2V_BASE, "v2v": V2V_BASE, "t2v": T2V_BASE}
STUBS = {model: f"tests/faulty_predictors.py:{model.upper()}" for model in BASES}


@pytest.fixture(scope="session")
def corpus(served_dir: Path, weights_server: str) -> dict[str, Any]:
    """The bad-input corpus, generated now and served from 127.0.0.1: {"dir": folder, "url": base URL}."""
    folder = served_dir / "corpus"
    bad_inputs.make_images(folder)
    bad_inputs.make_videos(folder)
    return {"dir": folder, "url": f"{weights_server}/corpus"}


class Reliable:
    """A Cog server for one model with its own TMPDIR, and the reference output of a fresh server."""

    def __init__(self, model: str, weights_url: str, base: Path, corpus: dict[str, Any]) -> None:
        self.model, self.corpus = model, corpus
        self.tmp = base / "tmp"
        self.tmp.mkdir()
        env = {"TMPDIR": str(self.tmp), "COG_PREDICT_TYPE_STUB": STUBS[model]}
        self.server = CogServer(
            MODULES[model], weights_url=weights_url, cache=base / "cache", log=base / "server.log", env=env
        )
        self.server.wait_ready()
        self.out = base / "out"
        self.out.mkdir()
        self.count = 0
        first = self.predict({})  # the reference: the first prediction of a fresh server
        assert first["status"] == "succeeded", first
        self.reference = self.frames(first)

    def inputs(self, overrides: dict[str, Any]) -> dict[str, Any]:
        inputs = {**BASES[self.model], PRIMARY_INPUT[self.model]: REFERENCE_FILE[self.model], **overrides}
        for name in ("image", "video"):
            value = inputs.get(name)
            if isinstance(value, str) and "/" not in value and (self.corpus["dir"] / value).is_file():
                inputs[name] = f"{self.corpus['url']}/{inputs[name]}"
        return {name: value for name, value in inputs.items() if value is not None}

    def predict(self, overrides: dict[str, Any]) -> dict:
        result = self.server.predict(**self.inputs(overrides))  # asserts HTTP 200 (never a 5xx)
        self.server.wait_ready(30)  # READY again: no crash, no hang
        return result

    def frames(self, result: dict) -> np.ndarray:
        self.count += 1
        meta, frames = read_mp4(decode_data_url(result["output"], self.out / f"{self.count}.mp4"))
        assert meta["codec"] == "h264"
        self.last_fps = meta["fps"] if meta["fps"] >= 1 else len(frames) / meta["duration"]  # ffmpeg rounds to 0.01
        return frames

    def assert_recovers(self) -> None:
        """The next valid prediction gives exactly the fresh server's video."""
        again = self.predict({})
        assert again["status"] == "succeeded", again
        np.testing.assert_array_equal(self.frames(again), self.reference)

    def leftovers(self) -> list[str]:
        """Files in the server's temp dir other than the one reused output file (and torch's compile cache)."""
        files = [p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file()]
        return sorted(f for f in files if not f.startswith("torchinductor") and not f.endswith("/output.mp4"))

    def worker(self) -> psutil.Process:
        (worker,) = [p for p in psutil.Process(self.server.process.pid).children() if "python" in p.name()]
        return worker

    def check(self, case: Case, result: dict) -> None:
        """Success with the promised video, or failure with the promised message; nothing left on disk."""
        if case.ok:
            assert result["status"] == "succeeded", (case.name, result.get("error"))
            frames = self.frames(result)
            height, width = case.size or (I2V_SIZE if self.model != "v2v" else (V2V_BASE["height"], V2V_BASE["width"]))
            assert frames.shape[1:] == (height, width, 3), case.name
            if case.frames is not None:
                assert len(frames) == case.frames, case.name
            if case.fps is not None:
                assert self.last_fps == pytest.approx(case.fps, rel=0.02), case.name
            assert frames.std() > 0, case.name  # not a blank video
        else:
            assert result["status"] == "failed", (case.name, result)
            error = result["error"]
            assert case.error in error, (case.name, error)
            # One clear sentence: ours, after Cog's "Prediction failed: ...InputError: " prefix; no traceback.
            assert "Traceback" not in error and error.count("\n") == 0, error
        assert self.leftovers() == [], case.name


@pytest.fixture(scope="session")
def reliable(
    weights_urls: dict[str, str], corpus: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    servers: dict[str, Reliable] = {}

    def start(model: str) -> Reliable:
        if model not in servers:
            servers[model] = Reliable(model, weights_urls[model], tmp_path_factory.mktemp(f"rel-{model}"), corpus)
        return servers[model]

    yield start
    for r in servers.values():
        r.server.close()


# --- the bad-input corpus ---------------------------------------------------------------------------------------------

CASES = [("i2v", case) for case in bad_inputs.i2v_cases()] + [("v2v", case) for case in bad_inputs.v2v_cases()]
CASES += [("t2v", case) for case in bad_inputs.t2v_cases()]


@pytest.mark.parametrize(("model", "case"), CASES, ids=[f"{m}-{c.name}" for m, c in CASES])
def test_bad_input_corpus(reliable: Any, model: str, case: Case) -> None:
    r = reliable(model)
    r.check(case, r.predict(case.inputs))
    assert r.server.status() == "READY"
    if not case.ok:
        r.assert_recovers()


def test_url_that_404s_fails_naming_it(reliable: Any) -> None:
    r = reliable("i2v")
    url = f"{r.corpus['url']}/missing.png"
    result = r.predict({"image": url})
    assert result["status"] == "failed"
    # Cog's own message (the download runs before our code): it names the URL, not the input.
    assert result["error"] == f"Input validation error: 404 Client Error: File not found for url: {url}"
    assert r.leftovers() == []  # Cog 0.23.1 itself leaves an empty temp file here: cog_compat fixes it
    r.assert_recovers()


# --- out of GPU memory ------------------------------------------------------------------------------------------------


def test_out_of_memory_in_process_is_clear_and_frees_memory(
    i2v: Any, corpus: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = corpus["dir"] / "photo.jpg"
    expected = read_mp4(i2v.run(image=image, **I2V_BASE))[1]
    held: list[weakref.ref] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        activations = torch.ones(64 * 2**20 // 4)  # what the failing step held
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(i2v.pipe.transformer, "forward", forward)
        with pytest.raises(ServiceError) as error:
            i2v.run(image=image, **I2V_BASE)
    frames = I2V_BASE.get("num_frames", 49)
    assert str(error.value) == (
        f"Out of GPU memory generating {frames} frames at {i2v.width}x{i2v.height}: try fewer frames or a smaller size."
    )  # never "fewer steps": steps do not lower the peak
    assert error.value.__suppress_context__  # one clear sentence, not the CUDA error's chain
    gc.collect()
    assert held and held[0]() is None  # released even while the error (and its traceback) is still alive
    np.testing.assert_array_equal(read_mp4(i2v.run(image=image, **I2V_BASE))[1], expected)


@pytest.mark.parametrize("model", ["i2v", "v2v", "t2v"])
def test_out_of_memory_through_the_server(reliable: Any, model: str) -> None:
    r = reliable(model)
    rss_before = r.worker().memory_info().rss
    for _ in range(3):
        result = r.predict({"prompt": faulty_predictors.OOM})
        assert result["status"] == "failed"
        assert re.search(
            r"Out of GPU memory generating \d+ frames at \d+x\d+: try fewer frames or a smaller size\.$",
            result["error"],
        ), result["error"]
    # Each failed attempt allocated 512 MiB: none of it is kept.
    assert r.worker().memory_info().rss - rss_before < faulty_predictors.OOM_ALLOCATION_BYTES
    assert r.leftovers() == []
    r.assert_recovers()


# --- cancellation -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trickle_server(corpus: dict[str, Any]) -> Iterator[str]:
    """Serves corpus files a few bytes at a time (~1.5 s for any file): a slow upload to cancel."""
    folder = corpus["dir"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            data = (folder / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            chunk = max(1, len(data) // 30)
            try:
                for start in range(0, len(data), chunk):
                    self.wfile.write(data[start : start + chunk])
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


CANCEL_POINTS = [
    ("i2v", "download", {"image": "TRICKLE/photo.jpg"}, None),
    ("v2v", "download", {"video": "TRICKLE/clip.mp4"}, None),
    ("i2v", "text encoding", {"prompt": faulty_predictors.STALL_TEXT}, "stalled in text encoding"),
    ("v2v", "text encoding", {"prompt": faulty_predictors.STALL_TEXT}, "stalled in text encoding"),
    ("i2v", "denoising", {"prompt": faulty_predictors.STALL_DENOISE}, "stalled in denoising"),
    ("v2v", "denoising", {"prompt": faulty_predictors.STALL_DENOISE}, "stalled in denoising"),
    ("i2v", "video encoding", {"prompt": faulty_predictors.STALL_ENCODE}, "stalled in video encoding"),
    ("v2v", "video encoding", {"prompt": faulty_predictors.STALL_ENCODE}, "stalled in video encoding"),
    ("t2v", "download", {"video": "TRICKLE/clip.mp4"}, None),
    ("t2v", "text encoding", {"prompt": faulty_predictors.STALL_TEXT}, "stalled in text encoding"),  # video-to-video
    ("t2v", "text-to-video text encoding", {"prompt": faulty_predictors.STALL_TEXT, "video": None}, "stalled in text"),
    ("t2v", "denoising", {"prompt": faulty_predictors.STALL_DENOISE}, "stalled in denoising"),  # video-to-video
    ("t2v", "text-to-video denoising", {"prompt": faulty_predictors.STALL_DENOISE, "video": None}, "stalled in denoi"),
    ("t2v", "video encoding", {"prompt": faulty_predictors.STALL_ENCODE}, "stalled in video encoding"),
]
CANCEL_IDS = [f"{model}-{point}" for model, point, *_ in CANCEL_POINTS]


@pytest.mark.parametrize(("model", "point", "inputs", "log"), CANCEL_POINTS, ids=CANCEL_IDS)
def test_cancel_leaves_nothing_behind(
    reliable: Any, webhooks: Any, trickle_server: str, model: str, point: str, inputs: dict, log: str | None
) -> None:
    r = reliable(model)
    inputs = {k: v.replace("TRICKLE", trickle_server) if isinstance(v, str) else v for k, v in inputs.items()}
    prediction_id = f"cancel-{model}-{point.replace(' ', '-')}"
    r.server.predict_async(prediction_id, webhooks.url, **r.inputs(inputs))
    if log:
        webhooks.wait_for(prediction_id, lambda s: log in (s.get("logs") or ""), 60)
        children = [p.name() for p in r.worker().children()]
        assert any("ffmpeg" in name for name in children) == (point == "video encoding")
    else:
        webhooks.wait_for(prediction_id, lambda s: s.get("status") == "processing")
        time.sleep(0.3)  # mid-download
    r.server.cancel(prediction_id)
    state = webhooks.wait_for(prediction_id, lambda s: s.get("status") in ("canceled", "failed", "succeeded"), 30)
    assert state["status"] == "canceled", state
    r.server.wait_ready(10)
    assert r.worker().children() == []  # no ffmpeg left running
    if point == "download":
        # Cog finishes the download before it cancels, and then no longer deletes the file: the next prediction does.
        r.assert_recovers()
    assert r.leftovers() == []
    r.assert_recovers()


@pytest.mark.parametrize("model", ["i2v", "v2v"])
def test_cancel_during_interpolation_changes_nothing(reliable: Any, webhooks: Any, model: str) -> None:
    """Cancelled while RIFE runs: nothing left behind, and the next interpolated video is the one before."""
    r = reliable(model)
    before = r.frames(r.predict({"interpolation": 2}))
    prediction_id = f"cancel-{model}-interpolation"
    inputs = r.inputs({"prompt": faulty_predictors.STALL_INTERPOLATE, "interpolation": 2})
    r.server.predict_async(prediction_id, webhooks.url, **inputs)
    webhooks.wait_for(prediction_id, lambda s: "stalled in interpolation" in (s.get("logs") or ""), 60)
    r.server.cancel(prediction_id)
    state = webhooks.wait_for(prediction_id, lambda s: s.get("status") in ("canceled", "failed", "succeeded"), 30)
    assert state["status"] == "canceled", state
    assert "Interpolation x2" in state["logs"] and "Interpolation took" not in state["logs"]
    r.server.wait_ready(10)
    assert r.worker().children() == [] and r.leftovers() == []
    np.testing.assert_array_equal(r.frames(r.predict({"interpolation": 2})), before)
    r.assert_recovers()


# --- disk and memory over many predictions ----------------------------------------------------------------------------


def test_mixed_traffic_keeps_disk_and_memory_bounded(reliable: Any) -> None:
    """50 predictions, valid and invalid mixed: temp files never pile up, the worker's memory stays flat."""
    r = reliable("i2v")
    cases = bad_inputs.i2v_cases()
    mix = [c for c in cases if c.ok and "num_inference_steps" not in c.inputs and c.frames == 9]
    mix += [c for c in cases if not c.ok][:10]
    r.assert_recovers()  # warm: the allocator's first growth is not a leak
    rss = [r.worker().memory_info().rss]
    for i in range(50):
        case = mix[(i * 7) % len(mix)]
        r.check(case, r.predict(case.inputs))
        rss.append(r.worker().memory_info().rss)
        assert sum(f.stat().st_size for f in r.tmp.rglob("*") if f.is_file()) < 10 * 2**20
    growth = (rss[-1] - rss[1]) / 2**20
    assert growth < 150, f"worker RSS grew {growth:.0f} MiB over 50 predictions: {[x // 2**20 for x in rss]}"
    r.assert_recovers()


# --- one validation, with or without an OpenAPI schema ----------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_server(weights_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    """The i2v server run from a folder holding the `.cog/openapi_schema.json` that `cog build` writes (the golden
    one in tests/schemas/, made by Cog's own parser)."""
    base = tmp_path_factory.mktemp("schema-server")
    (base / ".cog").mkdir()
    shutil.copy(ROOT / "tests" / "schemas" / "predict_i2v.json", base / ".cog" / "openapi_schema.json")
    env = {"COG_PREDICT_TYPE_STUB": str(ROOT / "predict_i2v.py") + ":Predictor", "PYTHONPATH": str(ROOT)}
    server = CogServer(
        "predict_i2v", weights_url=weights_urls["i2v"], cache=base / "cache", log=base / "server.log", env=env, cwd=base
    )
    server.wait_ready()
    yield server
    server.close()


SCHEMA_CASES = [
    ({"num_frames": 48}, "num_frames", "48 is not one of [9,17,25,33,41,49]"),
    ({"num_inference_steps": 0}, "num_inference_steps", "0 is less than the minimum of 1"),
    ({"guidance_scale": 20.5}, "guidance_scale", "20.5 is greater than the maximum of 20"),
    ({"scheduler": "euler"}, "scheduler", '"euler" is not one of ["cogvideox_dpm","cogvideox_ddim"]'),
    ({"seed": -1}, "seed", "-1 is less than the minimum of 0"),
    ({"prompt": 5}, "prompt", '5 is not of type "string"'),
    ({"use_dynamic_cfg": "yes"}, "use_dynamic_cfg", '"yes" is not of type "boolean"'),
    ({"image": None}, "image", "Field required"),
]


@pytest.mark.parametrize(("inputs", "name", "schema_message"), SCHEMA_CASES, ids=[c[1] for c in SCHEMA_CASES])
def test_both_validation_paths_name_the_input(
    reliable: Any, schema_server: CogServer, inputs: dict, name: str, schema_message: str
) -> None:
    """With a schema, coglet rejects the request itself (HTTP 422, its own wording); without, validate_inputs does."""
    r = reliable("i2v")
    without = r.predict(inputs)
    assert without["status"] == "failed" and f"input `{name}`: " in without["error"]

    response = schema_server.client.post("/predictions", json={"input": r.inputs(inputs)})
    assert response.status_code == 422, response.text
    (detail,) = [d for d in response.json()["detail"] if d["msg"] == schema_message]
    assert detail["loc"] == ["body", "input", name]
    assert schema_server.status() == "READY"


def test_schema_server_ignores_unknown_inputs_and_accepts_valid_ones(reliable: Any, schema_server: CogServer) -> None:
    r = reliable("i2v")
    for extra in ({}, {"num_frame": 9}):  # coglet drops unknown keys when it has a schema (no schema: we reject)
        result = schema_server.predict(**r.inputs(extra))
        assert result["status"] == "succeeded", result
        schema_server.wait_ready(10)


def test_reference_server_output_is_stable_across_restarts(
    reliable: Any, weights_urls: dict[str, str], tmp_path: Path
) -> None:
    """The reference every recovery is compared to is what a fresh server gives, not an artefact of one process."""
    r = reliable("i2v")
    fresh = Reliable("i2v", weights_urls["i2v"], tmp_path, r.corpus)
    try:
        np.testing.assert_array_equal(fresh.reference, r.reference)
    finally:
        fresh.server.close()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
