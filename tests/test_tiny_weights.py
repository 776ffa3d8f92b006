"""Quick checks that the tiny offline model folders load and run like the real ones."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_weights import build_i2v, build_v2v, make_tar


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return build_i2v(tmp_path_factory.mktemp("tiny") / "i2v")


@pytest.fixture(scope="module")
def v2v_dir(tmp_path_factory):
    return build_v2v(tmp_path_factory.mktemp("tiny") / "v2v")


def _rand_image(h: int, w: int, seed: int = 0):
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    return Image.fromarray(arr)


def test_i2v_folder_loads_and_runs(i2v_dir):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline, DiffusionPipeline

    index = json.loads((i2v_dir / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXImageToVideoPipeline"
    assert index["transformer"] == ["diffusers", "CogVideoXTransformer3DModel"]
    assert index["tokenizer"] == ["transformers", "T5Tokenizer"]

    generic = DiffusionPipeline.from_pretrained(i2v_dir)
    assert isinstance(generic, CogVideoXImageToVideoPipeline)
    assert isinstance(generic.scheduler, CogVideoXDDIMScheduler)

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(i2v_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    assert cfg.in_channels == 2 * cfg.out_channels == 2 * pipe.vae.config.latent_channels
    assert cfg.use_learned_positional_embeddings and cfg.use_rotary_positional_embeddings
    assert cfg.max_text_seq_length == pipe.tokenizer.model_max_length == 226
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4

    frames = pipe(
        image=_rand_image(64, 96),
        prompt="a cat, running (fast) in 4K! Zürich",
        num_frames=9,
        num_inference_steps=2,
        height=64,
        width=96,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert np.asarray(frames).shape == (1, 9, 64, 96, 3)
    assert np.isfinite(frames).all()


def test_v2v_folder_loads_and_runs(v2v_dir):
    from diffusers import DDIMScheduler, DiffusionPipeline, VideoToVideoSDPipeline

    index = json.loads((v2v_dir / "model_index.json").read_text())
    assert index["_class_name"] == "VideoToVideoSDPipeline"
    assert index["unet"] == ["diffusers", "UNet3DConditionModel"]

    generic = DiffusionPipeline.from_pretrained(v2v_dir)
    assert isinstance(generic, VideoToVideoSDPipeline)
    assert isinstance(generic.scheduler, DDIMScheduler)

    pipe = VideoToVideoSDPipeline.from_pretrained(v2v_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size

    video = [_rand_image(72, 128, seed=i) for i in range(8)]
    frames = pipe(
        prompt="a cat, running (fast) in 4K! Zürich",
        video=video,
        strength=0.6,
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert np.asarray(frames).shape == (1, 8, 72, 128, 3)
    assert np.isfinite(frames).all()


def test_make_tar_is_flat_and_deterministic(v2v_dir, tmp_path):
    a = make_tar(v2v_dir, tmp_path / "a.tar")
    again = build_v2v(tmp_path / "again")
    b = make_tar(again, tmp_path / "b.tar")
    assert a.read_bytes() == b.read_bytes()  # seeded build + normalised tar metadata

    with tarfile.open(a) as tar:  # plain, uncompressed
        names = tar.getnames()
    assert "model_index.json" in names
    assert "unet/diffusion_pytorch_model.safetensors" in names
    assert all(not n.startswith(("/", "./", "v2v")) for n in names)
    with open(a, "rb") as fh:
        assert fh.read(2) != b"\x1f\x8b"  # not gzip
