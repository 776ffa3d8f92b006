"""Image-to-video with CogVideoX-5b-I2V: animate a still image into a 720x480 clip, guided by a prompt."""

from __future__ import annotations

import torch
from cog import Input, Path
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image

from cogvideox import CogVideoXPredictor
from inputs import resolve_seed, validate_inputs
from interpolation import output_fps
from media import fit_image, load_image, output_path, write_mp4
from pipelines import Checkpoint
from reporting import phase, record_setup_metrics

CHECKPOINT = Checkpoint(
    name="CogVideoX-5b-I2V",
    variable="COGVIDEOX_I2V_WEIGHTS_URL",  # or hf://THUDM/CogVideoX-5b-I2V
    source="https://weights.replicate.delivery/default/THUDM/CogVideo/model_cache_i2v.tar",
    pipeline=CogVideoXImageToVideoPipeline,
    cuda_dtype=torch.bfloat16,
)
# Input() arguments stay literals (or module-level literals): `cog build` reads the schema statically.
FRAME_COUNTS = [9, 17, 25, 33, 41, 49]  # 8N+1: other counts come out as mosaics or the wrong length


class Predictor(CogVideoXPredictor):
    checkpoint = CHECKPOINT
    max_sequence_length = 226  # the learned positional embeddings take exactly this many prompt tokens

    def setup(self) -> None:
        """Fetch the weights if the cache lacks them, load the pipeline and run one warm-up step."""
        super().setup()
        # The learned positional embeddings fix the resolution (720x480 for the real model).
        config = self.pipe.transformer.config
        self.width = config.sample_width * self.pipe.vae_scale_factor_spatial
        self.height = config.sample_height * self.pipe.vae_scale_factor_spatial
        self.warm_up(self.width, self.height, image=Image.new("RGB", (self.width, self.height)), num_frames=9)

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
        fps: int = Input(
            description="Frames per second of the generated frames; the video plays at fps x interpolation.",
            ge=1,
            le=60,
            default=8,
        ),
        interpolation: int = Input(
            description="Frame interpolation (RIFE): 1 is off; 2 or 4 put 1 or 3 new frames between each pair, so N frames become (N - 1) x k + 1, played at fps x k (60 at most).",  # noqa: E501
            choices=[1, 2, 4],
            default=2,
        ),
        sizing_strategy: str = Input(
            description="Fitting another aspect ratio: center_crop (cover, crop), pad (fit, black bars) or stretch.",
            choices=["center_crop", "pad", "stretch"],
            default="center_crop",
        ),
        lora_url: str = Input(
            description="A LoRA trained on this model: an https URL of a .safetensors file, hf://OWNER/NAME (the repo's only .safetensors) or hf://OWNER/NAME/FILE.safetensors. Blank: none.",  # noqa: E501
            default="",
        ),
        lora_scale: float = Input(
            description="Strength of the LoRA: 1 as trained, 0 off. Past about 1.5 most LoRAs distort the video.",
            ge=-1.0,
            le=3.0,
            default=1.0,
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
        fps = output_fps(fps, interpolation)
        image = fit_image(load_image(image), self.width, self.height, sizing_strategy)
        seed = resolve_seed(seed)
        self.loras.use(lora_url, lora_scale)
        with (
            phase("inference"),
            self.memory.fit(width=self.width, height=self.height, frames=num_frames, guidance_scale=guidance_scale),
        ):
            frames = self.generate(
                image=image,
                prompt=prompt,
                negative_prompt=negative_prompt,
                width=self.width,
                height=self.height,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                use_dynamic_cfg=use_dynamic_cfg,
                scheduler=scheduler,
                seed=seed,
            )
        with phase("interpolation"):
            frames = self.rife.interpolate(frames, interpolation)
        with phase("encode"):
            return write_mp4(frames, fps, output_path())
