"""Image-to-video: the real setup() and run() on tiny CogVideoX weights, in process and through the Cog server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image

from conftest import assert_same_video, decode_data_url, load_predictor, read_mp4
from errors import InputError
from harness import data_url
from media import to_uint8

PROMPT = "a red boat sails across a calm lake"


def photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * height)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.array([1.0, 0.5, 0.2])
    noise = rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "input.png"
    photo(300, 200).save(path)
    return path


def direct_pipeline_frames(predictor: Any, image: Image.Image, seed: int, **kwargs: Any) -> np.ndarray:
    """What diffusers itself produces from the same components: a fresh pipeline object, same settings."""
    pipe = CogVideoXImageToVideoPipeline(**predictor.pipe.components)
    pipe.scheduler = predictor.schedulers[kwargs.pop("scheduler")]
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        image=image,
        height=predictor.height,
        width=predictor.width,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=226,
        output_type="np",
        **kwargs,
    ).frames[0]
    return frames


@pytest.mark.parametrize("scheduler", ["cogvideox_dpm", "cogvideox_ddim"])
def test_output_equals_the_pipeline_called_directly(i2v: Any, image_file: Path, scheduler: str) -> None:
    settings = dict(
        prompt=PROMPT,
        negative_prompt="blurry",
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=6.0,
        use_dynamic_cfg=True,
    )
    output = i2v.run(
        image=image_file, seed=42, scheduler=scheduler, sizing_strategy="stretch", fps=8, interpolation=1, **settings
    )

    # The predictor's stretch resizes with LANCZOS: the same input, so frames equal to the last bit.
    image = Image.open(image_file).convert("RGB").resize((96, 64), Image.Resampling.LANCZOS)
    expected = direct_pipeline_frames(i2v, image, 42, scheduler=scheduler, **settings)
    generated = i2v.generate(image=image, width=96, height=64, scheduler=scheduler, seed=42, **settings)
    np.testing.assert_array_equal(generated, expected)
    meta, frames = read_mp4(output)
    assert frames.shape == expected.shape == (9, 64, 96, 3)
    assert_same_video(frames, to_uint8(expected))


def test_same_seed_same_video_other_seed_other_video(i2v: Any, image_file: Path) -> None:
    args = dict(
        image=Image.open(image_file).convert("RGB").resize((96, 64)),
        prompt=PROMPT,
        negative_prompt="",
        width=96,
        height=64,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=6.0,
        use_dynamic_cfg=False,
        scheduler="cogvideox_dpm",
    )
    first, again, other = i2v.generate(seed=1, **args), i2v.generate(seed=1, **args), i2v.generate(seed=2, **args)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1 / 255


@pytest.mark.parametrize(("num_frames", "interpolation"), [(9, 1), (49, 1), (17, 2), (9, 4)])
def test_frame_count_fps_and_size(i2v: Any, image_file: Path, num_frames: int, interpolation: int) -> None:
    """N frames become (N - 1) x k + 1 at fps x k: the clip keeps its duration."""
    output = i2v.run(
        image=image_file, num_frames=num_frames, num_inference_steps=1, fps=12, interpolation=interpolation, seed=0
    )
    meta, frames = read_mp4(output)
    assert frames.shape == ((num_frames - 1) * interpolation + 1, 64, 96, 3)
    assert meta["fps"] == 12 * interpolation and meta["codec"] == "h264"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"num_frames": 48}, "Invalid input `num_frames`: must be one of 9, 17, 25, 33, 41, 49 (got 48)."),
        ({"num_inference_steps": 0}, "Invalid input `num_inference_steps`: must be >= 1 and <= 100 (got 0)."),
        ({"guidance_scale": 0.5}, "Invalid input `guidance_scale`: must be >= 1.0 and <= 20.0 (got 0.5)."),
        ({"scheduler": "euler"}, "Invalid input `scheduler`: must be one of cogvideox_dpm, cogvideox_ddim"),
        ({"fps": 0}, "Invalid input `fps`: must be >= 1 and <= 60 (got 0)."),
        ({"interpolation": 3}, "Invalid input `interpolation`: must be one of 1, 2, 4 (got 3)."),
        ({"fps": 31}, "Invalid inputs `fps` and `interpolation`: 31 fps x 2 is 62 fps, over 60: lower fps or "),
    ],
)
def test_out_of_range_inputs_are_rejected(i2v: Any, image_file: Path, inputs: dict, message: str) -> None:
    with pytest.raises(InputError) as error:
        i2v.run(image=image_file, **inputs)
    assert str(error.value).startswith(message)


def test_real_resolution_720x480(weights_urls: dict[str, str], tmp_path: Path, image_file: Path) -> None:
    """At the real model's sample size (60x90 latents) the output is 720x480 (frame counts: the test above)."""
    predictor = load_predictor("i2v", weights_urls["i2v-480p"], tmp_path / "cache")
    assert (predictor.width, predictor.height) == (720, 480)
    output = predictor.run(image=image_file, num_frames=9, num_inference_steps=1, fps=8, interpolation=1, seed=3)
    meta, frames = read_mp4(output)
    assert frames.shape == (9, 480, 720, 3)
    assert meta["fps"] == 8 and meta["size"] == (720, 480)


# --- through the real Cog server ------------------------------------------------------------------------------------


def test_server_predicts_fails_cleanly_and_recovers(cog_server: Any, image_file: Path, tmp_path: Path) -> None:
    server = cog_server("i2v")
    assert server.status() == "READY"
    inputs = {"image": data_url(image_file), "prompt": PROMPT, "num_frames": 9, "num_inference_steps": 2, "seed": 7}

    ok = server.predict(**inputs)
    assert ok["status"] == "succeeded", ok
    meta, frames = read_mp4(decode_data_url(ok["output"], tmp_path / "a.mp4"))
    # The default interpolation (2): 9 generated frames at 8 fps become 17 at 16 fps.
    assert frames.shape == (17, 64, 96, 3) and meta["fps"] == 16 and meta["codec"] == "h264"
    assert "Using seed: 7" in ok["logs"] and "Denoising step 2/2" in ok["logs"]
    assert "Interpolation x2: 8 new frames" in ok["logs"]
    timing = ok["metrics"]["timing"]
    assert timing["inference"] > 0 and timing["interpolation"] > 0 and timing["encode"] > 0
    assert {"download_s", "rife_download_s", "rife_load_s"} <= set(ok["metrics"]["setup"])

    bad = server.predict(**{**inputs, "num_frames": 50})
    assert bad["status"] == "failed"
    assert bad["error"].endswith("Invalid input `num_frames`: must be one of 9, 17, 25, 33, 41, 49 (got 50).")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bad = server.predict(**{**inputs, "image": data_url(text)})
    assert bad["status"] == "failed" and "Invalid input `image`: not a readable image" in bad["error"]
    server.wait_ready(10)

    again = server.predict(**inputs)
    assert again["status"] == "succeeded"
    _, frames_again = read_mp4(decode_data_url(again["output"], tmp_path / "b.mp4"))
    np.testing.assert_array_equal(frames_again, frames)  # same seed, same video, after the failures
