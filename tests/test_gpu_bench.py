"""benchmarks/gpu.py: its whole code path on tiny CPU models (--smoke) and its full-size models (on the meta device)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["i2v", "i2v15", "v2v", "t2v", "t2v-v2v"]
COGVIDEOX = ["i2v", "i2v15", "t2v", "t2v-v2v"]
OFFLOADED_REFERENCE = {"i2v", "i2v15", "v2v"}  # t2v's references are diffusers' examples: pipe.to("cuda")
POSITIVE = [
    "e2e_s",
    "denoise_s",
    "step_s",
    "forward_median_s",
    "text_encode_s",
    "vae_encode_s",
    "vae_decode_s",
    "tflops",
    "warmup_s",
    "e2e_s_at_default_steps",
    "speedup_vs_reference",
    "step_speedup_vs_reference",
]
MEASURED = [(model, config) for model in MODELS for config in ("reference", "project")]
MEASURED += [(model, "lora") for model in COGVIDEOX]


def positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-bench") / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--smoke", "--model", "all", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"report": json.loads(out.read_text()), "stdout": proc.stdout}


def test_report_structure(smoke: dict) -> None:
    report = smoke["report"]
    assert set(report) == {"meta", *MODELS}
    assert report["meta"]["smoke"] is True and report["meta"]["device"] == "cpu"
    assert report["meta"]["configs"] == ["reference", "project", "rife", "lora", "fbc", "setup"]
    for model in MODELS:
        assert list(report[model]["configs"]) == ["reference", "project", "rife", "lora", "fbc"]
        assert all(count > 0 for count in report[model]["params"].values())


@pytest.mark.parametrize(
    ("model", "frames", "height", "width", "executed_steps"),
    [("i2v", 9, 32, 48, 2), ("i2v15", 17, 48, 80, 2), ("v2v", 4, 64, 64, 2), ("t2v", 9, 32, 48, 2)]
    + [("t2v-v2v", 9, 32, 48, 2)],  # i2v15: 16:9 on a 48 px short side; t2v-v2v: 3 steps x strength 0.8
)
def test_runs_use_the_predictors_inputs(
    smoke: dict, model: str, frames: int, height: int, width: int, executed_steps: int
) -> None:
    """The frames decoded are the size and count run() makes from the benchmark's inputs."""
    settings = smoke["report"][model]["settings"]
    assert (settings["frames"], settings["height"], settings["width"]) == (frames, height, width)
    assert settings["executed_steps"] == executed_steps and settings["seed"] == 42


@pytest.mark.parametrize(("model", "config"), MEASURED)
def test_each_configuration_reports_positive_numbers(smoke: dict, model: str, config: str) -> None:
    result = smoke["report"][model]
    entry = result["configs"][config]
    assert "error" not in entry and "skipped" not in entry, entry
    for key in POSITIVE:
        if (model, key) == ("t2v", "vae_encode_s"):
            assert entry[key] == 0.0  # text-to-video encodes no image or video
            continue
        assert positive(entry[key]), (key, entry[key])
    assert "peak_gpu_mem_gib" in entry and entry["peak_gpu_mem_gib"] is None  # CPU: no GPU memory to report
    # memory.py's prediction per phase, for the placement the configuration ran (the measured side needs CUDA)
    model_figures = entry["memory_model"]
    offloaded = config == "reference" and model in OFFLOADED_REFERENCE
    assert model_figures["placement"] == ("offload" if offloaded else "resident")
    assert list(model_figures["phases"]) == ["text_encode", "vae_encode", "denoise", "vae_decode"]
    for phase in model_figures["phases"].values():
        assert positive(phase["predicted_gib"]) and phase["measured_gib"] is None
    assert len(entry["runs"]) == result["settings"]["repeats"]
    assert entry["forwards"] == result["settings"]["executed_steps"]  # one CFG-batched forward per step
    assert result["flops_per_forward"] > 0
    reference = "offload" if model in OFFLOADED_REFERENCE else "cpu"  # resident, on the CPU
    assert entry.get("placement") == {"reference": reference, "project": "cpu", "lora": None}[config]
    assert bool(entry.get("emulated")) == (config == "reference" and model in OFFLOADED_REFERENCE)
    assert entry["lossless"] is (config != "lora")


