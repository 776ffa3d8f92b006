"""Tiny, randomly initialised, offline stand-ins for the real model folders, in the real hub layouts.

The architectures are the real ones (CogVideoXTransformer3DModel / AutoencoderKLCogVideoX / T5 for
CogVideoX-5b-I2V, UNet3DConditionModel / AutoencoderKL / CLIP for zeroscope_v2_XL), only shrunk. The folders
are written file by file, NOT with today's ``save_pretrained``, so that they have what the hub snapshots have:
the same file names, weight formats and dtypes, shard indexes, config key sets (those of the diffusers and
transformers versions that wrote the hub files) and tokenizer files.

* ``build_i2v(dest, sample_height=8, sample_width=12)`` -> like ``THUDM/CogVideoX-5b-I2V``: a diffusers
  0.31.0.dev0 save, bf16 safetensors everywhere; the transformer in 3 shards and the T5 encoder in 2 shards, each
  with its ``*.safetensors.index.json`` (T5: ``shared.weight`` stored, ``encoder.embed_tokens.weight`` not: the
  model ties it on load); no 0.32+ config keys (``ofs_embed_dim``, ``patch_size_t``, ``patch_bias``,
  ``invert_scale_latents``); the tokenizer as transformers 4.44 writes a slow T5Tokenizer with 100 extra ids
  (``spiece.model``, ``tokenizer_config.json``, ``added_tokens.json``, ``special_tokens_map.json``, no
  ``tokenizer.json``).  The pixel size the transformer accepts is ``(sample_height * 8, sample_width * 8)``:
  the defaults give 64x96, ``(60, 90)`` gives the real 480x720.  ``max_text_seq_length`` and the tokenizer's
  ``model_max_length`` are 226, as in the real repo (with learned positional embeddings the prompt length MUST
  equal ``transformer.config.max_text_seq_length``).
* ``build_t2v(dest, sample_height=8, sample_width=12)`` -> like ``THUDM/CogVideoX-5b``: build_i2v's layout, with
  ``CogVideoXPipeline`` in ``model_index.json`` and the text-to-video transformer (``in_channels`` = latent
  channels, rotary position embeddings only).
* ``build_v2v(dest)`` -> like ``cerspense/zeroscope_v2_XL``: fp16 ``.bin`` pickles only (``torch.save`` of
  state dicts), the hub's ORIGINAL ``model_index.json`` (``TextToVideoSDPipeline``, unet library
  ``"models.unet_3d_condition"``, which diffusers 0.42 refuses: see ``fix_zeroscope_index``), old-diffusers
  config key sets, a CLIP tokenizer as ``vocab.json`` + ``merges.txt`` + SD2-style ``tokenizer_config.json`` /
  ``special_tokens_map.json`` (pad ``"!"``), and a ``zs2_XL/`` folder of (dummy) 1111-webui files.
* ``make_tar(folder, tar_path)`` -> plain uncompressed tar of the folder's contents (``model_index.json`` at
  the archive root), deterministic member order/metadata.
* ``stored_tensors(folder)`` -> ``{component: {name: tensor}}`` exactly as stored on disk.

Every component is built right after ``torch.manual_seed(seed)`` and every file is written deterministically,
so two builds with the same arguments are byte-identical.

Values that could not be checked against the hub files (only their key sets could) are marked "unverified".
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

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
# DDIMScheduler ignores; it is not passed to the constructor (but it is in the file).
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
T5_EXTRA_IDS = 100  # <extra_id_0> .. <extra_id_99>, appended after the SentencePiece pieces (highest id = 0)

COGVIDEOX_DIFFUSERS_VERSION = "0.31.0.dev0"  # model_index.json and every component config of CogVideoX-5b-I2V
COGVIDEOX_T2V_DIFFUSERS_VERSION = "0.30.0.dev0"  # CogVideoX-5b (unverified value: saved before 5b-I2V's)
COGVIDEOX15_DIFFUSERS_VERSION = "0.32.0.dev0"  # CogVideoX1.5-5B-I2V (unverified value: saved before 0.32.0)
COGVIDEOX_TRANSFORMERS_VERSION = "4.44.2"  # text_encoder/config.json "transformers_version" (unverified value)
ZEROSCOPE_DIFFUSERS_VERSION = "0.15.0"  # zeroscope_v2_XL "_diffusers_version" (unverified value)
ZEROSCOPE_TRANSFORMERS_VERSION = "4.30.2"  # < 4.31: CLIP's position_ids still saved (unverified value)

# Config keys of the hub files (the constructor arguments of the diffusers version that wrote them).  Newer
# diffusers keys are left out: their defaults reproduce the old behaviour, which is what loading the hub
# files relies on.
COGVIDEOX_TRANSFORMER_KEYS = frozenset(
    "activation_fn attention_bias attention_head_dim dropout flip_sin_to_cos freq_shift in_channels "
    "max_text_seq_length norm_elementwise_affine norm_eps num_attention_heads num_layers out_channels patch_size "
    "sample_frames sample_height sample_width spatial_interpolation_scale temporal_compression_ratio "
    "temporal_interpolation_scale text_embed_dim time_embed_dim timestep_activation_fn "
    "use_learned_positional_embeddings use_rotary_positional_embeddings".split()
)  # 0.32+ adds ofs_embed_dim, patch_size_t, patch_bias
COGVIDEOX_VAE_KEYS = frozenset(
    "act_fn block_out_channels down_block_types force_upcast in_channels latent_channels latents_mean latents_std "
    "layers_per_block norm_eps norm_num_groups out_channels sample_height sample_width scaling_factor shift_factor "
    "temporal_compression_ratio up_block_types use_post_quant_conv use_quant_conv".split()
)  # 0.32+ adds invert_scale_latents
ZEROSCOPE_UNET_KEYS = frozenset(
    "act_fn attention_head_dim block_out_channels cross_attention_dim down_block_types downsample_padding "
    "in_channels layers_per_block mid_block_scale_factor norm_eps norm_num_groups out_channels sample_size "
    "up_block_types".split()
)  # later: num_attention_heads, time_cond_proj_dim
ZEROSCOPE_VAE_KEYS = frozenset(
    "act_fn block_out_channels down_block_types in_channels latent_channels layers_per_block norm_num_groups "
    "out_channels sample_size scaling_factor up_block_types".split()
)  # later: force_upcast, shift_factor, latents_mean, latents_std, use_quant_conv, use_post_quant_conv, ...

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
# File writers
# ---------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    """As diffusers and transformers write their JSON files: indent 2, sorted keys, trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _diffusers_config(model: Any, keys: frozenset[str], version: str) -> dict:
    """The model's config reduced to the key set an older diffusers wrote, with that version stamped."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    missing = keys - config.keys()
    assert not missing, f"{type(model).__name__} has no config keys {sorted(missing)}"
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in keys}
    return {"_class_name": type(model).__name__, "_diffusers_version": version, **config}


def _state_dict(model: torch.nn.Module, dtype: torch.dtype, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Persistent tensors, floating ones cast to ``dtype``, each with its own contiguous storage."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name in drop:
            continue
        tensor = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
        out[name] = tensor.contiguous().clone()
    return out


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    """``{stem}-0000i-of-0000n.safetensors`` + ``{stem}.safetensors.index.json``, as diffusers/transformers shard.

    The tensors are split, in state-dict order, into ``shards`` runs of about equal byte size.
    """
    from safetensors.torch import save_file

    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    start = 0
    for name, size in zip(names, sizes, strict=True):  # the shard whose byte range holds the tensor's first byte
        groups[min(start * shards // total, shards - 1)].append(name)
        start += size
    for i in range(shards):  # a tiny model may leave a shard empty: move one tensor over from a neighbour
        if not groups[i]:
            donor = i - 1 if i and len(groups[i - 1]) > 1 else i + 1
            groups[i].append(groups[donor].pop() if donor < i else groups[donor].pop(0))
    assert all(groups) and sum(map(len, groups)) == len(names)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file_name = f"{stem}-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))
    _write_json(
        folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _save_single(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _save_bin(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)  # deterministic: same tensors + same file name -> same bytes


# ---------------------------------------------------------------------------
# Tokenizers (built offline)
# ---------------------------------------------------------------------------


def _added_token(content: str, *, strip: bool = False, special: bool | None = True) -> dict:
    token = {"content": content, "lstrip": strip, "normalized": False, "rstrip": strip, "single_word": False}
    if special is not None:
        token["special"] = special
    return token


def _write_t5_tokenizer_files(folder: Path) -> None:
    """spiece.model (a real SentencePiece model trained offline on a few sentences) plus the three JSON files
    transformers 4.44 writes for a slow T5Tokenizer with ``extra_ids=100``; no tokenizer.json."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    sentences = [" ".join(_WORDS[i::5]) for i in range(5)] + [" ".join(_LETTERS + _PUNCT)]
    model = io.BytesIO()  # trained in memory: no file paths end up in the model's trainer_spec (determinism)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 20),
        model_writer=model,
        vocab_size=100,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).get_piece_size()

    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    extra_ids = {token: pieces + T5_EXTRA_IDS - 1 - i for i, token in enumerate(extra)}  # <extra_id_0> is last
    decoder = {str(i): _added_token(t) for i, t in enumerate(("<pad>", "</s>", "<unk>"))}
    decoder.update({str(i): _added_token(t, strip=True) for t, i in extra_ids.items()})
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": True,
            "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
            "additional_special_tokens": extra,
            "clean_up_tokenization_spaces": True,
            "eos_token": "</s>",
            "extra_ids": T5_EXTRA_IDS,
            "legacy": True,
            "model_max_length": COGVIDEOX_MAX_TEXT_SEQ_LENGTH,
            "pad_token": "<pad>",
            "sp_model_kwargs": {},
            "tokenizer_class": "T5Tokenizer",
            "unk_token": "<unk>",
        },
    )
    _write_json(folder / "added_tokens.json", extra_ids)
    special = {k: _added_token(v, special=None) for k, v in (("eos_token", "</s>"), ("pad_token", "<pad>"))}
    special["unk_token"] = _added_token("<unk>", special=None)
    _write_json(folder / "special_tokens_map.json", {"additional_special_tokens": extra, **special})


