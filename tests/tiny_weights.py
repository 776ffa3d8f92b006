"""Tiny, randomly initialised, offline stand-ins for the real model folders.

The folders written here have the same layout as the real Hugging Face repos
(``model_index.json`` at the top, one subfolder per component, the same component
classes) and load with ``DiffusionPipeline.from_pretrained(folder)`` or the specific
pipeline class, without network access.  The architectures are the real ones
(CogVideoXTransformer3DModel / AutoencoderKLCogVideoX / T5 for CogVideoX-5b-I2V,
UNet3DConditionModel / AutoencoderKL / CLIP for zeroscope_v2_XL), only shrunk.

Every component is built right after ``torch.manual_seed(seed)``, so two builds with
the same arguments give the same weights.

* ``build_i2v(dest, sample_height=8, sample_width=12)`` -> CogVideoXImageToVideoPipeline
  folder like ``THUDM/CogVideoX-5b-I2V``.  The pixel size the transformer accepts is
  ``(sample_height * 8, sample_width * 8)``: the defaults give 64x96, ``(60, 90)`` gives
  the real 480x720.  ``max_text_seq_length`` and the tokenizer's ``model_max_length``
  are 226, as in the real repo, so the pipeline's default ``max_sequence_length=226``
  works (with learned positional embeddings the prompt length MUST equal
  ``transformer.config.max_text_seq_length``).
* ``build_v2v(dest)`` -> VideoToVideoSDPipeline folder like ``cerspense/zeroscope_v2_XL``
  (8x VAE, 4-level UNet3D with the real block types, CLIP tokenizer with
  ``model_max_length=77``, DDIMScheduler with the repo's config).
* ``make_tar(folder, tar_path)`` -> plain uncompressed tar of the folder's contents
  (``model_index.json`` at the archive root), deterministic member order/metadata.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch

# ---------------------------------------------------------------------------
# Real scheduler configs (values of the hub repos' scheduler/scheduler_config.json)
# ---------------------------------------------------------------------------

# THUDM/CogVideoX-5b-I2V scheduler/scheduler_config.json (CogVideoXDDIMScheduler).
COGVIDEOX_5B_I2V_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

# cerspense/zeroscope_v2_XL scheduler/scheduler_config.json (DDIMScheduler, inherited
# from damo-vilab/text-to-video-ms-1.7b).  "skip_prk_steps" is a PNDM leftover that
# DDIMScheduler ignores; it is not passed to the constructor.
ZEROSCOPE_V2_XL_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

COGVIDEOX_MAX_TEXT_SEQ_LENGTH = 226  # real transformer config + real tokenizer model_max_length
CLIP_MAX_LENGTH = 77
_T5_TOKENIZER_CONFIG = {
    "tokenizer_class": "T5Tokenizer",
    "model_max_length": COGVIDEOX_MAX_TEXT_SEQ_LENGTH,
    "extra_ids": 0,
}

# Words that get their own token in both tiny tokenizers (anything else still tokenizes:
# T5 falls back to single letters / <unk>, CLIP to byte-level characters).
_WORDS = (
    "a an the of and in on with at to is cat dog man woman person video cinematic "
    "beautiful high quality running walking sitting flying ocean sky sunset city "
    "forest mountain water light camera slow motion red blue green"
).split()
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
_PUNCT = ".,!?'\"-:;()"


# ---------------------------------------------------------------------------
# Tokenizers (built offline)
# ---------------------------------------------------------------------------


def _t5_tokenizer(folder: Path):
    """A real SentencePiece model trained offline on a few sentences, saved as the hub repo ships its tokenizer:
    spiece.model + tokenizer_config.json, no tokenizer.json (so loading takes the sentencepiece/protobuf path)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    sentences = [" ".join(_WORDS[i::5]) for i in range(5)] + [" ".join(_LETTERS + _PUNCT)]
    corpus.write_text("\n".join(sentences * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=100, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (folder / "spiece.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(_T5_TOKENIZER_CONFIG))
    return T5Tokenizer.from_pretrained(folder)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    bs += list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:  # every byte, word-internal and word-final: any text tokenizes
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in _WORDS:  # left-to-right merges building each word
        if len(w) < 2:
            continue
        cur = w[0]
        for i, ch in enumerate(w[1:], start=1):
            nxt = ch + "</w>" if i == len(w) - 1 else ch
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    # zeroscope (OpenCLIP ViT-H tokenizer, as in SD 2.x) pads with "!".
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH, pad_token="!")


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def build_i2v(
    dest: Path,
    sample_height: int = 8,
    sample_width: int = 12,
    *,
    seed: int = 0,
) -> Path:
    """Write a tiny CogVideoXImageToVideoPipeline folder (layout of THUDM/CogVideoX-5b-I2V).

    The transformer only accepts ``height = sample_height * 8`` and
    ``width = sample_width * 8`` (learned positional embeddings, as the real 5b-I2V).
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    dest = Path(dest)
    latent_channels = 4  # real: 16
    tokenizer = _t5_tokenizer(dest / "tokenizer")

    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,  # real: 4096 (t5-v1_1-xxl)
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            dropout_rate=0.0,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,  # real: 48
        attention_head_dim=16,  # real: 64 (3D RoPE needs head_dim // 8 * 3 even -> >= 16)
        in_channels=2 * latent_channels,  # noisy latents + image latents
        out_channels=latent_channels,
        flip_sin_to_cos=True,
        freq_shift=0,
        time_embed_dim=32,  # real: 512
        text_embed_dim=text_encoder.config.d_model,
        num_layers=1,  # real: 42
        dropout=0.0,
        attention_bias=True,
        sample_width=sample_width,
        sample_height=sample_height,
        sample_frames=49,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=COGVIDEOX_MAX_TEXT_SEQ_LENGTH,
        activation_fn="gelu-approximate",
        timestep_activation_fn="silu",
        norm_elementwise_affine=True,
        norm_eps=1e-5,
        spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    ).eval()

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,  # 4 blocks -> 8x spatial
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # real: (128, 256, 256, 512)
        latent_channels=latent_channels,
        layers_per_block=1,  # real: 3
        act_fn="silu",
        norm_eps=1e-6,
        norm_num_groups=2,  # real: 32
        temporal_compression_ratio=4,
        sample_height=480,
        sample_width=720,
        scaling_factor=0.7,  # real 5b value
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()

    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_5B_I2V_SCHEDULER_CONFIG)

    pipe = CogVideoXImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)
    if (dest / "tokenizer" / "spiece.model").exists():  # keep the hub's tokenizer layout: no tokenizer.json
        for name in ("tokenizer.json", "special_tokens_map.json"):
            (dest / "tokenizer" / name).unlink(missing_ok=True)
        (dest / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(_T5_TOKENIZER_CONFIG))
    return dest


def build_v2v(
    dest: Path,
    *,
    seed: int = 0,
    pipeline_class_name: str = "VideoToVideoSDPipeline",
) -> Path:
    """Write a tiny VideoToVideoSDPipeline folder (layout of cerspense/zeroscope_v2_XL).

    ``pipeline_class_name`` is written as ``_class_name`` in model_index.json; pass
    ``"TextToVideoSDPipeline"`` to mimic the hub index (same components, so
    ``VideoToVideoSDPipeline.from_pretrained`` loads it either way, while
    ``DiffusionPipeline.from_pretrained`` then returns a TextToVideoSDPipeline).
    The unet entry is written as ``["diffusers", "UNet3DConditionModel"]``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel, VideoToVideoSDPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    dest = Path(dest)
    tokenizer = _clip_tokenizer()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,  # real: 1024 (OpenCLIP ViT-H)
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=2,  # real: 23
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 8, 16, 16),  # real: (320, 640, 1280, 1280)
        layers_per_block=1,  # real: 2
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=4,  # real: 32
        norm_eps=1e-5,
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=4,  # (means number of heads in UNet3D, as in the real config: 64)
    ).eval()

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks -> 8x spatial
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # real: (128, 256, 512, 512)
        layers_per_block=1,  # real: 2
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=2,  # real: 32
        sample_size=768,
        scaling_factor=0.18215,
    ).eval()

    scheduler = DDIMScheduler(**ZEROSCOPE_V2_XL_SCHEDULER_CONFIG)

    pipe = VideoToVideoSDPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)

    index_path = dest / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = pipeline_class_name
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dest


def make_tar(folder: Path, tar_path: Path) -> Path:
    """Plain (uncompressed) tar of ``folder``'s contents, with them at the archive root.

    Members are added in sorted order with zeroed mtime/owner, so the same folder
    gives a byte-identical tar.
    """
    folder = Path(folder)
    tar_path = Path(tar_path)
    tar_path.parent.mkdir(parents=True, exist_ok=True)

    def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            tar.add(path, arcname=rel, recursive=False, filter=_normalise)
    return tar_path
