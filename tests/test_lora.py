"""LoRAs on the CogVideoX predictors: exact against diffusers' own loading, swapped without reloads or drift, bad
ones refused with the pipeline left as it was. Tiny LoRAs are built offline with peft (tiny_weights.build_lora) and
served from 127.0.0.1, as files and as hub repos."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cog import CancelationException
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import lora
import tiny_weights
from conftest import assert_same_video, decode_data_url, load_predictor, read_mp4
from errors import InputError, ServiceError
from fake_hub import FakeHub
from harness import data_url
from media import to_uint8

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
        self.declared: dict[str, int] = {}  # a size declared to the probe, then a longer body without a length
        self.gets: list[str] = []
        files = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                files.gets.append(self.path)
                status = files.status.get(self.path, 200 if self.path in files.files else 404)
                body = files.files.get(self.path, b"") if status == 200 else b""
                self.send_response(status)
                if self.path not in files.declared:
                    self.send_header("Content-Length", str(len(body)))
                elif self.headers.get("Range"):  # the size probe is told one size, the body is longer
                    self.send_header("Content-Length", str(files.declared[self.path]))
                    body = body[: files.declared[self.path]]
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


def diffusers_frames(pipe: Any, predictor: Any, path: Path | None, *, scale: float = 1.0, seed: int = 3) -> np.ndarray:
    if path is not None:
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name="reference")
        pipe.set_adapters(["reference"], [scale])
        pipe.transformer.eval()  # for inference, as the predictor (no dropout)
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
    np.testing.assert_array_equal(got, diffusers_frames(reference, predictor, path, scale=scale))
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
    np.testing.assert_array_equal(got, diffusers_frames(reference, predictor, path, scale=0.9))
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


MALFORMED = {
    "ftp": "ftp://x/y.safetensors",
    "owner only": "hf://only-owner",
    "relative": "lora.safetensors",
    "dotdot revision": "hf://owner/name@../x.safetensors",
    "hub id": "hf://owner/na--me",
    "long hub id": "hf://owner/" + "n" * 200,
    "crlf": "https://example.com/a\r\nX-Injected: 1/x.safetensors",
    "port": "https://example.com:99999/x.safetensors",
    "idna": "https://xn--/x.safetensors",
    "100 KB": "https://example.com/" + "a" * 100_000,
}


@pytest.mark.parametrize("url", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_url(predictor: Any, url: str) -> None:
    with pytest.raises(InputError) as error:
        generate(predictor, url)
    shown = url if len(url) <= 200 else url[:200] + "..."
    assert str(error.value) == (
        f"Invalid input `lora_url`: {shown!r} is not an https URL of a .safetensors file, hf://OWNER/NAME or "
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


def test_interpolation_with_a_lora(predictor: Any, loras: dict[str, Any], tmp_path: Path) -> None:
    """run() with a LoRA and interpolation 2: the LoRA's 9 generated frames, interpolated to 17 at 16 fps."""
    image = tmp_path / "image.png"
    IMAGE.save(image)
    url = loras["full"][0]
    with_lora, plain = generate(predictor, url), generate(predictor)
    settings = {k: v for k, v in SETTINGS.items() if k not in ("width", "height")}
    output = predictor.run(
        image=image, prompt=PROMPT, scheduler="cogvideox_dpm", seed=3, lora_url=url, fps=8, interpolation=2, **settings
    )
    meta, frames = read_mp4(output)
    assert frames.shape == (17, 64, 96, 3) and meta["fps"] == 16
    expected = predictor.rife.interpolate(with_lora, 2)
    np.testing.assert_array_equal(expected[::2], with_lora)
    assert_same_video(frames, to_uint8(expected))
    assert np.abs(frames[::2] - to_uint8(with_lora).astype(float)).mean() < np.abs(frames[::2] - to_uint8(plain)).mean()


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


# --- crafted files: a LoRA can change nothing but its own adapter ----------------------------------------------------


