"""Test-only subclasses of the production predictors that inject faults when the prompt is a magic word.

The Cog server loads them with COG_PREDICT_TYPE_STUB=tests/faulty_predictors.py:I2V (or :V2V, :T2V). Any other prompt
runs the production code unchanged, so the same server also serves the ordinary reliability tests. Nothing here is
reachable from the production predictors.

Magic prompts:
  OOM           the pipeline call raises torch.OutOfMemoryError after allocating a large tensor (as a GPU OOM would
                mid-step), so the test can check that phase() turns it into a clear error and frees the memory.
  STALL_TEXT    text encoding never ends (until the prediction is cancelled).
  STALL_DENOISE the denoiser's first call never ends (until cancelled): the text is encoded, the latents made.
  STALL_INTERPOLATE  RIFE's first batch never ends (until cancelled): the frames are generated, the model placed.
  STALL_ENCODE  the video encoder is fed one frame, then never gets the rest (until cancelled): ffmpeg is running
                and the output file is half-written when the cancellation arrives.
Each stall first prints "stalled in <where>" so a test can wait for that line in the prediction's logs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import predict_i2v  # noqa: E402
import predict_t2v  # noqa: E402
import predict_v2v  # noqa: E402
from pipelines import denoiser  # noqa: E402

OOM = "__oom__"
STALL_TEXT = "__stall_text_encoding__"
STALL_DENOISE = "__stall_denoising__"
STALL_INTERPOLATE = "__stall_interpolation__"
STALL_ENCODE = "__stall_video_encoding__"
OOM_ALLOCATION_BYTES = 512 * 2**20


def stall(where: str) -> None:
    while True:  # short sleeps: Cog's cancellation is raised at the next bytecode boundary
        print(f"stalled in {where}", flush=True)  # again and again: Cog throttles the log webhooks
        for _ in range(20):
            time.sleep(0.01)


class StallingFrames(np.ndarray):
    """Frames whose iteration stops after the first one: write_mp4 hangs with ffmpeg started and the file open."""

    def __iter__(self) -> Iterator[np.ndarray]:
        yield np.asarray(self)[0]
        stall("video encoding")


class FaultsMixin:
    pipe: Any

    def generate(self, *, prompt: str, **settings: Any) -> np.ndarray:
        if prompt == OOM:
            held = torch.ones(OOM_ALLOCATION_BYTES // 4)  # noqa: F841 - memory a failed CUDA step would hold
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
        if prompt == STALL_TEXT:
            pipe = settings.get("pipe") or self.pipe  # CogVideoX-5b's video-to-video runs its own pipeline object
            pipe.encode_prompt = lambda *a, **k: stall("text encoding")  # shadows the method on this instance
            try:
                return super().generate(prompt=prompt, **settings)  # type: ignore[misc]
            finally:
                del pipe.encode_prompt
        if prompt == STALL_DENOISE:
            handle = denoiser(self.pipe).register_forward_pre_hook(lambda module, args: stall("denoising"))
            try:
                return super().generate(prompt=prompt, **settings)  # type: ignore[misc]
            finally:
                handle.remove()
        if prompt == STALL_INTERPOLATE:  # the next IFNet call stalls, once: interpolation runs after generate()
            rife: Any = self.rife  # type: ignore[attr-defined]

            def stall_once(module: Any, args: Any) -> None:
                handle.remove()
                stall("interpolation")

            handle = rife.model.register_forward_pre_hook(stall_once)
        magic = (STALL_ENCODE, STALL_INTERPOLATE)
        frames = super().generate(prompt="" if prompt in magic else prompt, **settings)  # type: ignore[misc]
        return frames.view(StallingFrames) if prompt == STALL_ENCODE else frames


class I2V(FaultsMixin, predict_i2v.Predictor):
    pass


class V2V(FaultsMixin, predict_v2v.Predictor):
    pass


class T2V(FaultsMixin, predict_t2v.Predictor):
    pass
