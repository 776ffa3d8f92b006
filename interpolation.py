"""RIFE frame interpolation: k - 1 new frames between each pair of generated frames, on the pipeline's device.

``load_rife(offload=...)`` fetches the IFNet weights into the weights cache (once) and loads them strictly;
``Rife.interpolate(frames, factor)`` turns F frames into (F - 1) x factor + 1. The generated frames are copied to
their positions unchanged (bit for bit); only the frames in between are new. Between two frames that are nearly
identical (SSIM > 0.996) or across a scene cut (SSIM < 0.2), both measured on 32x32 downsamples as THUDM's
CogVideoX composite demo does, the new frames are copies of the first frame of the pair instead of warped ones.

The model is IFNet v4.26 "heavy" (5 IFBlocks of widths 192/128/96/64/32 and a 16-channel feature head), written
here from the architecture of RIFE (Huang et al., "Real-Time Intermediate Flow Estimation for Video Frame
Interpolation", ECCV 2022; hzwer/Practical-RIFE, MIT licence) as EutropicAI/cccv (MIT licence) packages v4.26 heavy,
with the same parameter names, so its published state dict loads strictly. Our own module rather than the cccv
package: cccv imports opencv (whose import needs libGL.so.1, absent from the CUDA base image) and torchvision, and
loads weights non-strictly (a wrong file would run half-initialised).

Weights: $RIFE_WEIGHTS_URL, default cccv's model zoo file (checked against its sha256); an override (an https URL
or hf://OWNER/NAME/FILE.pth) is guarded by strict, weights-only loading.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from errors import InputError, ServiceError, WeightsError
from reporting import logger
from weights import Source, cache_dir, cache_file, hub_file

VARIABLE = "RIFE_WEIGHTS_URL"
DEFAULT_SOURCE = "https://github.com/EutropicAI/cccv/releases/download/model_zoo/RIFE_IFNet_v426_heavy.pth"
DEFAULT_SHA256 = "4cc518e172156ad6207b9c7a43364f518832d83a4325d484240493a9e2980537"
MAX_FILE_BYTES = 500 * 10**6  # the published file is tens of MB
DOWNLOAD_BASE_S, DOWNLOAD_MIN_RATE = 300.0, 1e6  # a download's time limit: this, plus its size at this many bytes/s
MAX_OUTPUT_FPS = 60
DUPLICATE_SSIM, SCENE_CUT_SSIM = 0.996, 0.2  # THUDM's composite demo's thresholds, on 32x32 downsamples
PAD_MULTIPLE = 64  # the coarsest block works at 1/16 and its convolutions halve twice more
BATCH = 8  # frames made per IFNet call
CUDA_DTYPE = torch.float16  # bfloat16's 8-bit mantissa is too coarse for flows in pixels

WIDTHS = (192, 128, 96, 64, 32)  # IFBlock widths, coarse to fine
SCALES = (16, 8, 4, 2, 1)  # the resolution divisor each IFBlock works at
FEATURES = 16  # channels of the feature head's output, per frame


# --- IFNet v4.26 heavy ------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2, True))


class Head(nn.Module):
    """Per-frame features at full resolution (down by 2, three convolutions, up by 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn0 = nn.Conv2d(3, 16, 3, 2, 1)
        self.cnn1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(16, FEATURES, 4, 2, 1)
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.cnn0(x))
        x = self.relu(self.cnn1(x))
        x = self.relu(self.cnn2(x))
        return self.cnn3(x)


class ResConv(nn.Module):
    """A residual 3x3 convolution with a learned per-channel gain (beta)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class IFBlock(nn.Module):
    """At 1/scale: estimates flow (4: both directions), a blend mask (1) and features (8) for the next block."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(_conv(cin, c // 2, 2), _conv(c // 2, c, 2))
        self.convblock = nn.Sequential(*(ResConv(c) for _ in range(8)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * 13, 4, 2, 1), nn.PixelShuffle(2))

    def forward(
        self, x: torch.Tensor, flow: torch.Tensor | None, scale: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.interpolate(x, scale_factor=1 / scale, mode="bilinear", align_corners=False)
        if flow is not None:
            flow = F.interpolate(flow, scale_factor=1 / scale, mode="bilinear", align_corners=False) / scale
            x = torch.cat((x, flow), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))
        out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward-warp `image` by `flow` (pixels, x then y); sampled in float32, whatever the model's dtype."""
    _, _, h, w = flow.shape
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device).view(1, h, 1).expand(1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device).view(1, 1, w).expand(1, h, w)
    flow = flow.float()
    grid = torch.stack((xs + flow[:, 0] / ((w - 1) / 2), ys + flow[:, 1] / ((h - 1) / 2)), dim=-1)
    out = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(image.dtype)


