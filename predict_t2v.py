"""Text-to-video with CogVideoX-5b, and video-to-video (restyling a clip) with the same weights: 720x480 clips."""

from __future__ import annotations

import numpy as np
import torch
from cog import Input, Path
from diffusers import CogVideoXPipeline, CogVideoXVideoToVideoPipeline
from PIL import Image

from cogvideox import CogVideoXPredictor
from errors import InputError
from inputs import check_steps_run, resolve_seed, validate_inputs
from interpolation import output_fps
from media import fit_image, output_path, read_video, write_mp4
from pipelines import Checkpoint
from reporting import phase, record_setup_metrics

CHECKPOINT = Checkpoint(
    name="CogVideoX-5b",
    variable="COGVIDEOX_T2V_WEIGHTS_URL",  # or hf://THUDM/CogVideoX-5b
    source="https://weights.replicate.delivery/default/THUDM/CogVideo/model_cache.tar",
    pipeline=CogVideoXPipeline,
    cuda_dtype=torch.bfloat16,
)
# Input() arguments stay literals (or module-level literals): `cog build` reads the schema statically.
FRAME_COUNTS = [9, 17, 25, 33, 41, 49]  # 8N+1: other counts come out as mosaics or the wrong length


class Predictor(CogVideoXPredictor):
    checkpoint = CHECKPOINT
    max_sequence_length = 226  # the model's prompt length, in tokens

    def setup(self) -> None:
        """Fetch the weights if the cache lacks them, load the pipeline, build the video-to-video one on the same
        components (no second copy of the weights) and run one warm-up step."""
        super().setup()
        self.v2v = CogVideoXVideoToVideoPipeline(**self.pipe.components)
        self.v2v.set_progress_bar_config(disable=True)
        # The model's size, 720x480 (its rotary embeddings would take others, off its training distribution).
        config = self.pipe.transformer.config
        self.width = config.sample_width * self.pipe.vae_scale_factor_spatial
        self.height = config.sample_height * self.pipe.vae_scale_factor_spatial
        # Video-to-video runs every kernel text-to-video does, and the VAE's encoder besides.
        blank = [Image.new("RGB", (self.width, self.height))] * FRAME_COUNTS[0]
        self.warm_up(self.width, self.height, pipe=self.v2v, video=blank, strength=1.0)

    @validate_inputs
    def run(
        self,
        prompt: str = Input(description="Text describing the video you want.", default=""),
        negative_prompt: str = Input(description="Things you do not want to see in the video.", default=""),
        video: Path | None = Input(
            description="A clip to restyle (video-to-video): any format ffmpeg reads, up to 10 minutes, fitted to 720x480 by sizing_strategy. Blank: text-to-video.",  # noqa: E501
            default=None,
        ),
        strength: float = Input(
            description="Video-to-video: how much to change the video, 0 keeps it, 1 ignores it. Only strength x steps of the steps run.",  # noqa: E501
            ge=0.0,
            le=1.0,
            default=0.8,
        ),
        frame_sampling: str = Input(
            description="Video-to-video: first: the first num_frames frames; even: num_frames spread evenly over the whole clip.",  # noqa: E501
            choices=["first", "even"],
            default="first",
        ),
        num_frames: int = Input(
            description="Frames to generate (video-to-video: the most of the form 8N+1 the video gives, at least 9). The model was trained on 49.",  # noqa: E501
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
        """Generate a 720x480 H.264 MP4 from the prompt, or from the prompt and a video."""
        record_setup_metrics(self.setup_timings)
        fps = output_fps(fps, interpolation)
        if video is None:
            pipe, mode_inputs = self.pipe, {"num_frames": num_frames}
        else:
            check_steps_run(strength=strength, num_inference_steps=num_inference_steps)
            with phase("decode"):
                frames = read_frames(video, num_frames, frame_sampling)
                frames = [fit_image(frame, self.width, self.height, sizing_strategy) for frame in frames]
            pipe, mode_inputs = self.v2v, {"video": frames, "strength": strength}
        seed = resolve_seed(seed)
        self.loras.use(lora_url, lora_scale)
        encoded = len(mode_inputs.get("video", []))  # the frames the VAE encodes: the clip's, or none
        fits = self.memory.fit(
            width=self.width,
            height=self.height,
            frames=encoded or num_frames,
            guidance_scale=guidance_scale,
            encoded=encoded,
        )
        with phase("inference"), fits:
            output = self.generate(
                pipe=pipe,
                prompt=prompt,
                negative_prompt=negative_prompt,
                width=self.width,
                height=self.height,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                use_dynamic_cfg=use_dynamic_cfg,
                scheduler=scheduler,
                seed=seed,
                **mode_inputs,
            )
        with phase("interpolation"):
            output = self.rife.interpolate(output, interpolation)
        with phase("encode"):
            return write_mp4(output, fps, output_path())


def read_frames(video: Path, num_frames: int, frame_sampling: str) -> list[Image.Image]:
    """Up to `num_frames` frames of the video (media.read_video, with its checks), cut to the largest 8N+1 count:
    the model's frame counts (others come out as mosaics or the wrong length)."""
    frames, _ = read_video(video, num_frames, frame_sampling)
    if len(frames) < FRAME_COUNTS[0]:
        raise InputError(
            f"Invalid input `video`: {len(frames)} frame{'s' * (len(frames) != 1)} read; video-to-video needs at least "
            f"{FRAME_COUNTS[0]}."
        )
    count = (len(frames) - 1) // 8 * 8 + 1
    if frame_sampling == "even":  # keep them spread over the whole clip
        return [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]
    return frames[:count]
