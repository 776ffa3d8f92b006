"""LoRAs for the CogVideoX transformer, per prediction: fetched once, checked, kept loaded, applied exactly.

``Loras.use(url, scale)`` makes that LoRA (or none) the pipeline's state for the next pipeline call:

- the file is fetched once into ``<weights cache>/loras/`` (atomically, at most MAX_FILE_BYTES; the folder is kept
  under CACHE_BYTES by deleting the least recently used files);
- it is checked against the transformer before anything is loaded (every key names a linear layer of it, with the
  layer's shapes), so a LoRA for another model leaves the pipeline untouched;
- it is loaded with diffusers' ``load_lora_weights`` as a named adapter; the last KEEP_LOADED stay loaded, so
  alternating between LoRAs costs neither a download nor a load;
- it runs on the attention's unfused processors: the fused Q/K/V projections that speed up predictions without a
  LoRA would silently bypass LoRA layers on to_q/to_k/to_v. With no LoRA the adapters are disabled and the fused
  processors come back, so the output equals that of a pipeline that never saw a LoRA.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from errors import InputError, WeightsError
from memory import use_unfused_qkv
from reporting import logger, record_metric
from weights import Source, cache_dir, fetch_file, hub_base_model

MAX_FILE_BYTES = 2 * 10**9  # a rank-128 LoRA on every linear layer of a 5B transformer is ~1.4 GB in float32
CACHE_BYTES = 20 * 10**9  # the LoRA files kept on disk, least recently used deleted first
KEEP_LOADED = 3  # adapters kept in memory (each a few MB to a GB), least recently used deleted first
SOURCES = "an https URL of a .safetensors file, hf://OWNER/NAME or hf://OWNER/NAME/FILE.safetensors"


class Loras:
    """The LoRA adapters of one CogVideoX pipeline (whose transformer's Q/K/V projections are fused)."""

    def __init__(self, pipe: Any, model: str) -> None:
        """``model``: the checkpoint's name, e.g. "CogVideoX1.5-5B-I2V", to refuse LoRAs stated to be for another."""
        self.pipe, self.model = pipe, model
        transformer = pipe.transformer
        self.fused = dict(transformer.attn_processors)
        self.unfused = dict(transformer.original_attn_processors or self.fused)
        self.layers = {
            name: module
            for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith(("to_qkv", "to_kv"))  # ours, not trained
        }
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> source, least recently used first
        self.active: str | None = None

    def use(self, url: str, scale: float) -> None:
        """Make the LoRA at ``url`` with ``scale`` active for the next pipeline call; blank url or scale 0: none."""
        url = url.strip()
        if not url or scale == 0:
            self._deactivate()
            return
        try:
            source = Source.parse(url, file=True)
        except ValueError:
            raise InputError(f"Invalid input `lora_url`: {url!r} is not {SOURCES}.") from None
        name = "lora_" + hashlib.sha256(source.text.encode()).hexdigest()[:16]
        if name not in self.loaded:
            path = self._fetch(source, name)
            self._load(path, name, source.text)
        self.loaded.move_to_end(name)
        self.active = name
        use_unfused_qkv(self.pipe.transformer, True)  # resident and fused: the unfused projections onto the GPU
        self.pipe.transformer.set_attn_processor(dict(self.unfused))  # it empties the dict it is given
        self.pipe.enable_lora()  # set_adapters alone does not undo disable_lora
        self.pipe.set_adapters([name], [scale])
        logger.info("LoRA %s at scale %g", source.text, scale)

    def _deactivate(self) -> None:
        if self.active:
            self.pipe.disable_lora()
            self.pipe.transformer.set_attn_processor(dict(self.fused))
            use_unfused_qkv(self.pipe.transformer, False)
            self.active = None

    def _fetch(self, source: Source, name: str) -> Path:
        folder = cache_dir() / "loras"
        path = folder / f"{name}.safetensors"
        try:
            if source.repo and not path.is_file():
                self._check_base_model(hub_base_model(source), "its model card")
            metrics = fetch_file(source, path, MAX_FILE_BYTES, ".safetensors")
        except WeightsError as error:
            raise InputError(f"Invalid input `lora_url`: {error} ({source.text}).") from None
        record_metric("lora.download_s", metrics["download_s"])
        record_metric("lora.cached", metrics["cached"])
        if not metrics["cached"]:
            logger.info(
                "Downloaded LoRA %s: %.1f MB in %.1f s", source.text, metrics["bytes"] / 1e6, metrics["download_s"]
            )
            _evict(folder, keep=path)
        return path

    def _load(self, path: Path, name: str, source: str) -> None:
        """Check the file against the transformer, then load it as adapter ``name``; roll back on any failure."""
        start = time.perf_counter()
        try:
            state, metadata = _read(path)
            self._check_base_model(next((v for k, v in metadata.items() if "base_model" in k), None), "its metadata")
            self._check_layers(state)
        except InputError:
            path.unlink()  # not kept: the same URL may serve a good file later
            raise
        try:
            with warnings.catch_warnings():  # peft warns of several adapters in one model: that is the point here
                warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
                # As diffusers loads a LoRA file itself, its adapter metadata (alpha) included.
                self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
            if name not in self.pipe.transformer.peft_config:
                raise ValueError("no layer of the transformer was adapted")
        except Exception as error:
            if name in getattr(self.pipe.transformer, "peft_config", {}):
                self.pipe.delete_adapters(name)
            raise InputError(f"Invalid input `lora_url`: the LoRA could not be loaded ({error}).") from None
        self.loaded[name] = source
        while len(self.loaded) > KEEP_LOADED:
            evicted, _ = self.loaded.popitem(last=False)
            self.pipe.delete_adapters(evicted)
        seconds = time.perf_counter() - start
        record_metric("lora.load_s", seconds)
        logger.info("Loaded LoRA %s (%d tensors) in %.2f s", source, len(state), seconds)

    def _check_base_model(self, base_model: str | None, where: str) -> None:
        """Refuse a LoRA stated to be for the other CogVideoX generation (1.0 vs 1.5): the shapes of their attention
        layers are the same, so only what its card or file says can tell."""
        if base_model and "cogvideox" in base_model.lower() and ("1.5" in base_model) != ("1.5" in self.model):
            raise InputError(
                f"Invalid input `lora_url`: this LoRA is for {base_model} ({where} says so), not {self.model}."
            )

    def _check_layers(self, state: dict[str, torch.Tensor]) -> None:
        """Refuse a LoRA for another model before anything is loaded: each of its tensors must be the lora_A (rank x
        inputs) or lora_B (outputs x rank) of a linear layer of this transformer, in pairs, with finite values."""
        unknown, problems, ranks = [], [], {}
        for key, tensor in state.items():
            layer_name, _, part = key.removeprefix("transformer.").partition(".lora_")
            layer = self.layers.get(layer_name) if key.startswith("transformer.") else None
            if layer is None or part not in ("A.weight", "B.weight") or tensor.ndim != 2:
                unknown.append(key)
                continue
            rank = tensor.shape[0] if part == "A.weight" else tensor.shape[1]
            expected = (rank, layer.in_features) if part == "A.weight" else (layer.out_features, rank)
            if tuple(tensor.shape) != expected:
                problems.append(
                    f"{layer_name} is {layer.out_features}x{layer.in_features}, its lora_{part[0]} is "
                    f"{tensor.shape[0]}x{tensor.shape[1]}: a LoRA for another model size?"
                )
            elif not torch.isfinite(tensor).all():
                problems.append(f"its lora_{part[0]} of {layer_name} holds NaN or infinite values")
            ranks.setdefault(layer_name, []).append(rank)
        if not state or len(unknown) == len(state):
            example = f" (e.g. {unknown[0]})" if unknown else ""
            raise InputError(
                f"Invalid input `lora_url`: not a LoRA for {self.model} in diffusers' format: "
                f"none of its {len(state)} tensors is a transformer.<layer>.lora_A/B.weight{example}."
            )
        if unknown:
            raise InputError(
                f"Invalid input `lora_url`: {len(unknown)} of its {len(state)} tensors name no layer "
                f"of the {self.model} transformer (e.g. {unknown[0]})."
            )
        problems += [
            f"{name} has {'only one of lora_A and lora_B' if len(r) == 1 else 'two ranks'}"
            for name, r in ranks.items()
            if len(r) != 2 or r[0] != r[1]
        ]
        if problems:
            raise InputError(f"Invalid input `lora_url`: {problems[0]}.")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The LoRA's tensors and its safetensors metadata, read without unpickling anything."""
    try:
        with safe_open(path, "pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise InputError(f"Invalid input `lora_url`: not a .safetensors file ({error}).") from None


def _evict(folder: Path, keep: Path) -> None:
    """Delete the least recently used LoRA files until the folder holds at most CACHE_BYTES."""
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    for old in files:
        if total <= CACHE_BYTES:
            break
        if old != keep:
            total -= old.stat().st_size
            old.unlink(missing_ok=True)
            logger.info("Removed least recently used LoRA file %s", old.name)
