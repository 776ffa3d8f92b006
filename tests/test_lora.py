"""LoRAs on the CogVideoX predictors: exact against diffusers' own loading, swapped without reloads or drift, bad
ones refused with the pipeline left as it was. Tiny LoRAs are built offline with peft (tiny_weights.build_lora) and
served from 127.0.0.1, as files and as hub repos."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image
from safetensors.torch import save_file

import lora
import tiny_weights
from conftest import decode_data_url, load_predictor, read_mp4
from errors import InputError
from fake_hub import FakeHub
from harness import data_url

PROMPT = "a red boat sails across a calm lake"
IMAGE = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
SETTINGS = dict(width=96, height=64, num_frames=9, num_inference_steps=2, guidance_scale=6.0, use_dynamic_cfg=True)


class Files(http.server.ThreadingHTTPServer):
    """Serves LoRA files from 127.0.0.1: {path: bytes}, an HTTP status for a path, or a slow body (to cancel)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.slow: set[str] = set()
        self.gets: list[str] = []
        files = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                files.gets.append(self.path)
                status = files.status.get(self.path, 200 if self.path in files.files else 404)
                body = files.files.get(self.path, b"") if status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = max(1, len(body) // 50) if self.path in files.slow else len(body) or 1
                try:
                    for start in range(0, len(body), step):
                        self.wfile.write(body[start : start + step])
                        if self.path in files.slow:
                            time.sleep(0.1)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def add(self, name: str, data: bytes) -> str:
        self.files[f"/{name}"] = data
        return f"http://127.0.0.1:{self.server_port}/{name}"


@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    server = Files()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def loras(tiny_folders: dict[str, Path], files: Files, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny LoRAs of the i2v transformer, built offline and served: {name: (url, local file)}."""
    base = tmp_path_factory.mktemp("loras")
    build = functools.partial(tiny_weights.build_lora, tiny_folders["i2v"])
    made = {
        "full": build(base / "full"),  # q/k/v/out, with diffusers' adapter metadata (alpha 8 / rank 4)
        "qkv": build(base / "qkv", targets=("to_q", "to_k", "to_v"), seed=2),  # only what fused QKV would bypass
        "factory": build(base / "factory", rank=8, alpha=8, seed=3, dtype=torch.bfloat16, metadata=False),
        "other": build(base / "other", seed=4),
    }
    return {name: (files.add(f"{name}.safetensors", path.read_bytes()), path) for name, path in made.items()}


@pytest.fixture(scope="module")
def predictor(weights_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An i2v predictor of its own: the LoRA state it is left in concerns no other test."""
    return load_predictor("i2v", weights_urls["i2v"], tmp_path_factory.mktemp("lora-cache"))


@pytest.fixture(scope="module")
def reference(tiny_folders: dict[str, Path]) -> Any:
    """diffusers itself: the same weights, never fused, LoRAs loaded with load_lora_weights + set_adapters."""
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(tiny_folders["i2v"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(predictor: Any, url: str = "", scale: float = 1.0, seed: int = 3) -> np.ndarray:
    predictor.loras.use(url, scale)
    return predictor.generate(
        image=IMAGE, prompt=PROMPT, negative_prompt="", **SETTINGS, scheduler="cogvideox_dpm", seed=seed
    )


def diffusers_frames(pipe: Any, predictor: Any, path: Path | None, scale: float = 1.0, seed: int = 3) -> np.ndarray:
    if path is not None:
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name="reference")
        pipe.set_adapters(["reference"], [scale])
    pipe.scheduler = predictor.schedulers["cogvideox_dpm"]
    try:
        return pipe(
            image=IMAGE,
            prompt=PROMPT,
            negative_prompt="",
            max_sequence_length=226,
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(seed),
            **SETTINGS,
        ).frames[0]
    finally:
        if path is not None:
            pipe.delete_adapters("reference")


# --- exact, and without drift ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "scale"), [("full", 1.0), ("full", 0.6), ("qkv", 1.0), ("factory", 1.3)])
def test_lora_equals_diffusers_own_loading(
    predictor: Any, reference: Any, loras: dict[str, Any], name: str, scale: float
) -> None:
    """Bit for bit, on the CPU: the predictor (fused QKV by default) equals an unfused pipeline with the LoRA loaded
    by diffusers. The q/k/v-only LoRA is the one fused projections would silently bypass."""
    url, path = loras[name]
    without = generate(predictor)
    got = generate(predictor, url, scale)
    np.testing.assert_array_equal(got, diffusers_frames(reference, predictor, path, scale))
    assert np.abs(got - without).mean() > 1e-3  # the LoRA changes the video


def test_lora_on_q_k_v_with_cpu_offload(
    weights_urls: dict[str, str], reference: Any, loras: dict[str, Any], tmp_path: Path
) -> None:
    """Offload placement (what setup chooses on a GPU without room), emulated on the CPU: the same accelerate hooks
    move each model to its device and back. A LoRA on to_q/to_k/to_v still applies exactly as diffusers says."""
    predictor = load_predictor("i2v", weights_urls["i2v"], tmp_path / "cache")
    pipe = predictor.pipe
    pipe.enable_model_cpu_offload(device="cpu")
    # load_lora_weights takes the hooks off and puts them back with enable_model_cpu_offload() and no device, which
    # finds no accelerator on the CPU: give it the device a GPU machine would default to.
    pipe.enable_model_cpu_offload = functools.partial(pipe.enable_model_cpu_offload, device="cpu")
    url, path = loras["qkv"]
    without = generate(predictor)
    got = generate(predictor, url, 0.9)
    assert pipe.transformer._hf_hook is not None  # still offloaded after loading the LoRA
    np.testing.assert_array_equal(got, diffusers_frames(reference, predictor, path, 0.9))
    assert np.abs(got - without).mean() > 1e-3
    np.testing.assert_array_equal(generate(predictor), without)


def test_no_lora_scale_zero_and_no_drift(predictor: Any, reference: Any, loras: dict[str, Any]) -> None:
    """Before any LoRA, after many, and at scale 0: the same video, bit for bit, as a pipeline that never saw one."""
    before = generate(predictor)
    np.testing.assert_array_equal(before, diffusers_frames(reference, predictor, None))
    full, other = loras["full"][0], loras["other"][0]
    first = generate(predictor, full, 1.0)
    for url, scale in [(other, 0.5), (full, 1.0), (other, 2.0), ("", 1.0), (full, 0.0), (other, 1.0)]:
        generate(predictor, url, scale)
    np.testing.assert_array_equal(generate(predictor, full, 1.0), first)
    np.testing.assert_array_equal(generate(predictor), before)
    np.testing.assert_array_equal(generate(predictor, full, 0.0), before)


def test_switching_costs_no_download_and_no_reload(
    predictor: Any, loras: dict[str, Any], files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics: list[tuple[str, float]] = []
    monkeypatch.setattr(lora, "record_metric", lambda key, value: metrics.append((key, value)))
    full, other = loras["full"][0], loras["other"][0]
    generate(predictor, full)
    generate(predictor, other)
    gets, loaded = len(files.gets), dict(predictor.loras.loaded)
    metrics.clear()
    for url in (full, other, full, other):
        generate(predictor, url)
    assert len(files.gets) == gets and predictor.loras.loaded.keys() == loaded.keys()
    assert not [key for key, _ in metrics if key.startswith("lora.")]  # nothing fetched, nothing loaded


def test_adapters_and_files_are_bounded(
    predictor: Any, loras: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEEP_LOADED adapters stay in memory, least recently used out first; the file cache keeps CACHE_BYTES."""
    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lora, "CACHE_BYTES", 2 * loras["full"][1].stat().st_size + 10)
    urls = [loras[name][0] for name in ("full", "qkv", "other", "factory")]
    for url in urls:
        generate(predictor, url)
    assert list(predictor.loras.loaded.values()) == urls[1:]  # the first evicted (KEEP_LOADED = 3)
    assert set(predictor.pipe.transformer.peft_config) == set(predictor.loras.loaded)
    assert len(list((tmp_path / "loras").glob("*.safetensors"))) == 2  # least recently used files deleted
    np.testing.assert_array_equal(generate(predictor, urls[0]), generate(predictor, urls[0]))  # reloaded, same


# --- bad LoRAs: refused, and the pipeline is left as it was -------------------------------------------------------


def bad_file(tmp_path: Path, name: str) -> bytes:
    if name == "html":
        return b"<html><body>Sign in to continue</body></html>"
    tensors = {
        "sd": {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 320)},
        "flux": {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 3072),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(3072, 4),
        },
        "half": {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 32)},
        "2b": {
            "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 48),  # as 2b on 5b:
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(48, 4),
        },  # other widths
        "nan": {
            "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.full((4, 32), float("nan")),
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(32, 4),
        },
        "empty": {},
    }[name]
    save_file(tensors, tmp_path / "bad.safetensors")
    return (tmp_path / "bad.safetensors").read_bytes()


BAD = [
    ("html", "not a .safetensors file"),
    (
        "sd",
        "not a LoRA for CogVideoX-5b-I2V in diffusers' format: none of its 1 tensors is a "
        "transformer.<layer>.lora_A/B.weight (e.g. unet.down_blocks.0.attentions.0.proj_in.lora_A.weight).",
    ),
    ("flux", "not a LoRA for CogVideoX-5b-I2V in diffusers' format: none of its 2 tensors"),
    ("empty", "not a LoRA for CogVideoX-5b-I2V in diffusers' format: none of its 0 tensors"),
    ("half", "transformer_blocks.0.attn1.to_q has only one of lora_A and lora_B."),
    ("2b", "transformer_blocks.0.attn1.to_q is 32x32, its lora_A is 4x48: a LoRA for another model size?"),
    ("nan", "its lora_A of transformer_blocks.0.attn1.to_q holds NaN or infinite values."),
]


@pytest.mark.parametrize(("name", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_refused_and_change_nothing(
    predictor: Any, files: Files, tmp_path: Path, name: str, message: str
) -> None:
    before = generate(predictor)
    adapters = set(getattr(predictor.pipe.transformer, "peft_config", {}))
    url = files.add(f"{name}-{tmp_path.name}.safetensors", bad_file(tmp_path, name))
    with pytest.raises(InputError) as error:
        generate(predictor, url)
    assert str(error.value).startswith("Invalid input `lora_url`: ") and message in str(error.value)
    assert set(getattr(predictor.pipe.transformer, "peft_config", {})) == adapters
    name = f"lora_{hashlib.sha256(url.encode()).hexdigest()[:16]}.safetensors"
    assert not (lora.cache_dir() / "loras" / name).exists()  # a refused file is not kept
    np.testing.assert_array_equal(generate(predictor), before)


@pytest.mark.parametrize(("status", "detail"), [(404, "HTTP 404 Not Found"), (403, "HTTP 403 Forbidden")])
def test_unreachable_lora_names_the_input(predictor: Any, files: Files, status: int, detail: str) -> None:
    url = files.add(f"status-{status}.safetensors", b"")
    files.status[f"/status-{status}.safetensors"] = status
    with pytest.raises(InputError) as error:
        generate(predictor, url)
    assert str(error.value) == f"Invalid input `lora_url`: {detail} ({url})."


def test_oversized_file_is_refused_before_download(
    predictor: Any, loras: dict[str, Any], files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lora, "MAX_FILE_BYTES", 1000)
    url = files.add("big.safetensors", loras["other"][1].read_bytes())
    size = len(files.files["/big.safetensors"])
    with pytest.raises(InputError) as error:
        generate(predictor, url)
    assert str(error.value) == f"Invalid input `lora_url`: the file is {size:,} bytes, over the limit of 1,000 ({url})."


@pytest.mark.parametrize("url", ["ftp://x/y.safetensors", "hf://only-owner", "lora.safetensors"])
def test_malformed_url(predictor: Any, url: str) -> None:
    with pytest.raises(InputError) as error:
        generate(predictor, url)
    assert str(error.value) == (
        f"Invalid input `lora_url`: {url!r} is not an https URL of a .safetensors file, hf://OWNER/NAME or "
        "hf://OWNER/NAME/FILE.safetensors."
    )


# --- hub references -------------------------------------------------------------------------------------------------


@pytest.fixture
def lora_hub(hub: FakeHub, loras: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "pytorch_lora_weights.safetensors").write_bytes(loras["full"][1].read_bytes())
    (two / "a.safetensors").write_bytes(loras["full"][1].read_bytes())
    (two / "b.safetensors").write_bytes(loras["other"][1].read_bytes())
    hub.add_repo("someone/boat-lora", one, card_data={"base_model": "THUDM/CogVideoX-5b-I2V"})
    hub.add_repo("someone/two-loras", two)
    hub.add_repo("someone/lora-for-1.5", one, card_data={"base_model": "THUDM/CogVideoX1.5-5B-I2V"})
    return hub


def test_hub_references(predictor: Any, loras: dict[str, Any], lora_hub: FakeHub) -> None:
    by_url = generate(predictor, loras["full"][0])
    np.testing.assert_array_equal(generate(predictor, "hf://someone/boat-lora"), by_url)
    np.testing.assert_array_equal(generate(predictor, "hf://someone/two-loras/a.safetensors"), by_url)
    np.testing.assert_array_equal(
        generate(predictor, "hf://someone/two-loras/b.safetensors"), generate(predictor, loras["other"][0])
    )
    with pytest.raises(InputError) as error:
        generate(predictor, "hf://someone/two-loras")
    assert str(error.value) == (
        "Invalid input `lora_url`: someone/two-loras must hold exactly one .safetensors file, or the URL must name "
        "one (found: a.safetensors, b.safetensors) (hf://someone/two-loras)."
    )


def test_lora_for_the_other_generation_is_refused(predictor: Any, lora_hub: FakeHub) -> None:
    with pytest.raises(InputError) as error:
        generate(predictor, "hf://someone/lora-for-1.5")
    assert str(error.value) == (
        "Invalid input `lora_url`: this LoRA is for THUDM/CogVideoX1.5-5B-I2V (its model card says so), "
        "not CogVideoX-5b-I2V."
    )


# --- through the real Cog server ------------------------------------------------------------------------------------


def test_server_lora_prediction_metrics_and_bad_lora(
    cog_server: Any, loras: dict[str, Any], files: Files, tmp_path: Path
) -> None:
    server = cog_server("i2v")
    image = tmp_path / "image.png"
    IMAGE.save(image)
    inputs = {"image": data_url(image), "prompt": PROMPT, "num_frames": 9, "num_inference_steps": 2, "seed": 7}
    plain = server.predict(**inputs)
    with_lora = server.predict(**inputs, lora_url=loras["full"][0], lora_scale=0.8)
    assert with_lora["status"] == "succeeded", with_lora
    assert "Loaded LoRA" in with_lora["logs"] and "LoRA " in with_lora["logs"]
    assert {"download_s", "load_s", "cached"} <= set(with_lora["metrics"]["lora"])
    frames = {
        name: read_mp4(decode_data_url(r["output"], tmp_path / f"{name}.mp4"))[1]
        for name, r in (("plain", plain), ("lora", with_lora))
    }
    assert np.abs(frames["plain"].astype(int) - frames["lora"]).mean() > 1

    bad = server.predict(**inputs, lora_url=files.add("server-bad.safetensors", b"<html></html>"))
    assert bad["status"] == "failed" and "Invalid input `lora_url`: not a .safetensors file" in bad["error"]
    again = server.predict(**inputs)
    np.testing.assert_array_equal(
        read_mp4(decode_data_url(again["output"], tmp_path / "again.mp4"))[1], frames["plain"]
    )


def test_server_lora_download_cancelled_midway(
    cog_server: Any, webhooks: Any, loras: dict[str, Any], files: Files, tmp_path: Path
) -> None:
    """Cancelled while the LoRA downloads: nothing half-written stays in the cache, the pipeline is as it was, and the
    same LoRA works afterwards."""
    server = cog_server("i2v")
    image = tmp_path / "image.png"
    IMAGE.save(image)
    inputs = {"image": data_url(image), "prompt": PROMPT, "num_frames": 9, "num_inference_steps": 2, "seed": 11}
    plain = read_mp4(decode_data_url(server.predict(**inputs)["output"], tmp_path / "plain.mp4"))[1]
    url = files.add("slow.safetensors", loras["other"][1].read_bytes())
    files.slow.add("/slow.safetensors")  # ~5 s for the whole file
    server.predict_async("cancel-lora", webhooks.url, **inputs, lora_url=url)
    deadline = time.monotonic() + 60
    while files.gets.count("/slow.safetensors") < 2:  # the size probe, then the body (Cog's log webhooks lag)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # mid-download
    server.cancel("cancel-lora")
    state = webhooks.wait_for("cancel-lora", lambda s: s.get("status") in ("canceled", "failed", "succeeded"), 30)
    assert state["status"] == "canceled", state
    server.wait_ready(10)
    kept = [p.name for p in (server.cache / "loras").iterdir() if not p.name.endswith(".lock")]
    assert not [name for name in kept if name.startswith(".")], kept  # no temporary download left behind
    assert f"lora_{hashlib.sha256(url.encode()).hexdigest()[:16]}.safetensors" not in kept  # nor a partial file
    again = server.predict(**inputs)
    np.testing.assert_array_equal(read_mp4(decode_data_url(again["output"], tmp_path / "again.mp4"))[1], plain)
    files.slow.clear()
    with_lora = server.predict(**inputs, lora_url=url)
    assert with_lora["status"] == "succeeded" and with_lora["metrics"]["lora"]["cached"] == 0.0
