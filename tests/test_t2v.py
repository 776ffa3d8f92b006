"""CogVideoX-5b, text-to-video and video-to-video from one load: the real setup() and run() on tiny weights, in process
and through the Cog server."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXVideoToVideoPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

import memory
import tiny_weights
from conftest import assert_same_video, decode_data_url, gradient_frames, load_predictor, read_mp4, write_video
from errors import InputError
from fake_hub import FakeHub
from harness import data_url
from media import fit_image, read_video, to_uint8
from predict_t2v import read_frames

PROMPT = "a red boat sails across a calm lake"
SETTINGS = dict(num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 frames at 12 fps: video-to-video makes 17 of them (8N+1) unless num_frames asks for fewer."""
    return write_video(tmp_path_factory.mktemp("t2v-clip") / "clip.mp4", gradient_frames(20, 72, 128), fps=12)


def direct(predictor: Any, pipeline: Any, scheduler: str, seed: int, **kwargs: Any) -> np.ndarray:
    """What diffusers itself produces from the same components: a fresh pipeline object, same settings."""
    pipe = pipeline(**predictor.pipe.components)
    pipe.scheduler = predictor.schedulers[scheduler]
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        height=64,
        width=96,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=226,
        output_type="np",
        **kwargs,
    ).frames[0]


# --- both modes equal diffusers' own pipelines, from one set of weights ---------------------------------------------


@pytest.mark.parametrize("scheduler", ["cogvideox_dpm", "cogvideox_ddim"])
def test_text_to_video_equals_the_pipeline_called_directly(t2v: Any, scheduler: str) -> None:
    output = t2v.run(
        prompt=PROMPT, negative_prompt="blurry", num_frames=9, scheduler=scheduler, seed=42, interpolation=1, **SETTINGS
    )
    expected = direct(
        t2v, CogVideoXPipeline, scheduler, 42, prompt=PROMPT, negative_prompt="blurry", num_frames=9, **SETTINGS
    )
    args = dict(prompt=PROMPT, negative_prompt="blurry", width=96, height=64, scheduler=scheduler, seed=42)
    np.testing.assert_array_equal(t2v.generate(num_frames=9, **args, **SETTINGS), expected)
    meta, frames = read_mp4(output)
    assert frames.shape == expected.shape == (9, 64, 96, 3) and meta["fps"] == 8 and meta["codec"] == "h264"
    assert_same_video(frames, to_uint8(expected))


def test_video_to_video_equals_the_pipeline_called_directly(t2v: Any, clip: Path) -> None:
    output = t2v.run(
        prompt=PROMPT,
        video=clip,
        num_frames=9,
        strength=0.7,
        sizing_strategy="pad",
        fps=12,
        seed=7,
        interpolation=1,
        **SETTINGS,
    )

    frames, _ = read_video(clip, 9, "first")
    frames = [fit_image(frame, 96, 64, "pad") for frame in frames]
    expected = direct(
        t2v, CogVideoXVideoToVideoPipeline, "cogvideox_dpm", 7, video=frames, prompt=PROMPT, strength=0.7, **SETTINGS
    )
    generated = t2v.generate(
        pipe=t2v.v2v,
        video=frames,
        strength=0.7,
        prompt=PROMPT,
        negative_prompt="",
        width=96,
        height=64,
        scheduler="cogvideox_dpm",
        seed=7,
        **SETTINGS,
    )
    np.testing.assert_array_equal(generated, expected)
    meta, decoded = read_mp4(output)
    assert decoded.shape == expected.shape == (9, 64, 96, 3) and meta["fps"] == 12
    assert_same_video(decoded, to_uint8(expected))
    # The input is what it restyles: the same clip reversed gives another video.
    reversed_input = t2v.generate(
        pipe=t2v.v2v,
        video=frames[::-1],
        strength=0.7,
        prompt=PROMPT,
        negative_prompt="",
        width=96,
        height=64,
        scheduler="cogvideox_dpm",
        seed=7,
        **SETTINGS,
    )
    assert np.abs(generated - reversed_input).mean() > 1e-3


