"""Media in and out: image and video decoding with clear errors, sizing to the model's frame, H.264 encoding."""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import InputError
from reporting import logger

MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: larger files are refused before they are decoded
MAX_VIDEO_SECONDS = 600
MAX_VIDEO_SIDE = 8192
DECODE_MAX_SIDE = 2048  # videos are scaled down to this while decoding, before the model's own resize


def load_image(path: Path, name: str = "image") -> Image.Image:
    """Open an image as RGB, upright per its EXIF orientation; first frame of an animation."""
    if Path(path).stat().st_size == 0:
        raise InputError(f"Invalid input `{name}`: the file is empty (0 bytes).")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"Invalid input `{name}`: the image is too large ({img.width}x{img.height}; "
                    f"at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels)."
                )
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(
            f"Invalid input `{name}`: the image is too large (at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels)."
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"Invalid input `{name}`: not a readable image (PNG, JPEG, WebP, GIF, BMP, TIFF).") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"Invalid input `{name}`: the image is truncated or corrupt ({e}).") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: alpha composited on white, 16-bit and float scaled down, CMYK and palettes converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" else max(float(array.max()), 1.0)
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def fit_image(img: Image.Image, width: int, height: int, strategy: str) -> Image.Image:
    """Fit an image to width x height: center_crop (cover, then crop), pad (letterbox) or stretch."""
    if img.size == (width, height):
        return img
    if strategy == "center_crop":
        return ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS)
    if strategy == "pad":
        return ImageOps.pad(img, (width, height), Image.Resampling.LANCZOS, color=(0, 0, 0))
    return img.resize((width, height), Image.Resampling.LANCZOS)


def read_video(path: Path, max_frames: int, sampling: str, name: str = "video") -> tuple[list[Image.Image], float]:
    """Decode up to `max_frames` upright RGB frames and the frame rate they play at.

    sampling "first" keeps the first frames at the input's frame rate; "even" spreads them over the whole clip
    (the returned fps keeps the clip's duration). Any codec ffmpeg reads; rotation metadata is applied by ffmpeg;
    variable frame rate is resampled to a constant one.
    """
    if Path(path).stat().st_size == 0:
        raise InputError(f"Invalid input `{name}`: the file is empty (0 bytes).")
    meta = _probe_video(path, name)
    fps, duration = meta["fps"], meta["duration"]
    if duration > MAX_VIDEO_SECONDS:
        raise InputError(f"Invalid input `{name}`: {duration:.0f} s is too long (at most {MAX_VIDEO_SECONDS} s).")
    if max(meta["size"]) > MAX_VIDEO_SIDE:
        width, height = meta["size"]
        raise InputError(f"Invalid input `{name}`: {width}x{height} is too large (at most {MAX_VIDEO_SIDE} a side).")
    if fps <= 0:
        fps = 24.0
    if sampling == "even" and duration > 0:
        fps = min(fps, max_frames / duration)  # never faster than the input: that would repeat frames
    scale = f"scale='min({DECODE_MAX_SIDE},iw)':'min({DECODE_MAX_SIDE},ih)':force_original_aspect_ratio=decrease"
    frames = _decode(path, name, ["-vf", f"fps={fps:.6f},{scale}", "-frames:v", str(max_frames)])
    if not frames:
        raise InputError(f"Invalid input `{name}`: the video has no frames.")
    logger.info("Read %d frames at %.3f fps from a %.2f s %dx%d video", len(frames), fps, duration, *meta["size"])
    return frames, fps


def _probe_video(path: Path, name: str) -> dict:
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    except (OSError, IndexError, AttributeError, RuntimeError, StopIteration, ValueError):
        raise InputError(f"Invalid input `{name}`: not a readable video, or it has no video stream.") from None
    finally:
        reader.close()
    if not math.isfinite(meta.get("duration") or 0.0):
        meta["duration"] = 0.0
    return meta


def _decode(path: Path, name: str, output_params: list[str]) -> list[Image.Image]:
    reader = imageio_ffmpeg.read_frames(str(path), output_params=output_params)
    try:
        width, height = next(reader)["size"]
        return [Image.frombytes("RGB", (width, height), frame) for frame in reader]
    except (OSError, RuntimeError, IndexError, ValueError, StopIteration) as e:
        raise InputError(f"Invalid input `{name}`: the video is corrupt or truncated ({e}).") from None
    finally:
        reader.close()


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, rounded as diffusers' own export does not (it truncates)."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_mp4(frames: np.ndarray, fps: float, path: Path) -> Path:
    """Encode frames (F, H, W, 3), uint8 or float in [0, 1], as a browser-playable H.264 yuv420p MP4 with the moov
    atom first."""
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=2,
        output_params=["-crf", "17", "-preset", "medium", "-movflags", "+faststart"],
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def output_path(name: str = "output.mp4") -> Path:
    """The output file: one per process, overwritten by each prediction, so outputs never pile up on disk."""
    path = _output_dir() / name
    path.unlink(missing_ok=True)
    return path


@functools.cache
def _output_dir() -> Path:
    """This process's output folder, made at the first prediction's encode."""
    return Path(tempfile.mkdtemp(prefix="predict-output-"))
