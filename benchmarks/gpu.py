"""GPU benchmark of the predictors (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V, zeroscope v2 XL, CogVideoX-5b in both of
its modes): reference vs project.

Builds the real architectures at full size with random weights straight on the GPU (random weights cost exactly
the compute of the real ones), sets the predictor up on them with its own setup() (load_pipeline stubbed: no
download), and times the predictor's own run() under each configuration, in this order:

  reference  the model cards' / official demos': CPU offload + VAE tiling or slicing, in the checkpoint's dtype:
             i2v: enable_model_cpu_offload() + vae.enable_tiling() (CogVideoX-5b-I2V's card);
             i2v15: enable_model_cpu_offload() + vae.enable_tiling() + vae.enable_slicing() (THUDM cli_demo's
             option for GPUs with room; the 1.5 model card's own example offloads sequentially, slower still);
             v2v: enable_model_cpu_offload() + vae.enable_slicing() (the diffusers docs');
             t2v / t2v-v2v: diffusers' own example code for CogVideoXPipeline / CogVideoXVideoToVideoPipeline:
             pipe.to("cuda"), nothing else (resident, unfused, untiled); guidance 6, 50 steps, no dynamic CFG, the
             hub's DDIM sampler (t2v) or CogVideoXDPMScheduler (t2v-v2v, strength 0.8)
  project    what setup() and run() do: memory.GpuMemory places the pipeline (resident on a GPU with room) and
             picks the VAE's savers per call from the memory model; speed_up() fuses QKV where it places resident
  rife       project + RIFE frame interpolation x2 (interpolation=2): i2v 49 -> 97 frames at 720x480 (its default),
             i2v15 161 -> 321 frames at 1360x768, v2v 24 -> 47 frames at 1024x576; reports RIFE's seconds and
             its share of the prediction (also extrapolated to the default steps). RIFE's weights are random in the
             published layout (interpolation.py's IFNet v4.26 heavy at its real widths), served from 127.0.0.1
  lora       project + a rank-64 LoRA on to_q/to_k/to_v/to_out.0 (random, built with peft, served from 127.0.0.1),
             activated by the predictor's Loras and run() (CogVideoX only): changes the output by design
  fbc        project + FirstBlockCache(threshold 0.05) on the CogVideoX transformer: LOSSY (CogVideoX only)
  compile    project + speed_up(compile_blocks=True): each block torch.compile'd (TORCH_COMPILE=1 in production)
  setup      the production setup() in a fresh process, weights already on local disk (saved here first)

Per configuration: one warm-up run, then --repeats runs, medians of: end-to-end run() seconds, denoising seconds
(first to last transformer/UNet forward, CUDA events) and seconds per step, text-encode / VAE-encode / VAE-decode
seconds (synchronised wrappers), peak GPU memory of the run and of each phase (text encode, VAE encode, denoise,
VAE decode: torch.cuda.max_memory_allocated, reset as each phase starts) next to memory.py's prediction for the same
placement and inputs ("memory_model" in the JSON: predicted, measured, ratio), achieved TFLOP/s of the
transformer/UNet (FLOPs of one forward at the real shapes counted with FlopCounterMode, x forwards per run /
denoising seconds), the speed-up over the reference, and the max abs difference of the final latents (and decoded
video) from the reference, same seed.
The LoRA configuration also reports its per-step and end-to-end time over the project's, the first use of a LoRA
(download + check + load) and a switch between two loaded ones.
The JSON (--json) is rewritten after each configuration, and a table row is printed as each one finishes.
--budget-s stops before a run that would not end in time, so one command stays within the device's 10 minutes.

    python benchmarks/gpu.py --model i2v --steps 10 --repeats 2 --json i2v.json       # one H100
    python benchmarks/gpu.py --model i2v15 --steps 5 --repeats 1 --json i2v15.json    # one H100
    python benchmarks/gpu.py --model v2v --repeats 2 --json v2v.json                  # one H100
    python benchmarks/gpu.py --model t2v --steps 10 --repeats 2 --json t2v.json       # one H100
    python benchmarks/gpu.py --model t2v-v2v --steps 10 --repeats 2 --json t2v-v2v.json
    python benchmarks/gpu.py --smoke --model all --json smoke.json                    # CPU, tiny float32 models

Runs use the predictors' own defaults (frames, size, fps, guidance; --steps overrides the steps): 49 frames at
720x480 for i2v, t2v and t2v-v2v (of a 49-frame clip, strength 0.8: 40 of 50 steps run), 81 frames at 1360x768 (16:9)
for i2v15, 24 frames at 1024x576 for v2v.
--smoke builds tiny versions of the same architectures on the CPU in float32 (2 steps, few frames, small sizes;
i2v15's short side is patched from 768 to 48 px), so the whole code path runs without a GPU. There the reference is
EMULATED: enable_model_cpu_offload(device="cpu") installs and runs the same offload hooks, but nothing moves; CPU
timings are noise, only the code path and the numbers' agreement between configurations mean something.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import numpy as np
import torch
from cog import Path as CogPath
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import cogvideox  # noqa: E402
import memory  # noqa: E402
import tiny_weights  # noqa: E402
import weights  # noqa: E402
from harness import serve_directory  # noqa: E402
from media import write_mp4  # noqa: E402
from pipelines import Checkpoint, denoiser, speed_up  # noqa: E402

START = time.perf_counter()
SEED = 42
PROMPT = "a golden retriever running on a beach at sunset, waves rolling in, cinematic, high quality"
CONFIGS = ["reference", "project", "rife", "lora", "fbc", "compile", "setup"]
FBC_THRESHOLD = 0.05
LORA_RANK = 64
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LABELS = {
    "reference": "reference (model card: CPU offload + VAE tiling/slicing)",
    "project": "project (memory.GpuMemory placement + speed_up: resident, fused QKV where it fits)",
    "rife": "project + RIFE x2 frame interpolation (interpolation=2; lossless for the generated frames)",
    "lora": f"project + rank-{LORA_RANK} LoRA (not lossless: changes the output by design)",
    "fbc": f"project + FirstBlockCache {FBC_THRESHOLD} (LOSSY)",
    "compile": "project + per-block torch.compile",
}
CHANGES_OUTPUT = {"lora": "not lossless", "fbc": "LOSSY"}  # the configurations that are not lossless, as marked


def label(name: str, model: str) -> str:
    if name == "reference" and not MODELS[model].reference_offload:
        return "reference (diffusers' example: resident, unfused, untiled)"
    return LABELS[name]


@dataclass(frozen=True)
class Model:
    """A predictor under test. Its checkpoint (name, weights variable, dtype, placement) and its run() defaults come
    from its module; here only what the benchmark asks for differently."""

    module: str
    reference_vae: tuple[str, ...]  # the reference's VAE memory savers: "tiling", "slicing"
    inputs: dict[str, Any]  # run() inputs other than its defaults
    smoke_inputs: dict[str, Any]  # the same with --smoke
    smoke_constants: dict[str, Any] = field(default_factory=dict)  # module constants patched with --smoke
    media: str | None = "image"  # the file run() is given: "image", "video" or none (text-to-video)
    pipe_attr: str = "pipe"  # the predictor's pipeline that run() calls (t2v-v2v: the one on the same components)
    reference_offload: bool = True  # the reference offloads to the CPU (else: resident, as diffusers' examples)
    rife_inputs: dict[str, Any] = field(default_factory=lambda: {"interpolation": 2})  # the rife configuration's
    smoke_rife_inputs: dict[str, Any] = field(default_factory=lambda: {"interpolation": 2})  # the same with --smoke


MODELS = {
    "i2v": Model("predict_i2v", ("tiling",), {}, {"num_frames": 9, "num_inference_steps": 2, "interpolation": 1}),
    "i2v15": Model(
        "predict_i2v15",
        ("tiling", "slicing"),
        {"aspect_ratio": "16:9"},
        {"aspect_ratio": "16:9", "num_frames": 17, "num_inference_steps": 2, "interpolation": 1},
        {"SHORT_SIDE": 48},  # the tiny VAE decodes 17 frames at 768x768 in ~10 s on one core (CPU conv3d)
        rife_inputs={"num_frames": 161, "interpolation": 2},  # 321 frames at 1360x768 (smoke: 17 -> 33)
    ),
    "v2v": Model(
        "predict_v2v",
        ("slicing",),
        {},
        {"width": 64, "height": 64, "max_frames": 4, "num_inference_steps": 4, "interpolation": 1},
        media="video",
    ),
    "t2v": Model(  # diffusers' CogVideoXPipeline example: the hub's sampler (DDIM), guidance 6, no dynamic CFG
        "predict_t2v",
        (),
        {"scheduler": "cogvideox_ddim", "use_dynamic_cfg": False},
        {
            "scheduler": "cogvideox_ddim",
            "use_dynamic_cfg": False,
            "num_frames": 9,
            "num_inference_steps": 2,
            "interpolation": 1,
        },
        media=None,
        reference_offload=False,
    ),
    "t2v-v2v": Model(  # diffusers' CogVideoXVideoToVideoPipeline example: DPM, strength 0.8, no dynamic CFG
        "predict_t2v",
        (),
        {"use_dynamic_cfg": False},
        {"use_dynamic_cfg": False, "num_frames": 9, "num_inference_steps": 3, "interpolation": 1},  # 3 x 0.8: 2 run
        media="video",
        pipe_attr="v2v",
        reference_offload=False,
    ),
}


def module_of(model: str) -> ModuleType:
    return importlib.import_module(MODELS[model].module)


def checkpoint_of(model: str) -> Checkpoint:
    return module_of(model).CHECKPOINT


def run_default(model: str, name: str) -> Any:
    """The default of one of the predictor's run() inputs, as its Input() declares it."""
    return inspect.signature(module_of(model).Predictor.run).parameters[name].default.default


