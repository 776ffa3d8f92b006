"""What the CogVideoX predictors share: setup, samplers, LoRAs, RIFE and the pipeline call.

Each predictor (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V, CogVideoX-5b) subclasses CogVideoXPredictor with its checkpoint
and prompt length, and writes its own run(): the inputs differ (sizes, frame counts, modes), the generation does not.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from cog import BaseRunner
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

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

    def warm_up(self, width: int, height: int, *, pipe: Any = None, **mode_inputs: Any) -> None:
        """One denoising step at setup, so the first prediction does not pay for the first kernels' start-up.

        ``pipe`` and ``mode_inputs`` as in generate()."""
        start = time.perf_counter()
        self.generate(
            pipe=pipe,
            prompt="",
            negative_prompt="",
            width=width,
            height=height,
            num_inference_steps=1,
            guidance_scale=6.0,
            use_dynamic_cfg=False,
            scheduler="cogvideox_dpm",
            seed=0,
            **mode_inputs,
        )
        self.setup_timings["warmup_s"] = time.perf_counter() - start

    def generate(
        self,
        *,
        pipe: Any = None,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        num_inference_steps: int,
        guidance_scale: float,
        use_dynamic_cfg: bool,
        scheduler: str,
        seed: int,
        **mode_inputs: Any,
    ) -> np.ndarray:
        """The pipeline call, with the LoRA the prediction asked for (Loras.use): frames (F, H, W, 3) in [0, 1].

        ``pipe``: self.pipe, or a pipeline of another mode built on its components (one copy of the weights).
        ``mode_inputs``: what that mode takes besides the shared settings: ``image`` and ``num_frames``
        (image-to-video), ``num_frames`` (text-to-video), ``video`` and ``strength`` (video-to-video).
        """
        pipe = pipe or self.pipe
        pipe.scheduler = self.schedulers[scheduler]
        steps = int(num_inference_steps * mode_inputs.get("strength", 1.0))  # what diffusers runs
        frames = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            use_dynamic_cfg=use_dynamic_cfg,
            generator=torch.Generator("cpu").manual_seed(seed),
            max_sequence_length=self.max_sequence_length,
            output_type="np",
            callback_on_step_end=StepLogger(steps).on_step_end,
            **mode_inputs,
        ).frames[0]
        if pipe is not self.pipe:
            # With CPU offload the hooks live on the shared models, but only self.pipe puts them all back after a
            # call (another pipeline object would leave its last model on the GPU): do it for that one too.
            self.pipe.maybe_free_model_hooks()
        if not np.isfinite(frames).all():  # a black video otherwise: NaN becomes 0 when encoded
            raise self.loras.blame_for_broken_frames() or ServiceError(BROKEN_FRAMES)
        record_metric("frames", len(frames))
        return frames
