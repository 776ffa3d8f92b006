"""CogVideoX1.5-5B-I2V: sizes from the image's aspect ratio (portrait too), 16N+1 frames, the real setup() and run()
on a tiny 1.5 model, in process and through the Cog server.

Full-size frames are what the real model makes and what these tests decode; on 2 CPU cores the tiny VAE takes
~25 s per 17 frames at 1360x768, so frame counts past 17 are checked at a small size through generate() (the frame
logic does not depend on the size) and the sizes at 17 frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image

import predict_i2v15
import tiny_weights
from conftest import assert_same_video, decode_data_url, load_predictor, read_mp4
from errors import InputError
from fake_hub import FakeHub
from harness import data_url
from media import to_uint8
from predict_i2v15 import output_size

PROMPT = "a red boat sails across a calm lake"


def photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * height)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.array([1.0, 0.5, 0.2])
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def i2v15(weights_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_predictor("i2v15", weights_urls["i2v15"], tmp_path_factory.mktemp("cache-i2v15"))


# --- sizes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "aspect_ratio", "expected"),
    [
        ((1920, 1080), "match_input", (1360, 768)),  # 16:9 photo: 1365 -> the 1360 limit
        ((1080, 1920), "match_input", (768, 1360)),  # phone portrait
        ((1000, 1000), "match_input", (768, 768)),
        ((1000, 800), "match_input", (960, 768)),  # 5:4
        ((800, 1200), "match_input", (768, 1152)),  # 2:3 portrait
        ((3000, 1000), "match_input", (1360, 768)),  # wider than the model: long side capped, the rest cropped
        ((1000, 1000), "16:9", (1360, 768)),
        ((1000, 1000), "9:16", (768, 1360)),
        ((1000, 1000), "4:3", (1024, 768)),
        ((1000, 1000), "2:3", (768, 1152)),
    ],
)
def test_output_size_follows_the_aspect_ratio(image: tuple, aspect_ratio: str, expected: tuple) -> None:
    width, height = output_size(Image.new("RGB", image), aspect_ratio, None, None)
    assert (width, height) == expected
    assert min(width, height) == 768 and max(width, height) <= 1360 and max(width, height) % 16 == 0


def test_every_aspect_ratio_gives_an_allowed_size() -> None:
    for aspect_ratio in predict_i2v15.ASPECT_RATIOS:
        width, height = output_size(Image.new("RGB", (640, 480)), aspect_ratio, None, None)
        assert min(width, height) == 768 and 768 <= max(width, height) <= 1360 and max(width, height) % 16 == 0


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (1024, None, "Invalid inputs `width` and `height`: give both, or neither (aspect_ratio then sets the size)."),
        (
            1000,
            768,
            "Invalid inputs `width` and `height`: 1000x768 is not a size the model supports: one side must "
            "be 768 and the other a multiple of 16 from 768 to 1360 (e.g. 1360x768, 768x1360, 1024x768, "
            "768x768).",
        ),
        (1024, 800, "Invalid inputs `width` and `height`: 1024x800 is not a size the model supports"),
    ],
)
def test_bad_sizes_are_refused_naming_what_is_allowed(width: int, height: int | None, message: str) -> None:
    with pytest.raises(InputError) as error:
        output_size(Image.new("RGB", (100, 100)), "match_input", width, height)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"num_frames": 81 + 8},
            "Invalid input `num_frames`: must be one of 17, 33, 49, 65, 81, 97, 113, 129, 145, 161 (got 89).",
        ),
        ({"num_frames": 177}, "Invalid input `num_frames`: must be one of 17, 33"),
        ({"width": 1400, "height": 768}, "Invalid input `width`: must be >= 768 and <= 1360 (got 1400)."),
        ({"width": 640, "height": 768}, "Invalid input `width`: must be >= 768 and <= 1360 (got 640)."),
        (
            {"aspect_ratio": "21:9"},
            "Invalid input `aspect_ratio`: must be one of match_input, 16:9, 9:16, 3:2, "
            "2:3, 4:3, 3:4, 1:1 (got '21:9').",
        ),
    ],
)
def test_bad_inputs_are_refused(i2v15: Any, tmp_path: Path, inputs: dict, message: str) -> None:
    photo(320, 200).save(tmp_path / "image.png")
    with pytest.raises(InputError) as error:
        i2v15.run(image=tmp_path / "image.png", **inputs)
    assert str(error.value).startswith(message)


# --- generation ---------------------------------------------------------------------------------------------------


def test_an_exact_size_frames_and_fps(i2v15: Any, tmp_path: Path) -> None:
    """width and height given, an odd aspect, through run() at full size. The sizes that aspect_ratio and
    match_input give are output_size's (unit tests above); run() at full portrait size: the tests below."""
    image, inputs, size = (700, 900), {"width": 768, "height": 1008}, (768, 1008)
    photo(*image).save(tmp_path / "image.png")
    output = i2v15.run(
        image=tmp_path / "image.png", num_frames=17, num_inference_steps=1, guidance_scale=1.0, seed=1, **inputs
    )
    meta, frames = read_mp4(output)
    assert frames.shape == (17, size[1], size[0], 3)
    assert meta["fps"] == 16 and meta["size"] == size and meta["codec"] == "h264"
    assert frames.std() > 0