# ---------------------------------------------------------------------------------------------------------------
# The models: published configs (full) or tiny ones (--smoke), random weights, built on the target device
# ---------------------------------------------------------------------------------------------------------------


def _make(device: str, dtype: torch.dtype, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct a module directly on `device` (default random init there), then cast it to `dtype`."""
    torch.manual_seed(SEED)
    with torch.device(device):
        module = build()
    return module.to(dtype).eval().requires_grad_(False)


def build_cogvideox(model: str, smoke: bool, device: str, dtype: torch.dtype, workdir: Path) -> Any:
    """CogVideoXImageToVideoPipeline with THUDM/CogVideoX-5b-I2V's (i2v) or CogVideoX1.5-5B-I2V's (i2v15)
    architecture, or CogVideoXPipeline with THUDM/CogVideoX-5b's (t2v, t2v-v2v), or a tiny one with the same
    architecture flags."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_weights._t5_tokenizer(workdir / "t5-tokenizer")  # 100 ids: fits the real 32128 vocab
    if smoke:
        t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        dit = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, time_embed_dim=32, latent=4)
        dit.update(sample_height=4, sample_width=6)  # i2v: 32x48 pixels
        vae = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2)
    else:  # google/t5-v1_1-xxl encoder; CogVideoX-5b(-I2V) / CogVideoX1.5-5B(-I2V) transformer and VAE
        t5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
        dit = dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, time_embed_dim=512, latent=16)
        dit.update(sample_height=60, sample_width=90)  # i2v: 480x720 pixels
        vae = dict(block_out_channels=(128, 256, 256, 512), layers_per_block=3, norm_num_groups=32)
    if model == "i2v15":  # rotary position embeddings only (any size), 2-frame patches, an ofs embedding
        dit.update(sample_height=96, sample_width=170, sample_frames=81, use_learned_positional_embeddings=False)
        dit.update(patch_size_t=2, patch_bias=False, ofs_embed_dim=dit["time_embed_dim"])  # the two are added
        vae.update(invert_scale_latents=True)
    else:  # 5b: learned position embeddings besides the rotary ones for image-to-video, rotary only for text
        dit.update(sample_frames=49, use_learned_positional_embeddings=model == "i2v")
    latent = dit.pop("latent")
    text_to_video = model.startswith("t2v")
    text_encoder = _make(
        device,
        dtype,
        lambda: T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer) if smoke else 32128,
                num_decoder_layers=t5["num_layers"],
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu",
                layer_norm_epsilon=1e-6,
                dropout_rate=0.0,
                tie_word_embeddings=False,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
                **t5,
            )
        ),
    )
    transformer = _make(
        device,
        dtype,
        lambda: CogVideoXTransformer3DModel(
            in_channels=latent if text_to_video else 2 * latent,  # image-to-video: + the image's latents
            out_channels=latent,
            flip_sin_to_cos=True,
            freq_shift=0,
            text_embed_dim=t5["d_model"],
            dropout=0.0,
            attention_bias=True,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=tiny_weights.COGVIDEOX_MAX_TEXT_SEQ_LENGTH,
            activation_fn="gelu-approximate",
            timestep_activation_fn="silu",
            norm_elementwise_affine=True,
            norm_eps=1e-5,
            spatial_interpolation_scale=1.875,
            temporal_interpolation_scale=1.0,
            use_rotary_positional_embeddings=True,
            **dit,
        ),
    )
    vae = _make(
        device,
        dtype,
        lambda: AutoencoderKLCogVideoX(
            latent_channels=latent,
            temporal_compression_ratio=4,
            sample_height=480,
            sample_width=720,
            scaling_factor=0.7,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **vae,
        ),
    )
    scheduler = CogVideoXDDIMScheduler(**tiny_weights.COGVIDEOX_5B_I2V_SCHEDULER_CONFIG)
    pipeline = CogVideoXPipeline if text_to_video else CogVideoXImageToVideoPipeline
    return pipeline(tokenizer, text_encoder, vae, transformer, scheduler)


