"""The tiny offline model folders have the real hub layouts, load with diffusers 0.42 / transformers 5, and run."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import tiny_weights as tw
from tiny_weights import (
    assert_loads_exactly,
    build_i2v,
    build_t2v,
    build_v2v,
    fix_zeroscope_index,
    make_tar,
    stored_tensors,
)

I2V_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/added_tokens.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}
V2V_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "zs2_XL/open_clip_pytorch_model.bin",
    "zs2_XL/text2video_pytorch_model.pth",
}
# Messages diffusers / transformers log when a checkpoint lacks a weight or has one the model does not use.
WEIGHT_PROBLEMS = ("newly initialized", "were not used", "LOAD REPORT", "MISSING", "UNEXPECTED", "MISMATCH")


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return build_i2v(tmp_path_factory.mktemp("tiny") / "i2v")


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return build_t2v(tmp_path_factory.mktemp("tiny") / "t2v")


@pytest.fixture(scope="module")
def v2v_dir(tmp_path_factory):
    return build_v2v(tmp_path_factory.mktemp("tiny") / "v2v")


@pytest.fixture(scope="module")
def v2v_fixed(v2v_dir, tmp_path_factory):
    """A copy of the zeroscope folder whose unet entry names the "diffusers" library (0.42 refuses the hub's)."""
    fixed = tmp_path_factory.mktemp("tiny") / "v2v-fixed"
    shutil.copytree(v2v_dir, fixed)
    return fix_zeroscope_index(fixed)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _config_keys(path: Path) -> set[str]:
    return set(_json(path)) - {"_class_name", "_diffusers_version"}


def _rand_image(h: int, w: int, seed: int = 0):
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    return Image.fromarray(arr)


@contextlib.contextmanager
def _library_logs() -> Iterator[list[logging.LogRecord]]:
    """Records logged by diffusers and transformers (their loggers do not propagate to the root logger)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------


def test_i2v_layout_is_the_hub_one(i2v_dir):
    assert _files(i2v_dir) == I2V_FILES
    assert _json(i2v_dir / "model_index.json") == {
        "_class_name": "CogVideoXImageToVideoPipeline",
        "_diffusers_version": "0.31.0.dev0",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    for name in ("transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert _json(i2v_dir / name)["_diffusers_version"] == "0.31.0.dev0"

    transformer = _config_keys(i2v_dir / "transformer/config.json")
    assert transformer == tw.COGVIDEOX_TRANSFORMER_KEYS and len(transformer) == 25
    assert not transformer & {"ofs_embed_dim", "patch_size_t", "patch_bias"}  # diffusers 0.32+ keys
    vae = _config_keys(i2v_dir / "vae/config.json")
    assert vae == tw.COGVIDEOX_VAE_KEYS and "invert_scale_latents" not in vae
    scheduler = _json(i2v_dir / "scheduler/scheduler_config.json")
    assert scheduler["_class_name"] == "CogVideoXDDIMScheduler"
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"]
    assert scheduler["timestep_spacing"] == "trailing"

    # Shard indexes: the right shard names, total_size, and (checked by stored_tensors) shard contents.
    tensors = stored_tensors(i2v_dir)
    for component, stem, shards in (("transformer", "diffusion_pytorch_model", 3), ("text_encoder", "model", 2)):
        index = _json(i2v_dir / component / f"{stem}.safetensors.index.json")
        assert set(index["weight_map"].values()) == {
            f"{stem}-0000{i}-of-0000{shards}.safetensors" for i in (1, 2, 3)[:shards]
        }
        assert set(index["weight_map"]) == set(tensors[component])
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors[component].values())
    assert "shared.weight" in tensors["text_encoder"] and "encoder.embed_tokens.weight" not in tensors["text_encoder"]
    for file in sorted(i2v_dir.rglob("*.safetensors")):  # bf16 everywhere, as stored on disk
        with safe_open(file, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, file

    text_config = _json(i2v_dir / "text_encoder/config.json")
    assert text_config["torch_dtype"] == "bfloat16" and text_config["architectures"] == ["T5EncoderModel"]
    assert "dtype" not in text_config  # a transformers 4.x file

    tokenizer_config = _json(i2v_dir / "tokenizer/tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] == "T5Tokenizer" and tokenizer_config["extra_ids"] == 100
    assert tokenizer_config["legacy"] is True and tokenizer_config["model_max_length"] == 226
    extra = [f"<extra_id_{i}>" for i in range(100)]
    assert tokenizer_config["additional_special_tokens"] == extra
    added = _json(i2v_dir / "tokenizer/added_tokens.json")
    assert set(added) == set(extra) and added["<extra_id_0>"] == added["<extra_id_99>"] + 99  # appended, reversed
    assert text_config["vocab_size"] > added["<extra_id_0>"]
    assert _json(i2v_dir / "tokenizer/special_tokens_map.json")["additional_special_tokens"] == extra


def test_t2v_layout_is_5b_i2v_s_but_for_the_pipeline_and_the_transformer(t2v_dir, i2v_dir):
    """THUDM/CogVideoX-5b: the files of 5b-I2V, CogVideoXPipeline in model_index.json, and a transformer that takes the
    latents alone (in_channels 16 for real, I2V 32) with rotary position embeddings only."""
    assert _files(t2v_dir) == I2V_FILES
    index = _json(t2v_dir / "model_index.json")
    assert index.pop("_class_name") == "CogVideoXPipeline"
    assert index.pop("_diffusers_version") == tw.COGVIDEOX_T2V_DIFFUSERS_VERSION
    i2v_index = _json(i2v_dir / "model_index.json")
    assert index == {k: v for k, v in i2v_index.items() if not k.startswith("_")}
    config, i2v_config = _json(t2v_dir / "transformer/config.json"), _json(i2v_dir / "transformer/config.json")
    assert set(config) == set(i2v_config) and _config_keys(t2v_dir / "transformer/config.json") == (
        tw.COGVIDEOX_TRANSFORMER_KEYS
    )
    latent = _json(t2v_dir / "vae/config.json")["latent_channels"]
    assert (config["in_channels"], config["out_channels"], i2v_config["in_channels"]) == (latent, latent, 2 * latent)
    assert config["use_learned_positional_embeddings"] is False and config["use_rotary_positional_embeddings"]
    differ = {k for k in config if config[k] != i2v_config[k]} - {"_diffusers_version"}
    assert differ == {"in_channels", "use_learned_positional_embeddings"}
    for name in ("vae/config.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"):
        unversioned = [
            {k: v for k, v in _json(d / name).items() if k != "_diffusers_version"} for d in (t2v_dir, i2v_dir)
        ]
        assert unversioned[0] == unversioned[1], name
    for file in sorted(t2v_dir.rglob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, file


def test_t2v_loads_the_stored_tensors_and_runs_in_both_modes(t2v_dir):
    from diffusers import CogVideoXPipeline, CogVideoXVideoToVideoPipeline, DiffusionPipeline

    with _library_logs() as records:
        pipe = CogVideoXPipeline.from_pretrained(t2v_dir, dtype=torch.float32)
    assert not [r.getMessage() for r in records if any(p in r.getMessage() for p in WEIGHT_PROBLEMS)]
    assert_loads_exactly(pipe, t2v_dir)
    assert isinstance(DiffusionPipeline.from_pretrained(t2v_dir), CogVideoXPipeline)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a cat running", num_inference_steps=2, height=64, width=96, output_type="np")
    frames = pipe(num_frames=9, generator=torch.Generator().manual_seed(0), **args).frames
    assert np.asarray(frames).shape == (1, 9, 64, 96, 3) and np.isfinite(frames).all()
    v2v = CogVideoXVideoToVideoPipeline(**pipe.components)
    video = [_rand_image(64, 96, seed=i) for i in range(9)]
    frames = v2v(video=video, strength=0.5, generator=torch.Generator().manual_seed(0), **args).frames
    assert np.asarray(frames).shape == (1, 9, 64, 96, 3) and np.isfinite(frames).all()


def test_v2v_layout_is_the_hub_one(v2v_dir):
    assert _files(v2v_dir) == V2V_FILES
    assert not list(v2v_dir.rglob("*.safetensors"))
    assert _json(v2v_dir / "model_index.json") == {
        "_class_name": "TextToVideoSDPipeline",
        "_diffusers_version": tw.ZEROSCOPE_DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["models.unet_3d_condition", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    assert _config_keys(v2v_dir / "unet/config.json") == tw.ZEROSCOPE_UNET_KEYS
    assert _config_keys(v2v_dir / "vae/config.json") == tw.ZEROSCOPE_VAE_KEYS
    assert _json(v2v_dir / "scheduler/scheduler_config.json")["skip_prk_steps"] is True
    text_config = _json(v2v_dir / "text_encoder/config.json")
    assert text_config["architectures"] == ["CLIPTextModel"] and text_config["torch_dtype"] == "float16"

    tensors = stored_tensors(v2v_dir)  # torch.load(weights_only=True) of each .bin
    assert set(tensors) == {"text_encoder", "unet", "vae"}
    for component, stored in tensors.items():
        floats = {t.dtype for t in stored.values() if t.is_floating_point()}
        assert floats == {torch.float16}, component
    clip = tensors["text_encoder"]
    assert all(name.startswith("text_model.") for name in clip)  # transformers 4.x names
    assert clip["text_model.embeddings.position_ids"].dtype == torch.int64  # saved by transformers < 4.31

    assert _json(v2v_dir / "tokenizer/special_tokens_map.json")["pad_token"] == "!"
    assert _json(v2v_dir / "tokenizer/tokenizer_config.json")["tokenizer_class"] == "CLIPTokenizer"
    assert (v2v_dir / "tokenizer/merges.txt").read_text().startswith("#version: 0.2\n")
    assert all((v2v_dir / name).stat().st_size < 4096 for name in tw.ZEROSCOPE_WEBUI_FILES)


def test_hub_zeroscope_index_is_refused_and_the_fix_touches_only_the_unet_entry(v2v_dir, v2v_fixed):
    from diffusers import VideoToVideoSDPipeline

    with pytest.raises(ValueError, match=r"models\.unet_3d_condition is not one of the libraries"):
        VideoToVideoSDPipeline.from_pretrained(v2v_dir)
    hub, fixed = _json(v2v_dir / "model_index.json"), _json(v2v_fixed / "model_index.json")
    assert fixed.pop("unet") == ["diffusers", "UNet3DConditionModel"]
    hub.pop("unet")
    assert fixed == hub


def test_stored_tensors_checks_shards_against_their_index(i2v_dir, tmp_path):
    broken = tmp_path / "i2v"
    shutil.copytree(i2v_dir, broken)
    path = broken / "transformer/diffusion_pytorch_model.safetensors.index.json"
    index = _json(path)
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = next(s for s in set(index["weight_map"].values()) if s != shard)
    path.write_text(json.dumps(index))
    with pytest.raises(AssertionError, match="does not hold what"):
        stored_tensors(broken)


# ---------------------------------------------------------------------------
# Loading and running
# ---------------------------------------------------------------------------


def test_i2v_loads_the_stored_tensors_and_runs(i2v_dir):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline, DiffusionPipeline

    with _library_logs() as records:
        pipe = CogVideoXImageToVideoPipeline.from_pretrained(i2v_dir, dtype=torch.float32)
    problems = [r.getMessage() for r in records if any(p in r.getMessage() for p in WEIGHT_PROBLEMS)]
    assert not problems  # the tie of T5's embed_tokens to shared is not reported as a missing weight
    assert_loads_exactly(pipe, i2v_dir)

    assert isinstance(pipe.scheduler, CogVideoXDDIMScheduler)
    cfg = pipe.transformer.config
    assert cfg.in_channels == 2 * cfg.out_channels == 2 * pipe.vae.config.latent_channels
    assert cfg.use_learned_positional_embeddings and cfg.use_rotary_positional_embeddings
    assert cfg.ofs_embed_dim is None and cfg.patch_size_t is None and cfg.patch_bias  # the 0.31 behaviour
    assert not pipe.vae.config.invert_scale_latents
    assert cfg.max_text_seq_length == pipe.tokenizer.model_max_length == 226
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
    tokenizer = pipe.tokenizer
    pieces = len(tokenizer) - 100
    assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [pieces + 99, pieces]
    assert pipe.text_encoder.config.vocab_size >= len(tokenizer)
    assert isinstance(DiffusionPipeline.from_pretrained(i2v_dir), CogVideoXImageToVideoPipeline)

    pipe.set_progress_bar_config(disable=True)
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


def test_v2v_loads_the_stored_tensors_and_runs(v2v_fixed):
    from diffusers import DDIMScheduler, DiffusionPipeline, TextToVideoSDPipeline, VideoToVideoSDPipeline

    with _library_logs() as records:
        pipe = VideoToVideoSDPipeline.from_pretrained(v2v_fixed, dtype=torch.float32)
    problems = [r.getMessage() for r in records if any(p in r.getMessage() for p in WEIGHT_PROBLEMS)]
    assert not problems  # CLIP's stored position_ids is silently ignored by transformers 5
    assert_loads_exactly(pipe, v2v_fixed)

    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0  # from special_tokens_map.json
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert isinstance(DiffusionPipeline.from_pretrained(v2v_fixed), TextToVideoSDPipeline)  # the hub _class_name

    pipe.set_progress_bar_config(disable=True)
    video = [_rand_image(72, 128, seed=i) for i in range(4)]
    frames = pipe(
        prompt="a cat, running (fast) in 4K! Zürich",
        video=video,
        strength=0.6,
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert np.asarray(frames).shape == (1, 4, 72, 128, 3)
    assert np.isfinite(frames).all()


def test_make_tar_is_flat_and_deterministic(i2v_dir, v2v_dir, tmp_path):
    for name, folder, build, expected in (
        ("v2v", v2v_dir, build_v2v, V2V_FILES),
        ("i2v", i2v_dir, build_i2v, I2V_FILES),
    ):
        a = make_tar(folder, tmp_path / f"{name}-a.tar")
        b = make_tar(build(tmp_path / f"{name}-again"), tmp_path / f"{name}-b.tar")
        assert a.read_bytes() == b.read_bytes(), name  # seeded build + deterministic files + normalised tar

        with tarfile.open(a) as tar:  # plain, uncompressed, contents at the root
            files = {m.name for m in tar.getmembers() if m.isfile()}
        assert files == expected
        with open(a, "rb") as fh:
            assert fh.read(2) != b"\x1f\x8b"  # not gzip
