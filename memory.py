"""GPU memory: what each model holds on the GPU at the peak of each phase, the placement that fits, out-of-memory.

The model (``phase_peaks``), per phase of a prediction, in the checkpoint's dtype:

  weights     the components on the GPU in that phase: all of them when resident; with model CPU offload only the
              one running (accelerate's hooks move the others back). Parameter counts are those of the real configs
              (counted on the meta device: tests/test_memory.py, benchmarks/memory.py). Fusing Q/K/V adds a copy of
              the projections (2.2 GiB for CogVideoX): resident, the projections not in use are parked on the CPU
              (``use_unfused_qkv``), so one copy is on the GPU; under offload nothing is fused. Loaded LoRA adapters
              count with the denoiser, by their actual bytes.
  text encode T5 XXL or CLIP on up to 226/77 tokens: a small bound (TEXT_ACTIVATION).
  VAE encode  CogVideoX: the first frame (1 frame at W x H, or one tile); zeroscope: every frame at once, one at a
              time with slicing, in 768 x 768 tiles with tiling; plus the input video.
  denoise     CogVideoX: one transformer block's activations at the full sequence (latent frames / patch_t x H/16 x
              W/16 video tokens + 226 text tokens; CFG doubles the batch); SDPA's flash / memory-efficient kernels
              keep attention linear in the sequence. Zeroscope: the UNet's activations per latent pixel and frame.
  VAE decode  CogVideoX decodes 2-3 latent frames at a time (conv cache), so the peak is one such batch over the
              frame (or one 240 x 360 tile: the VAE config's 480x720 halved; assumed the same for 1.5) plus the video
              in the output dtype and its float32 copy; zeroscope decodes all frames at once unless sliced, tiles of
              768 x 768.

The activation coefficients are peaks measured on the CPU in float32 at real channel widths (benchmarks/memory.py,
peak resident set of a fresh process above the weights and input; reduced sizes, fitted per pixel or per token),
scaled to 2 bytes an element (bf16/fp16 halve every tensor; kernels that upcast internally, e.g. normalisations,
are covered by the margin). CUDA kernels and the caching allocator differ from the CPU's (cuDNN workspaces,
fragmentation, rounding), so a placement must leave ACTIVATION_MARGIN of the activations and HEADROOM free on top:
the figures are predictions for the first GPU run to check (benchmarks/gpu.py records each phase's peak next to
them). The measurements (MiB above weights + input, float32; per unit in elements):

  CogVideoX VAE decode, 3 latent frames   96x64: 422, 192x128: 1634     17,200 per output pixel + 17 MiB
  CogVideoX VAE encode, 1 frame           96x64:  87, 192x128:  293      2,920 per pixel + 19 MiB (3,120 used)
  SD VAE decode                           256x144 x1: 157, x4: 447; 512x288 x1: 562
                                                                          690 per pixel-frame + 270 per pixel
  SD VAE encode                           256x144 x4: 370                  660 per pixel-frame
  CogVideoX block (3072 wide), batch 2    2,926 tokens: 774, 5,626: 1470  11.0 x 3072 per token and sample
  UNet3D, batch 2                         512x288 x2: 392, x4: 764         10,600 per latent pixel, frame, sample
                                          (256x144 x2: 164, x4: 207: a ~90 MiB CPU constant dominates small sizes)

Tolerance: the suite checks one SD VAE decode within ACTIVATION_MARGIN (tests/test_memory.py); benchmarks/memory.py
prints every case against the model. Cross-check: zeroscope's card reports 15.3 GB for 30 frames at 1024x576;
the model gives 3.4 GiB of weights + 10.9 GiB of UNet activations = 15.4 GB at the denoising peak.

Placement (``GpuMemory``): the budget is the GPU memory free at setup, before any weights; each prediction gets the
fastest plan whose every phase fits: resident (fused Q/K/V), then resident with VAE slicing (zeroscope; CogVideoX
decodes a batch of one), then with tiling too, then model CPU offload (unfused) with the same VAE steps. Nothing
fits: the input is refused (InputError) naming the largest frame count that would fit at that size. Each decision
is logged with its figures.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from errors import InputError, ServiceError
from reporting import logger

GIB = 2**30
# Measured coefficients (benchmarks/memory.py, CPU float32): elements of activations at the peak, per unit below.
CV_DECODE_PER_PIXEL = 17_200.0  # CogVideoX VAE decode, one batch of 3 latent frames: per output pixel (W x H)
CV_DECODE_FIXED = 4.6e6  # elements, whatever the size
CV_ENCODE_PER_PIXEL = 3_120.0  # CogVideoX VAE encode of one frame: per pixel
SD_DECODE_PER_PIXEL = 690.0  # SD VAE decode: per pixel and frame decoded at once
SD_DECODE_ONCE_PER_PIXEL = 270.0  # SD VAE decode: per pixel, once whatever the frames decoded at once
SD_ENCODE_PER_PIXEL = 660.0  # SD VAE encode: per pixel and frame encoded at once
BLOCK_PER_TOKEN = 11.0  # CogVideoX block: per token, batch element and hidden unit (3072), its input excluded
BLOCK_INPUT_PER_TOKEN = 1.0  # the block's input (the residual stream), which the measurement excluded
UNET_PER_LATENT = 10_600.0  # UNet3D: per latent pixel (H/8 x W/8), frame and batch element
TEXT_ACTIVATION = 256 * 2**20  # T5 XXL on 226 tokens (gated FF 10240 wide) or CLIP on 77: tens of MB; a bound
ACTIVATION_MARGIN = 0.25  # CPU-measured activations may be off by this much on CUDA (kernels, allocator)
HEADROOM = int(1.5 * GIB)  # cuBLAS/cuDNN workspaces, allocator rounding, latents and small tensors


@dataclass(frozen=True)
class Request:
    """What a prediction asks for, as far as memory goes."""

    width: int
    height: int
    frames: int
    batch: int = 2  # classifier-free guidance (guidance_scale > 1) runs the denoiser on 2 samples

    def describe(self) -> str:
        return f"{self.frames} frames at {self.width}x{self.height}"


@dataclass(frozen=True)
class Architecture:
    """One served model's shapes: parameter counts of the real configs and what its activations depend on."""

    name: str
    family: str  # "cogvideox" or "unet3d"
    dtype_bytes: int
    text_encoder_params: int
    denoiser_params: int
    qkv_params: int  # the unfused Q/K/V (self-attention) and K/V (cross-attention) projections: the fused copy's size
    vae_params: int
    frame_choices: tuple[int, ...]  # the frame counts a prediction may ask for, ascending
    default: Request
    largest: Request
    vae_tile: tuple[int, int] = (768, 768)  # (height, width) of a decoded tile, pixels
    always_tile: bool = False  # tile the VAE in every plan (CogVideoX1.5, as the official demo), on the CPU too
    hidden: int = 3072
    text_tokens: int = 226
    patch_t: int = 1  # latent frames per token (CogVideoX1.5: 2, the latents padded to an even count)

    @property
    def weight_bytes(self) -> dict[str, int]:
        b = self.dtype_bytes
        return {
            "text_encoder": self.text_encoder_params * b,
            "denoiser": self.denoiser_params * b,
            "vae": self.vae_params * b,
        }

    def tokens(self, request: Request) -> int:
        """CogVideoX's sequence: latent frames (4x temporal compression, padded to patch_t) x 2x2 patches + text."""
        latent_frames = (request.frames - 1) // 4 + 1
        latent_frames += -latent_frames % self.patch_t
        return latent_frames // self.patch_t * (request.height // 16) * (request.width // 16) + self.text_tokens


