"""CPU measurements that calibrate memory.py's activation terms: peak memory of the real architectures, float32.

Each measurement runs in a fresh subprocess (big allocations forced onto mmap, so the resident set follows the
live tensors): it builds the component from its real config with random weights (the weights' values do not change
what is allocated), makes the input, then runs the operation under torch.inference_mode and reports the peak
resident set above what was resident just before (the weights and the input excluded), in MiB, next to what
memory.py predicts for the same operation in float32.

    nice python benchmarks/memory.py            # a few minutes on 2 cores
    nice python benchmarks/memory.py --quick    # the smallest sizes only

The sizes are reduced from the served ones where a real size would take minutes of CPU (a CogVideoX VAE decode at
720x480 costs ~5 TFLOP a frame): the terms are per pixel (VAEs) or per token (attention), so two sizes check the
scaling and memory.py extrapolates. CPU kernels are not CUDA's (oneDNN convolutions vs cuDNN workspaces; the CPU's
flash attention vs the GPU's), hence the tolerance stated in memory.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import ctypes, json, resource, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
spec = json.loads(sys.argv[1])
import importlib.util
loader = importlib.util.spec_from_file_location("memory_benchmark", sys.argv[3])
bench = importlib.util.module_from_spec(loader)
loader.loader.exec_module(bench)

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

kind = spec["kind"]
model, run = bench.calibration_case(kind, **spec["args"])
def hwm_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

ctypes.CDLL("libc.so.6").malloc_trim(0)
try:  # reset the peak to the current size, so that building the model does not count (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak_of_run = hwm_mib
except OSError:  # the lifetime peak: an overestimate when building the model peaked higher
    peak_of_run = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss_mib()
with torch.inference_mode():
    run()
print(json.dumps({"peak_mib": peak_of_run() - before}))
"""

CASES = [
    # (kind, args): VAE operations at reduced sizes with the real channel widths; attention at real widths
    ("cogvideox_vae_decode", {"width": 96, "height": 64, "latent_frames": 3}),
    ("cogvideox_vae_decode", {"width": 192, "height": 128, "latent_frames": 3}),
    ("cogvideox_vae_encode", {"width": 192, "height": 128, "frames": 1}),
    ("cogvideox_vae_encode", {"width": 96, "height": 64, "frames": 9}),  # CogVideoX-5b's video-to-video batch
    ("sd_vae_decode", {"width": 256, "height": 144, "frames": 1}),
    ("sd_vae_decode", {"width": 256, "height": 144, "frames": 4}),
    ("sd_vae_decode", {"width": 512, "height": 288, "frames": 1}),
    ("sd_vae_encode", {"width": 256, "height": 144, "frames": 4}),
    ("cogvideox_block", {"tokens": 2926, "batch": 2}),
    ("cogvideox_block", {"tokens": 5626, "batch": 2}),
    ("unet3d", {"width": 256, "height": 144, "frames": 2, "batch": 2}),
    ("unet3d", {"width": 256, "height": 144, "frames": 4, "batch": 2}),
]
QUICK = [0, 3, 4, 7]


# The real configs (the hub repos' config.json values; tests/tiny_weights.py shrinks the same architectures).
COGVIDEOX_TRANSFORMER = {
    "num_attention_heads": 48,
    "attention_head_dim": 64,
    "in_channels": 32,
    "out_channels": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": 512,
    "text_embed_dim": 4096,
    "num_layers": 42,
    "dropout": 0.0,
    "attention_bias": True,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": True,
}
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "CogVideoX-5b-I2V/transformer": {
        **COGVIDEOX_TRANSFORMER,
        "sample_height": 60,
        "sample_width": 90,
        "sample_frames": 49,
        "use_learned_positional_embeddings": True,
    },
    "CogVideoX1.5-5B-I2V/transformer": {
        **COGVIDEOX_TRANSFORMER,
        "sample_height": 96,
        "sample_width": 170,
        "sample_frames": 81,
        "use_learned_positional_embeddings": False,
        "patch_size_t": 2,
        "patch_bias": False,
        "ofs_embed_dim": 512,
    },
    "CogVideoX/vae": {
        "block_out_channels": (128, 256, 256, 512),
        "layers_per_block": 3,
        "norm_num_groups": 32,
        "latent_channels": 16,
        "down_block_types": ("CogVideoXDownBlock3D",) * 4,
        "up_block_types": ("CogVideoXUpBlock3D",) * 4,
        "temporal_compression_ratio": 4,
        "sample_height": 480,
        "sample_width": 720,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "CogVideoX/text_encoder": {
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
    },
    "zeroscope_v2_XL/unet": {
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 1024,
        "attention_head_dim": 64,
        "in_channels": 4,
        "out_channels": 4,
        "norm_num_groups": 32,
    },
    "zeroscope_v2_XL/vae": {
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 32,
        "sample_size": 768,
    },
    "zeroscope_v2_XL/text_encoder": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "projection_dim": 512,
        "vocab_size": 49408,
        "hidden_act": "gelu",
    },
}


