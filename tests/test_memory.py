"""The memory model and the placements it decides (memory.py), with the CUDA memory query faked; its figures against
the real architectures (parameter counts on the meta device; one real-width VAE decode measured on the CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import memory
from errors import InputError, ServiceError

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
CARDS = [16, 24, 40, 48, 80, 141]  # GB cards as sold: what mem_get_info reports free is a little less
CUDA_CONTEXT_GIB = 0.6


def _benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeVae:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def __getattr__(self, name: str) -> Any:  # enable_slicing, disable_slicing, enable_tiling, disable_tiling
        if not name.startswith(("enable_", "disable_")):
            raise AttributeError(name)
        return lambda: self.calls.append(f"vae.{name}")


class FakePipe:
    """Records what placement does to it: .to(device), model CPU offload, hooks removed, the VAE's savers."""

    def __init__(self, family: str) -> None:
        self.calls: list[str] = []
        self.vae = FakeVae(self.calls)
        setattr(self, "transformer" if family == "cogvideox" else "unet", torch.nn.Linear(1, 1))

    def to(self, device: str) -> None:
        self.calls.append(f"to({device})")

    def enable_model_cpu_offload(self) -> None:
        self.calls.append("offload")

    def remove_all_hooks(self) -> None:
        self.calls.append("remove_hooks")

    @property
    def state(self) -> dict[str, Any]:
        """Where the pipeline is and which VAE savers are on, from the calls' order."""
        state: dict[str, Any] = {"placement": None, "slicing": False, "tiling": False}
        for call in self.calls:
            if call in ("to(cuda)", "offload"):
                state["placement"] = "resident" if call == "to(cuda)" else "offload"
            elif call.startswith("vae."):
                on, _, what = call[4:].partition("_")
                state[what] = on == "enable"
        return state