def _t5_tokenizer(folder: Path):
    """Write the tiny T5 tokenizer files into ``folder`` and load them (vocab: the pieces + 100 extra ids)."""
    from transformers import T5Tokenizer

    _write_t5_tokenizer_files(Path(folder))
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


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny CLIP BPE vocabulary: every byte (so any text tokenizes), merges building ``_WORDS``, and the two
    special tokens last, as in the real one ("!" is id 0 there and here)."""
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
    return vocab, merges


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    # zeroscope (OpenCLIP ViT-H tokenizer, as in SD 2.x) pads with "!".
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH, pad_token="!")


def _write_clip_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt + the SD 2.x tokenizer_config.json / special_tokens_map.json (no tokenizer.json).

    As in stabilityai/stable-diffusion-2 (copied into damo-vilab's and zeroscope's folders), the pad token is
    ``"!"`` in special_tokens_map.json while tokenizer_config.json still says ``"<|endoftext|>"``.
    """
    vocab, merges = _clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")

    def token(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": {"__type": "AddedToken", **token("<|startoftext|>")},
            "do_lower_case": True,
            "eos_token": {"__type": "AddedToken", **token("<|endoftext|>")},
            "errors": "replace",
            "model_max_length": CLIP_MAX_LENGTH,
            "name_or_path": "openai/clip-vit-large-patch14",
            "pad_token": "<|endoftext|>",
            "special_tokens_map_file": "./special_tokens_map.json",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": {"__type": "AddedToken", **token("<|endoftext|>")},
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": token("<|startoftext|>"),
            "eos_token": token("<|endoftext|>"),
            "pad_token": "!",
            "unk_token": token("<|endoftext|>"),
        },
    )


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def _t5_config(vocab_size: int) -> dict:
    """text_encoder/config.json of CogVideoX-5b-I2V (google/t5-v1_1-xxl's encoder as transformers 4.44 saves it),
    shrunk: real d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads, vocab 32128."""
    return {
        "_name_or_path": "google/t5-v1_1-xxl",
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": 64,
        "d_kv": 8,
        "d_model": 32,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": 1,
        "num_heads": 4,
        "num_layers": 1,
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": COGVIDEOX_TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def build_i2v(
    dest: Path,
    sample_height: int = 8,
    sample_width: int = 12,
    *,
    seed: int = 0,
) -> Path:
    """Write a tiny CogVideoXImageToVideoPipeline folder in the layout of THUDM/CogVideoX-5b-I2V.

    The transformer only accepts ``height = sample_height * 8`` and
    ``width = sample_width * 8`` (learned positional embeddings, as the real 5b-I2V).
    """
    return _build_cogvideox(
        dest,
        seed,
        COGVIDEOX_DIFFUSERS_VERSION,
        transformer={
            "sample_height": sample_height,
            "sample_width": sample_width,
            "sample_frames": 49,
            "use_learned_positional_embeddings": True,
        },
        transformer_keys=COGVIDEOX_TRANSFORMER_KEYS,
        vae={"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 2, "latent_channels": 4},
        vae_keys=COGVIDEOX_VAE_KEYS,
    )


def build_t2v(dest: Path, sample_height: int = 8, sample_width: int = 12, *, seed: int = 0) -> Path:
    """Write a tiny CogVideoXPipeline folder in the layout of THUDM/CogVideoX-5b (text-to-video).

    The layout of 5b-I2V (same T5, tokenizer, VAE and scheduler files, sharded bf16 transformer), but the transformer
    takes the noisy latents alone (``in_channels`` = the VAE's latent channels, I2V: twice that) and has rotary
    position embeddings only (``use_learned_positional_embeddings`` false), so any 8x size runs; its sample size
    (``sample_height * 8`` x ``sample_width * 8``, real 480x720) is the size the predictor makes.
    """
    return _build_cogvideox(
        dest,
        seed,
        COGVIDEOX_T2V_DIFFUSERS_VERSION,
        transformer={
            "sample_height": sample_height,
            "sample_width": sample_width,
            "sample_frames": 49,
            "use_learned_positional_embeddings": False,
            "in_channels": 4,  # the VAE's latent channels: text-to-video has no image latents
        },
        transformer_keys=COGVIDEOX_TRANSFORMER_KEYS,
        vae={"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 2, "latent_channels": 4},
        vae_keys=COGVIDEOX_VAE_KEYS,
        pipeline="CogVideoXPipeline",
    )


def build_i2v15(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny CogVideoXImageToVideoPipeline folder in the layout of THUDM/CogVideoX1.5-5B-I2V.

    The 1.5 architecture: rotary position embeddings only (any size), patch_size_t 2 (the pipeline pads the latent
    frames to an even count), an ofs embedding, the real sample size 96x170 (latents) x 81 frames, and a VAE that
    inverts its image-latent scaling. The VAE is the narrowest that keeps 8x spatial / 4x temporal compression (one
    channel a block, no extra resnets, two latent channels): decoding full-size frames dominates the cost on the CPU
    (~8 s for 17 frames at 1360x768, tiled, on 2 cores).
    """
    return _build_cogvideox(
        dest,
        seed,
        COGVIDEOX15_DIFFUSERS_VERSION,
        transformer={
            "sample_height": 96,
            "sample_width": 170,
            "sample_frames": 81,
            "use_learned_positional_embeddings": False,
            "patch_size_t": 2,
            "patch_bias": False,
            "ofs_embed_dim": 32,
        },  # real 512: it must equal time_embed_dim (the two are added)
        transformer_keys=COGVIDEOX_TRANSFORMER_KEYS | {"ofs_embed_dim", "patch_size_t", "patch_bias"},
        vae={
            "block_out_channels": (1, 1, 1, 1),
            "layers_per_block": 0,
            "norm_num_groups": 1,
            "latent_channels": 2,
            "invert_scale_latents": True,
        },
        vae_keys=COGVIDEOX_VAE_KEYS | {"invert_scale_latents"},
    )


def _build_cogvideox(
    dest: Path,
    seed: int,
    version: str,
    transformer: dict[str, Any],
    transformer_keys: frozenset[str],
    vae: dict[str, Any],
    vae_keys: frozenset[str],
    pipeline: str = "CogVideoXImageToVideoPipeline",
) -> Path:
    """A tiny CogVideoX folder; ``transformer`` and ``vae`` hold what differs between checkpoints (real VAE:
    block_out_channels (128, 256, 256, 512), layers_per_block 3, 32 norm groups, 16 latent channels). The transformer
    takes twice the latent channels (noisy latents + image latents) unless ``transformer`` says otherwise."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    latent_channels = vae["latent_channels"]
    tokenizer = _t5_tokenizer(dest / "tokenizer")
    # Real: 32000 pieces + 100 extra ids, padded to 32128 (a multiple of 128); same rounding here.
    vocab_size = -(-len(tokenizer) // 128) * 128

    t5_config = _t5_config(vocab_size)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config.from_dict(t5_config)).eval()
    _write_json(dest / "text_encoder" / "config.json", t5_config)
    # transformers saves the tied input embeddings once, as shared.weight (the model re-ties them on load).
    t5_tensors = _state_dict(text_encoder, torch.bfloat16, drop=("encoder.embed_tokens.weight",))
    _save_sharded(t5_tensors, dest / "text_encoder", "model", shards=2)

    transformer = dict(transformer)
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,  # real: 48
        attention_head_dim=16,  # real: 64 (3D RoPE needs head_dim // 8 * 3 even -> >= 16)
        in_channels=transformer.pop("in_channels", 2 * latent_channels),
        out_channels=latent_channels,
        flip_sin_to_cos=True,
        freq_shift=0,
        time_embed_dim=32,  # real: 512
        text_embed_dim=t5_config["d_model"],
        num_layers=1,  # real: 42
        dropout=0.0,
        attention_bias=True,
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
        **transformer,
    ).eval()
    _write_json(dest / "transformer" / "config.json", _diffusers_config(model, transformer_keys, version))
    tensors = _state_dict(model, torch.bfloat16)
    _save_sharded(tensors, dest / "transformer", "diffusion_pytorch_model", shards=3)

    torch.manual_seed(seed)
    autoencoder = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,  # 4 blocks -> 8x spatial
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        act_fn="silu",
        norm_eps=1e-6,
        temporal_compression_ratio=4,
        sample_height=480,
        sample_width=720,
        scaling_factor=0.7,  # real 5b value
        use_quant_conv=False,
        use_post_quant_conv=False,
        **vae,
    ).eval()
    _write_json(dest / "vae" / "config.json", _diffusers_config(autoencoder, vae_keys, version))
    _save_single(_state_dict(autoencoder, torch.bfloat16), dest / "vae" / "diffusion_pytorch_model.safetensors")

    scheduler = {"_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": version}
    _write_json(dest / "scheduler" / "scheduler_config.json", {**scheduler, **COGVIDEOX_5B_I2V_SCHEDULER_CONFIG})

    _write_json(
        dest / "model_index.json",
        {
            "_class_name": pipeline,
            "_diffusers_version": version,
            "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLCogVideoX"],
        },
    )
    return dest