_COGVIDEOX = {
    "family": "cogvideox",
    "dtype_bytes": 2,
    "text_encoder_params": 4_762_310_656,  # T5 v1.1 XXL encoder
    "vae_params": 215_583_907,
    "qkv_params": 1_189_472_256,  # 42 blocks x 3 x (3072 x 3072 + 3072)
}
ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture(
            name="CogVideoX-5b-I2V",
            denoiser_params=5_570_479_680 + 54_607_872,  # + the learned positional embeddings (a buffer)
            frame_choices=(9, 17, 25, 33, 41, 49),
            default=Request(720, 480, 49),
            largest=Request(720, 480, 49),
            vae_tile=(240, 360),
            **_COGVIDEOX,
        ),
        Architecture(
            name="CogVideoX1.5-5B-I2V",
            denoiser_params=5_571_594_880,
            frame_choices=(17, 33, 49, 65, 81, 97, 113, 129, 145, 161),
            default=Request(1360, 768, 81),
            largest=Request(1360, 768, 161),
            vae_tile=(240, 360),  # the VAE config's sample size halved (480x720, as 5b's: assumed, not read)
            always_tile=True,
            patch_t=2,
            **_COGVIDEOX,
        ),
        Architecture(
            name="zeroscope_v2_XL",
            family="unet3d",
            dtype_bytes=2,
            text_encoder_params=340_387_840,
            denoiser_params=1_411_233_860,
            qkv_params=151_035_904,
            vae_params=83_653_863,
            frame_choices=tuple(range(1, 49)),
            default=Request(1024, 576, 24),
            largest=Request(1280, 1280, 48),
        ),
    )
}