def fake_gpu(monkeypatch: pytest.MonkeyPatch, card_gb: int) -> None:
    free = int((card_gb - CUDA_CONTEXT_GIB) * GIB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, card_gb * GIB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


# What each card does with each model's default and largest inputs (README's table): placement, VAE slicing, VAE
# tiling, fused Q/K/V; or "refused" with the most frames that fit at that size.
RES, OFF = "resident", "offload"
EXPECTED: dict[tuple[int, str, str], tuple[str, bool, bool, bool] | tuple[str, int]] = {
    (16, "CogVideoX-5b-I2V", "default"): (OFF, False, True, False),
    (16, "CogVideoX-5b-I2V", "largest"): (OFF, False, True, False),
    (16, "CogVideoX1.5-5B-I2V", "default"): ("refused", 17),
    (16, "CogVideoX1.5-5B-I2V", "largest"): ("refused", 17),
    (16, "zeroscope_v2_XL", "default"): (OFF, True, False, False),
    (16, "zeroscope_v2_XL", "largest"): ("refused", 8),
    (24, "CogVideoX-5b-I2V", "default"): (OFF, False, False, False),
    (24, "CogVideoX-5b-I2V", "largest"): (OFF, False, False, False),
    (24, "CogVideoX1.5-5B-I2V", "default"): (OFF, False, True, False),
    (24, "CogVideoX1.5-5B-I2V", "largest"): ("refused", 113),
    (24, "zeroscope_v2_XL", "default"): (RES, True, False, True),
    (24, "zeroscope_v2_XL", "largest"): ("refused", 15),
    (40, "CogVideoX-5b-I2V", "default"): (RES, False, False, True),
    (40, "CogVideoX-5b-I2V", "largest"): (RES, False, False, True),
    (40, "CogVideoX1.5-5B-I2V", "default"): (RES, False, True, True),
    (40, "CogVideoX1.5-5B-I2V", "largest"): (RES, False, True, True),
    (40, "zeroscope_v2_XL", "default"): (RES, False, False, True),
    (40, "zeroscope_v2_XL", "largest"): ("refused", 27),
    (48, "CogVideoX-5b-I2V", "default"): (RES, False, False, True),
    (48, "CogVideoX-5b-I2V", "largest"): (RES, False, False, True),
    (48, "CogVideoX1.5-5B-I2V", "default"): (RES, False, True, True),
    (48, "CogVideoX1.5-5B-I2V", "largest"): (RES, False, True, True),
    (48, "zeroscope_v2_XL", "default"): (RES, False, False, True),
    (48, "zeroscope_v2_XL", "largest"): ("refused", 34),
    (80, "CogVideoX-5b-I2V", "default"): (RES, False, False, True),
    (80, "CogVideoX-5b-I2V", "largest"): (RES, False, False, True),
    (80, "CogVideoX1.5-5B-I2V", "default"): (RES, False, True, True),
    (80, "CogVideoX1.5-5B-I2V", "largest"): (RES, False, True, True),
    (80, "zeroscope_v2_XL", "default"): (RES, False, False, True),
    (80, "zeroscope_v2_XL", "largest"): (RES, True, False, True),
    (141, "CogVideoX-5b-I2V", "default"): (RES, False, False, True),
    (141, "CogVideoX-5b-I2V", "largest"): (RES, False, False, True),
    (141, "CogVideoX1.5-5B-I2V", "default"): (RES, False, True, True),
    (141, "CogVideoX1.5-5B-I2V", "largest"): (RES, False, True, True),
    (141, "zeroscope_v2_XL", "default"): (RES, False, False, True),
    (141, "zeroscope_v2_XL", "largest"): (RES, False, False, True),
}


@pytest.mark.parametrize(("card", "model", "which"), sorted(EXPECTED))
def test_placement_per_card_model_and_input(monkeypatch: pytest.MonkeyPatch, card: int, model: str, which: str) -> None:
    fake_gpu(monkeypatch, card)
    frames_input = "max_frames" if model == "zeroscope_v2_XL" else "num_frames"
    gpu = memory.GpuMemory(model, frames_input=frames_input)
    arch = gpu.arch
    pipe = FakePipe(arch.family)
    setup = gpu.place(pipe)
    assert setup is not None and gpu.fused == (setup.placement == "resident")
    request = arch.default if which == "default" else arch.largest
    expected = EXPECTED[card, model, which]
    calls_before = len(pipe.calls)
    if expected[0] == "refused":
        with pytest.raises(InputError) as error:
            with gpu.fit(width=request.width, height=request.height, frames=request.frames, guidance_scale=6):
                pytest.fail("a refused request must not run")
        assert f"at most {expected[1]} frames fit at {request.width}x{request.height}" in str(error.value)
        assert str(error.value).startswith(f"Invalid input `{frames_input}`: {request.describe()} need about ")
        assert len(pipe.calls) == calls_before  # refused before anything moved
        return
    with gpu.fit(width=request.width, height=request.height, frames=request.frames, guidance_scale=6) as chosen:
        assert chosen is not None and chosen.fits
    placement, slicing, tiling, fused = expected
    assert pipe.state == {"placement": placement, "slicing": slicing, "tiling": tiling}
    assert (chosen.placement, chosen.slicing, chosen.tiling, chosen.fused) == expected
    assert max(chosen.needs.values()) <= gpu.budget


def test_a_larger_input_switches_placement_per_call_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """32 GB: CogVideoX1.5's default runs resident; 161 frames only fit offloaded, for that call only."""
    fake_gpu(monkeypatch, 32)
    gpu = memory.GpuMemory("CogVideoX1.5-5B-I2V")
    pipe = FakePipe("cogvideox")
    assert gpu.place(pipe).placement == "resident"
    with gpu.fit(width=1360, height=768, frames=161, guidance_scale=6) as chosen:
        assert chosen.placement == "offload" and chosen.fused  # fused at setup: the copy now moves, and is counted
        assert (
            chosen.peaks["denoise"]
            > memory.phase_peaks(
                gpu.arch, gpu.arch.largest, placement="offload", fused=False, slicing=False, tiling=True, lora_bytes=0
            )[0]["denoise"]
        )
    assert pipe.state["placement"] == "offload"
    with gpu.fit(width=1360, height=768, frames=81, guidance_scale=6) as chosen:
        assert chosen.placement == "resident"
    assert pipe.calls[-4:] == ["remove_hooks", "to(cuda)", "vae.disable_slicing", "vae.enable_tiling"]


def test_guidance_1_runs_one_sample_and_fits_more(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 24)
    gpu = memory.GpuMemory("CogVideoX1.5-5B-I2V")
    gpu.place(FakePipe("cogvideox"))
    with pytest.raises(InputError):
        with gpu.fit(width=1360, height=768, frames=161, guidance_scale=6):
            pass
    with gpu.fit(width=1360, height=768, frames=161, guidance_scale=1) as chosen:
        assert chosen.placement == "offload"


def test_loaded_loras_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 40)
    gpu = memory.GpuMemory("CogVideoX-5b-I2V")
    pipe = FakePipe("cogvideox")
    gpu.place(pipe)
    without = gpu.plan_for(gpu.arch.default)
    # a LoRA of 2 GiB: as peft names its layers
    pipe.transformer = torch.nn.Module()
    pipe.transformer.register_module("to_q", torch.nn.Module())
    pipe.transformer.to_q.lora_A = torch.nn.ModuleDict({"x": torch.nn.Linear(1, 1, bias=False)})
    pipe.transformer.to_q.lora_A.x.weight = torch.nn.Parameter(
        torch.empty(GIB // 2, dtype=torch.bfloat16, device="meta")
    )
    assert memory.lora_bytes(pipe.transformer) == GIB
    with_lora = gpu.plan_for(gpu.arch.default)
    assert with_lora.peaks["denoise"] - without.peaks["denoise"] == GIB


def test_v2v_refusal_names_max_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 8)
    gpu = memory.GpuMemory("zeroscope_v2_XL", frames_input="max_frames")
    gpu.place(FakePipe("unet3d"))
    with pytest.raises(InputError, match=r"^Invalid input `max_frames`: 48 frames at 1280x1280 need about \d+ GiB"):
        with gpu.fit(width=1280, height=1280, frames=48, guidance_scale=15):
            pass


