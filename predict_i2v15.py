"""Image-to-video with CogVideoX1.5-5B-I2V: any aspect ratio (portrait experimental), 5 or 10 second clips at 16 fps."""

from __future__ import annotations

import torch
from cog import Input, Path
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image

from cogvideox import CogVideoXPredictor
from errors import InputError
from inputs import resolve_seed, validate_inputs
from interpolation import output_fps
from media import fit_image, load_image, output_path, write_mp4
from pipelines import Checkpoint
from reporting import phase, record_setup_metrics

CHECKPOINT = Checkpoint(
    name="CogVideoX1.5-5B-I2V",
    variable="COGVIDEOX15_I2V_WEIGHTS_URL",
    source="hf://THUDM/CogVideoX1.5-5B-I2V",
    pipeline=CogVideoXImageToVideoPipeline,
    cuda_dtype=torch.bfloat16,
)
# The model card's limits: the short side is 768, the long side a multiple of 16 from 768 to 1360.
SHORT_SIDE, LONG_SIDE_MAX, SIDE_MULTIPLE = 768, 1360, 16
# Input() arguments stay literals (or module-level literals): `cog build` reads the schema statically.
FRAME_COUNTS = [17, 33, 49, 65, 81, 97, 113, 129, 145, 161]  # 16N+1, N <= 10: 81 is 5 s at 16 fps, 161 is 10 s
ASPECT_RATIOS = ["match_input", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "1:1"]


class Predictor(CogVideoXPredictor):
    checkpoint = CHECKPOINT
    max_sequence_length = 224  # the model card's prompt limit, in tokens

    def setup(self) -> None:
        """Fetch the weights if the cache lacks them, load the pipeline and run one warm-up step."""
        super().setup()
        # diffusers slices the rotary embeddings from a table of sample_height x sample_width latents (96 x 170:
        # at most 768 px high), so portrait sizes fail (THUDM/CogVideo#758): widen the table to the long side.
        # Every position that fitted before keeps its embedding, so landscape output is unchanged.
        config = self.pipe.transformer.config
        long_side = max(config.sample_height, config.sample_width)
        self.pipe.transformer.register_to_config(sample_height=long_side, sample_width=long_side)
        # Small: what a first call pays is kernel start-up, not its size.
        self.warm_up(256, 256, image=Image.new("RGB", (256, 256)), num_frames=FRAME_COUNTS[0])

    @validate_inputs
    def run(
        self,
        image: Path = Input(description="The first frame. The video follows its aspect ratio unless told otherwise."),
        prompt: str = Input(description="Text describing the video you want.", default=""),
        negative_prompt: str = Input(description="Things you do not want to see in the video.", default=""),
        aspect_ratio: str = Input(
            description="Shape of the video: match_input follows the image. The short side is 768 px, the long side up to 1360.",  # noqa: E501
            choices=ASPECT_RATIOS,
            default="match_input",
        ),
        width: int | None = Input(
            description="Exact width in pixels, with height (overrides aspect_ratio): one side 768, the other a multiple of 16 up to 1360.",  # noqa: E501
            ge=768,
            le=1360,
            default=None,
        ),
        height: int | None = Input(
            description="Exact height in pixels, with width (overrides aspect_ratio).", ge=768, le=1360, default=None
        ),
        num_frames: int = Input(
            description="Frames to generate: 81 is 5 s and 161 is 10 s at 16 fps. Fewer are faster.",
            choices=FRAME_COUNTS,
            default=81,
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
            default=16,
        ),
        interpolation: int = Input(
            description="Frame interpolation (RIFE): 1 is off; 2 or 4 put 1 or 3 new frames between each pair, so N frames become (N - 1) x k + 1, played at fps x k (60 at most).",  # noqa: E501
            choices=[1, 2, 4],
            default=1,
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
        """Animate the image into an H.264 MP4 with a short side of 768 px."""
        record_setup_metrics(self.setup_timings)
        fps = output_fps(fps, interpolation)
        image = load_image(image)
        width, height = output_size(image, aspect_ratio, width, height)
        image = fit_image(image, width, height, sizing_strategy)
        seed = resolve_seed(seed)
        self.loras.use(lora_url, lora_scale)
        with (
            phase("inference"),
            self.memory.fit(width=width, height=height, frames=num_frames, guidance_scale=guidance_scale),
        ):
            frames = self.generate(
                image=image,
                prompt=prompt,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
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


def output_size(image: Image.Image, aspect_ratio: str, width: int | None, height: int | None) -> tuple[int, int]:
    """The video's (width, height): the exact size asked for, or the one nearest the aspect ratio asked for."""
    if width is None and height is None:
        if aspect_ratio == "match_input":
            return size_for(image.width / image.height)
        w, h = aspect_ratio.split(":")
        return size_for(int(w) / int(h))
    if width is None or height is None:
        raise InputError(
            "Invalid inputs `width` and `height`: give both, or neither (aspect_ratio then sets the size)."
        )
    if min(width, height) != SHORT_SIDE or max(width, height) % SIDE_MULTIPLE:
        raise InputError(
            f"Invalid inputs `width` and `height`: {width}x{height} is not a size the model supports: one side must be "
            f"{SHORT_SIDE} and the other a multiple of {SIDE_MULTIPLE} from {SHORT_SIDE} to {LONG_SIDE_MAX} "
            "(e.g. 1360x768, 768x1360, 1024x768, 768x768)."
        )
    return width, height


def size_for(aspect: float) -> tuple[int, int]:
    """(width, height) nearest `aspect` (width / height): short side 768, long side a multiple of 16 up to 1360."""
    long_side = round(SHORT_SIDE * max(aspect, 1 / aspect) / SIDE_MULTIPLE) * SIDE_MULTIPLE
    long_side = min(max(long_side, SHORT_SIDE), LONG_SIDE_MAX)
    return (long_side, SHORT_SIDE) if aspect >= 1 else (SHORT_SIDE, long_side)
