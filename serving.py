"""What both predictors share: input validation, seeds, pipeline loading and placement, progress and metrics."""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from cog import Path, current_scope
from cog.input import FieldInfo
from cog.types import URLPath

from weights import cache_dir, download_weights

logger = logging.getLogger("predict")


class InputError(ValueError):
    """A bad input: the message names the input and what is allowed, and is shown to the user as is."""


def configure_logging() -> None:
    """Send our INFO logs to stdout, which Cog shows as the prediction's logs."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _check(name: str, value: Any, field: FieldInfo, hint: Any) -> Any:
    """Check one input against its type and its Input() constraints; return the value to use."""
    if isinstance(value, FieldInfo):  # not given: Cog without a schema passes the Input() object itself
        value = value.default
    optional = type(None) in typing.get_args(hint)
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise InputError(f"Missing input `{name}`: it is required.")
    if base is Path:
        if not isinstance(value, pathlib.Path):
            raise InputError(f"Invalid input `{name}`: expected a file or URL, got {value!r}.")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise InputError(f"Invalid input `{name}`: expected {base.__name__}, got {value!r}.")
    if field.choices is not None and value not in field.choices:
        allowed = ", ".join(str(c) for c in field.choices)
        raise InputError(f"Invalid input `{name}`: must be one of {allowed} (got {value!r}).")
    too_low = field.ge is not None and value < field.ge
    too_high = field.le is not None and value > field.le
    if too_low or too_high:
        bounds = [f">= {field.ge}"] * (field.ge is not None) + [f"<= {field.le}"] * (field.le is not None)
        raise InputError(f"Invalid input `{name}`: must be {' and '.join(bounds)} (got {value!r}).")
    if field.max_length is not None and len(value) > field.max_length:
        raise InputError(f"Invalid input `{name}`: at most {field.max_length} characters (got {len(value)}).")
    return value


def validate_inputs(run: Callable[..., Any]) -> Callable[..., Any]:
    """Check every input of `run` against its signature before running it.

    The Input() declarations are the single source of truth. Without an OpenAPI schema (a server started without
    `cog build`) Cog checks nothing and passes the Input() objects for inputs not given: every check and default
    happens here. With one, Cog rejects wrong types and out-of-range values itself (HTTP 422, its own wording)
    before this runs. Before the run it also deletes input downloads earlier predictions left behind.
    """
    params = list(inspect.signature(run).parameters.values())[1:]
    hints = typing.get_type_hints(run)

    @functools.wraps(run)
    def wrapper(self: Any, **kwargs: Any) -> Any:
        unknown = sorted(set(kwargs) - {p.name for p in params})
        if unknown:
            allowed = ", ".join(p.name for p in params)
            raise InputError(f"Unknown input `{unknown[0]}`: allowed inputs are {allowed}.")
        values = {p.name: _check(p.name, kwargs.get(p.name, p.default), p.default, hints[p.name]) for p in params}
        _remove_stale_inputs(keep=values.values())
        return run(self, **values)

    return wrapper


def resolve_seed(seed: int | None) -> int:
    """The seed to use: the given one, or a random one. Logged either way so a result can be reproduced."""
    if seed is None:
        seed = random.SystemRandom().randint(0, 2**32 - 1)
    logger.info("Using seed: %d", seed)
    return seed


def load_pipeline(pipeline_cls: Any, url: str, name: str, cuda_dtype: torch.dtype, resident_gib: float) -> tuple:
    """Fetch the weights into the cache if needed, load them offline, place the pipeline and speed up its denoiser.

    On CUDA in `cuda_dtype`; on the CPU (tests) in float32, where half precision is slow or unsupported.
    TORCH_COMPILE=1 also compiles the denoiser's blocks (see speed_up). Returns the pipeline and setup's timings.
    """
    configure_logging()
    start = time.perf_counter()
    timings = download_weights(url, cache_dir() / name)
    device, dtype = ("cuda", cuda_dtype) if torch.cuda.is_available() else ("cpu", torch.float32)
    pipe = pipeline_cls.from_pretrained(cache_dir() / name, dtype=dtype, local_files_only=True)  # never the hub
    place_pipeline(pipe, device, resident_gib)
    speed_up(denoiser(pipe), compile_blocks=os.environ.get("TORCH_COMPILE") == "1")
    pipe.set_progress_bar_config(disable=True)
    timings["load_s"] = time.perf_counter() - start - timings["download_s"]
    logger.info("Weights ready in %.1f s, pipeline loaded in %.1f s", timings["download_s"], timings["load_s"])
    return pipe, timings


def place_pipeline(pipe: Any, device: str, resident_gib: float) -> str:
    """Keep the whole pipeline on the GPU when `resident_gib` of memory is free; else offload to the CPU.

    Returns the placement chosen ("cpu", "resident" or "offload"), which is also logged.
    """
    if device == "cpu":
        placement = "cpu"
        pipe.to("cpu")
    else:
        free_gib = torch.cuda.mem_get_info()[0] / 2**30
        if free_gib >= resident_gib:
            placement = "resident"
            pipe.to("cuda")
        else:
            placement = "offload"
            pipe.enable_model_cpu_offload()
            pipe.vae.enable_tiling()
            pipe.vae.enable_slicing()
        logger.info("GPU memory free: %.1f GiB (resident needs %.0f GiB)", free_gib, resident_gib)
    logger.info("Pipeline placement: %s", placement)
    return placement


def record_metric(key: str, value: float) -> None:
    current_scope().record_metric(key, value)


def record_setup_metrics(timings: dict[str, float]) -> None:
    """Report setup's timings with each prediction (setup itself runs outside any prediction)."""
    for key, value in timings.items():
        record_metric(f"setup.{key}", value)