def _clip_config(vocab_size: int) -> dict:
    """text_encoder/config.json of zeroscope_v2_XL (OpenCLIP ViT-H text tower as in SD 2.x, written by
    transformers < 4.31), shrunk: real hidden 1024, intermediate 4096, 23 layers, 16 heads, projection 512,
    vocab 49408.  bos/eos/pad ids 0/2/1 are the real file's (CLIPTextConfig defaults, not the tokenizer's)."""
    return {
        "_name_or_path": "text_encoder",  # value unverified
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": 32,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "model_type": "clip_text_model",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "projection_dim": 32,
        "torch_dtype": "float16",
        "transformers_version": ZEROSCOPE_TRANSFORMERS_VERSION,
        "vocab_size": vocab_size,
    }


# The zs2_XL/ files (weights for the 1111 webui text2video extension; diffusers never reads them).  Here they
# are tiny valid torch pickles, so a tool that scans every .bin/.pth still gets a loadable file.
ZEROSCOPE_WEBUI_FILES = ("zs2_XL/open_clip_pytorch_model.bin", "zs2_XL/text2video_pytorch_model.pth")


def build_v2v(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny zeroscope folder in the layout of cerspense/zeroscope_v2_XL, hub model_index.json included.

    diffusers 0.42 refuses that model_index.json (unet library ``"models.unet_3d_condition"``): load a copy
    fixed with ``fix_zeroscope_index`` (or load the components yourself).
    """
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    version = ZEROSCOPE_DIFFUSERS_VERSION
    _write_clip_tokenizer_files(dest / "tokenizer")
    vocab, _ = _clip_vocab()

    clip_config = _clip_config(len(vocab))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(clip_config)).eval()
    _write_json(dest / "text_encoder" / "config.json", clip_config)
    # transformers 4.x's CLIPTextModel wrapped everything in ``text_model`` (5.x drops that level and strips the
    # prefix on load), and before 4.31 it also saved the position_ids buffer (int64, 1 x 77).
    tensors = {f"text_model.{k}": v for k, v in _state_dict(text_encoder, torch.float16).items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(CLIP_MAX_LENGTH).unsqueeze(0)
    _save_bin(tensors, dest / "text_encoder" / "pytorch_model.bin")

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
        cross_attention_dim=clip_config["hidden_size"],
        attention_head_dim=4,  # (means number of heads in UNet3D, as in the real config: 64)
    ).eval()
    _write_json(dest / "unet" / "config.json", _diffusers_config(unet, ZEROSCOPE_UNET_KEYS, version))
    _save_bin(_state_dict(unet, torch.float16), dest / "unet" / "diffusion_pytorch_model.bin")

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
    _write_json(dest / "vae" / "config.json", _diffusers_config(vae, ZEROSCOPE_VAE_KEYS, version))
    _save_bin(_state_dict(vae, torch.float16), dest / "vae" / "diffusion_pytorch_model.bin")

    scheduler = {"_class_name": "DDIMScheduler", "_diffusers_version": version, "skip_prk_steps": True}
    _write_json(dest / "scheduler" / "scheduler_config.json", {**scheduler, **ZEROSCOPE_V2_XL_SCHEDULER_CONFIG})

    _write_json(
        dest / "model_index.json",
        {
            "_class_name": "TextToVideoSDPipeline",
            "_diffusers_version": version,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["models.unet_3d_condition", "UNet3DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    for i, name in enumerate(ZEROSCOPE_WEBUI_FILES):
        _save_bin({"stand_in": torch.full((4,), float(i), dtype=torch.float16)}, dest / name)
    return dest


def fix_zeroscope_index(folder: Path) -> Path:
    """Rewrite the unet entry of a zeroscope ``model_index.json`` to ``["diffusers", "UNet3DConditionModel"]``
    (in place), the one change diffusers 0.42 needs to load the hub folder."""
    path = Path(folder) / "model_index.json"
    index = json.loads(path.read_text())
    index["unet"] = ["diffusers", index["unet"][1]]
    _write_json(path, index)
    return Path(folder)


# ---------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def stored_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{component: {name: tensor}}`` as stored on disk, for each component of ``model_index.json`` that has
    weights: safetensors shards through their index (every shard file must hold exactly the names the index
    maps to it), a single safetensors file, or a ``.bin`` pickle (read with ``weights_only=True``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component in sorted(k for k in index if not k.startswith("_")):
        sub = folder / component
        path = next((sub / f for f in _WEIGHT_FILES if (sub / f).is_file()), None)
        if path is None:
            continue
        if path.name.endswith(".index.json"):
            weight_map: dict[str, str] = json.loads(path.read_text())["weight_map"]
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                part = load_file(str(sub / shard))
                expected = {name for name, file in weight_map.items() if file == shard}
                assert set(part) == expected, f"{sub / shard} does not hold what {path.name} maps to it"
                tensors.update(part)
        elif path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        out[component] = tensors
    return out


def assert_loads_exactly(pipe: Any, folder: Path) -> None:
    """Every stored tensor is in the loaded component, cast to float32 (integers unchanged), with equal values;
    every loaded persistent tensor was stored, except T5's encoder.embed_tokens.weight (tied to shared.weight) and
    the fused Q/K/V projections that pipelines.speed_up adds (to_qkv, to_kv)."""
    stored_all = stored_tensors(folder)
    assert stored_all  # every component with weights
    for component, stored in stored_all.items():
        module = getattr(pipe, component)
        loaded = module.state_dict()
        buffers = dict(module.named_buffers())  # non-persistent ones included (CLIP's position_ids)
        names = {}
        for name in stored:  # transformers 5's CLIPTextModel has no "text_model." level: it strips the prefix
            names[name] = name if name in loaded or name in buffers else name.removeprefix("text_model.")
        for name, tensor in stored.items():
            got = loaded.get(names[name], buffers.get(names[name]))
            assert got is not None, f"{component}: stored {name} not in the model"
            assert got.dtype == (torch.float32 if tensor.is_floating_point() else tensor.dtype), (component, name)
            assert torch.equal(got, tensor.to(got.dtype)), f"{component}: {name} differs from the stored tensor"
        unstored = {
            name for name in set(loaded) - set(names.values()) if ".to_qkv." not in name and ".to_kv." not in name
        }
        if component == "text_encoder" and "shared.weight" in stored:
            assert unstored == {"encoder.embed_tokens.weight"}
            assert torch.equal(loaded["encoder.embed_tokens.weight"], stored["shared.weight"].float())
            assert module.encoder.embed_tokens.weight is module.shared.weight  # tied, not a copy
        else:
            assert not unstored, f"{component}: not from the checkpoint: {sorted(unstored)}"


def build_lora(
    folder: Path,
    dest: Path,
    *,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    rank: int = 4,
    alpha: int = 8,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
    metadata: bool = True,
) -> Path:
    """A LoRA for the transformer of the tiny CogVideoX ``folder``, saved as the CogVideoX trainers save theirs.

    peft adapters on ``targets`` with random (non-zero) A and B, saved by diffusers' ``save_lora_weights`` as
    ``dest/pytorch_lora_weights.safetensors``: keys ``transformer.<layer>.lora_A/B.weight``, in ``dtype``. With
    ``metadata`` its peft config (rank, alpha) goes along as diffusers 0.42 writes it (so alpha / rank scales it);
    without, as the diffusers CogVideoX training scripts and cogvideox-factory save (diffusers then takes alpha =
    rank). Returns the file.
    """
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = CogVideoXTransformer3DModel.from_pretrained(Path(folder) / "transformer", dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:  # peft starts B at zero: the LoRA would change nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    layers = {key: value.to(dtype) for key, value in get_peft_model_state_dict(transformer).items()}
    CogVideoXImageToVideoPipeline.save_lora_weights(
        dest, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict() if metadata else None
    )
    return Path(dest) / "pytorch_lora_weights.safetensors"


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


def rife_layout() -> dict[str, tuple[int, ...]]:
    """The published RIFE IFNet v4.26 heavy state dict (cccv's model zoo file): ``{key: shape}``, keys with the
    ``module.`` prefix the file carries. Written from cccv's ``ifnet_arch.py`` (EutropicAI/cccv 79725f4), not from
    interpolation.py: 158 tensors, 5,723,156 values. Widths are the real ones (the file is ~23 MB)."""
    layout: dict[str, tuple[int, ...]] = {}
    blocks = [(7 + 32, 192), (8 + 4 + 8 + 32, 128), (8 + 4 + 8 + 32, 96), (8 + 4 + 8 + 32, 64), (8 + 4 + 8 + 32, 32)]
    for i, (cin, c) in enumerate(blocks):
        prefix = f"module.block{i}"
        layout |= {f"{prefix}.conv0.0.0.weight": (c // 2, cin, 3, 3), f"{prefix}.conv0.0.0.bias": (c // 2,)}
        layout |= {f"{prefix}.conv0.1.0.weight": (c, c // 2, 3, 3), f"{prefix}.conv0.1.0.bias": (c,)}
        for j in range(8):
            layout[f"{prefix}.convblock.{j}.beta"] = (1, c, 1, 1)
            layout[f"{prefix}.convblock.{j}.conv.weight"] = (c, c, 3, 3)
            layout[f"{prefix}.convblock.{j}.conv.bias"] = (c,)
        layout |= {f"{prefix}.lastconv.0.weight": (c, 52, 4, 4), f"{prefix}.lastconv.0.bias": (52,)}
    for name, shape in [("cnn0", (16, 3, 3, 3)), ("cnn1", (16, 16, 3, 3)), ("cnn2", (16, 16, 3, 3))]:
        layout |= {f"module.encode.{name}.weight": shape, f"module.encode.{name}.bias": (16,)}
    layout |= {"module.encode.cnn3.weight": (16, 16, 4, 4), "module.encode.cnn3.bias": (16,)}
    return layout


def build_rife(dest: Path, *, seed: int = 0, layout: dict[str, tuple[int, ...]] | None = None) -> Path:
    """Random IFNet v4.26 heavy weights as cccv publishes them: a ``torch.save``'d dict of float32 tensors under
    ``module.`` keys (``rife_layout()``, or another ``layout`` to make a wrong file). Deterministic per seed."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in (layout or rife_layout()).items():
        if key.endswith(".beta"):
            state[key] = torch.ones(shape)
        else:
            fan_in = max(1, torch.Size(shape[1:]).numel()) if len(shape) > 1 else shape[0]
            state[key] = torch.randn(shape, generator=generator) * (0.5 / fan_in**0.5)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest)
    return Path(dest)