def build(name: str, device: str = "meta") -> torch.nn.Module:
    """A component of the real architecture from REAL_CONFIGS: on "meta" (shapes only) or with random weights."""
    from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, CogVideoXTransformer3DModel, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = REAL_CONFIGS[name]
    component = name.split("/")[1]
    with torch.device(device):
        if component == "transformer":
            return CogVideoXTransformer3DModel(**config).eval()
        if name == "CogVideoX/vae":
            return AutoencoderKLCogVideoX(**config).eval()
        if name == "CogVideoX/text_encoder":
            return T5EncoderModel(T5Config(**config)).eval()
        if component == "unet":
            return UNet3DConditionModel(**config).eval()
        if component == "vae":
            return AutoencoderKL(**config).eval()
        return CLIPTextModel(CLIPTextConfig(**config)).eval()


def calibration_case(kind: str, **case: int) -> tuple[torch.nn.Module, Callable[[], Any]]:
    """The component (real widths, random float32 weights) and the operation to measure, its input made."""
    torch.manual_seed(0)
    if kind.startswith("cogvideox_vae"):
        vae = build("CogVideoX/vae", "cpu")
        if kind == "cogvideox_vae_decode":
            z = torch.randn(1, 16, case["latent_frames"], case["height"] // 8, case["width"] // 8)
            return vae, lambda: vae.decode(z)
        x = torch.randn(1, 3, case["frames"], case["height"], case["width"])
        return vae, lambda: vae.encode(x)
    if kind.startswith("sd_vae"):
        vae = build("zeroscope_v2_XL/vae", "cpu")
        if kind == "sd_vae_decode":
            z = torch.randn(case["frames"], 4, case["height"] // 8, case["width"] // 8)
            return vae, lambda: vae.decode(z)
        x = torch.randn(case["frames"], 3, case["height"], case["width"])
        return vae, lambda: vae.encode(x)
    if kind == "cogvideox_block":
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

        block = CogVideoXBlock(
            dim=3072, num_attention_heads=48, attention_head_dim=64, time_embed_dim=512, attention_bias=True
        ).eval()
        text, video, batch = 226, case["tokens"] - 226, case["batch"]
        hidden, encoder = torch.randn(batch, video, 3072), torch.randn(batch, text, 3072)
        temb, rotary = torch.randn(batch, 512), (torch.randn(video, 64), torch.randn(video, 64))
        return block, lambda: block(hidden, encoder, temb, image_rotary_emb=rotary)
    if kind == "unet3d":
        unet = build("zeroscope_v2_XL/unet", "cpu")
        batch, frames = case["batch"], case["frames"]
        sample = torch.randn(batch, 4, frames, case["height"] // 8, case["width"] // 8)
        text = torch.randn(batch, 77, 1024)
        return unet, lambda: unet(sample, 500, encoder_hidden_states=text)
    raise ValueError(kind)


def calibration_prediction(kind: str, **case: int) -> float:
    """memory.py's figure for the same operation, in float32 bytes (activations only: weights and input excluded)."""
    import memory

    return memory.calibration_figure(kind, dtype_bytes=4, **case)


def measure(kind: str, args: dict, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    spec = json.dumps({"kind": kind, "args": args})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, spec, str(threads), __file__], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    for index, (kind, case) in enumerate(CASES):
        if args.quick and index not in QUICK:
            continue
        measured = measure(kind, case, args.threads)
        predicted = calibration_prediction(kind, **case) / 2**20
        rows.append({"kind": kind, **case, "measured_mib": round(measured), "predicted_mib": round(predicted)})
        print(f"{kind:22s} {json.dumps(case):60s} measured {measured:8.0f} MiB  model {predicted:8.0f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
