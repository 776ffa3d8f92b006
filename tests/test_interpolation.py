"""RIFE frame interpolation: the IFNet module against an independent reference on the published layout, frame
counts and positions, the duplicate / scene-cut rule, weights refused at setup, and frame counts and fps per model.

The weights are random (the real ones cannot be downloaded here) in the published layout at the real widths
(tiny_weights.rife_layout, written from cccv's source): what a trained IFNet learns (t=0 gives frame 0, symmetry)
cannot be tested on them; the structure, the arithmetic and everything around the model can.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import interpolation
import tiny_weights
from conftest import load_predictor, read_mp4, write_video
from errors import InputError, ServiceError, WeightsError
from interpolation import IFNet, Rife

# --- the module -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Random weights as published: torch.save'd, `module.` keys, float32."""
    path = tiny_weights.build_rife(tmp_path_factory.mktemp("rife") / "rife.pth", seed=3)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def model(state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> IFNet:
    path = tmp_path_factory.mktemp("rife-load") / "rife.pth"
    torch.save(state, path)
    return interpolation._load_strictly(path, "RIFE_WEIGHTS_URL (test)")


def test_published_layout_loads_strictly_every_tensor(state: dict[str, torch.Tensor], model: IFNet) -> None:
    layout = tiny_weights.rife_layout()
    assert len(layout) == 158 and sum(torch.Size(s).numel() for s in layout.values()) == 5_723_156
    assert {k: tuple(v.shape) for k, v in state.items()} == layout
    loaded = model.state_dict()
    assert set(loaded) == {key.removeprefix("module.") for key in layout}
    for key, value in state.items():
        assert torch.equal(loaded[key.removeprefix("module.")], value), key


def reference_ifnet(sd: dict[str, torch.Tensor], img0: torch.Tensor, img1: torch.Tensor, t: float) -> torch.Tensor:
    """IFNet v4.26 heavy written independently, straight from the state dict (functional, pixel-coordinate warps),
    following the structure of cccv's ifnet_arch.py."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}

    def conv(x: torch.Tensor, name: str, stride: int = 1) -> torch.Tensor:
        return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride, 1)

    def up(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.conv_transpose2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], 2, 1)

    def act(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.2)

    def resize(x: torch.Tensor, factor: float) -> torch.Tensor:
        return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)

    def warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[2:]
        y, x = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
        gx = 2 * (x + flow[:, 0]) / (w - 1) - 1
        gy = 2 * (y + flow[:, 1]) / (h - 1) - 1
        return F.grid_sample(img, torch.stack((gx, gy), -1), "bilinear", "border", align_corners=True)

    def block(i: int, x: torch.Tensor, flow: torch.Tensor | None, scale: int) -> tuple:
        x = resize(x, 1 / scale)
        if flow is not None:
            x = torch.cat((x, resize(flow, 1 / scale) / scale), 1)
        x = act(conv(act(conv(x, f"block{i}.conv0.0.0", 2)), f"block{i}.conv0.1.0", 2))
        for j in range(8):
            x = act(conv(x, f"block{i}.convblock.{j}.conv") * sd[f"block{i}.convblock.{j}.beta"] + x)
        x = resize(F.pixel_shuffle(up(x, f"block{i}.lastconv.0"), 2), scale)
        return x[:, :4] * scale, x[:, 4:5], x[:, 5:]

    def head(x: torch.Tensor) -> torch.Tensor:
        x = act(conv(act(conv(act(conv(x, "encode.cnn0", 2)), "encode.cnn1")), "encode.cnn2"))
        return up(x, "encode.cnn3")

    time = torch.full_like(img0[:, :1], t)
    f0, f1 = head(img0), head(img1)
    flow, mask, feat = block(0, torch.cat((img0, img1, f0, f1, time), 1), None, 16)
    for i, scale in zip(range(1, 5), (8, 4, 2, 1), strict=True):
        w0, w1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:])
        x = torch.cat((w0, w1, warp(f0, flow[:, :2]), warp(f1, flow[:, 2:]), time, mask, feat), 1)
        delta, mask, feat = block(i, x, flow, scale)
        flow = flow + delta
    mask = torch.sigmoid(mask)
    return warp(img0, flow[:, :2]) * mask + warp(img1, flow[:, 2:]) * (1 - mask)


@pytest.mark.parametrize(("height", "width", "t"), [(128, 64, 0.25)])  # one case: each costs ~2 s
def test_ifnet_equals_an_independent_reference(
    state: dict[str, torch.Tensor], model: IFNet, height: int, width: int, t: float
) -> None:
    generator = torch.Generator().manual_seed(height + width)
    img0, img1 = torch.rand(2, 2, 3, height, width, generator=generator)
    with torch.inference_mode():
        ours = model(img0, img1, torch.full((2,), t))
        expected = reference_ifnet(state, img0, img1, t)
        other_time = model(img0, img1, torch.full((2,), 0.9))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - img0).abs().mean() > 0.01 and (ours - img1).abs().mean() > 0.01  # a new frame, not a copy
    assert (ours - other_time).abs().max() > 1e-4  # the timestep reaches the network
    with torch.inference_mode():  # each item of a batch is computed on its own
        torch.testing.assert_close(model(img0[:1], img1[:1], torch.full((1,), t)), ours[:1], atol=1e-5, rtol=1e-5)


def test_warp_moves_by_the_flow_in_pixels() -> None:
    """Backward warp: out(x, y) = image(x + flow_x, y + flow_y); zero flow is the identity."""
    image = torch.rand(1, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    flow = torch.zeros(1, 2, 8, 10)
    torch.testing.assert_close(interpolation.warp(image, flow), image, atol=1e-6, rtol=0)
    flow[:, 0] = 1
    torch.testing.assert_close(interpolation.warp(image, flow)[..., :-1], image[..., 1:], atol=1e-5, rtol=0)
    flow[:, 0], flow[:, 1] = 0, 2
    torch.testing.assert_close(interpolation.warp(image, flow)[..., :-2, :], image[..., 2:, :], atol=1e-5, rtol=0)


def test_zero_flows_blend_the_frames_by_the_mask(state: dict[str, torch.Tensor]) -> None:
    """With every block's output head zeroed the flows are zero and the mask logit 0: the frame is the average of
    the two, at any time; a large mask bias on the last block selects frame 0."""
    model = IFNet()
    zeroed = {k.removeprefix("module."): v.clone() for k, v in state.items()}
    for key in zeroed:
        if ".lastconv." in key:
            zeroed[key].zero_()
    model.load_state_dict(zeroed)
    img0, img1 = torch.rand(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for t in (0.0, 0.3, 1.0):
            torch.testing.assert_close(model(img0, img1, torch.tensor([t])), (img0 + img1) / 2, atol=1e-5, rtol=0)
        bias = model.block4.lastconv[0].bias
        bias[16:20] = 30.0  # PixelShuffle(2): channels 16-19 become the mask (output channel 4)
        torch.testing.assert_close(model(img0, img1, torch.tensor([0.5])), img0, atol=1e-5, rtol=0)


# --- frame counts, positions, the rule --------------------------------------------------------------------------------


def moving(count: int, height: int, width: int, step: int = 2) -> np.ndarray:
    """A smooth pattern sliding right by `step` px a frame: consecutive frames are neither duplicates nor cuts."""
    y, x = np.mgrid[0:height, 0 : width + step * count].astype(np.float32)
    pattern = np.stack([0.5 + 0.4 * np.sin(x / 6), 0.5 + 0.4 * np.cos(y / 5), (x + y) / (x + y).max()], -1)
    return np.stack([pattern[:, i * step : i * step + width] for i in range(count)]).astype(np.float32)


@pytest.fixture(scope="module")
def rife(model: IFNet) -> Rife:
    return Rife(model, offloaded=lambda: False)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_generated_frames_are_kept_bit_exactly(rife: Rife, factor: int) -> None:
    frames = moving(4, 50, 70)  # not multiples of 64: padded for IFNet, cropped back
    out = rife.interpolate(frames, factor)
    assert out.shape == ((4 - 1) * factor + 1, 50, 70, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[::factor], frames)  # first and last included
    assert out.min() >= 0 and out.max() <= 1
    for i in range(len(out)):
        if i % factor:
            before, after = frames[i // factor], frames[i // factor + 1]
            assert np.abs(out[i] - before).mean() > 1e-3 and np.abs(out[i] - after).mean() > 1e-3, i


def test_one_frame_and_factor_one_are_unchanged(rife: Rife) -> None:
    frames = moving(3, 8, 8)
    assert rife.interpolate(frames, 1) is frames
    assert rife.interpolate(frames[:1], 4) is not None and rife.interpolate(frames[:1], 4).shape == (1, 8, 8, 3)


def test_new_frames_are_the_model_at_their_times(rife: Rife, model: IFNet) -> None:
    frames = moving(3, 64, 64)
    out = rife.interpolate(frames, 4)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    with torch.inference_mode():
        expected = model(video[[1, 1, 1]], video[[2, 2, 2]], torch.tensor([0.25, 0.5, 0.75]))
    np.testing.assert_allclose(out[5:8], expected.clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_offloaded_rife_waits_on_the_cpu(model: IFNet, rife: Rife, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offloaded (emulated: the CPU stands for the GPU), the model moves for the call and back, output unchanged."""
    offloaded = Rife(IFNet(), offloaded=lambda: True)
    offloaded.model.load_state_dict(model.state_dict())
    moves: list[str] = []
    original = offloaded.model.to
    monkeypatch.setattr(offloaded.model, "to", lambda *a, **k: moves.append(str(a[0])) or original(*a, **k))
    frames = moving(3, 32, 32)
    np.testing.assert_array_equal(offloaded.interpolate(frames, 2), rife.interpolate(frames, 2))
    assert moves == ["cpu", "cpu"]  # to the device (here the CPU), then back to the CPU
    assert next(offloaded.model.parameters()).device.type == "cpu"


def test_out_of_memory_halves_the_batch_then_fails_in_one_sentence(rife: Rife, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = moving(5, 32, 32)
    expected = rife.interpolate(frames, 4)  # 12 new frames: batches of 8 and 4
    sizes: list[int] = []
    real = Rife._frames

    def frames_or_oom(self: Rife, video: torch.Tensor, batch: list, factor: int) -> np.ndarray:
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, video, batch, factor)

    monkeypatch.setattr(Rife, "_frames", frames_or_oom)
    np.testing.assert_allclose(rife.interpolate(frames, 4), expected, atol=1e-5)
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}
    monkeypatch.setattr(Rife, "_frames", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("injected")))
    with pytest.raises(ServiceError) as error:
        rife.interpolate(frames, 2)
    assert str(error.value) == "Out of GPU memory interpolating 32x32 frames: try a lower interpolation."


