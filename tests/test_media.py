"""Image and video decoding, sizing strategies and MP4 encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ffmpeg, gradient_frames, read_mp4, rotate_video, write_video
from errors import InputError
from media import fit_image, load_image, read_video, write_mp4


def save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


# --- images ---------------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = load_image(save(img, tmp_path / "rotated.jpg", exif=exif))
    assert loaded.size == (40, 60)


@pytest.mark.parametrize(
    ("img", "suffix", "expected"),
    [
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), ".png", (255, 255, 255)),  # transparent over white
        (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), ".png", (255, 0, 0)),
        (Image.new("LA", (8, 8), (0, 255)), ".png", (0, 0, 0)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), ".jpg", (255, 0, 0)),
        (Image.new("P", (8, 8), 0), ".gif", (0, 0, 0)),
        (Image.fromarray(np.full((8, 8), 65535, np.uint16)), ".png", (255, 255, 255)),  # 16-bit
        (Image.fromarray(np.full((8, 8), 32896, np.uint16)), ".png", (128, 128, 128)),
    ],
)
def test_any_mode_becomes_rgb(tmp_path: Path, img: Image.Image, suffix: str, expected: tuple) -> None:
    loaded = load_image(save(img, tmp_path / f"in{suffix}"))
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded)[4, 4].astype(int) - expected).max() <= 2


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "Invalid input `image`: the file is empty (0 bytes)."),
        (b"hello, I am text", "Invalid input `image`: not a readable image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "Invalid input `image`: not a readable image"),
    ],
)
def test_unreadable_images_fail_clearly(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_image(path)


def test_truncated_image_fails_clearly(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = save(Image.fromarray(noise), tmp_path / "full.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="Invalid input `image`: the image is truncated or corrupt"):
        load_image(path)


@pytest.mark.parametrize("size", [(20000, 20000), (9000, 6000)])
def test_huge_image_is_refused_before_decoding(tmp_path: Path, size: tuple[int, int]) -> None:
    path = save(Image.new("1", size), tmp_path / "huge.png")  # a "decompression bomb": tiny file, huge image
    with pytest.raises(InputError, match=r"Invalid input `image`: the image is too large \(.*at most 50 megapixels\)"):
        load_image(path)


# --- sizing ---------------------------------------------------------------------------------------------------------


def portrait() -> Image.Image:
    """480x720 portrait: white with a red band across the top and bottom sixth."""
    array = np.full((720, 480, 3), 255, np.uint8)
    array[:120] = array[-120:] = (255, 0, 0)
    return Image.fromarray(array)


def test_center_crop_fills_the_frame_without_squashing() -> None:
    out = np.asarray(fit_image(portrait(), 96, 64, "center_crop"))
    assert out.shape == (64, 96, 3)
    assert (out > 240).all()  # only the white middle survives: scaled to cover, never squashed


def test_pad_keeps_the_whole_image_with_black_bars() -> None:
    out = np.asarray(fit_image(portrait(), 96, 64, "pad"))
    assert out.shape == (64, 96, 3)
    assert out[:, :20].max() == 0 and out[:, -20:].max() == 0  # bars left and right
    middle = out[:, 48]
    assert middle[2].tolist()[1] < 30 and middle[32].min() > 240  # red band top, white centre: aspect kept


def test_stretch_distorts_to_fit() -> None:
    out = np.asarray(fit_image(portrait(), 96, 64, "stretch"))
    assert out.shape == (64, 96, 3)
    assert out[2, 2, 1] < 30 and out[32, 2].min() > 240  # bands squashed but all there, edge to edge


def test_image_of_the_right_size_is_untouched() -> None:
    img = Image.new("RGB", (96, 64), (1, 2, 3))
    assert fit_image(img, 96, 64, "pad") is img


# --- video ----------------------------------------------------------------------------------------------------------


def test_read_first_frames_at_the_input_fps(tmp_path: Path) -> None:
    path = write_video(tmp_path / "in.mp4", gradient_frames(30, 48, 64), fps=15)
    frames, fps = read_video(path, max_frames=10, sampling="first")
    assert len(frames) == 10 and frames[0].size == (64, 48)
    assert fps == pytest.approx(15)


def test_read_evenly_spaced_frames_keeps_the_duration(tmp_path: Path) -> None:
    path = write_video(tmp_path / "in.mp4", gradient_frames(40, 48, 64), fps=20)  # 2 s
    frames, fps = read_video(path, max_frames=8, sampling="even")
    assert len(frames) == 8
    assert fps == pytest.approx(4, rel=0.05)
    blues = [np.asarray(f)[24, 32, 2] for f in frames]
    assert len(set(blues)) == 8  # distinct source frames, spread over the clip


def test_rotation_metadata_is_honoured(tmp_path: Path) -> None:
    source = write_video(tmp_path / "in.mp4", gradient_frames(4, 48, 64), fps=10)
    rotated = rotate_video(source, tmp_path / "rotated.mp4")
    frames, _ = read_video(rotated, max_frames=4, sampling="first")
    assert frames[0].size == (48, 64)


def test_odd_sized_video_and_single_frame(tmp_path: Path) -> None:
    path = write_video(tmp_path / "odd.mkv", gradient_frames(1, 37, 53), fps=5, output_params=["-c:v", "ffv1"])
    frames, fps = read_video(path, max_frames=24, sampling="even")
    assert len(frames) == 1 and frames[0].size == (53, 37)


def test_variable_frame_rate_is_resampled(tmp_path: Path) -> None:
    source = write_video(tmp_path / "in.mp4", gradient_frames(20, 32, 32), fps=10)
    vfr = tmp_path / "vfr.mp4"
    # Frames 0-9 at 10 fps, then 10-19 at 2.5 fps: 1 s + 4 s.
    ffmpeg("-i", str(source), "-vf", "setpts='if(lt(N,10),N/10,1+(N-10)*0.4)/TB'", "-fps_mode", "vfr", str(vfr))
    frames, fps = read_video(vfr, max_frames=48, sampling="first")
    assert fps > 0
    assert len(frames) == pytest.approx(fps * 5, abs=3)  # constant rate over the whole 5 s


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "Invalid input `video`: the file is empty (0 bytes)."),
        (b"this is not a video at all", "Invalid input `video`: not a readable video, or it has no video stream."),
    ],
)
def test_unreadable_videos_fail_clearly(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        read_video(path, 8, "first")
    assert str(error.value) == message


def test_audio_only_file_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "audio.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(path))
    with pytest.raises(InputError, match="no video stream"):
        read_video(path, 8, "first")


# --- encoding -------------------------------------------------------------------------------------------------------


def test_write_mp4_is_browser_playable_h264(tmp_path: Path) -> None:
    frames = gradient_frames(9, 64, 96)
    path = write_mp4(frames, 8, tmp_path / "out.mp4")
    meta, decoded = read_mp4(path)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 8 and meta["size"] == (96, 64)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: plays before it has fully downloaded