def test_out_of_memory_is_one_sentence_naming_what_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 24)
    gpu = memory.GpuMemory("CogVideoX-5b-I2V")
    gpu.place(FakePipe("cogvideox"))
    with pytest.raises(ServiceError) as error:
        with gpu.fit(width=720, height=480, frames=49, guidance_scale=6):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert str(error.value) == (
        "Out of GPU memory generating 49 frames at 720x480: try fewer frames or a smaller size "
        "(the memory model predicted 49 frames to fit here: please report this)."
    )
    assert "steps" not in str(error.value)
    assert error.value.__suppress_context__


def test_cpu_places_on_the_cpu_and_tiles_only_where_the_model_always_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for model, tiles in (("CogVideoX-5b-I2V", False), ("CogVideoX1.5-5B-I2V", True)):
        pipe = FakePipe("cogvideox")
        gpu = memory.GpuMemory(model)
        assert gpu.place(pipe) is None and gpu.fused
        assert pipe.calls == ["to(cpu)"] + (["vae.enable_tiling"] if tiles else [])
        with gpu.fit(width=720, height=480, frames=49, guidance_scale=6) as chosen:
            assert chosen is None


def test_parameter_counts_are_the_real_configs() -> None:
    """ARCHITECTURES' counts equal those of the real configs built on the meta device (no weights needed)."""
    bench = _benchmark()

    def count(name: str, only: tuple[str, ...] = ()) -> int:
        model = bench.build(name)
        named = [(n, p) for n, p in model.named_parameters() if not only or n.split(".")[-2] in only]
        buffers = [] if only else [b for n, b in model.named_buffers() if n.endswith("pos_embedding")]
        return sum(p.numel() for _, p in named) + sum(b.numel() for b in buffers)

    for model in ("CogVideoX-5b-I2V", "CogVideoX1.5-5B-I2V"):
        arch = memory.ARCHITECTURES[model]
        assert arch.denoiser_params == count(f"{model}/transformer")
        assert arch.qkv_params == count(f"{model}/transformer", ("to_q", "to_k", "to_v"))
        assert arch.text_encoder_params == count("CogVideoX/text_encoder")
        assert arch.vae_params == count("CogVideoX/vae")
    arch = memory.ARCHITECTURES["zeroscope_v2_XL"]
    assert arch.denoiser_params == count("zeroscope_v2_XL/unet")
    assert arch.qkv_params == count("zeroscope_v2_XL/unet", ("to_q", "to_k", "to_v"))
    assert arch.text_encoder_params == count("zeroscope_v2_XL/text_encoder")
    assert arch.vae_params == count("zeroscope_v2_XL/vae")