def test_one_copy_of_the_weights(t2v: Any) -> None:
    """The video-to-video pipeline is built on the very modules text-to-video loaded: no second copy."""
    assert isinstance(t2v.pipe, CogVideoXPipeline) and isinstance(t2v.v2v, CogVideoXVideoToVideoPipeline)
    for name in ("transformer", "vae", "text_encoder", "tokenizer"):
        assert getattr(t2v.v2v, name) is getattr(t2v.pipe, name), name

    def storages(pipe: Any) -> set[int]:
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}

    assert storages(t2v.v2v) == storages(t2v.pipe)
    assert len(storages(t2v.pipe)) > 100  # the parameters themselves, not one shared blob


def test_video_to_video_with_cpu_offload(weights_urls: dict[str, str], clip: Path, tmp_path: Path) -> None:
    """Offload placement (what setup chooses on a GPU without room), emulated on the CPU: the hooks live on the shared
    models, and after a video-to-video call they are put back as the text-to-video pipeline's own calls leave them.
    Both modes give what they give resident."""
    predictor = load_predictor("t2v", weights_urls["t2v"], tmp_path / "cache")
    frames = [fit_image(f, 96, 64, "center_crop") for f in read_frames(clip, 9, "first")]
    settings = dict(prompt=PROMPT, negative_prompt="", width=96, height=64, scheduler="cogvideox_dpm", seed=1)
    settings.update(num_inference_steps=2, guidance_scale=6.0, use_dynamic_cfg=False)
    resident = [predictor.generate(pipe=predictor.v2v, video=frames, strength=1.0, **settings)]
    resident.append(predictor.generate(num_frames=9, **settings))
    predictor.pipe.enable_model_cpu_offload(device="cpu")
    hooks = {name: getattr(predictor.pipe, name)._hf_hook for name in ("text_encoder", "transformer", "vae")}
    offloaded = predictor.generate(pipe=predictor.v2v, video=frames, strength=1.0, **settings)
    np.testing.assert_array_equal(offloaded, resident[0])
    for name, hook in hooks.items():  # offload hooks installed afresh, as after the text-to-video pipeline's calls
        assert getattr(predictor.pipe, name)._hf_hook is not hook, name
    np.testing.assert_array_equal(predictor.generate(num_frames=9, **settings), resident[1])


def test_memory_model_counts_what_each_mode_encodes() -> None:
    """Text-to-video encodes nothing; video-to-video encodes the clip, 9 frames at a time (benchmarks/memory.py
    measured 225 / 855 MiB in float32 for 9 frames at 96x64 / 192x128 against 87 / 293 for one)."""
    arch = memory.ARCHITECTURES["CogVideoX-5b"]

    def encode(frames: int, encoded: int) -> int:
        request = memory.Request(720, 480, frames, encoded=encoded)
        return memory.vae_encode_bytes(arch, request, slicing=False, tiling=False)

    one_image, clip = encode(49, 1), 3 * 720 * 480 * 49 * (4 + 2)
    assert encode(49, 0) == 0 < one_image
    nine_at_once = int((memory.CV_ENCODE_PER_PIXEL + 8 * memory.CV_ENCODE_PER_EXTRA_FRAME) * 720 * 480 * 2)
    assert encode(49, 49) == nine_at_once + clip  # 49 = 9 + 5 x 8: the first batch is the largest
    for (width, height), mib in (((96, 64), 225), ((192, 128), 855)):  # the model's figure within 10% of each
        figure = memory.calibration_figure("cogvideox_vae_encode", dtype_bytes=4, width=width, height=height, frames=9)
        assert abs(figure / 2**20 - mib) <= 0.1 * mib, (width, height, figure / 2**20)


# --- video-to-video inputs -------------------------------------------------------------------------------------------


EVEN_17_OF_20 = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 17, 18, 19]  # linspace(0, 19, 17), rounded


