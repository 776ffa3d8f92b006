"""Video-to-video: the real setup() and run() on tiny zeroscope weights, in process and through the Cog server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import VideoToVideoSDPipeline
from PIL import Image

from conftest import assert_same_video, decode_data_url, gradient_frames, read_mp4, rotate_video, write_video
from errors import InputError
from harness import data_url
from media import fit_image, read_video, to_uint8

PROMPT = "a sailing boat, highly detailed"
SMALL = {"width": 128, "height": 72, "num_inference_steps": 4, "strength": 0.5, "seed": 5}


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.mp4", gradient_frames(12, 90, 160), fps=12)


def test_output_equals_the_pipeline_called_directly(v2v: Any, clip: Path) -> None:
    output = v2v.run(video=clip, prompt=PROMPT, negative_prompt="blurry", max_frames=6, guidance_scale=9.0, **SMALL)

    frames, _ = read_video(clip, 6, "first")
    frames = [fit_image(f, 128, 72, "center_crop") for f in frames]
    pipe = VideoToVideoSDPipeline(**v2v.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=PROMPT,
        video=frames,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=9.0,
        negative_prompt="blurry",
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).frames[0]

    generated = v2v.generate(
        frames=frames,
        prompt=PROMPT,
        negative_prompt="blurry",
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=9.0,
        seed=5,
    )
    np.testing.assert_array_equal(generated, expected)
    meta, decoded = read_mp4(output)
    assert decoded.shape == (6, 72, 128, 3) and meta["fps"] == 12
    assert_same_video(decoded, to_uint8(expected))


def test_strength_zero_steps_rejected_clearly(v2v: Any, clip: Path) -> None:
    with pytest.raises(InputError) as error:
        v2v.run(video=clip, **{**SMALL, "strength": 0.1, "num_inference_steps": 5})
    assert str(error.value) == (
        "Invalid inputs `strength` and `num_inference_steps`: strength x steps must be at least 1 (got 0.1 x 5)."
    )


@pytest.mark.parametrize(("name", "value"), [("width", 130), ("height", 100)])
def test_size_must_be_a_multiple_of_8(v2v: Any, clip: Path, name: str, value: int) -> None:
    with pytest.raises(InputError) as error:
        v2v.run(video=clip, **{**SMALL, name: value})
    assert str(error.value) == f"Invalid input `{name}`: must be a multiple of 8 (got {value})."


@pytest.mark.parametrize(
    ("sampling", "fps", "expected_frames", "expected_fps"),
    [("first", None, 8, 12), ("even", None, 8, 8), ("first", 24, 8, 24)],  # even: 8 frames over the 1 s clip
)
def test_frame_sampling_and_fps(
    v2v: Any, clip: Path, sampling: str, fps: int | None, expected_frames: int, expected_fps: float
) -> None:
    output = v2v.run(video=clip, max_frames=8, frame_sampling=sampling, fps=fps, **SMALL)
    meta, frames = read_mp4(output)
    assert frames.shape == (expected_frames, 72, 128, 3)
    assert meta["fps"] == pytest.approx(expected_fps, rel=0.01)


def test_portrait_rotated_odd_sized_input(v2v: Any, tmp_path: Path) -> None:
    odd = write_video(tmp_path / "odd.mp4", gradient_frames(5, 51, 77), fps=10, output_params=["-pix_fmt", "yuv444p"])
    rotated = rotate_video(odd, tmp_path / "rotated.mp4")
    for strategy in ("center_crop", "pad", "stretch"):
        meta, frames = read_mp4(v2v.run(video=rotated, sizing_strategy=strategy, **SMALL))
        assert frames.shape == (5, 72, 128, 3) and meta["fps"] == 10


def test_single_frame_video(v2v: Any, tmp_path: Path) -> None:
    path = write_video(tmp_path / "one.mp4", gradient_frames(1, 72, 128), fps=24)
    _, frames = read_mp4(v2v.run(video=path, **SMALL))
    assert frames.shape == (1, 72, 128, 3)


def test_image_given_as_video(v2v: Any, tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    Image.fromarray(gradient_frames(1, 72, 128)[0]).save(path)
    _, frames = read_mp4(v2v.run(video=path, **SMALL))
    assert frames.shape == (1, 72, 128, 3)


# --- through the real Cog server ------------------------------------------------------------------------------------


def test_server_predicts_fails_cleanly_and_recovers(cog_server: Any, clip: Path, tmp_path: Path) -> None:
    server = cog_server("v2v")
    assert server.status() == "READY"
    inputs = {"video": data_url(clip), "prompt": PROMPT, "max_frames": 6, **SMALL}

    ok = server.predict(**inputs)
    assert ok["status"] == "succeeded", ok
    meta, frames = read_mp4(decode_data_url(ok["output"], tmp_path / "a.mp4"))
    assert frames.shape == (6, 72, 128, 3) and meta["fps"] == 12 and meta["codec"] == "h264"
    assert "Using seed: 5" in ok["logs"] and "Denoising step 2/2" in ok["logs"]
    assert {"decode", "inference", "encode"} <= set(ok["metrics"]["timing"])

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for bad_inputs, message in [
        ({"video": data_url(empty)}, "Invalid input `video`: the file is empty (0 bytes)."),
        ({"strength": 1.5}, "Invalid input `strength`: must be >= 0.0 and <= 1.0 (got 1.5)."),
        ({"frame_sampling": "random"}, "Invalid input `frame_sampling`: must be one of first, even (got 'random')."),
    ]:
        bad = server.predict(**{**inputs, **bad_inputs})
        assert bad["status"] == "failed" and bad["error"].endswith(message), bad
        server.wait_ready(10)

    again = server.predict(**inputs)
    _, frames_again = read_mp4(decode_data_url(again["output"], tmp_path / "b.mp4"))
    np.testing.assert_array_equal(frames_again, frames)