_OUTPUT_DIR = Path(tempfile.mkdtemp(prefix="predict-output-"))
_INPUT_DIR = Path(tempfile.mkdtemp(prefix="predict-inputs-"))


def _download_input(self: URLPath) -> pathlib.Path:
    """Cog's URLPath.convert (cog 0.23.1) downloading into _INPUT_DIR, and removing the file if the download fails.

    Cog's own leaves its temp file behind when a download fails (a 404 leaves an empty file) and when the prediction
    is cancelled during the download (the file is complete but Cog no longer deletes it). The first is handled here,
    the second by _remove_stale_inputs() at the next prediction.
    """
    if self._path is None:
        with tempfile.NamedTemporaryFile(suffix=self.filename, dir=_INPUT_DIR, delete=False) as dest:
            try:
                shutil.copyfileobj(self.fileobj, dest)
            except BaseException:
                pathlib.Path(dest.name).unlink()
                raise
        self._path = Path(dest.name)
    return self._path


URLPath.convert = _download_input


def _remove_stale_inputs(keep: Iterable[Any]) -> None:
    """Delete the downloads earlier predictions left behind: all in _INPUT_DIR but this prediction's own inputs.

    Safe because a sync run() serves one prediction at a time.
    """
    for path in _INPUT_DIR.iterdir():
        if path not in keep:
            path.unlink(missing_ok=True)


def output_path(name: str = "output.mp4") -> Path:
    """The output file: one per process, overwritten by each prediction, so outputs never pile up on disk."""
    path = _OUTPUT_DIR / name
    path.unlink(missing_ok=True)
    return path


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a phase of a prediction as the metric `timing.<name>`; turn out-of-memory into a clear error."""
    start = time.perf_counter()
    try:
        yield
    except torch.OutOfMemoryError as error:
        # The traceback keeps the failed step's frames, and so its tensors, alive (even outside this block: the
        # caller's `with` is still handling the error): clear their locals so the memory can be given back.
        traceback.clear_frames(error.__traceback__)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise RuntimeError(
            f"Out of GPU memory during {name}: try fewer frames, a smaller size or fewer inference steps."
        ) from None
    seconds = time.perf_counter() - start
    record_metric(f"timing.{name}", seconds)
    logger.info("%s took %.2f s", name.capitalize(), seconds)


class StepLogger:
    """Logs each denoising step with its speed; hooks into both diffusers callback styles."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.start = time.perf_counter()

    def on_step(self, step: int, *_: Any) -> None:
        """The legacy `callback(step, timestep, latents)`."""
        seconds = (time.perf_counter() - self.start) / (step + 1)
        logger.info("Denoising step %d/%d (%.2f s/step)", step + 1, self.total_steps, seconds)

    def on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """`callback_on_step_end(pipe, step, timestep, callback_kwargs)`."""
        self.on_step(step)
        return callback_kwargs


def denoiser(pipe: Any) -> torch.nn.Module:
    """The model the denoising loop calls: CogVideoX's transformer or zeroscope's UNet3D."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def speed_up(model: Any, compile_blocks: bool = False) -> None:
    """Speed up the denoiser (CogVideoX transformer or UNet3D) in place, after placement. Lossless.

    Fuses each attention's Q/K/V (or K/V) projections into one matmul: on tiny weights in float32 the pipeline's
    latents are unchanged (CogVideoX) or within 1e-5 (UNet3D). With `compile_blocks` and CUDA, also compiles each
    repeated block with torch.compile (diffusers' compile_repeated_blocks rejects both models); off by default:
    it costs compile time at setup and at each new input shape, and no GPU measurement shows it paying off yet.
    """
    model.fuse_qkv_projections()
    compiled = compile_blocks and torch.cuda.is_available()
    if compiled:
        blocks = getattr(model, "transformer_blocks", None) or [*model.down_blocks, model.mid_block, *model.up_blocks]
        for block in blocks:
            block.compile()
    logger.info("Speed-ups: fused QKV projections%s", ", compiled blocks" if compiled else "")