@pytest.mark.parametrize(
    ("num_frames", "sampling", "expected"),
    [(49, "first", list(range(17))), (9, "first", list(range(9))), (49, "even", EVEN_17_OF_20)],
)
def test_frame_counts_are_8n_plus_1(clip: Path, num_frames: int, sampling: str, expected: list | None) -> None:
    """The largest 8N+1 up to num_frames that the video gives; even sampling keeps the picks spread to the end."""
    decoded, _ = read_video(clip, num_frames, sampling)
    assert len(decoded) == min(num_frames, 20)  # all 20 frames fit: "even" reads them at the input's rate
    frames = read_frames(clip, num_frames, sampling)
    assert len(frames) == len(expected)
    for frame, index in zip(frames, expected, strict=True):
        assert np.array_equal(np.asarray(frame), np.asarray(decoded[index]))


@pytest.mark.parametrize(("count", "message"), [(1, "1 frame read"), (5, "5 frames read")])
def test_too_few_frames_are_refused(t2v: Any, tmp_path: Path, count: int, message: str) -> None:
    video = write_video(tmp_path / "short.mp4", gradient_frames(count, 72, 128), fps=24)
    with pytest.raises(InputError) as error:
        t2v.run(video=video, num_inference_steps=2)
    assert str(error.value) == f"Invalid input `video`: {message}; video-to-video needs at least 9."