def test_ssim() -> None:
    frames = torch.from_numpy(moving(2, 32, 32)).permute(0, 3, 1, 2)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert interpolation.ssim(frames[:1], frames[:1]).item() == pytest.approx(1.0, abs=1e-6)
    assert interpolation.ssim(frames[:1], noise).item() < 0.2
    assert 0.2 < interpolation.ssim(frames[:1], frames[1:]).item() < 0.996
    assert interpolation.ssim(frames[:1], (frames[:1] + 0.001).clamp(0, 1)).item() > 0.996


def test_duplicates_and_scene_cuts_get_copies_of_the_first_frame(rife: Rife) -> None:
    a, b = moving(2, 48, 64)
    cut = np.random.default_rng(1).random((48, 64, 3), dtype=np.float32)
    near_a = np.clip(a + 0.001, 0, 1)  # a re-encoded duplicate: not bit-equal, SSIM > 0.996
    frames = np.stack([a, near_a, b, cut])
    assert interpolation.copy_pairs(torch.from_numpy(frames).permute(0, 3, 1, 2)).tolist() == [True, False, True]
    out = rife.interpolate(frames, 4)
    np.testing.assert_array_equal(out[::4], frames)
    np.testing.assert_array_equal(out[1:4], np.stack([a] * 3))  # duplicate pair: copies of its first frame
    np.testing.assert_array_equal(out[9:12], np.stack([b] * 3))  # scene cut: copies of the frame before the cut
    assert all(np.abs(out[i] - near_a).mean() > 1e-3 and np.abs(out[i] - b).mean() > 1e-3 for i in (5, 6, 7))


