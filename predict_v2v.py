"""Video-to-video with zeroscope v2 XL: re-render a clip at up to 1024x576, guided by a prompt (upscaling)."""

from __future__ import annotations

import time

import numpy as np
import torch
from cog import BaseRunner, Input, Path
from diffusers import DPMSolverMultistepScheduler, VideoToVideoSDPipeline
from PIL import Image

import cog_compat
from errors import InputError, ServiceError
from inputs import check_steps_run, resolve_seed, validate_inputs
from interpolation import load_rife, output_fps
from media import fit_image, output_path, read_video, write_mp4
from memory import GpuMemory
from pipelines import Checkpoint, load_pipeline
from reporting import StepLogger, phase, record_metric, record_setup_metrics

CHECKPOINT = Checkpoint(
    name="zeroscope_v2_XL",
    variable="ZEROSCOPE_XL_WEIGHTS_URL",
    source="hf://cerspense/zeroscope_v2_XL",
    pipeline=VideoToVideoSDPipeline,
    cuda_dtype=torch.float16,
)


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Fetch the weights if the cache lacks them, load the pipeline and run one warm-up step."""
        cog_compat.install()
        self.memory = GpuMemory(CHECKPOINT.name, frames_input="max_frames")  # before the weights: memory free now
        self.pipe, self.setup_timings = load_pipeline(CHECKPOINT, self.memory)
        # As the model card's diffusers example.
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        self.rife, rife_timings = load_rife(offloaded=lambda: self.pipe.device.type != "cuda")
        self.setup_timings |= rife_timings
        start = time.perf_counter()
        self.generate(
            frames=[Image.new("RGB", (64, 64))] * 2,
            prompt="",
            negative_prompt="",
            strength=1.0,
            num_inference_steps=1,
            guidance_scale=1.0,
            seed=0,
        )
        self.setup_timings["warmup_s"] = time.perf_counter() - start

    @validate_inputs
    def run(
        self,
        video: Path = Input(description="The video to re-render: any format ffmpeg reads, up to 10 minutes."),
        prompt: str = Input(description="Text describing the video you want.", default=""),
        negative_prompt: str = Input(description="Things you do not want to see in the video.", default=""),
        strength: float = Input(
            description="How much to change the video: 0 keeps it, 1 ignores it. The model card suggests 0.66-0.85 for upscaling.",  # noqa: E501
            ge=0.0,
            le=1.0,
            default=0.6,
        ),
        num_inference_steps: int = Input(
            description="Denoising steps; only strength x steps of them run.", ge=1, le=100, default=40
        ),
        guidance_scale: float = Input(description="How closely to follow the prompt.", ge=1.0, le=30.0, default=15.0),
        width: int = Input(
            description="Output width, a multiple of 8. The model was trained at 1024.", ge=64, le=1280, default=1024
        ),
        height: int = Input(
            description="Output height, a multiple of 8. The model was trained at 576.", ge=64, le=1280, default=576
        ),
        sizing_strategy: str = Input(
            description="Fitting another aspect ratio: center_crop (cover, crop), pad (fit, black bars) or stretch.",
            choices=["center_crop", "pad", "stretch"],
            default="center_crop",
        ),
        max_frames: int = Input(
            description="Frames to take from the input. The model works best at 24; quality drops past about 40.",
            ge=1,
            le=48,
            default=24,
        ),
        frame_sampling: str = Input(
            description="first: the first max_frames frames; even: max_frames spread evenly over the whole clip.",
            choices=["first", "even"],
            default="first",
        ),
        fps: int | None = Input(
            description="Frames per second of the generated frames (the video plays at fps x interpolation). Blank: the input's, adjusted for frame_sampling.",  # noqa: E501
            ge=1,
            le=60,
            default=None,
        ),
        interpolation: int = Input(
            description="Frame interpolation (RIFE): 1 is off; 2 or 4 put 1 or 3 new frames between each pair, so N frames become (N - 1) x k + 1, played at fps x k (60 at most).",  # noqa: E501
            choices=[1, 2, 4],
            default=1,
        ),
        seed: int | None = Input(
            description="Random seed (0 to 4294967295). Blank for a random one; the seed used is logged.",
            ge=0,
            le=4294967295,
            default=None,
        ),
    ) -> Path:
        """Re-render the video as an H.264 MP4 of width x height."""
        record_setup_metrics(self.setup_timings)
        for name, value in (("width", width), ("height", height)):
            if value % 8:
                raise InputError(f"Invalid input `{name}`: must be a multiple of 8 (got {value}).")
        check_steps_run(strength=strength, num_inference_steps=num_inference_steps)
        with phase("decode"):
            frames, input_fps = read_video(video, max_frames, frame_sampling)
            frames = [fit_image(frame, width, height, sizing_strategy) for frame in frames]
        fps = output_fps(fps or input_fps, interpolation, from_input=fps is None)
        seed = resolve_seed(seed)
        fits = self.memory.fit(width=width, height=height, frames=len(frames), guidance_scale=guidance_scale)
        with phase("inference"), fits:
            output = self.generate(
                frames=frames,
                prompt=prompt,
                negative_prompt=negative_prompt,
                strength=strength,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                seed=seed,
            )
        with phase("interpolation"):
            output = self.rife.interpolate(output, interpolation)
        with phase("encode"):
            return write_mp4(output, fps, output_path())

    def generate(
        self,
        *,
        frames: list[Image.Image],
        prompt: str,
        negative_prompt: str,
        strength: float,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int,
    ) -> np.ndarray:
        """The pipeline call: frames (F, H, W, 3) in [0, 1]."""
        output = self.pipe(
            prompt=prompt,
            video=frames,
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            callback=StepLogger(int(num_inference_steps * strength)).on_step,
        ).frames[0]
        if not np.isfinite(output).all():  # a black video otherwise: NaN becomes 0 when encoded
            raise ServiceError("The model produced NaN or infinite frames; this is not a problem with the input.")
        record_metric("frames", len(output))
        return output