def test_defaults_and_largest_inputs_are_the_predictors() -> None:
    import predict_i2v
    import predict_i2v15

    assert memory.ARCHITECTURES["CogVideoX-5b-I2V"].frame_choices == tuple(predict_i2v.FRAME_COUNTS)
    arch = memory.ARCHITECTURES["CogVideoX1.5-5B-I2V"]
    assert arch.frame_choices == tuple(predict_i2v15.FRAME_COUNTS)
    assert arch.largest.frames == predict_i2v15.FRAME_COUNTS[-1] and arch.largest.width == predict_i2v15.LONG_SIDE_MAX


def test_sequence_lengths() -> None:
    """720x480x49 on 5b: 13 latent frames x 30 x 45 patches + 226 text tokens; 1.5 pads 41 latent frames to 42."""
    five, one_five = memory.ARCHITECTURES["CogVideoX-5b-I2V"], memory.ARCHITECTURES["CogVideoX1.5-5B-I2V"]
    assert five.tokens(memory.Request(720, 480, 49)) == 13 * 30 * 45 + 226
    assert one_five.tokens(memory.Request(1360, 768, 161)) == 21 * 48 * 85 + 226
    assert one_five.tokens(memory.Request(1360, 768, 81)) == 11 * 48 * 85 + 226


def test_unfused_projections_are_parked_while_fused() -> None:
    """Resident and fused, only the projections in use sit on the accelerator ("meta" stands in for it here)."""
    from diffusers import CogVideoXTransformer3DModel

    def fused_model() -> torch.nn.Module:
        sizes = {"in_channels": 8, "out_channels": 4, "time_embed_dim": 32, "text_embed_dim": 32, "num_layers": 1}
        model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, **sizes)
        model.fuse_qkv_projections()
        return model

    model = fused_model()
    memory.use_unfused_qkv(model, False, device=torch.device("meta"))
    attention = model.transformer_blocks[0].attn1
    assert attention.to_qkv.weight.device.type == "meta" and attention.to_q.weight.device.type == "cpu"
    model = fused_model()
    memory.use_unfused_qkv(model, True, device=torch.device("meta"))
    attention = model.transformer_blocks[0].attn1
    assert attention.to_qkv.weight.device.type == "cpu" and attention.to_v.weight.device.type == "meta"
    memory.use_unfused_qkv(model, True)  # on the CPU, without a device: nothing moves
    assert attention.to_v.weight.device.type == "meta"


def test_vae_decode_figure_matches_a_measured_real_width_decode() -> None:
    """zeroscope's SD VAE at its real widths, 2 frames at 192x112, float32, measured on the CPU in a fresh process:
    the model's figure is within ACTIVATION_MARGIN of the measured peak (benchmarks/memory.py runs the others)."""
    bench = _benchmark()
    case = {"width": 192, "height": 112, "frames": 2}
    measured = bench.measure("sd_vae_decode", case, threads=1) * 2**20
    predicted = bench.calibration_prediction("sd_vae_decode", **case)
    assert abs(measured - predicted) <= memory.ACTIVATION_MARGIN * predicted, (measured / 2**20, predicted / 2**20)
