"""Loading a model: its weights into the cache, a diffusers pipeline from them, placed on the GPU (memory.py decides
where) and sped up."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from errors import WeightsError
from memory import GpuMemory, denoiser
from reporting import configure_logging, logger
from weights import cache_dir, fetch_weights


@dataclass(frozen=True)
class Checkpoint:
    """One model's weights and how to serve them."""

    name: str  # the model's name, and its folder in the weights cache
    variable: str  # the environment variable that may point at another source (a tar URL or hf://OWNER/NAME)
    source: str  # the default source
    pipeline: Any  # the diffusers pipeline class
    cuda_dtype: torch.dtype


def load_pipeline(checkpoint: Checkpoint, memory: GpuMemory) -> tuple[Any, dict[str, float]]:
    """Fetch the weights into the cache if needed, load them offline, place the pipeline and speed up its denoiser.

    On CUDA in the checkpoint's dtype; on the CPU (tests) in float32, where half precision is slow or unsupported.
    `memory` (made before, so that its budget is the GPU memory free before any weights) places the pipeline and
    says whether fusing Q/K/V pays. TORCH_COMPILE=1 also compiles the denoiser's blocks (see speed_up). Returns the
    pipeline and setup's timings.
    """
    configure_logging()
    start = time.perf_counter()
    source = os.environ.get(checkpoint.variable) or checkpoint.source
    folder = cache_dir() / checkpoint.name
    timings = fetch_weights(source, folder, checkpoint.variable)
    device, dtype = ("cuda", checkpoint.cuda_dtype) if torch.cuda.is_available() else ("cpu", torch.float32)
    with strict_loading(f"{checkpoint.variable} ({source})"):
        pipe = checkpoint.pipeline.from_pretrained(folder, dtype=dtype, local_files_only=True)  # never the hub
    memory.place(pipe)
    speed_up(denoiser(pipe), fuse=memory.fused, compile_blocks=os.environ.get("TORCH_COMPILE") == "1")
    memory.after_fusing()
    pipe.set_progress_bar_config(disable=True)
    timings["load_s"] = time.perf_counter() - start - timings["download_s"]
    logger.info("Weights ready in %.1f s, pipeline loaded in %.1f s", timings["download_s"], timings["load_s"])
    return pipe, timings


class _LoadReports(logging.Handler):
    """Collects what diffusers and transformers log (never raise) about weights they did not load or did not use:
    diffusers' "...newly initialized: [...]" and "...were not used when initializing ...", transformers 5's
    "<Model> LOAD REPORT" table of MISSING / UNEXPECTED / MISMATCHED keys."""

    SIGNS = ("newly initialized", "were not used when initializing", "load report")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # transformers colours its report
        if any(sign in message.lower() for sign in self.SIGNS):
            self.reports.append(message)


@contextmanager
def strict_loading(source: str) -> Iterator[None]:
    """Fail when a weight was left randomly initialised or a stored one was not used: a mismatched checkpoint
    would otherwise load without an error and generate noise. Any loading error becomes one WeightsError sentence
    (.bin pickles load weights-only in diffusers and transformers: one holding code fails here, unexecuted)."""
    handler = _LoadReports()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for each in loggers:
        each.addHandler(handler)
    try:
        yield
    except Exception as error:  # OSError, UnpicklingError, ValueError...: setup fails either way, say why in one line
        raise WeightsError(
            f"The weights in {source} could not be loaded: {type(error).__name__}: {_one_line(str(error))}"
        ) from error
    finally:
        for each in loggers:
            each.removeHandler(handler)
    if handler.reports:
        raise WeightsError(f"The weights in {source} do not match the model: {_one_line(handler.reports[0])}")


def _one_line(text: str, limit: int = 400) -> str:
    """A library's multi-line message (a load report table, a traceback-like error) as one line of at most ~limit."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def speed_up(model: Any, *, fuse: bool = True, compile_blocks: bool = False) -> None:
    """Speed up the denoiser (CogVideoX transformer or UNet3D) in place, after placement, without changing its output.

    With `fuse`, fuses each attention's Q/K/V (or K/V) projections into one matmul: on tiny weights in float32 the
    pipeline's latents are unchanged (CogVideoX) or within 1e-5 (UNet3D). The unfused projections stay (LoRAs need
    them): memory.GpuMemory.after_fusing parks them on the CPU while resident; memory.GpuMemory.fused says not to
    fuse under CPU offload, where the copy would move with every call. With `compile_blocks` and CUDA, also compiles
    each repeated block with torch.compile (diffusers' compile_repeated_blocks rejects both models); off by default:
    it costs compile time at setup and at each new input shape, and no GPU measurement shows it paying off yet.
    """
    if fuse:
        model.fuse_qkv_projections()
    compiled = compile_blocks and torch.cuda.is_available()
    if compiled:
        blocks = getattr(model, "transformer_blocks", None) or [*model.down_blocks, model.mid_block, *model.up_blocks]
        for block in blocks:
            block.compile()
    done = [name for name, on in (("fused QKV projections", fuse), ("compiled blocks", compiled)) if on]
    logger.info("Speed-ups: %s", ", ".join(done) or "none")