class IFNet(nn.Module):
    """IFNet v4.26 heavy: a middle frame at `timestep` in [0, 1] between img0 and img1, (B, 3, H, W) in [0, 1].

    H and W must be multiples of PAD_MULTIPLE. Five IFBlocks refine the flows coarse to fine (1/16 to 1/1), each
    seeing both frames warped by the flows so far, their warped features, the timestep, the mask and the previous
    block's features; the frame is the two warped frames blended by the final mask.
    """

    def __init__(self) -> None:
        super().__init__()
        first = 3 + 3 + 2 * FEATURES + 1  # img0, img1, f0, f1, timestep
        refine = first + 1 + 8 + 4  # + mask, previous features, flow
        self.block0 = IFBlock(first, WIDTHS[0])
        self.block1 = IFBlock(refine, WIDTHS[1])
        self.block2 = IFBlock(refine, WIDTHS[2])
        self.block3 = IFBlock(refine, WIDTHS[3])
        self.block4 = IFBlock(refine, WIDTHS[4])
        self.encode = Head()

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """`timestep`: (B,) in [0, 1]; 0 is img0's time, 1 is img1's."""
        b, _, h, w = img0.shape
        t = timestep.to(img0.dtype).view(b, 1, 1, 1).expand(b, 1, h, w)
        f0, f1 = self.encode(img0), self.encode(img1)
        blocks = (self.block0, self.block1, self.block2, self.block3, self.block4)
        flow, mask, feat = blocks[0](torch.cat((img0, img1, f0, f1, t), 1), None, SCALES[0])
        warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:])
        for block, scale in zip(blocks[1:], SCALES[1:], strict=True):
            wf0, wf1 = warp(f0, flow[:, :2]), warp(f1, flow[:, 2:])
            x = torch.cat((warped0, warped1, wf0, wf1, t, mask, feat), 1)
            delta, mask, feat = block(x, flow, scale)
            flow = flow + delta
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:])
        mask = torch.sigmoid(mask)
        return warped0 * mask + warped1 * (1 - mask)


# --- duplicates and scene cuts ----------------------------------------------------------------------------------------


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of image pairs (N, C, H, W) in [0, 1], one value per pair: an 11-tap Gaussian window (sigma 1.5) over
    channels, rows and columns at once, edges replicated (as RIFE's ssim_matlab, which THUDM's thresholds assume)."""
    taps = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    taps = (taps / taps.sum()).float()
    window = (taps.view(11, 1, 1) * taps.view(1, 11, 1) * taps.view(1, 1, 11)).view(1, 1, 11, 11, 11)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(F.pad(x.unsqueeze(1), (5,) * 6, mode="replicate"), window.to(x.device))

    a, b = a.float(), b.float()
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def copy_pairs(frames: torch.Tensor) -> torch.Tensor:
    """For each consecutive pair of frames (F, 3, H, W): True where new frames are copies (duplicate or scene cut)."""
    small = F.interpolate(frames.float(), size=(32, 32), mode="bilinear", align_corners=False)
    similarity = ssim(small[:-1], small[1:])
    return (similarity > DUPLICATE_SSIM) | (similarity < SCENE_CUT_SSIM)


# --- the interpolator -------------------------------------------------------------------------------------------------


def output_fps(fps: float, factor: int, *, from_input: bool = False) -> float:
    """The output's frame rate, fps x factor; above MAX_OUTPUT_FPS an InputError naming both inputs.
    ``from_input``: fps was left blank and is the input video's."""
    if fps * factor > MAX_OUTPUT_FPS + 1e-9:
        given = f"the input's {fps:g} fps (fps is blank)" if from_input else f"{fps:g} fps"
        raise InputError(
            f"Invalid inputs `fps` and `interpolation`: {given} x {factor} is {fps * factor:g} fps, over "
            f"{MAX_OUTPUT_FPS}: lower fps or interpolation."
        )
    return fps * factor