def build_v2v(smoke: bool, device: str, dtype: torch.dtype, workdir: Path) -> Any:
    """VideoToVideoSDPipeline with cerspense/zeroscope_v2_XL's architecture (or a tiny one)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel, VideoToVideoSDPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_weights._clip_tokenizer()  # < 1000 ids: fits the real 49408 vocab
    if smoke:
        clip = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2)
        unet = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4)
        vae = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2)
    else:  # OpenCLIP ViT-H text tower (as SD 2); zeroscope v2 XL UNet3D; SD 2 VAE
        clip = dict(
            hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23, num_attention_heads=16
        )
        unet = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32)
        unet.update(attention_head_dim=64)
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    text_encoder = _make(
        device,
        dtype,
        lambda: CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer) if smoke else 49408,
                max_position_embeddings=tiny_weights.CLIP_MAX_LENGTH,
                hidden_act="gelu",
                layer_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **clip,
            )
        ),
    )
    unet = _make(
        device,
        dtype,
        lambda: UNet3DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
            downsample_padding=1,
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_eps=1e-5,
            cross_attention_dim=clip["hidden_size"],
            **unet,
        ),
    )
    vae = _make(
        device,
        dtype,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            act_fn="silu",
            latent_channels=4,
            sample_size=768,
            scaling_factor=0.18215,
            **vae,
        ),
    )
    scheduler = DDIMScheduler(**tiny_weights.ZEROSCOPE_V2_XL_SCHEDULER_CONFIG)
    return VideoToVideoSDPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )


def build(model: str, smoke: bool, device: str, dtype: torch.dtype, workdir: Path) -> Any:
    """The model's pipeline at full size (tiny with `smoke`), random weights, built on `device` in `dtype`."""
    if model == "v2v":
        return build_v2v(smoke, device, dtype, workdir)
    return build_cogvideox(model, smoke, device, dtype, workdir)


def make_predictor(model: str, pipe: Any) -> Any:
    """The predictor, set up by its own setup() (warm-up included) on `pipe`: load_pipeline stubbed to what it does
    after the download and placement (speed_up, so that setup() makes its Loras on fused projections, as in
    production); each configuration then places the pipeline its way."""

    def load_pipeline(checkpoint: Checkpoint, gpu: memory.GpuMemory) -> tuple[Any, dict[str, float]]:
        gpu.place(pipe)
        speed_up(denoiser(pipe), fuse=gpu.fused)
        gpu.after_fusing()
        pipe.set_progress_bar_config(disable=True)
        return pipe, {}

    def free_without_the_weights() -> int | None:  # the pipeline is already on the GPU: what setup would see free
        return torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated() if torch.cuda.is_available() else None

    module = module_of(model)
    loader = cogvideox if issubclass(module.Predictor, cogvideox.CogVideoXPredictor) else module
    with (
        mock.patch.object(loader, "load_pipeline", load_pipeline),
        mock.patch.object(memory, "free_gpu_bytes", free_without_the_weights),
    ):
        predictor = module.Predictor()
        predictor.setup()
    return predictor


