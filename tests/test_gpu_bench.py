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
POSITIVE = [
    "e2e_s", "denoise_s", "step_s", "forward_median_s", "text_encode_s", "vae_encode_s", "vae_decode_s", "tflops",
    "warmup_s", "e2e_s_at_default_steps", "speedup_vs_reference", "step_speedup_vs_reference",
]  # fmt: skip
COMPARED = [("i2v", "reference"), ("i2v", "project"), ("v2v", "reference"), ("v2v", "project")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-bench") / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--smoke", "--model", "both", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"report": json.loads(out.read_text()), "stdout": proc.stdout}


@pytest.mark.parametrize(("model", "config"), COMPARED)
def test_each_configuration_reports_positive_numbers(smoke: dict, model: str, config: str) -> None:
    result = smoke["report"][model]
    entry = result["configs"][config]
    assert "error" not in entry and "skipped" not in entry, entry
    for key in POSITIVE:
        assert isinstance(entry[key], float) and math.isfinite(entry[key]) and entry[key] > 0, (key, entry[key])
    assert "peak_gpu_mem_gib" in entry and entry["peak_gpu_mem_gib"] is None  # CPU: no GPU memory to report
    assert len(entry["runs"]) == result["settings"]["repeats"]
    assert entry["forwards"] == result["settings"]["executed_steps"]  # one CFG-batched forward per step
    assert result["flops_per_forward"] > 0
    assert entry["placement"] == ("offload" if config == "reference" else "cpu")
    assert bool(entry.get("emulated")) == (config == "reference")


@pytest.mark.parametrize("model", ["i2v", "v2v"])
def test_reference_over_project_ratio(smoke: dict, model: str) -> None:
    result = smoke["report"][model]
    ratio, configs = result["reference_over_project"], result["configs"]
    assert ratio["e2e"] == pytest.approx(configs["reference"]["e2e_s"] / configs["project"]["e2e_s"])
    assert ratio["step"] == pytest.approx(configs["reference"]["step_s"] / configs["project"]["step_s"])
    assert configs["project"]["speedup_vs_reference"] == pytest.approx(ratio["e2e"])


@pytest.mark.parametrize("model", ["i2v", "v2v"])
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


def test_lossy_mode_is_labelled_and_only_where_supported(smoke: dict) -> None:
    fbc = smoke["report"]["i2v"]["configs"]["fbc"]
    assert fbc["lossy"] is True and "LOSSY" in fbc["label"]
    assert fbc["tflops"] is None and fbc["tflops_effective"] > 0
    assert "| i2v | fbc (LOSSY) |" in smoke["stdout"]
    assert "UNet3D" in smoke["report"]["v2v"]["configs"]["fbc"]["skipped"]


@pytest.mark.parametrize("model", ["i2v", "v2v"])
def test_setup_is_timed_in_a_fresh_process_without_download(smoke: dict, model: str) -> None:
    setup = smoke["report"][model]["setup"]
    assert "error" not in setup, setup.get("error")
    assert setup["cached"] == 1.0 and setup["download_s"] == 0.0  # weights already on local disk
    assert setup["setup_s"] > setup["import_s"] > 0
    assert setup["setup_s"] > setup["load_s"] > 0 and setup["warmup_s"] > 0 and setup["save_s"] > 0


def test_table_is_printed(smoke: dict) -> None:
    assert "| model | config | e2e s | s/step |" in smoke["stdout"]
    for model, config in COMPARED:
        assert f"| {model} | {config}" in smoke["stdout"]
    assert "i2v reference / project: e2e" in smoke["stdout"]


def test_full_size_models_are_the_published_architectures() -> None:
    """The models the GPU run builds, on the meta device: the published parameter counts and dtypes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    expected = {
        "i2v": {"text_encoder": (4_762_310_656, 0), "transformer": (5.57e9, 0.01), "vae": (2.156e8, 0.01)},
        "v2v": {"text_encoder": (340_387_840, 0), "unet": (1.411e9, 0.01), "vae": (83_653_863, 0)},
    }  # t5-v1_1-xxl encoder, SD 2 text encoder and SD VAE exactly; CogVideoX-5b and zeroscope within 1%
    pipes = {}
    for model, components in expected.items():
        with tempfile.TemporaryDirectory() as workdir:
            pipes[model] = gpu.BUILDERS[model](False, "meta", gpu.SPECS[model].cuda_dtype, Path(workdir))
        for name, (count, rel) in components.items():
            module = getattr(pipes[model], name)
            assert sum(p.numel() for p in module.parameters()) == pytest.approx(count, rel=rel), name
            assert {p.dtype for p in module.parameters()} == {gpu.SPECS[model].cuda_dtype}
    transformer, unet = pipes["i2v"].transformer.config, pipes["v2v"].unet.config
    assert (transformer.num_layers, transformer.num_attention_heads, transformer.attention_head_dim) == (42, 48, 64)
    assert (transformer.sample_height, transformer.sample_width, transformer.in_channels) == (60, 90, 32)
    assert (unet.attention_head_dim, unet.cross_attention_dim, unet.block_out_channels) == (
        64,
        1024,
        (320, 640, 1280, 1280),
    )