class Rife:
    """IFNet on the pipeline's device: on CUDA in float16, on the CPU (tests) in float32. ``offloaded()`` says, at each
    call, whether the pipeline runs under CPU offload (the placement may change per prediction): then the model
    waits on the CPU and is on the GPU only while it interpolates; otherwise it stays on the GPU."""

    def __init__(self, model: IFNet, *, offloaded: Callable[[], bool]) -> None:
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = CUDA_DTYPE if cuda else torch.float32
        self.offloaded = offloaded
        self.model = model.eval().to(self.dtype)  # on the CPU until the first interpolation

    @torch.inference_mode()
    def interpolate(self, frames: np.ndarray, factor: int) -> np.ndarray:
        """(F, H, W, 3) float frames in [0, 1] -> ((F - 1) x factor + 1, H, W, 3): the given frames at every
        factor-th position, unchanged; between them factor - 1 frames at times 1/factor, 2/factor, ..."""
        if factor == 1 or len(frames) < 2:
            return frames
        count, height, width, _ = frames.shape
        out = np.empty(((count - 1) * factor + 1, height, width, 3), dtype=frames.dtype)
        out[::factor] = frames
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        copies = copy_pairs(video).tolist()
        for pair, copy in enumerate(copies):
            if copy:
                out[pair * factor + 1 : (pair + 1) * factor] = frames[pair]
        jobs = [(p, j) for p, copy in enumerate(copies) if not copy for j in range(1, factor)]
        logger.info(
            "Interpolation x%d: %d new frames, %d copied (%d of %d pairs duplicate or across a scene cut)",
            factor,
            len(out) - count,
            sum(copies) * (factor - 1),
            sum(copies),
            len(copies),
        )
        if not jobs:
            return out
        try:
            self.model.to(self.device)
            done, batch_size = 0, BATCH
            while done < len(jobs):
                batch = jobs[done : done + batch_size]
                try:
                    made = self._frames(video, batch, factor)
                except torch.OutOfMemoryError:
                    if batch_size == 1:
                        raise ServiceError(
                            f"Out of GPU memory interpolating {width}x{height} frames: try a lower interpolation."
                        ) from None
                    batch_size //= 2  # the exception is gone here, and with it the failed batch's tensors
                    torch.cuda.empty_cache()
                    continue
                for (p, j), frame in zip(batch, made, strict=True):
                    out[p * factor + j] = frame
                done += len(batch)
        finally:
            if self.offloaded():
                self.model.to("cpu")
        return out

    def _frames(self, video: torch.Tensor, batch: list[tuple[int, int]], factor: int) -> np.ndarray:
        """The new frames of `batch` ((pair, j): the frame at time j / factor after frame `pair`), (B, H, W, 3)."""
        height, width = video.shape[2:]
        pad = (0, -width % PAD_MULTIPLE, 0, -height % PAD_MULTIPLE)  # right and bottom, zeros: Practical-RIFE's
        pairs = torch.tensor([p for p, _ in batch])
        img0 = F.pad(video[pairs].to(self.device, self.dtype), pad)
        img1 = F.pad(video[pairs + 1].to(self.device, self.dtype), pad)
        t = torch.tensor([j / factor for _, j in batch], device=self.device)
        made = self.model(img0, img1, t)[:, :, :height, :width].clamp(0, 1)
        return made.permute(0, 2, 3, 1).float().cpu().numpy()


def load_rife(*, offloaded: Callable[[], bool]) -> tuple[Rife, dict[str, float]]:
    """Fetch the IFNet weights named by $RIFE_WEIGHTS_URL into the weights cache (once) and load them strictly;
    ``offloaded``: whether the pipeline runs under CPU offload now (see Rife).

    Returns the interpolator and setup metrics (rife_download_s, rife_load_s). Every failure is one WeightsError
    sentence naming RIFE_WEIGHTS_URL.
    """
    start = time.perf_counter()
    text = os.environ.get(VARIABLE) or DEFAULT_SOURCE
    try:
        source = Source.parse(text, file=True)
    except ValueError:
        raise WeightsError(
            f"{VARIABLE} is {text!r}: use an https:// URL of a .pth file, or hf://OWNER/NAME/FILE.pth."
        ) from None
    path = cache_dir() / "rife" / f"{hashlib.sha256(source.text.encode()).hexdigest()[:16]}.pth"
    where = f"{VARIABLE} ({source.text})"
    try:
        pinned = hub_file(source, ".pth").source if source.repo and not path.is_file() else source
        metrics = cache_file(
            pinned,
            path,
            max_bytes=MAX_FILE_BYTES,
            time_limit=lambda size: DOWNLOAD_BASE_S + (size or MAX_FILE_BYTES) / DOWNLOAD_MIN_RATE,
            make_room=lambda size: None,  # one small file: nothing to evict
        )
    except WeightsError as error:
        raise WeightsError(f"Cannot fetch the RIFE weights in {where}: {error}.") from None
    try:
        if source.text == DEFAULT_SOURCE and (digest := _sha256(path)) != DEFAULT_SHA256:
            raise WeightsError(
                f"The RIFE weights in {where} are not the published file: sha256 {digest}, expected {DEFAULT_SHA256}."
            )
        model = _load_strictly(path, where)
    except WeightsError:
        path.unlink(missing_ok=True)  # not kept: the source may serve the right file later
        raise
    rife = Rife(model, offloaded=offloaded)
    timings = {"rife_download_s": metrics["download_s"], "rife_load_s": time.perf_counter() - start}
    timings["rife_load_s"] -= metrics["download_s"]
    logger.info("RIFE (IFNet v4.26 heavy) from %s on %s, %s", source.text, rife.device, rife.dtype)
    return rife, timings


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_strictly(path: Path, where: str) -> IFNet:
    """IFNet with every parameter loaded from the file and every stored tensor used (a `module.` prefix is
    stripped); the file is read weights-only, so a pickle holding code fails unexecuted."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError (code, or not a pickle), RuntimeError, EOFError...
        message = " ".join(str(error).split())[:200]
        raise WeightsError(
            f"The RIFE weights in {where} could not be read as a weights-only PyTorch state dict: {message}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"The RIFE weights in {where} are not a state dict of tensors.")
    state = {str(key).removeprefix("module."): value for key, value in state.items()}
    model = IFNet()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = [
        f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
        f"{len(extra)} unknown tensors (e.g. {extra[0]})" if extra else "",
        f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)}, expected "
        f"{tuple(expected[shapes[0]].shape)})"
        if shapes
        else "",
    ]
    if any(problems):
        raise WeightsError(
            f"The RIFE weights in {where} are not IFNet v4.26 heavy: {', '.join(p for p in problems if p)}."
        )
    model.load_state_dict(state, strict=True)
    return model