def write_lora(pipe: Any, path: Path, seed: int) -> Path:
    """A rank-LORA_RANK LoRA on the transformer's LORA_TARGETS with random non-zero weights, saved as the trainers
    save theirs (save_lora_weights, peft config as metadata): peft adapts a meta-device copy of the transformer for
    the layers' names and shapes, so the real one stays untouched."""
    from peft import LoraConfig, get_peft_model_state_dict

    transformer, dtype = pipe.transformer, pipe.transformer.dtype
    with torch.device("meta"):
        shadow = type(transformer).from_config(transformer.config)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS)
    shadow.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for key, meta in get_peft_model_state_dict(shadow).items():  # lora_A: rank x in, lora_B: out x rank
        scale = meta.shape[1] ** -0.5 * (0.1 if ".lora_B." in key else 1.0)  # a change of ~10% of each output
        layers[key] = torch.randn(meta.shape, generator=generator, dtype=dtype).mul_(scale)
    type(pipe).save_lora_weights(
        path.parent,
        weight_name=path.name,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return path


# ---------------------------------------------------------------------------------------------------------------
# Measuring one run
# ---------------------------------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Probe:
    """Times a pipeline call's phases and keeps its final latents, without changing what it computes."""

    def __init__(self, pipe: Any, rife: Any = None) -> None:
        self.pipe, self.denoiser, self.rife = pipe, denoiser(pipe), rife
        self.cuda = torch.cuda.is_available()
        self.forward_inputs: tuple | None = None  # (args, kwargs) of one denoiser forward, for the FLOP count
        self.reset()

    def reset(self) -> None:
        self.phases = {"text_encode_s": 0.0, "vae_encode_s": 0.0, "vae_decode_s": 0.0, "interpolation_s": 0.0}
        self.frames_out: int | None = None  # what interpolation returned
        self.peaks: dict[str, float] = {}  # phase -> peak bytes allocated while it ran (CUDA)
        self.marks: list[list[Any]] = []  # [start, end] of each denoiser forward
        self.latents: torch.Tensor | None = None
        self.video: torch.Tensor | None = None

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _peak_start(self) -> None:
        if self.cuda:
            self.peaks["run"] = max(self.peaks.get("run", 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def _peak_end(self, phase: str) -> None:
        if self.cuda:
            self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated())
            self.peaks["run"] = max(self.peaks.get("run", 0), self.peaks[phase])

    def _timed(self, name: str, fn: Callable[..., Any], keep: bool = False) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            self._peak_start()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self._peak_end(name.removesuffix("_s"))
            self.phases[name] += time.perf_counter() - start
            if keep:  # decode_latents(latents) -> video
                self.latents, self.video = args[0].detach().float().cpu(), out.detach().float().cpu()
            return out

        return wrapper

    def _interpolate(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """RIFE's interpolate(frames, factor), timed when it makes frames (factor > 1)."""
        timed = self._timed("interpolation_s", fn)

        @functools.wraps(fn)
        def wrapper(frames: Any, factor: int) -> Any:
            if factor == 1:
                return fn(frames, factor)
            out = timed(frames, factor)
            self.frames_out = len(out)
            return out

        return wrapper

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.forward_inputs is None:
            self.forward_inputs = (args, kwargs)
        self._peak_start()
        self.marks.append([self._now(), None])

    def _post(self, module: Any, args: tuple, output: Any) -> None:
        self.marks[-1][1] = self._now()
        self._peak_end("denoise")

    def __enter__(self) -> Probe:
        self.pipe.encode_prompt = self._timed("text_encode_s", self.pipe.encode_prompt)
        self.pipe.vae.encode = self._timed("vae_encode_s", self.pipe.vae.encode)
        self.pipe.decode_latents = self._timed("vae_decode_s", self.pipe.decode_latents, keep=True)
        if self.rife is not None:
            self.rife.interpolate = self._interpolate(self.rife.interpolate)
        self.hooks = [
            self.denoiser.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.denoiser.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self.hooks:
            hook.remove()
        del self.pipe.encode_prompt, self.pipe.vae.encode, self.pipe.decode_latents
        if self.rife is not None:
            del self.rife.interpolate

    def forward_seconds(self) -> tuple[float, list[float]]:
        """(first forward's start to last forward's end, each forward's own time), in seconds."""
        if self.cuda:
            sync()
            spans = [start.elapsed_time(end) / 1e3 for start, end in self.marks]
            return self.marks[0][0].elapsed_time(self.marks[-1][1]) / 1e3, spans
        return self.marks[-1][1] - self.marks[0][0], [end - start for start, end in self.marks]


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode counts the CUDA attention kernels but not the CPU one (smoke runs): count it the same way."""
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _cpu_sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(probe: Probe) -> int:
    """FLOPs of one denoiser forward at the real shapes (the inputs captured from a run)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    args, kwargs = probe.forward_inputs
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe.denoiser(*args, **kwargs)
    sync()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------
# Inputs and runs
# ---------------------------------------------------------------------------------------------------------------


def write_inputs(workdir: Path, smoke: bool) -> tuple[Path, Path]:
    """A still image (i2v) and a 49-frame moving-gradient clip (v2v: its first 24; t2v-v2v: all), in a size to be
    fitted as users' are."""
    rng = np.random.default_rng(SEED)
    width, height = (128, 72) if smoke else (960, 640)
    x = np.linspace(0, 255, width)[None, :, None] * np.array([1.0, 0.6, 0.3])
    image = np.clip(x + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(workdir / "input.png")
    width, height = (128, 72) if smoke else (640, 360)
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    frames = [np.stack([np.roll(x, 7 * i, axis=1), y, np.full_like(x, (i * 37) % 256)], axis=-1) for i in range(49)]
    return workdir / "input.png", write_mp4(np.asarray(frames, dtype=np.uint8), 8, workdir / "input.mp4")


def run_inputs(model: str, smoke: bool, steps: int | None, image: Path, video: Path) -> dict[str, Any]:
    """The inputs the benchmark gives run(): the predictor's defaults but for the model's own, --steps, the seed."""
    spec = MODELS[model]
    inputs = {"prompt": PROMPT, "seed": SEED, **(spec.smoke_inputs if smoke else spec.inputs)}
    if steps:
        inputs["num_inference_steps"] = steps
    if spec.media:  # a cog.Path, as the server passes them
        inputs[spec.media] = CogPath(image if spec.media == "image" else video)
    return inputs


def one_run(run: Callable[[], Any], probe: Probe) -> dict[str, Any]:
    gc.collect()
    if probe.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    probe.reset()
    with probe:
        start = time.perf_counter()
        run()
        sync()
        e2e = time.perf_counter() - start
    denoise, spans = probe.forward_seconds()
    return {
        "e2e_s": e2e,
        "denoise_s": denoise,
        "forwards": len(spans),
        "forward_median_s": statistics.median(spans),
        **probe.phases,
        "frames_out": probe.frames_out,
        "peak_gpu_mem_gib": max(probe.peaks.get("run", 0), torch.cuda.max_memory_allocated()) / 2**30
        if probe.cuda
        else None,
        "phase_peaks_gib": {phase: peak / 2**30 for phase, peak in probe.peaks.items() if phase != "run"},
    }


def memory_model(predictor: Any, measured: dict[str, float]) -> dict[str, Any]:
    """memory.py's peaks for the placement and inputs of the last run, per phase, next to the measured ones (GiB):
    the placement the predictor planned, or for the reference (which places itself) model CPU offload, unfused;
    the VAE's savers as they were."""
    gpu, pipe = predictor.memory, predictor.pipe
    if gpu.request is None:
        return {}
    reference = getattr(gpu, "reference", False)
    placement = "offload" if reference or (gpu.current and gpu.current.placement == "offload") else "resident"
    fused = not reference and (gpu.current.fused if gpu.current else True)
    peaks, _ = memory.phase_peaks(
        gpu.arch,
        gpu.request,
        placement=placement,
        fused=fused,
        slicing=bool(pipe.vae.use_slicing),
        tiling=bool(pipe.vae.use_tiling),
        lora_bytes=memory.lora_bytes(denoiser(pipe)),
    )
    phases = {}
    for phase, predicted in peaks.items():
        got = measured.get(phase)
        ratio = got / (predicted / 2**30) if got else None
        phases[phase] = {"predicted_gib": predicted / 2**30, "measured_gib": got, "measured_over_predicted": ratio}
    return {"request": gpu.request.describe(), "batch": gpu.request.batch, "placement": placement, "phases": phases}


# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """One model under test: its predictor (on the built pipeline), what run() is given, where files go."""

    model: str
    predictor: Any
    device: str
    workdir: Path
    inputs: dict[str, Any]
    server: Any = None  # serves the LoRA files (lora configuration)
    saved_inputs: dict[str, Any] = field(default_factory=dict)  # run()'s inputs before the rife configuration

    @property
    def pipe(self) -> Any:
        """The pipeline setup() loaded (and placed): the one holding the models."""
        return self.predictor.pipe

    @property
    def called(self) -> Any:
        """The pipeline run() calls: t2v-v2v's is built on the loaded one's components."""
        return getattr(self.predictor, MODELS[self.model].pipe_attr)


def configure(name: str, bench: Bench) -> dict[str, Any]:
    """Put the pipeline in configuration `name` (applied in CONFIGS order); what was done, for the report."""
    pipe = bench.pipe
    if name == "reference":
        unfuse(denoiser(pipe))  # as the model card loads it
        gpu = bench.predictor.memory  # the reference places itself: run() must not plan the call
        gpu.plan_for, gpu.reference = (lambda request: None), MODELS[bench.model].reference_offload
        if not MODELS[bench.model].reference_offload:  # diffusers' example: pipe.to("cuda")
            pipe.to(bench.device)
            return {"placement": "resident" if bench.device != "cpu" else "cpu", "vae": vae_savers(pipe)}
        pipe.enable_model_cpu_offload(device=bench.device)
        for saver in MODELS[bench.model].reference_vae:
            getattr(pipe.vae, f"enable_{saver}")()
        emulated = "CPU: the offload hooks run, but there is no GPU to move the models to"
        emulated = emulated if bench.device == "cpu" else None
        return {"placement": "offload", "vae": vae_savers(pipe), "emulated": emulated}
    if name == "project":
        pipe.remove_all_hooks()  # undo the reference's offloading
        pipe.vae.disable_tiling()
        pipe.vae.disable_slicing()
        gpu = bench.predictor.memory
        gpu.__dict__.pop("plan_for", None)  # plan each call again (the reference stubbed it)
        gpu.__dict__.pop("reference", None)
        gpu.current = None
        chosen = gpu.place(pipe)
        speed_up(denoiser(pipe), fuse=gpu.fused)
        gpu.after_fusing()
        return {"placement": chosen.placement if chosen else "cpu", "vae": vae_savers(pipe)}
    if name == "rife":
        spec = MODELS[bench.model]
        inputs = spec.smoke_rife_inputs if bench.device == "cpu" else spec.rife_inputs  # CPU: --smoke
        bench.saved_inputs = dict(bench.inputs)
        bench.inputs.update(inputs)
        return {"rife_inputs": inputs}
    if name == "lora":
        return configure_lora(bench)
    if name == "fbc":
        from diffusers import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=FBC_THRESHOLD))
        return {"note": "effective TFLOP/s: cached steps skip most blocks"}
    if name == "compile":
        speed_up(denoiser(pipe), compile_blocks=True)
        return {"note": "warmup_s includes compiling"}
    raise ValueError(name)


def vae_savers(pipe: Any) -> str:
    """The VAE's memory savers on: "tiling", "slicing", both or none."""
    return "+".join(saver for saver in ("tiling", "slicing") if getattr(pipe.vae, f"use_{saver}"))


def unfuse(model: torch.nn.Module) -> None:
    """Undo speed_up's fusion entirely: the unfused processors back, and the fused projections' weights gone (they
    would add ~2.4 GB to what the reference holds and moves). The next speed_up() fuses afresh."""
    model.unfuse_qkv_projections()
    for module in model.modules():
        if getattr(module, "fused_projections", False):
            for name in ("to_qkv", "to_kv"):
                if hasattr(module, name):
                    delattr(module, name)
            module.fused_projections = False


def configure_lora(bench: Bench) -> dict[str, Any]:
    """Two random LoRAs served from 127.0.0.1, used through the predictor's Loras; run() is then given the first.

    Times the first use of a LoRA (download, check, load) and switching between the two once both are loaded.
    """
    loras = bench.predictor.loras
    os.environ["WEIGHTS_CACHE_DIR"] = str(bench.workdir / "cache")  # where Loras keeps its files
    bench.server = serve_directory(bench.workdir)
    urls = []
    for seed in (1, 2):
        path = write_lora(bench.pipe, bench.workdir / f"lora-{seed}.safetensors", seed)
        urls.append(f"http://127.0.0.1:{bench.server.server_port}/{path.name}")

    def use(url: str) -> float:
        start = time.perf_counter()
        loras.use(url, 1.0)
        sync()
        return time.perf_counter() - start

    first_use = use(urls[0])
    use(urls[1])
    switches = [use(url) for url in urls * 3]
    bench.inputs.update(lora_url=urls[0], lora_scale=1.0)  # run() makes it active itself, as in production
    return {
        "lora_rank": LORA_RANK,
        "lora_targets": LORA_TARGETS,
        "lora_mb": path.stat().st_size / 1e6,
        "lora_first_use_s": first_use,
        "lora_switch_s": statistics.median(switches),
    }


def unconfigure(name: str, bench: Bench) -> None:
    if name == "rife":
        bench.inputs.clear()
        bench.inputs.update(bench.saved_inputs)
    if name == "lora":
        bench.predictor.loras.use("", 0)  # back to the fused processors
        bench.pipe.unload_lora_weights()  # and to the plain layers, for the configurations after this one
        bench.inputs.pop("lora_url", None)
        bench.inputs.pop("lora_scale", None)
        if bench.server:
            bench.server.shutdown()
    if name == "fbc":
        bench.pipe.transformer.disable_cache()


def skip_reason(name: str, model: str, device: str) -> str | None:
    if name == "lora" and model == "v2v":
        return "zeroscope's predictor takes no LoRA"
    if name == "fbc" and model == "v2v":
        return "UNet3D has no cache support in diffusers"
    if name == "compile" and device == "cpu":
        return "speed_up compiles only on CUDA"
    return None


def summarise(runs: list[dict], flops: int | None, executed_steps: int, default_steps: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in runs[0]:
        if isinstance(runs[0][key], dict):  # phase_peaks_gib: the largest of the runs
            summary[key] = {k: max(run[key][k] for run in runs) for k in runs[0][key]}
            continue
        values = [run[key] for run in runs if run[key] is not None]
        summary[key] = statistics.median(values) if values else None
    summary["step_s"] = summary["denoise_s"] / executed_steps
    summary["tflops"] = flops * summary["forwards"] / summary["denoise_s"] / 1e12 if flops else None
    summary["e2e_s_at_default_steps"] = summary["e2e_s"] + (default_steps - executed_steps) * summary["step_s"]
    if summary.get("interpolation_s"):  # RIFE's share of the prediction, as run and at the default steps
        summary["interpolation_share"] = summary["interpolation_s"] / summary["e2e_s"]
        summary["interpolation_share_at_default_steps"] = summary["interpolation_s"] / summary["e2e_s_at_default_steps"]
    return summary


def max_abs_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None or a.shape != b.shape:  # none, or another frame count (i2v15's rife configuration)
        return None
    return (a - b).abs().max().item()


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = START + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, estimate: float) -> bool:
        return self.left() > estimate * 1.15 + 5


def bench_configs(model: str, args: argparse.Namespace, result: dict, save: Callable[[], None]) -> None:
    """Build the model, save it for the setup measurement, and run each configuration; results go into `result`."""
    checkpoint = checkpoint_of(model)
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", checkpoint.cuda_dtype)
    workdir = Path(result["_workdir"])
    start = time.perf_counter()
    pipe = build(model, args.smoke, device, dtype, workdir)
    sync()
    result["build_s"] = time.perf_counter() - start
    params = {
        name: sum(p.numel() for p in m.parameters()) for name, m in pipe.components.items() if hasattr(m, "parameters")
    }
    result["params"] = params
    print(f"[{model}] built {params} in {result['build_s']:.1f} s on {device} ({dtype})", flush=True)
    if "setup" in args.configs:
        start = time.perf_counter()
        pipe.save_pretrained(workdir / "cache" / checkpoint.name, safe_serialization=True)
        result["setup"] = {"save_s": time.perf_counter() - start}
        print(f"[{model}] saved for the setup measurement in {result['setup']['save_s']:.1f} s", flush=True)
        save()

    if args.smoke:
        for constant, value in MODELS[model].smoke_constants.items():
            setattr(module_of(model), constant, value)
    os.environ["WEIGHTS_CACHE_DIR"] = str(workdir / "cache")  # RIFE's weights (and the LoRAs) go there
    predictor = make_predictor(model, pipe)
    bench = Bench(
        model, predictor, device, workdir, run_inputs(model, args.smoke, args.steps, *write_inputs(workdir, args.smoke))
    )
    steps = bench.inputs.get("num_inference_steps", run_default(model, "num_inference_steps"))
    strength = run_default(model, "strength") if MODELS[model].media == "video" else 1.0
    executed = max(1, int(steps * strength))
    default_executed = int(run_default(model, "num_inference_steps") * strength)  # to extrapolate to the default
    result["settings"] = {
        **{k: v for k, v in bench.inputs.items() if not isinstance(v, Path)},
        "executed_steps": executed,
        "repeats": args.repeats,
    }
    probe = Probe(bench.called, predictor.rife)
    reference: dict[str, Any] = {}
    last_run_s = 0.0
    budget = Budget(args.budget_s)

    for name in [c for c in CONFIGS if c in args.configs and c != "setup"]:
        entry = result["configs"][name] = {"label": label(name, model), "lossless": name not in CHANGES_OUTPUT}
        if reason := skip_reason(name, model, device):
            entry["skipped"] = reason
            continue
        if last_run_s and not budget.allows(2 * last_run_s):
            entry["skipped"] = "time budget"
            continue
        try:
            entry.update(configure(name, bench))
            run = functools.partial(predictor.run, **bench.inputs)
            start = time.perf_counter()
            one_run(run, probe)
            entry["warmup_s"] = last_run_s = time.perf_counter() - start
            first_latents = probe.latents
            if result.get("flops_per_forward") is None:
                result["flops_per_forward"] = count_flops(probe)
                pipe.maybe_free_model_hooks()  # offloading: put the transformer back where a run leaves it
                frames, height, width = probe.video.shape[-3:]  # (batch, channels, frames, height, width)
                result["settings"].update(frames=frames, height=height, width=width)
            runs = []
            for _ in range(args.repeats):
                if not budget.allows(last_run_s):
                    entry["truncated"] = f"time budget: {len(runs)} of {args.repeats} repeats"
                    break
                runs.append(one_run(run, probe))
                last_run_s = runs[-1]["e2e_s"]
            if not runs:
                continue
            entry["runs"] = runs
            entry.update(summarise(runs, result["flops_per_forward"], executed, default_executed))
            entry["memory_model"] = memory_model(bench.predictor, runs[-1]["phase_peaks_gib"])
            if name == "fbc":  # the cached steps skip most blocks: not the FLOPs counted
                entry["tflops_effective"], entry["tflops"] = entry["tflops"], None
            entry["latents_repeat_max_abs_diff"] = max_abs_diff(first_latents, probe.latents)
            if not reference:
                reference.update(name=name, latents=probe.latents, video=probe.video, e2e_s=entry["e2e_s"])
                reference["step_s"] = entry["step_s"]
            entry["compared_with"] = reference["name"]
            entry["latents_max_abs_diff"] = max_abs_diff(reference["latents"], probe.latents)
            entry["video_max_abs_diff"] = max_abs_diff(reference["video"], probe.video)
            entry["speedup_vs_reference"] = reference["e2e_s"] / entry["e2e_s"]
            if name == "rife":
                frames, height, width = probe.video.shape[-3:]
                entry.update(frames_in=frames, height=height, width=width)
            entry["step_speedup_vs_reference"] = reference["step_s"] / entry["step_s"]
            if name == "reference":
                result["reference_latents_max_abs"] = probe.latents.abs().max().item()
            if name == "lora" and "e2e_s" in (project := result["configs"].get("project", {})):
                entry["step_s_over_project"] = entry["step_s"] / project["step_s"]
                entry["e2e_s_over_project"] = entry["e2e_s"] / project["e2e_s"]
        except Exception as exc:  # report and go on with the next configuration
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            unconfigure(name, bench)
            save()
            print(table_row(model, name, entry), flush=True)
    ref, proj = result["configs"].get("reference", {}), result["configs"].get("project", {})
    if "e2e_s" in ref and "e2e_s" in proj:
        result["reference_over_project"] = {"e2e": ref["e2e_s"] / proj["e2e_s"], "step": ref["step_s"] / proj["step_s"]}


def measure_setup(model: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The production setup() in a fresh process, timed from spawn to ready, weights on local disk.

    The weights were just written, so they are read from the page cache: a cold disk adds size / disk speed.
    """
    checkpoint = checkpoint_of(model)
    cache = workdir / "cache"
    folder = cache / checkpoint.name
    source = f"https://benchmark.invalid/{checkpoint.name}.tar"  # never fetched: the marker says the cache holds it
    files = [f for f in folder.rglob("*") if f.is_file()]
    marker = {"source": source, "commit": None, "bytes": sum(f.stat().st_size for f in files), "files": len(files)}
    (folder / weights.MARKER).write_text(json.dumps(marker))
    patches = MODELS[model].smoke_constants if args.smoke else {}
    code = (
        "import time; t0 = time.time()\n"
        f"import json, torch, {MODELS[model].module} as m\n"
        + "".join(f"m.{constant} = {value!r}\n" for constant, value in patches.items())
        + "t1 = time.time(); p = m.Predictor(); p.setup()\n"
        "torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
        "print('SETUP_RESULT ' + json.dumps({'start': t0, 'imported': t1, 'ready': time.time(), "
        "'timings': p.setup_timings}))\n"
    )
    env = {**os.environ, "WEIGHTS_CACHE_DIR": str(cache), checkpoint.variable: source}
    env.pop("TORCH_COMPILE", None)  # production default
    spawned = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(10.0, Budget(args.budget_s).left()),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"not ready within the time budget ({time.time() - spawned:.0f} s)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SETUP_RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
    child = json.loads(lines[-1].removeprefix("SETUP_RESULT "))
    return {
        "weights_gib": marker["bytes"] / 2**30,
        "setup_s": child["ready"] - spawned,  # process start to ready: interpreter, imports, load, placement, warm-up
        "python_start_s": child["start"] - spawned,
        "import_s": child["imported"] - child["start"],
        **child["timings"],  # setup()'s own: download_s (0: cached), load_s, warmup_s
        "note": "fresh process on the same machine; weights read from the page cache (just written)",
    }


# ---------------------------------------------------------------------------------------------------------------
# Reporting and the command line
# ---------------------------------------------------------------------------------------------------------------

HEADER = (
    "| model | config | e2e s | s/step | text enc s | VAE enc s | VAE dec s | peak GiB | TFLOP/s | vs ref | "
    "latents max|diff| | e2e s at default steps |\n" + "|---" * 12 + "|"
)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if value and abs(value) < 10**-digits else f"{value:.{digits}f}"
    return str(value)


def table_row(model: str, name: str, entry: dict) -> str:
    if "e2e_s" not in entry:
        return f"| {model} | {name} | {entry.get('skipped') or entry.get('error') or 'no runs'} |" + " |" * 10
    tflops = entry["tflops"] if entry["tflops"] is not None else entry.get("tflops_effective")
    cells = [
        model,
        name
        + (f" ({CHANGES_OUTPUT[name]})" if name in CHANGES_OUTPUT else "")
        + (" (emulated)" if entry.get("emulated") else ""),
        _fmt(entry["e2e_s"]),
        _fmt(entry["step_s"], 3),
        _fmt(entry["text_encode_s"]),
        _fmt(entry["vae_encode_s"]),
        _fmt(entry["vae_decode_s"]),
        _fmt(entry["peak_gpu_mem_gib"], 1),
        _fmt(tflops, 1),
        _fmt(entry["speedup_vs_reference"]) + "x",
        _fmt(entry["latents_max_abs_diff"], 4),
        _fmt(entry["e2e_s_at_default_steps"], 1),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    rows = [HEADER]
    notes = []
    for model, result in report.items():
        if model not in MODELS:
            continue
        rows += [table_row(model, name, entry) for name, entry in result["configs"].items()]
        if setup := result.get("setup"):
            notes.append(
                f"{model} setup (fresh process, weights on local disk): "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in setup.items() if isinstance(v, float | int))
                + (f"; error: {setup['error'][-300:]}" if "error" in setup else "")
            )
        if ratio := result.get("reference_over_project"):
            notes.append(f"{model} reference / project: e2e {ratio['e2e']:.2f}x, per step {ratio['step']:.2f}x")
        if "interpolation_share" in (rife := result["configs"].get("rife", {})):
            notes.append(
                f"{model} RIFE x2: {rife['frames_in']} -> {rife['frames_out']} frames at {rife['width']}x"
                f"{rife['height']} in {rife['interpolation_s']:.2f} s, {rife['interpolation_share']:.1%} of the "
                f"prediction ({rife['interpolation_share_at_default_steps']:.1%} at the default steps)"
            )
        if "step_s_over_project" in (lora := result["configs"].get("lora", {})):
            notes.append(
                f"{model} project + LoRA / project: per step {lora['step_s_over_project']:.2f}x, e2e "
                f"{lora['e2e_s_over_project']:.2f}x; rank-{lora['lora_rank']} LoRA ({lora['lora_mb']:.1f} MB): first "
                f"use (download + load) {lora['lora_first_use_s']:.3f} s, switch {lora['lora_switch_s']:.4f} s"
            )
    return "\n".join(rows + [""] + notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all", "both"], default="all", help="both: all (older name)")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: run()'s, 50 / 40; smoke 2 / 4)")
    parser.add_argument("--repeats", type=int, help="measured runs after the warm-up (default 3; smoke 1)")
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated, of {','.join(CONFIGS)} (default: "
        "reference,project,rife,lora,setup; smoke: reference,project,rife,lora,fbc,setup)",
    )
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting runs past this (default 540)")
    parser.add_argument("--json", type=Path, help="write the results here (after each configuration)")
    parser.add_argument("--workdir", type=Path, help="where to save the weights for the setup measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 models on the CPU: the code path only")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.configs = args.configs or (
        "reference,project,rife,lora,fbc,setup" if args.smoke else "reference,project,rife,lora,setup"
    )
    args.configs = args.configs.split(",")
    if unknown := set(args.configs) - set(CONFIGS):
        parser.error(f"unknown configs: {sorted(unknown)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke to check the code path on the CPU")
    return args


def main(argv: list[str] | None = None) -> dict:
    import diffusers
    import transformers

    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # not the float32-modules and deprecation notices
    transformers.utils.logging.set_verbosity_error()
    report: dict[str, Any] = {
        "meta": {
            "command": " ".join(sys.argv),
            "smoke": args.smoke,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "configs": args.configs,
            "note": "random weights at the real sizes (same compute as the real ones); medians over repeats",
        }
    }

    def save() -> None:
        if args.json:
            public = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in report.items()}
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(public, indent=2, default=str))
            tmp.replace(args.json)

    rife_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-rife-", dir=args.workdir))
    rife_server = serve_rife(rife_dir)
    print(HEADER, flush=True)
    for model in list(MODELS) if args.model in ("all", "both") else [args.model]:
        with tempfile.TemporaryDirectory(prefix=f"gpu-bench-{model}-", dir=args.workdir) as workdir:
            result = report[model] = {"configs": {}, "_workdir": workdir}
            bench_configs(model, args, result, save)
            gc.collect()  # the benchmark's pipeline is gone: give its GPU memory to the setup process
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if "setup" in args.configs:
                if Budget(args.budget_s).allows(60):
                    result["setup"].update(measure_setup(model, args, Path(workdir)))
                else:
                    result["setup"]["skipped"] = "time budget"
                save()
            result.pop("_workdir")
    rife_server.shutdown()
    shutil.rmtree(rife_dir, ignore_errors=True)
    print("\n" + markdown(report), flush=True)
    save()
    return report


def serve_rife(folder: Path) -> Any:
    """Random RIFE weights in the published layout, served from 127.0.0.1 as RIFE_WEIGHTS_URL (setup() fetches them
    into each model's cache, as in production)."""
    tiny_weights.build_rife(folder / "rife.pth")
    server = serve_directory(folder)
    os.environ["RIFE_WEIGHTS_URL"] = f"http://127.0.0.1:{server.server_port}/rife.pth"
    return server


if __name__ == "__main__":
    main()