@dataclass(frozen=True)
class Plan:
    """A placement and the peaks the model predicts for it, per phase (bytes)."""

    placement: str  # "resident" or "offload"
    fused: bool
    slicing: bool
    tiling: bool
    peaks: dict[str, int]
    needs: dict[str, int]  # the peaks with ACTIVATION_MARGIN of their activations and HEADROOM on top
    budget: int

    @property
    def fits(self) -> bool:
        return max(self.needs.values()) <= self.budget

    def describe(self) -> str:
        vae = [name for name, on in (("slicing", self.slicing), ("tiling", self.tiling)) if on]
        peaks = ", ".join(f"{phase} {peak / GIB:.1f}" for phase, peak in self.peaks.items())
        return (
            f"{self.placement}{', fused QKV' if self.fused else ''}, VAE {' + '.join(vae) or 'whole'}; "
            f"predicted peaks (GiB): {peaks}; needs {max(self.needs.values()) / GIB:.1f} of {self.budget / GIB:.1f}"
        )


def phase_peaks(
    arch: Architecture, request: Request, *, placement: str, fused: bool, slicing: bool, tiling: bool, lora_bytes: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(peaks, activations) per phase in bytes: what is on the GPU at each phase's peak, and the activation part."""
    b, w = arch.dtype_bytes, arch.weight_bytes
    qkv = arch.qkv_params * b if fused and placement == "offload" else 0  # resident: the unused copy is parked
    denoiser = w["denoiser"] + qkv + lora_bytes
    resident = placement == "resident"
    everything = sum(w.values()) + lora_bytes
    activations = {
        "text_encode": TEXT_ACTIVATION,
        "vae_encode": vae_encode_bytes(arch, request, slicing=slicing, tiling=tiling),
        "denoise": denoise_bytes(arch, request),
        "vae_decode": vae_decode_bytes(arch, request, slicing=slicing, tiling=tiling),
    }
    weights = {
        "text_encode": everything if resident else w["text_encoder"],
        "vae_encode": everything if resident else w["vae"],
        "denoise": everything if resident else denoiser,
        "vae_decode": everything if resident else w["vae"],
    }
    return {phase: weights[phase] + activations[phase] for phase in activations}, activations


def denoise_bytes(arch: Architecture, request: Request) -> int:
    """The denoiser's activations at the peak of one forward (all of CFG's batch), plus the latents."""
    b = arch.dtype_bytes
    if arch.family == "cogvideox":
        per_token = BLOCK_PER_TOKEN + BLOCK_INPUT_PER_TOKEN
        return int(per_token * arch.tokens(request) * request.batch * arch.hidden * b)
    latent_pixels = (request.height // 8) * (request.width // 8)
    return int(UNET_PER_LATENT * latent_pixels * request.frames * request.batch * b)


def _pixels(arch: Architecture, request: Request, tiling: bool) -> int:
    """Pixels a VAE works on at once: the frame, or one tile when tiling and the frame is larger."""
    tile_h, tile_w = arch.vae_tile
    if tiling and (request.height > tile_h or request.width > tile_w):
        return tile_h * tile_w
    return request.height * request.width


def vae_encode_bytes(arch: Architecture, request: Request, *, slicing: bool, tiling: bool) -> int:
    b, pixels = arch.dtype_bytes, _pixels(arch, request, tiling)
    if arch.family == "cogvideox":  # image-to-video: only the first frame is encoded
        return int(CV_ENCODE_PER_PIXEL * pixels * b)
    video = 3 * request.width * request.height * request.frames * b
    return int(SD_ENCODE_PER_PIXEL * pixels * (1 if slicing else request.frames) * b) + video


def vae_decode_bytes(arch: Architecture, request: Request, *, slicing: bool, tiling: bool) -> int:
    """One decode batch (CogVideoX: 3 latent frames; SD VAE: every frame, or one with slicing) over the frame or one
    tile, plus the decoded video in the model's dtype and the pipeline's float32 copy of it."""
    b, pixels = arch.dtype_bytes, _pixels(arch, request, tiling)
    video = 3 * request.width * request.height * request.frames * (b + 4)
    if arch.family == "cogvideox":
        return int((CV_DECODE_PER_PIXEL * pixels + CV_DECODE_FIXED) * b) + video
    at_once = 1 if slicing else request.frames
    return int((SD_DECODE_PER_PIXEL * at_once + SD_DECODE_ONCE_PER_PIXEL) * pixels * b) + video


def calibration_figure(kind: str, *, dtype_bytes: int, **case: int) -> float:
    """The model's activation bytes for one of benchmarks/memory.py's CPU measurements (its output excluded where the
    measurement has none to accumulate)."""
    cv = replace(ARCHITECTURES["CogVideoX-5b-I2V"], dtype_bytes=dtype_bytes)
    sd = replace(ARCHITECTURES["zeroscope_v2_XL"], dtype_bytes=dtype_bytes)
    if kind == "cogvideox_vae_decode":
        frames, pixels = 1 + 4 * (case["latent_frames"] - 1), case["width"] * case["height"]
        return (CV_DECODE_PER_PIXEL * pixels + CV_DECODE_FIXED + 3 * pixels * frames) * dtype_bytes
    if kind == "cogvideox_vae_encode":
        return vae_encode_bytes(cv, Request(case["width"], case["height"], 1), slicing=False, tiling=False)
    if kind == "sd_vae_decode":
        per_frame, once = SD_DECODE_PER_PIXEL, SD_DECODE_ONCE_PER_PIXEL
        return (per_frame * case["frames"] + once) * case["width"] * case["height"] * dtype_bytes
    if kind == "sd_vae_encode":
        return SD_ENCODE_PER_PIXEL * case["frames"] * case["width"] * case["height"] * dtype_bytes
    if kind == "cogvideox_block":
        return BLOCK_PER_TOKEN * case["tokens"] * case["batch"] * cv.hidden * dtype_bytes
    if kind == "unet3d":
        return denoise_bytes(sd, Request(case["width"], case["height"], case["frames"], case["batch"]))
    raise ValueError(kind)


def plan(
    arch: Architecture,
    request: Request,
    budget: int,
    *,
    lora_bytes: int = 0,
    fused: bool | None = None,
    always_tile: bool = False,
) -> Plan:
    """The fastest plan that fits `budget` bytes, or the most frugal one (``fits`` False) when none does.

    `fused`: whether the denoiser's Q/K/V are fused (None: fuse when resident, as setup decides).
    """
    # (slicing, tiling) from fastest to most frugal; CogVideoX decodes one video, a batch of one: slicing does nothing
    steps = [(False, False), (False, True)]
    if arch.family == "unet3d":
        steps = [(False, False), (True, False), (True, True)]
    candidates = []
    for placement in ("resident", "offload"):
        for slicing, tiling in steps:
            if always_tile and not tiling:
                continue
            is_fused = placement == "resident" if fused is None else fused
            peaks, activations = phase_peaks(
                arch,
                request,
                placement=placement,
                fused=is_fused,
                slicing=slicing,
                tiling=tiling,
                lora_bytes=lora_bytes,
            )
            needs = {p: peaks[p] + int(ACTIVATION_MARGIN * activations[p]) + HEADROOM for p in peaks}
            candidate = Plan(placement, is_fused, slicing, tiling, peaks, needs, budget)
            if candidate.fits:
                return candidate
            candidates.append(candidate)
    return min(candidates, key=lambda c: max(c.needs.values()))


def largest_fitting_frames(arch: Architecture, request: Request, budget: int, **options: Any) -> int:
    """The most frames (of the model's choices) that fit at the request's size; 0 if none does."""
    fitting = [f for f in arch.frame_choices if plan(arch, replace(request, frames=f), budget, **options).fits]
    return max(fitting, default=0)


def free_gpu_bytes() -> int | None:
    """Free memory on the current CUDA device, or None without CUDA."""
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


class GpuMemory:
    """One pipeline's placement on the GPU, planned per prediction from the memory model and the budget.

    Make it before loading the weights (its budget is the memory free then), `place` the pipeline once loaded, and
    run each pipeline call inside `fit`.
    """

    def __init__(self, model: str, *, frames_input: str = "num_frames") -> None:
        """`model`: the checkpoint's name (ARCHITECTURES); `frames_input`: the input that sets the frame count, named
        when a request is refused."""
        self.arch = ARCHITECTURES[model]
        self.always_tile, self.frames_input = self.arch.always_tile, frames_input
        self.budget = free_gpu_bytes()
        self.pipe: Any = None
        self.current: Plan | None = None
        self.request: Request | None = None  # the last call's

    @property
    def fused(self) -> bool:
        """Whether setup should fuse the denoiser's Q/K/V: on the CPU (tests: the GPU's resident path) and when the
        default request runs resident; never under CPU offload, where the copy would move with every call."""
        return self.current is None or self.current.fused

    def place(self, pipe: Any) -> Plan | None:
        """Place a freshly loaded pipeline for the model's default request (CPU: stays there)."""
        self.pipe = pipe
        if self.budget is None:
            pipe.to("cpu")
            if self.always_tile:
                pipe.vae.enable_tiling()
            logger.info("Pipeline placement: cpu%s", ", VAE tiling" if self.always_tile else "")
            return None
        chosen = plan(self.arch, self.arch.default, self.budget, always_tile=self.always_tile)
        if chosen.placement == "resident":  # setup also holds both Q/K/V copies for a moment while fusing
            extra = self.arch.qkv_params * self.arch.dtype_bytes
            if sum(self.arch.weight_bytes.values()) + extra + HEADROOM > self.budget:
                chosen = replace(chosen, fused=False)
        self._apply(chosen)
        logger.info(
            "GPU memory at setup: %.1f GiB free; default %s: %s",
            self.budget / GIB,
            self.arch.default.describe(),
            chosen.describe(),
        )
        return chosen

    def after_fusing(self) -> None:
        """Resident and fused: park the unfused projections on the CPU until a LoRA needs them."""
        if self.current and self.current.placement == "resident":
            use_unfused_qkv(denoiser(self.pipe), False)

    def plan_for(self, request: Request) -> Plan | None:
        """The plan for `request` (None on the CPU); refuses (InputError) a request that fits in no placement."""
        if self.budget is None:
            return None
        fused = self.current.fused if self.current else None
        loras = lora_bytes(denoiser(self.pipe))
        chosen = plan(self.arch, request, self.budget, lora_bytes=loras, fused=fused, always_tile=self.always_tile)
        if not chosen.fits:
            best = largest_fitting_frames(self.arch, request, self.budget, fused=fused, always_tile=self.always_tile)
            what_fits = (
                f"at most {best} frames fit at {request.width}x{request.height}"
                if best
                else f"no frame count fits at {request.width}x{request.height}: try a smaller size"
            )
            raise InputError(
                f"Invalid input `{self.frames_input}`: {request.describe()} need about "
                f"{max(chosen.needs.values()) / GIB:.0f} GiB of GPU memory even with CPU offload and VAE tiling, more "
                f"than the {self.budget / GIB:.0f} GiB this GPU has free; {what_fits}."
            )
        return chosen

    @contextmanager
    def fit(self, *, width: int, height: int, frames: int, guidance_scale: float) -> Iterator[Plan | None]:
        """Plan the call (refusing what cannot fit before any work), apply the plan, and turn out-of-memory into one
        sentence that names what fits."""
        request = self.request = Request(width, height, frames, 2 if guidance_scale > 1 else 1)
        chosen = self.plan_for(request)
        if chosen is not None:
            self._apply(chosen)
            logger.info("GPU memory for %s: %s", request.describe(), chosen.describe())
        try:
            yield chosen
        except torch.OutOfMemoryError as error:
            # The traceback keeps the failed step's frames, and so its tensors, alive (even outside this block: the
            # caller's `with` is still handling the error): clear their locals so the memory can be given back.
            traceback.clear_frames(error.__traceback__)
            del error
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            hint = ""
            if self.budget is not None:
                best = largest_fitting_frames(self.arch, request, self.budget)
                hint = f" (the memory model predicted {best} frames to fit here: please report this)"
            raise ServiceError(
                f"Out of GPU memory generating {request.describe()}: try fewer frames or a smaller size{hint}."
            ) from None

    def _apply(self, chosen: Plan) -> None:
        """Make the pipeline match `chosen`: placement (moving it only when it changes) and the VAE's savers."""
        pipe, previous = self.pipe, self.current
        if previous is None or previous.placement != chosen.placement:
            if chosen.placement == "offload":
                pipe.enable_model_cpu_offload()
            else:
                if previous is not None:
                    pipe.remove_all_hooks()
                pipe.to("cuda")
                if previous is not None and previous.fused:
                    use_unfused_qkv(denoiser(pipe), bool(getattr(denoiser(pipe), "_lora_active", False)))
        vae = pipe.vae
        vae.enable_slicing() if chosen.slicing else vae.disable_slicing()
        vae.enable_tiling() if chosen.tiling else vae.disable_tiling()
        self.current = chosen


def denoiser(pipe: Any) -> torch.nn.Module:
    """The model the denoising loop calls: CogVideoX's transformer or zeroscope's UNet3D."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def lora_bytes(model: torch.nn.Module) -> int:
    """Bytes of every LoRA adapter loaded into `model` (peft's lora_A/lora_B layers), active or not."""
    total = 0
    for name, parameter in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            total += parameter.numel() * parameter.element_size()
    return total


def use_unfused_qkv(model: torch.nn.Module, unfused: bool, *, device: torch.device | None = None) -> None:
    """Keep on the GPU only the Q/K/V projections in use, the others on the CPU: the unfused ones (to_q/to_k/to_v,
    with their LoRA layers) while a LoRA is active, else the fused ones (to_qkv/to_kv). Without fusion, or when
    `model` is not resident on a GPU (CPU, CPU offload), nothing moves. `device`: the GPU (default: the model's)."""
    model._lora_active = unfused  # read back when the placement changes
    attentions = [m for m in model.modules() if getattr(m, "fused_projections", False)]
    device = device or next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    if not attentions or device is None or getattr(model, "_hf_hook", None) is not None:
        return
    for attention in attentions:
        fused = [m for m in (getattr(attention, "to_qkv", None), getattr(attention, "to_kv", None)) if m is not None]
        separate = [attention.to_k, attention.to_v]
        if hasattr(attention, "to_qkv"):
            separate.insert(0, attention.to_q)
        parked, used = (fused, separate) if unfused else (separate, fused)
        for module in parked:  # first, so that both copies are never on the GPU together
            module.to("cpu")
        for module in used:
            module.to(device)