def test_still_image_as_video_is_refused(t2v: Any, tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    Image.fromarray(gradient_frames(1, 72, 128)[0]).save(path)
    with pytest.raises(InputError) as error:
        t2v.run(video=path, num_inference_steps=2)
    assert str(error.value) == "Invalid input `video`: 1 frame read; video-to-video needs at least 9."


def test_strength_times_steps_below_one_is_refused(t2v: Any, clip: Path) -> None:
    with pytest.raises(InputError) as error:
        t2v.run(video=clip, strength=0.1, num_inference_steps=5)
    assert str(error.value) == (
        "Invalid inputs `strength` and `num_inference_steps`: strength x steps must be at least 1 (got 0.1 x 5)."
    )
    # Without a video, strength plays no part: text-to-video runs.
    assert read_mp4(t2v.run(strength=0.1, num_inference_steps=1, num_frames=9, seed=0, interpolation=1))[1].shape == (
        9,
        64,
        96,
        3,
    )


# --- LoRAs: exact in both modes; refused when stated to be for the image-to-video model, and vice versa ----------


@pytest.fixture(scope="module")
def t2v_lora(tiny_folders: dict[str, Path], served_dir: Path, weights_server: str) -> tuple[str, Path]:
    path = tiny_weights.build_lora(tiny_folders["t2v"], served_dir / "t2v-lora", seed=5)
    return f"{weights_server}/t2v-lora/{path.name}", path


@pytest.fixture(scope="module")
def reference(tiny_folders: dict[str, Path]) -> Any:
    """diffusers itself: the same weights, never fused, the LoRA loaded with load_lora_weights + set_adapters."""
    pipe = CogVideoXPipeline.from_pretrained(tiny_folders["t2v"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lora_is_exact_in_both_modes(t2v: Any, reference: Any, t2v_lora: tuple[str, Path], clip: Path) -> None:
    url, path = t2v_lora
    frames = [fit_image(f, 96, 64, "center_crop") for f in read_frames(clip, 9, "first")]
    modes = {
        "t2v": (None, CogVideoXPipeline, {"num_frames": 9}),
        "v2v": (t2v.v2v, CogVideoXVideoToVideoPipeline, {"video": frames, "strength": 0.8}),
    }
    settings = dict(prompt=PROMPT, negative_prompt="", width=96, height=64, seed=3, **SETTINGS)
    reference.load_lora_weights(path.parent, weight_name=path.name, adapter_name="reference")
    reference.set_adapters(["reference"], [0.7])
    try:
        for mode, (pipe, pipeline, inputs) in modes.items():
            t2v.loras.use("", 1.0)
            without = t2v.generate(pipe=pipe, scheduler="cogvideox_dpm", **settings, **inputs)
            t2v.loras.use(url, 0.7)
            got = t2v.generate(pipe=pipe, scheduler="cogvideox_dpm", **settings, **inputs)
            expected = pipeline(**reference.components)
            expected.set_progress_bar_config(disable=True)
            expected.scheduler = t2v.schedulers["cogvideox_dpm"]
            want = expected(
                max_sequence_length=226,
                output_type="np",
                generator=torch.Generator("cpu").manual_seed(3),
                **{k: v for k, v in settings.items() if k != "seed"},
                **inputs,
            ).frames[0]
            np.testing.assert_array_equal(got, want, err_msg=mode)
            assert np.abs(got - without).mean() > 1e-3, mode  # the LoRA changes the video
    finally:
        reference.delete_adapters("reference")
        t2v.loras.use("", 1.0)


def with_base_model(path: Path, dest: Path, base_model: str) -> Path:
    """A copy of a LoRA file whose safetensors metadata names its base model as trainers write it: in diffusers'
    adapter metadata (peft's base_model_name_or_path) where the file has that, else as a plain header entry."""
    from safetensors import safe_open

    with safe_open(path, "pt") as file:
        header = file.metadata() or {}
    if "lora_adapter_metadata" in header:
        adapter = json.loads(header["lora_adapter_metadata"])
        header["lora_adapter_metadata"] = json.dumps({**adapter, "transformer.base_model_name_or_path": base_model})
    else:
        header["base_model"] = base_model
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(path), dest, metadata=header)
    return dest


@pytest.fixture(scope="module")
def family_loras(tiny_folders: dict[str, Path], served_dir: Path, weights_server: str) -> dict[str, str]:
    """Attention-only LoRAs (the same shapes on both models) whose metadata names their model, and LoRAs that also
    adapt patch_embed.proj (the layer whose input channels differ: 16 latent channels, or 32 with the image's)."""
    base = served_dir / "family"
    attention = functools.partial(tiny_weights.build_lora, targets=("to_q", "to_v"), seed=9)
    bare = functools.partial(attention, metadata=False)  # as diffusers' CogVideoX scripts save: no adapter metadata
    patch_embed = functools.partial(tiny_weights.build_lora, targets=("to_q", "patch_embed.proj"))
    made = {
        "t2v-says-5b": with_base_model(
            attention(tiny_folders["t2v"], base / "a"), base / "t2v.safetensors", "THUDM/CogVideoX-5b"
        ),
        "i2v-says-5b-I2V": with_base_model(
            bare(tiny_folders["i2v"], base / "b"), base / "i2v.safetensors", "THUDM/CogVideoX-5b-I2V"
        ),
        "t2v-patch-embed": patch_embed(tiny_folders["t2v"], base / "c"),
        "i2v-patch-embed": patch_embed(tiny_folders["i2v"], base / "d"),
    }
    return {name: f"{weights_server}/{path.relative_to(served_dir).as_posix()}" for name, path in made.items()}


def test_lora_stated_for_the_other_mode_is_refused_both_ways(t2v: Any, i2v: Any, family_loras: dict) -> None:
    """Metadata only: an attention LoRA fits both transformers, so only what its file says tells them apart (and
    "CogVideoX-5b" is a prefix of "CogVideoX-5b-I2V": each loads on its own model)."""
    refusals = [
        (t2v, family_loras["i2v-says-5b-I2V"], "THUDM/CogVideoX-5b-I2V", "CogVideoX-5b"),
        (i2v, family_loras["t2v-says-5b"], "THUDM/CogVideoX-5b", "CogVideoX-5b-I2V"),
    ]
    for predictor, url, stated, model in refusals:
        adapters = set(getattr(predictor.pipe.transformer, "peft_config", {}))
        with pytest.raises(InputError) as error:
            predictor.loras.use(url, 1.0)
        assert str(error.value) == (
            f"Invalid input `lora_url`: this LoRA is for {stated} (its metadata says so), not {model}."
        )
        assert set(getattr(predictor.pipe.transformer, "peft_config", {})) == adapters  # nothing loaded
    for predictor, url in [(t2v, family_loras["t2v-says-5b"]), (i2v, family_loras["i2v-says-5b-I2V"])]:
        predictor.loras.use(url, 1.0)  # its own model's: loads
        predictor.loras.use("", 1.0)


def test_lora_on_the_patch_embedding_is_refused_by_the_other_mode(t2v: Any, i2v: Any, family_loras: dict) -> None:
    """A LoRA that adapts patch_embed.proj (a convolution over 16 or 32 input channels) says nothing of its model, and
    is refused by the layer check, before anything is loaded. (Only linear layers are checked and adapted: a LoRA on
    that convolution is refused by its own model too.)"""
    for predictor, url, model in [
        (t2v, family_loras["i2v-patch-embed"], "CogVideoX-5b"),
        (i2v, family_loras["t2v-patch-embed"], "CogVideoX-5b-I2V"),
    ]:
        adapters = set(getattr(predictor.pipe.transformer, "peft_config", {}))
        with pytest.raises(InputError) as error:
            predictor.loras.use(url, 1.0)
        assert str(error.value) == (
            f"Invalid input `lora_url`: 2 of its 4 tensors name no layer of the {model} transformer (e.g. "
            "transformer.patch_embed.proj.lora_A.weight)."
        )
        assert set(getattr(predictor.pipe.transformer, "peft_config", {})) == adapters


def test_lora_whose_card_names_the_image_to_video_model_is_refused(
    t2v: Any, hub: FakeHub, t2v_lora: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(t2v_lora[1].read_bytes())
    hub.add_repo("someone/i2v-lora", folder, card_data={"base_model": "THUDM/CogVideoX-5b-I2V"})
    with pytest.raises(InputError) as error:
        t2v.loras.use("hf://someone/i2v-lora", 1.0)
    assert str(error.value) == (
        "Invalid input `lora_url`: this LoRA is for THUDM/CogVideoX-5b-I2V (its model card says so), not CogVideoX-5b."
    )


# --- through the real Cog server ------------------------------------------------------------------------------------


def test_server_both_modes_fail_cleanly_and_recover(cog_server: Any, clip: Path, tmp_path: Path) -> None:
    server = cog_server("t2v")
    assert server.status() == "READY"
    inputs = {"prompt": PROMPT, "num_frames": 9, "num_inference_steps": 2, "seed": 7}

    text = server.predict(**inputs)  # interpolation at its default, 2: 9 frames at 8 fps become 17 at 16 fps
    assert text["status"] == "succeeded", text
    meta, frames = read_mp4(decode_data_url(text["output"], tmp_path / "a.mp4"))
    assert frames.shape == (17, 64, 96, 3) and meta["fps"] == 16 and meta["codec"] == "h264"
    assert "Using seed: 7" in text["logs"] and "Denoising step 2/2" in text["logs"]
    assert "decode" not in text["metrics"]["timing"] and "download_s" in text["metrics"]["setup"]

    restyle = {"video": data_url(clip), "num_frames": 49, "strength": 0.5, "fps": 12, "interpolation": 1}
    video = server.predict(**{**inputs, **restyle})
    assert video["status"] == "succeeded", video
    meta, restyled = read_mp4(decode_data_url(video["output"], tmp_path / "b.mp4"))
    assert restyled.shape == (17, 64, 96, 3) and meta["fps"] == 12
    assert "Denoising step 1/1" in video["logs"] and "Denoising step 2/" not in video["logs"]  # 0.5 x 2 steps
    assert {"decode", "inference", "interpolation", "encode"} <= set(video["metrics"]["timing"])

    one_frame = write_video(tmp_path / "one.mp4", gradient_frames(1, 72, 128), fps=24)
    for bad_inputs, message in [
        ({"video": data_url(one_frame)}, "Invalid input `video`: 1 frame read; video-to-video needs at least 9."),
        ({"strength": 1.5}, "Invalid input `strength`: must be >= 0.0 and <= 1.0 (got 1.5)."),
        ({"num_frames": 48}, "Invalid input `num_frames`: must be one of 9, 17, 25, 33, 41, 49 (got 48)."),
        (
            {"fps": 40},
            "Invalid inputs `fps` and `interpolation`: 40 fps x 2 is 80 fps, over 60: lower fps or interpolation.",
        ),
    ]:
        bad = server.predict(**{**inputs, **bad_inputs})
        assert bad["status"] == "failed" and bad["error"].endswith(message), bad
        server.wait_ready(10)

    again = server.predict(**inputs)
    np.testing.assert_array_equal(read_mp4(decode_data_url(again["output"], tmp_path / "c.mp4"))[1], frames)
