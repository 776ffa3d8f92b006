"""Image-to-video with CogVideoX-5b-I2V: animate a still image, guided by a prompt."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from cog import BaseRunner, Input, Path
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline
from PIL import Image

from media import fit_image, load_image, to_uint8, write_mp4
from serving import (
    StepLogger,
    load_pipeline,
    output_path,
    phase,
    record_metric,
    record_setup_metrics,
    resolve_seed,
    validate_inputs,
)

WEIGHTS_URL = os.environ.get(
    "COGVIDEOX_I2V_WEIGHTS_URL", "https://weights.replicate.delivery/default/THUDM/CogVideo/model_cache_i2v.tar"
)
# Input() arguments stay literals (or module-level literals): `cog build` reads the schema statically.
FRAME_COUNTS = [9, 17, 25, 33, 41, 49]  # 8N+1: other counts come out as mosaics or the wrong length
SCHEDULERS = {"cogvideox_dpm": CogVideoXDPMScheduler, "cogvideox_ddim": CogVideoXDDIMScheduler}
RESIDENT_GIB = 40  # free GPU memory needed to keep the whole bf16 pipeline on the GPU (~21 GiB weights + activations)


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Fetch the weights if the cache lacks them, load the pipeline and run one warm-up step."""
        self.pipe, self.setup_timings = load_pipeline(
            CogVideoXImageToVideoPipeline, WEIGHTS_URL, "cogvideox-5b-i2v", torch.bfloat16, RESIDENT_GIB
        )
        # As the official CLI: "trailing" spacing, which the hub's scheduler config lacks.
        self.schedulers = {
            name: cls.from_config(self.pipe.scheduler.config, timestep_spacing="trailing")
            for name, cls in SCHEDULERS.items()
        }
        # The learned positional embeddings fix the resolution (720x480 for the real model).
        config = self.pipe.transformer.config
        self.width = config.sample_width * self.pipe.vae_scale_factor_spatial
        self.height = config.sample_height * self.pipe.vae_scale_factor_spatial
        start = time.perf_counter()
        self.generate(Image.new("RGB", (self.width, self.height)), "", "", 9, 1, 6.0, False, "cogvideox_dpm", 0)
        self.setup_timings["warmup_s"] = time.perf_counter() - start

    @validate_inputs
    def run(
        self,
        image: Path = Input(description="The first frame. Fitted to 720x480 (landscape) by sizing_strategy."),
        prompt: str = Input(description="Text describing the video you want.", default=""),
        negative_prompt: str = Input(description="Things you do not want to see in the video.", default=""),
        num_frames: int = Input(
            description="Frames to generate. The model was trained on 49; fewer are faster, off its training data.",
            choices=FRAME_COUNTS,
            default=49,
        ),
        num_inference_steps: int = Input(
            description="Denoising steps: more is slower and finer.", ge=1, le=100, default=50
        ),
        guidance_scale: float = Input(description="How closely to follow the prompt.", ge=1.0, le=20.0, default=6.0),
        use_dynamic_cfg: bool = Input(description="Vary guidance over the steps (as the official demo).", default=True),
        scheduler: str = Input(
            description="Sampler.", choices=["cogvideox_dpm", "cogvideox_ddim"], default="cogvideox_dpm"
        ),
        fps: int = Input(description="Frames per second of the output video.", ge=1, le=60, default=8),
        sizing_strategy: str = Input(
            description="Fitting another aspect ratio: center_crop (cover, crop), pad (fit, black bars) or stretch.",
            choices=["center_crop", "pad", "stretch"],
            default="center_crop",
        ),
        seed: int | None = Input(
            description="Random seed (0 to 4294967295). Blank for a random one; the seed used is logged.",
            ge=0,
            le=4294967295,
            default=None,
        ),
    ) -> Path:
        """Animate the image into a 720x480 H.264 MP4."""
        record_setup_metrics(self.setup_timings)
        image = fit_image(load_image(image), self.width, self.height, sizing_strategy)
        seed = resolve_seed(seed)
        with phase("inference"):
            frames = self.generate(
                image, prompt, negative_prompt, num_frames, num_inference_steps, guidance_scale, use_dynamic_cfg,
                scheduler, seed,
            )  # fmt: skip
        with phase("encode"):
            return write_mp4(frames, fps, output_path())

    def generate(
        self,
        image: Image.Image,
        prompt: str,
        negative_prompt: str,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        use_dynamic_cfg: bool,
        scheduler: str,
        seed: int,
    ) -> np.ndarray:
        """The pipeline call: uint8 frames (F, H, W, 3)."""
        self.pipe.scheduler = self.schedulers[scheduler]
        frames = self.pipe(
            image=image,
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=self.height,
            width=self.width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            use_dynamic_cfg=use_dynamic_cfg,
            generator=torch.Generator("cpu").manual_seed(seed),
            max_sequence_length=self.pipe.transformer.config.max_text_seq_length,
            output_type="np",
            callback_on_step_end=StepLogger(num_inference_steps).on_step_end,
        ).frames[0]
        record_metric("frames", len(frames))
        return to_uint8(frames)