def test_output_fps_is_refused_over_60() -> None:
    assert interpolation.output_fps(8, 2) == 16 and interpolation.output_fps(15, 4) == 60
    with pytest.raises(InputError) as error:
        interpolation.output_fps(16, 4)
    assert str(error.value) == (
        "Invalid inputs `fps` and `interpolation`: 16 fps x 4 is 64 fps, over 60: lower fps or interpolation."
    )
    with pytest.raises(InputError) as error:
        interpolation.output_fps(30, 4, from_input=True)
    assert "the input's 30 fps (fps is blank) x 4 is 120 fps" in str(error.value)


# --- weights: fetched, checked, refused -------------------------------------------------------------------------------


@pytest.fixture
def serve(served_dir: Path, weights_server: str) -> Any:
    """serve(name, data) -> the URL of a file served from 127.0.0.1."""

    def add(name: str, data: bytes) -> str:
        (served_dir / "rife-test").mkdir(exist_ok=True)
        (served_dir / "rife-test" / name).write_bytes(data)
        return f"{weights_server}/rife-test/{name}"

    return add


def layout_file(tmp_path: Path, layout: dict[str, tuple[int, ...]]) -> bytes:
    return tiny_weights.build_rife(tmp_path / "weights.pth", layout=layout).read_bytes()


