"""A corpus of what real traffic sends, generated at test time: odd and broken images and videos, and values at and
past every bound. Each case says what must happen: a video of a given length and frame rate, or a failure whose
message contains a given sentence (naming the input). Used by tests/test_reliability.py and benchmarks/soak.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conftest import ffmpeg, gradient_frames, rotate_video, write_video

# The valid request every case starts from (tiny models: i2v makes 64x96 frames).
# interpolation 1 (the model's default is 2): the corpus's frame counts and fps bounds are those of the generation.
I2V_BASE = {"prompt": "a boat", "num_frames": 9, "num_inference_steps": 1, "fps": 8, "interpolation": 1, "seed": 1}
V2V_BASE = {
    "prompt": "a boat",
    "width": 64,
    "height": 64,
    "max_frames": 4,
    "num_inference_steps": 2,
    "strength": 0.5,
    "seed": 5,
}
# CogVideoX-5b: video-to-video unless the case drops the video (tiny model: 64x96 frames, like i2v).
T2V_BASE = {
    "prompt": "a boat",
    "num_frames": 9,
    "num_inference_steps": 2,
    "strength": 0.5,
    "fps": 8,
    "interpolation": 1,
    "seed": 5,
}
I2V_SIZE = (64, 96)  # height, width


@dataclass
class Case:
    name: str
    inputs: dict[str, Any]  # on top of the base request; a file is given as its name in the corpus folder
    frames: int | None = None  # success: this many frames...
    fps: float | None = None  # ...at this frame rate
    size: tuple[int, int] | None = None  # ...of this height x width (default: the model's)
    error: str | None = None  # failure: the error ends with, or contains, this
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def _photo(width: int = 120, height: int = 80) -> Image.Image:
    return Image.fromarray(gradient_frames(1, height, width)[0])


def make_images(folder: Path) -> None:
    """Write the image corpus into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    png = _png(_photo())
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    _photo().save(folder / "photo.jpg", quality=90)
    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "drawing.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><circle cx="50" cy="50" r="40"/></svg>'
    )
    Image.new("1", (20000, 20000)).save(folder / "bomb.png", optimize=True)  # 400 MP, ~60 kB on disk
    Image.new("RGB", (1, 1), (200, 40, 40)).save(folder / "one_pixel.png")
    _photo().convert("CMYK").save(folder / "cmyk.jpg")
    gray16 = (np.linspace(0, 65535, 120)[None, :] * np.ones((80, 1))).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")  # mode I;16
    frames = [_photo().rotate(10 * i) for i in range(4)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _photo().save(folder / "exif_rotated.jpg", exif=exif)
    rgba = _photo().convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "transparent.png")
    _photo(97, 31).save(folder / "odd_wide.png")