def rewrite(path: Path, dest: Path, *, factor: float = 1.0, **settings: Any) -> bytes:
    """``path``'s LoRA with its tensors times ``factor`` and its adapter metadata's ``settings`` changed."""
    with safe_open(path, "pt") as file:
        tensors = {key: file.get_tensor(key) * factor for key in file.keys()}  # noqa: SIM118
        header = file.metadata() or {}
    metadata = json.loads(header.get("lora_adapter_metadata", "{}"))
    metadata.update({f"transformer.{key}": value for key, value in settings.items()})
    save_file(tensors, dest, metadata={**header, "lora_adapter_metadata": json.dumps(metadata)})
    return dest.read_bytes()


def module_tree(predictor: Any) -> list[tuple[str, int]]:
    return [(name, id(module)) for name, module in predictor.pipe.transformer.named_modules()]


CRAFTED = [
    ("tokens", {"trainable_token_indices": [1, 2]}, 1.0, "sets `trainable_token_indices` to [1, 2]"),
    ("dora", {"use_dora": True}, 1.0, "sets `use_dora` to true (DoRA adapters are not supported)"),
    ("unknown", {"magic": 1}, 1.0, "sets `magic`, which this server's peft does not know"),
    ("alpha", {"lora_alpha": 1e30}, 1.0, "has a rank or alpha of 1e+30"),
    ("huge", {}, 1e30, "layer's own weights"),
    ("large", {}, 1e3, "layer's own weights"),
    ("base", {"base_model_name_or_path": "THUDM/CogVideoX1.5-5B-I2V"}, 1.0, "this LoRA is for THUDM/CogVideoX1.5"),
]