class Touch:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def load(monkeypatch: pytest.MonkeyPatch, cache: Path, url: str) -> Any:
    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(cache))
    monkeypatch.setenv("RIFE_WEIGHTS_URL", url)
    return interpolation.load_rife(offloaded=lambda: False)


def bad_file(tmp_path: Path, kind: str) -> bytes:
    layout = tiny_weights.rife_layout()
    if kind == "missing keys":
        del layout["module.block4.lastconv.0.bias"]
    elif kind == "extra keys":
        layout["module.teacher.conv.weight"] = (4, 4)
    elif kind == "wrong shapes":  # the standard (not heavy) v4.26 head: 4 features per frame
        layout["module.encode.cnn3.weight"] = (16, 4, 4, 4)
    elif kind == "pickle with code":
        torch.save({"block0.conv0.0.0.weight": Touch(tmp_path / "ran")}, tmp_path / "code.pth")
        return (tmp_path / "code.pth").read_bytes()
    elif kind == "not a pickle":
        return b"<html>login</html>"
    return layout_file(tmp_path, layout)


BAD_FILES = {
    "missing keys": "are not IFNet v4.26 heavy: 1 tensors missing (e.g. block4.lastconv.0.bias).",
    "extra keys": "are not IFNet v4.26 heavy: 1 unknown tensors (e.g. teacher.conv.weight).",
    "wrong shapes": "are not IFNet v4.26 heavy: 1 of another shape (e.g. encode.cnn3.weight: (16, 4, 4, 4), "
    "expected (16, 16, 4, 4)).",
    "pickle with code": "could not be read as a weights-only PyTorch state dict: ",
    "not a pickle": "could not be read as a weights-only PyTorch state dict: ",
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_wrong_files_are_refused_in_one_sentence(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    url = serve(f"{kind.replace(' ', '-')}.pth", bad_file(tmp_path, kind))
    with pytest.raises(WeightsError) as error:
        load(monkeypatch, tmp_path / "cache", url)
    message = str(error.value)
    assert message.startswith(f"The RIFE weights in RIFE_WEIGHTS_URL ({url}) ") and BAD_FILES[kind] in message
    assert "\n" not in message
    assert not (tmp_path / "ran").exists()  # the pickle's code never ran
    assert [p.name for p in (tmp_path / "cache" / "rife").glob("*.pth")] == []  # not kept in the cache


def test_a_wrong_file_fails_the_predictors_setup(
    serve: Any, weights_urls: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = serve("missing-for-setup.pth", bad_file(tmp_path, "missing keys"))
    monkeypatch.setenv("RIFE_WEIGHTS_URL", url)
    with pytest.raises(WeightsError, match=r"^The RIFE weights in RIFE_WEIGHTS_URL .* 1 tensors missing"):
        load_predictor("i2v", weights_urls["i2v"], tmp_path / "cache")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://example.com/rife.pth", "RIFE_WEIGHTS_URL is 'ftp://example.com/rife.pth': use an https:// URL"),
        ("hf://", "RIFE_WEIGHTS_URL is 'hf://': use an https:// URL of a .pth file, or hf://OWNER/NAME/FILE.pth."),
    ],
)
def test_malformed_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    with pytest.raises(WeightsError) as error:
        load(monkeypatch, tmp_path, value)
    assert str(error.value).startswith(message)


def test_unreachable_source(weights_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{weights_server}/rife-test/absent.pth"
    with pytest.raises(WeightsError) as error:
        load(monkeypatch, tmp_path, url)
    assert str(error.value).startswith(f"Cannot fetch the RIFE weights in RIFE_WEIGHTS_URL ({url}): ")
    assert "404" in str(error.value) and "\n" not in str(error.value)


def test_default_source_is_checked_against_its_sha256(
    rife_url: str, served_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default source (here pointed at the served random file) must be the published file, byte for byte."""
    monkeypatch.setattr(interpolation, "DEFAULT_SOURCE", rife_url)
    monkeypatch.delenv("RIFE_WEIGHTS_URL")
    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path))
    digest = hashlib.sha256((served_dir / "rife" / "RIFE_IFNet_v426_heavy.pth").read_bytes()).hexdigest()
    with pytest.raises(WeightsError) as error:
        interpolation.load_rife(offloaded=lambda: False)
    assert str(error.value) == (
        f"The RIFE weights in RIFE_WEIGHTS_URL ({rife_url}) are not the published file: sha256 {digest}, "
        f"expected {interpolation.DEFAULT_SHA256}."
    )
    assert list((tmp_path / "rife").glob("*.pth")) == []  # deleted: the next setup fetches again

    monkeypatch.setattr(interpolation, "DEFAULT_SHA256", digest)
    rife, timings = interpolation.load_rife(offloaded=lambda: False)
    assert timings["rife_download_s"] > 0 and isinstance(rife.model, IFNet)
    _, again = interpolation.load_rife(offloaded=lambda: False)
    assert again["rife_download_s"] == 0.0  # fetched once, then from the cache


def test_an_override_is_not_checksummed(rife_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rife, _ = load(monkeypatch, tmp_path, rife_url)  # not the published bytes, but the published layout
    assert rife.device.type == "cpu" and rife.dtype == torch.float32 and not rife.model.training


def test_hub_sources(
    hub: Any, rife_url: str, served_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf://OWNER/NAME (the repo's only .pth) and hf://OWNER/NAME/FILE.pth; once cached, setup needs no hub."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "flownet.pth").write_bytes((served_dir / "rife" / "RIFE_IFNet_v426_heavy.pth").read_bytes())
    hub.add_repo("someone/rife", repo)
    for url in ("hf://someone/rife", "hf://someone/rife/flownet.pth"):
        rife, timings = load(monkeypatch, tmp_path / "cache", url)
        assert timings["rife_download_s"] > 0 and isinstance(rife.model, IFNet)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # unreachable
    assert load(monkeypatch, tmp_path / "cache", "hf://someone/rife")[1]["rife_download_s"] == 0.0


# --- through the predictors -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v2v_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = (moving(5, 64, 64, step=3) * 255).astype(np.uint8)
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, fps=20)


@pytest.mark.parametrize(("factor", "fps", "expected_fps"), [(1, None, 20), (2, None, 40), (4, 15, 60)])
def test_v2v_frame_count_and_fps(v2v: Any, v2v_clip: Path, factor: int, fps: int | None, expected_fps: int) -> None:
    output = v2v.run(
        video=v2v_clip,
        width=64,
        height=64,
        max_frames=3,
        num_inference_steps=2,
        strength=0.5,
        fps=fps,
        interpolation=factor,
    )
    meta, frames = read_mp4(output)
    assert frames.shape == (2 * factor + 1, 64, 64, 3)
    assert meta["fps"] == pytest.approx(expected_fps, rel=0.01)


def test_v2v_refuses_the_inputs_fps_times_factor_over_60(v2v: Any, v2v_clip: Path) -> None:
    with pytest.raises(InputError) as error:
        v2v.run(video=v2v_clip, width=64, height=64, max_frames=2, strength=0.5, interpolation=4)
    assert str(error.value) == (
        "Invalid inputs `fps` and `interpolation`: the input's 20 fps (fps is blank) x 4 is 80 fps, over 60: "
        "lower fps or interpolation."
    )


def test_setup_metrics_name_rife(i2v: Any) -> None:
    assert {"rife_download_s", "rife_load_s"} <= set(i2v.setup_timings)
    assert os.environ["RIFE_WEIGHTS_URL"].endswith("/rife/RIFE_IFNet_v426_heavy.pth")
