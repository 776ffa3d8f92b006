"""What the CogVideoX image-to-video predictors share: setup, samplers, LoRAs, RIFE and the pipeline call.

Each predictor (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V) subclasses CogVideoXPredictor with its checkpoint and prompt
length, and writes its own run(): the inputs differ (sizes, frame counts), the generation does not.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from cog import BaseRunner
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from PIL import Image

import cog_compat
from errors import ServiceError
from interpolation import load_rife
from lora import Loras
from memory import GpuMemory
from pipelines import Checkpoint, load_pipeline
from reporting import StepLogger, record_metric

BROKEN_FRAMES = "The model produced NaN or infinite frames; this is not a problem with the input."
SCHEDULERS = {"cogvideox_dpm": CogVideoXDPMScheduler, "cogvideox_ddim": CogVideoXDDIMScheduler}


class CogVideoXPredictor(BaseRunner):
    checkpoint: Checkpoint
    max_sequence_length: int  # prompt tokens given to the transformer

    def setup(self) -> None:
        """Fetch the weights if the cache lacks them and load the pipeline, its samplers and the LoRA slots."""
        cog_compat.install()
        self.memory = GpuMemory(self.checkpoint.name)  # before the weights: its budget is the memory free now
        self.pipe, self.setup_timings = load_pipeline(self.checkpoint, self.memory)
        # As the official CLI: "trailing" timestep spacing (which the hub's scheduler configs also give).
        self.schedulers = {
            name: cls.from_config(self.pipe.scheduler.config, timestep_spacing="trailing")
            for name, cls in SCHEDULERS.items()
        }
        self.loras = Loras(self.pipe, self.checkpoint.name)
        self.rife, rife_timings = load_rife(offloaded=lambda: self.pipe.device.type != "cuda")  # frame interpolation
        self.setup_timings |= rife_timings

    def warm_up(self, width: int, height: int, num_frames: int) -> None:
        """One denoising step at setup, so the first prediction does not pay for the first kernels' start-up."""
        start = time.perf_counter()
        self.generate(
            image=Image.new("RGB", (width, height)),
            prompt="",
            negative_prompt="",
            width=width,
            height=height,
            num_frames=num_frames,
            num_inference_steps=1,
            guidance_scale=6.0,
            use_dynamic_cfg=False,
            scheduler="cogvideox_dpm",
            seed=0,
        )
        self.setup_timings["warmup_s"] = time.perf_counter() - start

    def generate(
        self,
        *,
        image: Image.Image,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        use_dynamic_cfg: bool,
        scheduler: str,
        seed: int,
    ) -> np.ndarray:
        """The pipeline call, with the LoRA the prediction asked for (Loras.use): frames (F, H, W, 3) in [0, 1]."""
        self.pipe.scheduler = self.schedulers[scheduler]
        frames = self.pipe(
            image=image,
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            use_dynamic_cfg=use_dynamic_cfg,
            generator=torch.Generator("cpu").manual_seed(seed),
            max_sequence_length=self.max_sequence_length,
            output_type="np",
            callback_on_step_end=StepLogger(num_inference_steps).on_step_end,
        ).frames[0]
        if not np.isfinite(frames).all():  # a black video otherwise: NaN becomes 0 when encoded
            raise self.loras.blame_for_broken_frames() or ServiceError(BROKEN_FRAMES)
        record_metric("frames", len(frames))
        return frames