def make_videos(folder: Path) -> None:
    """Write the video corpus into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.mp4").write_bytes(b"")
    clip = write_video(folder / "clip.mp4", gradient_frames(12, 72, 128), fps=12)  # moov atom at the end
    data = clip.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(folder / "audio_only.mp4"))
    write_video(folder / "one_frame.mp4", gradient_frames(1, 72, 128), fps=24)
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=4000x4000:rate=2:duration=1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        str(folder / "huge_4000.mp4"),
    )
    for name, seconds in (("ten_minutes.mp4", 600), ("eleven_minutes.mp4", 660)):
        ffmpeg(
            "-f",
            "lavfi",
            "-i",
            f"testsrc=size=16x16:rate=1:duration={seconds}",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            str(folder / name),
        )
    # Variable frame rate: frames at irregular times (0, 0.05, 0.3, 0.35, 0.9, ...).
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=128x72:rate=20:duration=1",
        "-vf",
        "select='not(mod(n\\,3))+eq(n\\,1)',setpts=N/(20*TB)+if(gt(N\\,2)\\,0.2/TB\\,0)",
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(folder / "vfr.mp4"),
    )
    rotate_video(clip, folder / "rotated.mp4", 90)
    write_video(folder / "odd_size.mp4", gradient_frames(5, 51, 77), fps=10, output_params=["-pix_fmt", "yuv444p"])
    _photo(128, 72).save(folder / "still.png")
    (folder / "text.mp4").write_text("this is not a video\n")


def i2v_cases() -> list[Case]:
    ok = {"frames": 9, "fps": 8}
    bad = "Invalid input `image`: "
    cases = [
        Case("empty file", {"image": "empty.png"}, error=bad + "the file is empty (0 bytes)."),
        Case("truncated PNG", {"image": "truncated.png"}, error=bad + "the image is truncated or corrupt"),
        Case("truncated JPEG", {"image": "truncated.jpg"}, error=bad + "the image is truncated or corrupt"),
        Case("text named .png", {"image": "text.png"}, error=bad + "not a readable image"),
        Case("SVG", {"image": "drawing.svg"}, error=bad + "not a readable image"),
        Case("20000x20000 PNG bomb", {"image": "bomb.png"}, error=bad + "the image is too large"),
        Case("1x1", {"image": "one_pixel.png"}, **ok),
        Case("CMYK JPEG", {"image": "cmyk.jpg"}, **ok),
        Case("16-bit PNG", {"image": "gray16.png"}, **ok),
        Case("animated GIF", {"image": "animated.gif"}, **ok),
        Case("animated WebP", {"image": "animated.webp"}, **ok),
        Case("EXIF-rotated JPEG", {"image": "exif_rotated.jpg"}, **ok),
        Case("transparent PNG", {"image": "transparent.png"}, **ok),
        Case("odd-sized PNG, pad", {"image": "odd_wide.png", "sizing_strategy": "pad"}, **ok),
        Case("a video as image", {"image": "clip.mp4"}, error=bad + "not a readable image"),
        Case("image missing", {"image": None}, error="Missing input `image`: it is required."),
        Case("image a number", {"image": 5}, error=bad + "expected a file or URL, got 5."),
        Case("image a bare word", {"image": "hello"}, error=bad + "expected a file or URL, got 'hello'."),
        Case("image a server path", {"image": "/etc/passwd"}, error=bad + "expected a file or URL, got '/etc/passwd'."),
    ]
    cases += bounds_cases(
        [
            ("num_frames", [9, 49], [8, 50, 0, -9], "must be one of 9, 17, 25, 33, 41, 49"),
            ("num_inference_steps", [1, 100], [0, 101, -1], "must be >= 1 and <= 100"),
            ("guidance_scale", [1.0, 20.0], [0.99, 20.01], "must be >= 1.0 and <= 20.0"),
            ("fps", [1, 60], [0, 61], "must be >= 1 and <= 60"),
            ("seed", [0, 2**32 - 1], [-1, 2**32, 2**64], "must be >= 0 and <= 4294967295"),
            ("scheduler", ["cogvideox_ddim"], ["euler", ""], "must be one of cogvideox_dpm, cogvideox_ddim"),
            ("sizing_strategy", ["stretch"], ["fit"], "must be one of center_crop, pad, stretch"),
            ("interpolation", [2, 4], [0, 3, 8], "must be one of 1, 2, 4"),
        ],
        ok,
        expected_frames={"num_frames": lambda v: v, "interpolation": lambda v: 8 * v + 1},
        expected_fps={"fps": lambda v: v, "interpolation": lambda v: 8 * v},
    )
    cases += type_cases(
        {
            "num_frames": "9",
            "num_inference_steps": 1.5,
            "guidance_scale": "6",
            "use_dynamic_cfg": "yes",
            "prompt": 5,
            "negative_prompt": ["a"],
            "seed": "1",
            "fps": True,
            "scheduler": 1,
        }
    )
    cases += [
        Case("steps as a whole float", {"num_inference_steps": 2.0}, **ok),
        Case("long prompt", {"prompt": "a boat on a lake " * 5000}, **ok),
        Case("odd characters in prompt", {"prompt": "bo\x00at \u202e \U0001f6a4", "negative_prompt": "\n"}, **ok),
        Case(
            "fps x interpolation over 60",
            {"fps": 16, "interpolation": 4},
            error="Invalid inputs `fps` and `interpolation`: 16 fps x 4 is 64 fps, over 60: lower fps or",
        ),
        Case("unknown input", {"num_frame": 9}, error="Unknown input `num_frame`: allowed inputs are image, prompt"),
    ]
    return cases


def v2v_cases() -> list[Case]:
    bad = "Invalid input `video`: "
    unreadable = bad + "not a readable video, or it has no video stream."
    cases = [
        Case("empty file", {"video": "empty.mp4"}, error=bad + "the file is empty (0 bytes)."),
        Case("truncated mp4", {"video": "truncated.mp4"}, error=unreadable),
        Case("audio only", {"video": "audio_only.mp4"}, error=unreadable),
        Case("text named .mp4", {"video": "text.mp4"}, error=unreadable),
        Case("one frame", {"video": "one_frame.mp4"}, frames=1, fps=24),
        Case("4000x4000", {"video": "huge_4000.mp4"}, frames=2, fps=2),
        Case("10 minutes, first", {"video": "ten_minutes.mp4"}, frames=4, fps=1),
        Case("10 minutes, even", {"video": "ten_minutes.mp4", "frame_sampling": "even"}, frames=4, fps=4 / 600),
        Case("11 minutes", {"video": "eleven_minutes.mp4"}, error=bad + "660 s is too long (at most 600 s)."),
        Case("variable frame rate", {"video": "vfr.mp4", "max_frames": 48}, frames=None, fps=None),
        Case("rotated", {"video": "rotated.mp4", "sizing_strategy": "pad"}, frames=4, fps=12),
        Case("odd size", {"video": "odd_size.mp4", "max_frames": 48}, frames=5, fps=10),
        Case("still image as video", {"video": "still.png"}, frames=1, fps=25),
        Case("animated GIF as video", {"video": "animated.gif", "max_frames": 48}, frames=4, fps=10),
        Case("video missing", {"video": None}, error="Missing input `video`: it is required."),
        Case("video a number", {"video": 3}, error=bad + "expected a file or URL, got 3."),
        Case("width not a multiple of 8", {"width": 68}, error="Invalid input `width`: must be a multiple of 8"),
        Case(
            "strength x steps < 1",
            {"strength": 0.01, "num_inference_steps": 50},
            error="Invalid inputs `strength` and `num_inference_steps`: strength x steps must be at least 1",
        ),
        Case(
            "the input's fps x interpolation over 60",
            {"video": "one_frame.mp4", "interpolation": 4},  # 24 fps
            error="Invalid inputs `fps` and `interpolation`: the input's 24 fps (fps is blank) x 4 is 96 fps, over 60",
        ),
        Case(
            "strength 0",
            {"strength": 0.0},
            error="Invalid inputs `strength` and `num_inference_steps`: strength x steps must be at least 1",
        ),
    ]  # fmt: skip - a table: one case a line reads better aligned
    cases += bounds_cases(
        [
            ("strength", [1.0], [-0.1, 1.01], "must be >= 0.0 and <= 1.0"),
            ("num_inference_steps", [100], [0, 101], "must be >= 1 and <= 100"),
            ("guidance_scale", [1.0, 30.0], [0.5, 31], "must be >= 1.0 and <= 30.0"),
            ("width", [64, 1280], [56, 1288], "must be >= 64 and <= 1280"),
            ("height", [64, 1280], [8, 2000], "must be >= 64 and <= 1280"),
            ("max_frames", [1, 48], [0, 49], "must be >= 1 and <= 48"),
            ("fps", [1, 60], [0, 61], "must be >= 1 and <= 60"),
            ("seed", [4294967295], [-5, 2**40], "must be >= 0 and <= 4294967295"),
            ("frame_sampling", ["even"], ["last"], "must be one of first, even"),
            ("interpolation", [2, 4], [3], "must be one of 1, 2, 4"),
        ],
        {"frames": 4, "fps": 12},
        expected_frames={"max_frames": lambda v: min(v, 12), "interpolation": lambda v: 3 * v + 1},
        expected_fps={"fps": lambda v: v, "frame_sampling": lambda v: 4, "interpolation": lambda v: 12 * v},
        expected_size={"width": lambda v: (64, v), "height": lambda v: (v, 64)},
        cheap={"num_inference_steps": {"strength": 0.01}, "width": {"max_frames": 1}, "height": {"max_frames": 1}},
    )
    cases += type_cases({"strength": "0.5", "width": 64.5, "max_frames": [4], "frame_sampling": 1, "fps": "8"})
    return cases


def t2v_cases() -> list[Case]:
    """The video corpus through CogVideoX-5b's video-to-video: the same files as zeroscope's, but a video must give
    at least 9 frames (8N+1) and the output plays at `fps`."""
    bad = "Invalid input `video`: "
    unreadable = bad + "not a readable video, or it has no video stream."
    ok = {"frames": 9, "fps": 8}
    cases = [
        Case("empty file", {"video": "empty.mp4"}, error=bad + "the file is empty (0 bytes)."),
        Case("truncated mp4", {"video": "truncated.mp4"}, error=unreadable),
        Case("audio only", {"video": "audio_only.mp4"}, error=unreadable),
        Case("text named .mp4", {"video": "text.mp4"}, error=unreadable),
        Case("one frame", {"video": "one_frame.mp4"}, error=bad + "1 frame read; video-to-video needs at least 9."),
        Case("4000x4000, 2 frames", {"video": "huge_4000.mp4"}, error=bad + "2 frames read; video-to-video needs"),
        Case("10 minutes, first", {"video": "ten_minutes.mp4"}, **ok),
        Case("10 minutes, even", {"video": "ten_minutes.mp4", "frame_sampling": "even"}, **ok),
        Case("11 minutes", {"video": "eleven_minutes.mp4"}, error=bad + "660 s is too long (at most 600 s)."),
        Case("variable frame rate, 8 frames", {"video": "vfr.mp4"}, error=bad + "8 frames read; video-to-video needs"),
        Case("rotated", {"video": "rotated.mp4", "sizing_strategy": "pad"}, **ok),
        Case("rotated, 12 frames", {"video": "rotated.mp4", "num_frames": 49}, **ok),  # the largest 8N+1: 9
        Case("odd size, 5 frames", {"video": "odd_size.mp4"}, error=bad + "5 frames read; video-to-video needs"),
        Case("still image as video", {"video": "still.png"}, error=bad + "1 frame read; video-to-video needs"),
        Case("animated GIF, 4 frames", {"video": "animated.gif"}, error=bad + "4 frames read; video-to-video needs"),
        Case("no video: text-to-video", {"video": None}, **ok),
        Case("no video, strength 0", {"video": None, "strength": 0.0}, **ok),  # strength plays no part
        Case("video a number", {"video": 3}, error=bad + "expected a file or URL, got 3."),
        Case(
            "strength x steps < 1",
            {"strength": 0.01, "num_inference_steps": 50},
            error="Invalid inputs `strength` and `num_inference_steps`: strength x steps must be at least 1",
        ),
    ]
    cases += bounds_cases(
        [
            ("strength", [1.0], [-0.1, 1.01], "must be >= 0.0 and <= 1.0"),
            ("num_frames", [17], [8, 50], "must be one of 9, 17, 25, 33, 41, 49"),
            ("frame_sampling", ["even"], ["last"], "must be one of first, even"),
        ],
        ok,
        expected_frames={"num_frames": lambda v: 9},  # the clip has 12 frames
    )
    cases += type_cases({"strength": "0.5", "frame_sampling": 1, "num_frames": "9"})
    return cases


def bounds_cases(
    bounds: list[tuple[str, list, list, str]],
    ok: dict,
    expected_frames: dict[str, Callable] | None = None,
    expected_fps: dict[str, Callable] | None = None,
    expected_size: dict[str, Callable] | None = None,
    cheap: dict[str, dict] | None = None,
) -> list[Case]:
    """Each allowed extreme must work (with the output it implies); each value past it fails naming the input."""
    cases = []
    for name, good, bad, message in bounds:
        for value in good:
            expected = dict(ok)
            if name in (expected_frames or {}):
                expected["frames"] = expected_frames[name](value)
            if name in (expected_fps or {}):
                expected["fps"] = expected_fps[name](value)
            if name in (expected_size or {}):
                expected["size"] = expected_size[name](value)
                expected["frames"] = 1
            cases.append(Case(f"{name}={value!r}", {name: value, **(cheap or {}).get(name, {})}, **expected))
        for value in bad:
            cases.append(Case(f"{name}={value!r}", {name: value}, error=f"Invalid input `{name}`: {message}"))
    return cases


def type_cases(values: dict[str, Any]) -> list[Case]:
    """A value of the wrong JSON type fails naming the input."""
    return [
        Case(f"{name} as {value!r}", {name: value}, error=f"Invalid input `{name}`: ") for name, value in values.items()
    ]