@pytest.mark.parametrize(("name", "settings", "factor", "message"), CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_metadata_and_magnitudes_are_refused_before_loading(
    predictor: Any,
    loras: dict[str, Any],
    files: Files,
    tmp_path: Path,
    name: str,
    settings: dict,
    factor: float,
    message: str,
) -> None:
    before, tree = generate(predictor), module_tree(predictor)
    url = files.add(
        f"crafted-{name}.safetensors", rewrite(loras["full"][1], tmp_path / "x.safetensors", factor=factor, **settings)
    )
    with pytest.raises(InputError) as error:
        generate(predictor, url)
    assert str(error.value).startswith("Invalid input `lora_url`: ") and message in str(error.value), error.value
    assert module_tree(predictor) == tree
    assert not list((lora.cache_dir() / "loras").glob("*.safetensors")) or all(
        url not in source for source in predictor.loras.loaded.values()
    )
    np.testing.assert_array_equal(generate(predictor), before)


def test_a_load_that_fails_inside_diffusers_leaves_the_transformer_as_it_was(
    predictor: Any, reference: Any, loras: dict[str, Any], files: Files, tmp_path: Path
) -> None:
    """Metadata whose rank disagrees with its tensors passes our checks and fails inside peft, half-way: the
    adapter's layers are undone, the earlier LoRA still gives exactly diffusers' output, the file is deleted."""
    url, path = loras["full"]
    first = generate(predictor, url)
    tree = module_tree(predictor)
    bad = files.add("rank-mismatch.safetensors", rewrite(path, tmp_path / "x.safetensors", r=8))
    with pytest.raises(InputError, match="the LoRA could not be loaded"):
        generate(predictor, bad)
    assert module_tree(predictor) == tree
    assert set(predictor.pipe.transformer.peft_config) == set(predictor.loras.loaded)
    assert [p for p in (lora.cache_dir() / "loras").iterdir() if "rank-mismatch" in p.name] == []
    cached = {p.name for p in (lora.cache_dir() / "loras").glob("*.safetensors")}
    assert f"lora_{hashlib.sha256(bad.encode()).hexdigest()[:16]}.safetensors" not in cached  # refused: deleted
    np.testing.assert_array_equal(generate(predictor, url), first)
    np.testing.assert_array_equal(generate(predictor, url), diffusers_frames(reference, predictor, path))


def test_dropout_in_the_metadata_changes_nothing_between_runs(
    predictor: Any, reference: Any, loras: dict[str, Any], files: Files, tmp_path: Path
) -> None:
    """peft makes dropout modules in training mode; the transformer is put back in eval mode: same seed, same video,
    equal to diffusers' own loading in eval mode."""
    path = tmp_path / "dropout.safetensors"
    url = files.add("dropout.safetensors", rewrite(loras["full"][1], path, lora_dropout=0.5))
    first, again = generate(predictor, url), generate(predictor, url)
    np.testing.assert_array_equal(first, again)
    assert not predictor.pipe.transformer.training
    np.testing.assert_array_equal(first, diffusers_frames(reference, predictor, path))


def test_a_cancel_in_the_middle_of_a_load_changes_nothing(
    weights_urls: dict[str, str], loras: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cog's cancel (a BaseException) raised just after peft loaded the weights, under (emulated) CPU offload: the
    adapter is gone, the hooks are back, the next prediction without a LoRA is the baseline, and the LoRA loads
    afterwards as if nothing had happened."""
    predictor = load_predictor("i2v", weights_urls["i2v"], tmp_path / "cache")
    pipe = predictor.pipe
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.enable_model_cpu_offload = functools.partial(pipe.enable_model_cpu_offload, device="cpu")  # as above
    before, tree = generate(predictor), module_tree(predictor)
    original = pipe.transformer.load_lora_adapter

    def cancelled(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        raise CancelationException()

    monkeypatch.setattr(pipe.transformer, "load_lora_adapter", cancelled)
    with pytest.raises(CancelationException):
        generate(predictor, loras["qkv"][0])
    monkeypatch.undo()
    assert module_tree(predictor) == tree and not getattr(pipe.transformer, "peft_config", {})
    assert pipe.transformer._hf_hook is not None  # still offloaded
    assert predictor.loras.loaded == {} and predictor.loras.active is None
    np.testing.assert_array_equal(generate(predictor), before)
    with_lora = generate(predictor, loras["qkv"][0])
    assert np.abs(with_lora - before).mean() > 1e-3
    np.testing.assert_array_equal(generate(predictor), before)


def test_nan_frames_fail_naming_the_lora_or_the_server(
    predictor: Any, loras: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A black video is never returned: NaN frames fail, naming lora_url and lora_scale when a LoRA was active."""
    handle = predictor.pipe.vae.decoder.conv_out.conv.register_forward_hook(
        lambda module, args, output: output * float("nan")
    )
    try:
        with pytest.raises(InputError) as error:
            generate(predictor, loras["full"][0], 2.5)
        assert str(error.value) == (
            f"Invalid inputs `lora_url` and `lora_scale`: with the LoRA {loras['full'][0]} at scale 2.5 the model "
            "produced NaN or infinite frames (a broken or over-scaled LoRA): try a lower lora_scale or another LoRA."
        )
        with pytest.raises(ServiceError, match="The model produced NaN or infinite frames"):
            generate(predictor)
    finally:
        handle.remove()


# --- the LoRA cache stays healthy ------------------------------------------------------------------------------------


def test_cache_makes_room_before_a_download_and_keeps_one_lock(
    predictor: Any, loras: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "loras"
    size = loras["full"][1].stat().st_size
    generate(predictor, loras["full"][0])
    generate(predictor, loras["qkv"][0])
    (folder / ".lora_0123.safetensors.tmp-999-dead").mkdir()  # left by a killed process, another URL
    free = {"bytes": lora.DISK_RESERVE_BYTES + size + size // 2}  # room for one more file, not two

    def usage(path: Any) -> Any:
        used = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        return shutil._ntuple_diskusage(10**12, used, free["bytes"] - used)  # type: ignore[attr-defined]

    monkeypatch.setattr(lora.shutil, "disk_usage", usage)
    free["bytes"] += 2 * size  # what the two cached files use
    generate(predictor, loras["other"][0])
    names = sorted(p.name for p in folder.iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) == 2  # the least recently used one made room
    assert [n for n in names if not n.endswith(".safetensors")] == [".lock"]  # one lock; the stale folder is gone
    free["bytes"] = lora.DISK_RESERVE_BYTES // 2  # nothing can make room: the server's problem, not the input's
    with pytest.raises(ServiceError, match="The server's disk has no room for a LoRA"):
        generate(predictor, loras["factory"][0])


def test_declared_length_is_enforced(predictor: Any, loras: dict[str, Any], files: Files) -> None:
    url = files.add("liar.safetensors", loras["full"][1].read_bytes())
    files.declared["/liar.safetensors"] = 100
    with pytest.raises(InputError) as error:
        generate(predictor, url)
    assert str(error.value) == (
        f"Invalid input `lora_url`: the server sent more than the 100 bytes it declared ({url})."
    )


def test_hub_lora_follows_its_repo_and_outlives_a_hub_outage(
    predictor: Any, loras: dict[str, Any], lora_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf://OWNER/NAME is resolved to a commit on each use: a new commit of the repo is fetched again."""
    first = generate(predictor, "hf://someone/boat-lora")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "pytorch_lora_weights.safetensors").write_bytes(loras["other"][1].read_bytes())
    lora_hub.add_repo("someone/boat-lora", tmp_path / "new", card_data={"base_model": "THUDM/CogVideoX-5b-I2V"})
    second = generate(predictor, "hf://someone/boat-lora")
    np.testing.assert_array_equal(second, generate(predictor, loras["other"][0]))
    assert np.abs(first - second).mean() > 1e-3
    lora_hub.fail("/api/models/someone/boat-lora", status=403)  # the hub refuses now: the last commit resolved serves
    warnings: list[str] = []
    monkeypatch.setattr(lora.logger, "warning", lambda message, *args: warnings.append(message % args))
    np.testing.assert_array_equal(generate(predictor, "hf://someone/boat-lora"), second)
    assert len(warnings) == 1 and warnings[0].startswith("Using hf://someone/boat-lora@")


def test_server_a_crafted_lora_breaks_nothing_for_the_next_caller(
    cog_server: Any, loras: dict[str, Any], files: Files, tmp_path: Path
) -> None:
    """Through the Cog server: a LoRA with token-layer metadata (which once left a wrapper behind and broke every
    later LoRA) fails naming lora_url; the LoRA before it gives the same video after it; a LoRA with dropout gives the
    same video twice."""
    server = cog_server("i2v")
    image = tmp_path / "image.png"
    IMAGE.save(image)
    inputs = {"image": data_url(image), "prompt": PROMPT, "num_frames": 9, "num_inference_steps": 2, "seed": 5}

    def video(result: dict, name: str) -> np.ndarray:
        assert result["status"] == "succeeded", result
        return read_mp4(decode_data_url(result["output"], tmp_path / f"{name}.mp4"))[1]

    good = video(server.predict(**inputs, lora_url=loras["full"][0]), "good")
    tokens = files.add(
        "server-tokens.safetensors",
        rewrite(loras["other"][1], tmp_path / "t.safetensors", trainable_token_indices=[1, 2]),
    )
    failed = server.predict(**inputs, lora_url=tokens)
    assert failed["status"] == "failed"
    assert "Invalid input `lora_url`: its adapter metadata sets `trainable_token_indices`" in failed["error"]
    np.testing.assert_array_equal(video(server.predict(**inputs, lora_url=loras["full"][0]), "again"), good)
    dropout = files.add(
        "server-dropout.safetensors", rewrite(loras["other"][1], tmp_path / "d.safetensors", lora_dropout=0.3)
    )
    first = video(server.predict(**inputs, lora_url=dropout), "d1")
    np.testing.assert_array_equal(video(server.predict(**inputs, lora_url=dropout), "d2"), first)


def test_a_plain_base_model_header_counts_beside_adapter_metadata(
    predictor: Any, loras: dict[str, Any], files: Files, tmp_path: Path
) -> None:
    """A file with diffusers' adapter metadata (whose base_model_name_or_path peft leaves None) and a plain
    base_model header entry, as some trainers write both: the header entry is read."""
    path = tmp_path / "x.safetensors"
    rewrite(loras["full"][1], path)
    with safe_open(path, "pt") as file:
        tensors, header = {key: file.get_tensor(key) for key in file.keys()}, file.metadata()  # noqa: SIM118
    save_file(tensors, path, metadata={**header, "base_model": "THUDM/CogVideoX1.5-5B-I2V"})
    with pytest.raises(InputError, match="this LoRA is for THUDM/CogVideoX1.5-5B-I2V \\(its metadata says so\\)"):
        generate(predictor, files.add("header-base.safetensors", path.read_bytes()))