@pytest.mark.parametrize("num_frames", [81, 161])
def test_frame_counts_of_5_and_10_seconds(i2v15: Any, num_frames: int) -> None:
    frames = i2v15.generate(
        image=photo(128, 80),
        prompt=PROMPT,
        negative_prompt="",
        width=128,
        height=80,
        num_frames=num_frames,
        num_inference_steps=1,
        guidance_scale=6.0,
        use_dynamic_cfg=True,
        scheduler="cogvideox_dpm",
        seed=0,
    )
    assert frames.shape == (num_frames, 80, 128, 3)


def direct_pipeline_frames(
    predictor: Any, image: Image.Image, *, width: int, height: int, pipe: Any = None, **settings: Any
) -> Any:
    """What diffusers generates from the predictor's components (its VAE tiling and widened rotary table), or from
    `pipe`, with the predictor's sampler."""
    pipe = pipe or CogVideoXImageToVideoPipeline(**predictor.pipe.components)
    pipe.scheduler = predictor.schedulers["cogvideox_ddim"]
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        image=image,
        width=width,
        height=height,
        max_sequence_length=224,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(5),
        **settings,
    ).frames[0]


SETTINGS = dict(
    prompt=PROMPT,
    negative_prompt="blurry",
    num_frames=17,
    num_inference_steps=2,
    guidance_scale=6.0,
    use_dynamic_cfg=True,
)


def test_output_equals_the_pipeline_called_directly(i2v15: Any, tmp_path: Path) -> None:
    """Bit for bit at a small size (the generation does not depend on it); and a portrait MP4 holds what diffusers
    generates at that size."""
    image = photo(256, 160)
    generated = i2v15.generate(image=image, width=256, height=160, scheduler="cogvideox_ddim", seed=5, **SETTINGS)
    np.testing.assert_array_equal(generated, direct_pipeline_frames(i2v15, image, width=256, height=160, **SETTINGS))

    photo(1080, 1920).save(tmp_path / "image.png")
    output = i2v15.run(image=tmp_path / "image.png", seed=5, scheduler="cogvideox_ddim", **SETTINGS)
    image = Image.open(tmp_path / "image.png").convert("RGB").resize((768, 1360), Image.Resampling.LANCZOS)
    expected = direct_pipeline_frames(i2v15, image, width=768, height=1360, **SETTINGS)
    meta, frames = read_mp4(output)
    assert frames.shape == expected.shape == (17, 1360, 768, 3)
    assert_same_video(frames, to_uint8(expected), min_correlation=0.75)  # the one-channel tiny VAE: mostly noise