@pytest.mark.parametrize("model", MODELS)
def test_configurations_give_the_same_latents(smoke: dict, model: str) -> None:
    """Offloading and fused QKV are lossless: same seed, same latents up to float32 rounding."""
    result = smoke["report"][model]
    assert result["reference_latents_max_abs"] > 0.1  # real latents, not zeros
    for config in ("reference", "project"):
        entry = result["configs"][config]
        assert entry["compared_with"] == "reference"
        assert entry["latents_max_abs_diff"] < 1e-3, entry["latents_max_abs_diff"]
        assert entry["video_max_abs_diff"] < 1e-3, entry["video_max_abs_diff"]
        assert entry["latents_repeat_max_abs_diff"] < 1e-6  # the same seed gives the same result run after run
    assert result["configs"]["reference"]["latents_max_abs_diff"] == 0.0


@pytest.mark.parametrize("model", COGVIDEOX)
def test_lora_configuration(smoke: dict, model: str) -> None:
    """A rank-64 LoRA through the predictor's Loras: timed (first use, switch, per step against the project), and it
    changes the output (by design, so not lossless) the same way run after run."""
    configs = smoke["report"][model]["configs"]
    lora = configs["lora"]
    assert "LoRA" in lora["label"] and lora["lossless"] is False
    assert lora["lora_rank"] == 64 and lora["lora_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert positive(lora["lora_mb"]) and positive(lora["lora_first_use_s"]) and positive(lora["lora_switch_s"])
    assert positive(lora["step_s_over_project"]) and positive(lora["e2e_s_over_project"])
    assert lora["latents_max_abs_diff"] > 1e-3 and lora["video_max_abs_diff"] > 1e-3
    assert lora["latents_repeat_max_abs_diff"] < 1e-6
    # Unloaded after its configuration: the next one (FirstBlockCache) runs without it again.
    assert configs["fbc"]["latents_max_abs_diff"] < lora["latents_max_abs_diff"] / 10


@pytest.mark.parametrize(("model", "frames"), [("i2v", 9), ("i2v15", 17), ("v2v", 4)])
def test_rife_configuration_reports_its_share(smoke: dict, model: str, frames: int) -> None:
    """RIFE x2 after the generation: its seconds and share of the prediction, the generation itself unchanged."""
    configs = smoke["report"][model]["configs"]
    rife = configs["rife"]
    assert "error" not in rife, rife.get("error")
    assert (rife["frames_in"], rife["frames_out"]) == (frames, 2 * frames - 1)
    assert positive(rife["interpolation_s"]) and 0 < rife["interpolation_share"] < 1
    assert rife["interpolation_share_at_default_steps"] < rife["interpolation_share"]  # more steps: a smaller share
    assert configs["project"]["interpolation_s"] == 0.0 and "interpolation_share" not in configs["project"]
    assert rife["latents_max_abs_diff"] < 1e-3  # the same generation as the project's
    assert f"{model} RIFE x2: {frames} -> {2 * frames - 1} frames" in smoke["stdout"]


def test_lossy_mode_is_labelled_and_only_where_supported(smoke: dict) -> None:
    for model in COGVIDEOX:
        fbc = smoke["report"][model]["configs"]["fbc"]
        assert fbc["lossless"] is False and "LOSSY" in fbc["label"]
        assert fbc["tflops"] is None and fbc["tflops_effective"] > 0
        assert f"| {model} | fbc (LOSSY) |" in smoke["stdout"]
    v2v = smoke["report"]["v2v"]["configs"]
    assert "UNet3D" in v2v["fbc"]["skipped"] and "no LoRA" in v2v["lora"]["skipped"]


@pytest.mark.parametrize("model", MODELS)
def test_setup_is_timed_in_a_fresh_process_without_download(smoke: dict, model: str) -> None:
    setup = smoke["report"][model]["setup"]
    assert "error" not in setup, setup.get("error")
    assert setup["cached"] == 1.0 and setup["download_s"] == 0.0  # weights already on local disk
    assert setup["setup_s"] > setup["import_s"] > 0
    assert setup["setup_s"] > setup["load_s"] > 0 and setup["warmup_s"] > 0 and setup["save_s"] > 0


def test_table_is_printed(smoke: dict) -> None:
    assert "| model | config | e2e s | s/step |" in smoke["stdout"]
    for model, config in MEASURED:
        assert f"| {model} | {config}" in smoke["stdout"]
    for model in MODELS:
        assert f"{model} reference / project: e2e" in smoke["stdout"]
    for model in COGVIDEOX:
        assert f"{model} project + LoRA / project: per step" in smoke["stdout"]


def test_full_size_models_are_the_published_architectures() -> None:
    """The models the GPU run builds, on the meta device: the published parameter counts and dtypes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    cogvideox = {"text_encoder": (4_762_310_656, 0), "transformer": (5.57e9, 0.01), "vae": (2.156e8, 0.01)}
    expected = {
        "i2v": cogvideox,
        "i2v15": {**cogvideox, "transformer": (5.57e9, 0.001)},  # 11.14 GB in bf16, as the hub files
        "v2v": {"text_encoder": (340_387_840, 0), "unet": (1.411e9, 0.01), "vae": (83_653_863, 0)},
        "t2v": cogvideox,  # the patch embedding's 16 fewer input channels: 196,608 parameters fewer than I2V's
    }  # t5-v1_1-xxl encoder, SD 2 text encoder and SD VAE exactly; CogVideoX and zeroscope within 1%
    pipes = {}
    for model, components in expected.items():
        dtype = gpu.checkpoint_of(model).cuda_dtype
        with tempfile.TemporaryDirectory() as workdir:
            pipes[model] = gpu.build(model, False, "meta", dtype, Path(workdir))
        for name, (count, rel) in components.items():
            module = getattr(pipes[model], name)
            assert sum(p.numel() for p in module.parameters()) == pytest.approx(count, rel=rel), name
            assert {p.dtype for p in module.parameters()} == {dtype}
    transformer, unet = pipes["i2v"].transformer.config, pipes["v2v"].unet.config
    t2v = pipes["t2v"].transformer.config
    assert (t2v.in_channels, t2v.out_channels, t2v.sample_height, t2v.sample_width) == (16, 16, 60, 90)
    assert not t2v.use_learned_positional_embeddings and t2v.use_rotary_positional_embeddings
    assert type(pipes["t2v"]).__name__ == "CogVideoXPipeline"
    i2v_params = sum(p.numel() for p in pipes["i2v"].transformer.parameters())
    assert i2v_params - sum(p.numel() for p in pipes["t2v"].transformer.parameters()) == 16 * 2 * 2 * 3072
    assert (transformer.num_layers, transformer.num_attention_heads, transformer.attention_head_dim) == (42, 48, 64)
    assert (transformer.sample_height, transformer.sample_width, transformer.in_channels) == (60, 90, 32)
    assert transformer.use_learned_positional_embeddings and transformer.patch_size_t is None
    v15 = pipes["i2v15"].transformer.config  # the hub's transformer/config.json values
    assert (v15.num_layers, v15.num_attention_heads, v15.attention_head_dim, v15.text_embed_dim) == (42, 48, 64, 4096)
    assert (v15.in_channels, v15.out_channels, v15.time_embed_dim, v15.ofs_embed_dim) == (32, 16, 512, 512)
    assert (v15.patch_size, v15.patch_size_t, v15.patch_bias, v15.max_text_seq_length) == (2, 2, False, 226)
    assert (v15.sample_height, v15.sample_width, v15.sample_frames) == (96, 170, 81)
    assert v15.use_rotary_positional_embeddings and not v15.use_learned_positional_embeddings
    assert pipes["i2v15"].vae.config.invert_scale_latents and not pipes["i2v"].vae.config.invert_scale_latents
    assert (unet.attention_head_dim, unet.cross_attention_dim, unet.block_out_channels) == (
        64,
        1024,
        (320, 640, 1280, 1280),
    )