def test_widened_rotary_table_leaves_landscape_unchanged(tiny_folders: dict[str, Path]) -> None:
    """The predictor widens diffusers' rotary table to the long side so portrait works: landscape, which worked
    before, gives the same latents as with the table as published."""
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(tiny_folders["i2v15"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def latents() -> torch.Tensor:
        return pipe(
            image=photo(1360, 128),
            prompt=PROMPT,
            width=1360,
            height=128,
            num_frames=17,
            num_inference_steps=1,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
            max_sequence_length=224,
        ).frames

    before = latents()
    with pytest.raises(RuntimeError):  # portrait with the table as published (THUDM/CogVideo#758)
        pipe(
            image=photo(128, 1360),
            prompt=PROMPT,
            width=128,
            height=1360,
            num_frames=17,
            num_inference_steps=1,
            output_type="latent",
            max_sequence_length=224,
        )
    pipe.transformer.register_to_config(sample_height=170, sample_width=170)
    assert torch.equal(latents(), before)


def generate_small(predictor: Any, image: Image.Image) -> Any:
    """SETTINGS at 256x160 without a negative prompt, seed 5."""
    return predictor.generate(
        image=image, width=256, height=160, scheduler="cogvideox_ddim", seed=5, **{**SETTINGS, "negative_prompt": ""}
    )


# --- LoRAs -------------------------------------------------------------------------------------------------------


def test_lora_for_1_5_applies_exactly_and_a_1_0_lora_is_refused(
    i2v15: Any, tiny_folders: dict[str, Path], hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same LoRA code as CogVideoX-5b-I2V: exact against diffusers' own loading. A LoRA whose model card names
    a CogVideoX 1.0 model is refused (the two generations' layers have the same shapes: only its card can tell)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    path = tiny_weights.build_lora(tiny_folders["i2v15"], tmp_path / "lora")
    hub.add_repo("someone/lora-1.5", path.parent, card_data={"base_model": "THUDM/CogVideoX1.5-5B-I2V"})
    hub.add_repo("someone/lora-1.0", path.parent, card_data={"base_model": "THUDM/CogVideoX-5b-I2V"})
    image = photo(256, 160)
    i2v15.loras.use("", 1.0)
    without = generate_small(i2v15, image)
    i2v15.loras.use("hf://someone/lora-1.5", 0.8)
    got = generate_small(i2v15, image)
    reference = CogVideoXImageToVideoPipeline.from_pretrained(tiny_folders["i2v15"], dtype=torch.float32)
    reference.vae.enable_tiling()  # as the predictor
    reference.transformer.register_to_config(sample_height=170, sample_width=170)
    reference.load_lora_weights(path.parent, weight_name=path.name, adapter_name="reference")
    reference.set_adapters(["reference"], [0.8])
    np.testing.assert_array_equal(
        got,
        direct_pipeline_frames(
            i2v15, image, width=256, height=160, pipe=reference, **{**SETTINGS, "negative_prompt": ""}
        ),
    )
    assert np.abs(got - without).mean() > 1e-3
    with pytest.raises(InputError) as error:
        i2v15.loras.use("hf://someone/lora-1.0", 1.0)
    assert str(error.value) == (
        "Invalid input `lora_url`: this LoRA is for THUDM/CogVideoX-5b-I2V (its model card says so), "
        "not CogVideoX1.5-5B-I2V."
    )
    i2v15.loras.use("", 1.0)
    np.testing.assert_array_equal(generate_small(i2v15, image), without)


# --- through the real Cog server ----------------------------------------------------------------------------------


def test_server_portrait_prediction_failure_and_cancel(cog_server: Any, webhooks: Any, tmp_path: Path) -> None:
    server = cog_server("i2v15")
    assert server.status() == "READY"
    photo(720, 1280).save(tmp_path / "image.png")
    inputs = {"image": data_url(tmp_path / "image.png"), "prompt": PROMPT, "num_frames": 17, "num_inference_steps": 1}
    result = server.predict(**inputs, seed=3)
    assert result["status"] == "succeeded", result
    meta, frames = read_mp4(decode_data_url(result["output"], tmp_path / "out.mp4"))
    assert frames.shape == (17, 1360, 768, 3) and meta["fps"] == 16
    assert "Using seed: 3" in result["logs"]
    bad = server.predict(**inputs, width=1000, height=768)
    assert bad["status"] == "failed" and bad["error"].endswith(
        "Invalid inputs `width` and `height`: 1000x768 is not a size the model supports: one side must be 768 and "
        "the other a multiple of 16 from 768 to 1360 (e.g. 1360x768, 768x1360, 1024x768, 768x768)."
    )
    server.wait_ready(10)

    server.predict_async("to-cancel-15", webhooks.url, **{**inputs, "num_inference_steps": 100})
    webhooks.wait_for("to-cancel-15", lambda s: "Denoising step 2/100" in (s.get("logs") or ""), 120)
    server.cancel("to-cancel-15")
    state = webhooks.wait_for("to-cancel-15", lambda s: s.get("status") in ("canceled", "failed", "succeeded"), 60)
    assert state["status"] == "canceled" and "Denoising step 100/100" not in state["logs"]
    server.wait_ready(30)
