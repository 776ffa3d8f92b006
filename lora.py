"""LoRAs for the CogVideoX transformer, per prediction: fetched once, checked, kept loaded, applied exactly.

``Loras.use(url, scale)`` makes that LoRA (or none) the pipeline's state for the next pipeline call:

- an ``hf://`` reference is resolved to the commit its revision names now, so the cache follows the repo;
- the file is fetched once into ``<weights cache>/loras/`` (atomically, at most MAX_FILE_BYTES, within a time limit
  of DOWNLOAD_BASE_S + size / DOWNLOAD_MIN_RATE or $LORA_DOWNLOAD_TIMEOUT_S; least recently used files are deleted
  before a download to keep the folder under CACHE_BYTES and DISK_RESERVE_BYTES free on the disk);
- it is checked before diffusers sees it: every tensor is the lora_A/B of a linear layer of this transformer, with the
  layer's shapes and finite values, and no update larger than MAX_UPDATE_RATIO times the layer's own weights; its
  adapter metadata may set only what a plain LoRA needs (ADAPTER_SETTINGS), so that it cannot add token layers,
  DoRA magnitudes or anything else to the transformer; a LoRA stated to be for another CogVideoX model is refused;
- it is loaded with diffusers' ``load_lora_weights`` as a named adapter, the transformer in eval mode (no dropout,
  whatever the metadata says); if loading fails or is interrupted (Cog's cancel is a BaseException) the transformer's
  modules, adapters and offload hooks are put back exactly as they were, and the file is deleted;
- the last KEEP_LOADED stay loaded, so alternating between LoRAs costs neither a download nor a load;
- it runs on the attention's unfused processors: the fused Q/K/V projections that speed up predictions without a
  LoRA would silently bypass LoRA layers on to_q/to_k/to_v. With no LoRA the adapters are disabled and the fused
  processors come back, so the output equals that of a pipeline that never saw a LoRA.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from errors import InputError, ServiceError, WeightsError
from memory import use_unfused_qkv
from reporting import logger, record_metric
from weights import Source, cache_dir, cache_file, hub_file

MAX_FILE_BYTES = 2 * 10**9  # a rank-128 LoRA on every linear layer of a 5B transformer is ~1.4 GB in float32
CACHE_BYTES = 20 * 10**9  # the LoRA files kept on disk, least recently used deleted first
DISK_RESERVE_BYTES = 2 * 10**9  # free disk space a LoRA download must leave
KEEP_LOADED = 3  # adapters kept in memory (each a few MB to a GB), least recently used deleted first
DOWNLOAD_BASE_S = 60.0  # a LoRA download's time limit: this, plus its size at DOWNLOAD_MIN_RATE
DOWNLOAD_MIN_RATE = 5e6  # bytes per second: 2 GB may take 460 s
MAX_UPDATE_RATIO = 100.0  # |scale x B @ A| / |W| (Frobenius) per layer: trained LoRAs change a layer by a fraction
SOURCES = "an https URL of a .safetensors file, hf://OWNER/NAME or hf://OWNER/NAME/FILE.safetensors"
# peft LoraConfig fields that a plain LoRA may set in its adapter metadata (as diffusers' training scripts and
# finetrainers write it); every other field must keep peft's default, or the file is refused before loading.
ADAPTER_SETTINGS = {
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "peft_type",
    "peft_version",
    "inference_mode",
    "exclude_modules",
}


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
        self.scale = 0.0
        self.resolved: dict[str, Source] = {}  # hf:// reference -> the pinned file it last resolved to

    def use(self, url: str, scale: float) -> None:
        """Make the LoRA at ``url`` with ``scale`` active for the next pipeline call; blank url or scale 0: none.

        Whatever interrupts it, the pipeline is left either in the state asked for or with no LoRA active."""
        url = url.strip()
        if not url or scale == 0:
            self._deactivate()
            return
        source = self._resolve(url)
        name = "lora_" + hashlib.sha256(source.text.encode()).hexdigest()[:16]
        if name not in self.loaded:
            path = self._fetch(source, name)
            self._load(path, name, source.text)
        self.loaded.move_to_end(name)
        try:
            self.active, self.scale = name, scale
            use_unfused_qkv(self.pipe.transformer, True)  # resident and fused: the unfused projections onto the GPU
            self.pipe.transformer.set_attn_processor(dict(self.unfused))  # it empties the dict it is given
            self.pipe.enable_lora()  # set_adapters alone does not undo disable_lora
            self.pipe.set_adapters([name], [scale])
        except BaseException:
            self._deactivate(force=True)
            raise
        logger.info("LoRA %s at scale %g", source.text, scale)

    def blame_for_broken_frames(self) -> InputError | None:
        """The error to give when the frames came out NaN or infinite while a LoRA was active (None: no LoRA)."""
        if not self.active:
            return None
        return InputError(
            f"Invalid inputs `lora_url` and `lora_scale`: with the LoRA {self.loaded[self.active]} at scale "
            f"{self.scale:g} the model produced NaN or infinite frames (a broken or over-scaled LoRA): try a lower "
            "lora_scale or another LoRA."
        )

    def _deactivate(self, force: bool = False) -> None:
        if self.active or force:
            if self.loaded:
                self.pipe.disable_lora()
            self.pipe.transformer.set_attn_processor(dict(self.fused))
            use_unfused_qkv(self.pipe.transformer, False)
            self.active = None

    def _resolve(self, url: str) -> Source:
        """The source to fetch: an https URL as given, an hf:// reference pinned to a commit and a file."""
        try:
            source = Source.parse(url, file=True)
        except ValueError:
            shown = url if len(url) <= 200 else url[:200] + "..."
            raise InputError(f"Invalid input `lora_url`: {shown!r} is not {SOURCES}.") from None
        if source.url:
            return source
        try:
            info = hub_file(source, ".safetensors")
        except WeightsError as error:
            if source.text in self.resolved:  # the hub is unreachable now: the commit it named last time will do
                logger.warning("Using %s as last resolved: %s", self.resolved[source.text].text, error)
                return self.resolved[source.text]
            raise InputError(f"Invalid input `lora_url`: {error} ({source.text}).") from None
        self._check_base_model(info.base_model, "its model card")
        self.resolved[source.text] = info.source
        return info.source

    def _fetch(self, source: Source, name: str) -> Path:
        folder = cache_dir() / "loras"
        path = folder / f"{name}.safetensors"
        try:
            metrics = cache_file(
                source,
                path,
                max_bytes=MAX_FILE_BYTES,
                time_limit=_time_limit,
                make_room=lambda size: _make_room(folder, size),
            )
        except WeightsError as error:
            raise InputError(f"Invalid input `lora_url`: {error} ({source.text}).") from None
        record_metric("lora.download_s", metrics["download_s"])
        record_metric("lora.cached", metrics["cached"])
        if not metrics["cached"]:
            seconds = metrics["download_s"]
            logger.info("Downloaded LoRA %s: %.1f MB in %.1f s", source.text, metrics["bytes"] / 1e6, seconds)
        return path

    def _load(self, path: Path, name: str, source: str) -> None:
        """Check the file, then load it as adapter ``name``. On any failure or interruption the file is deleted and
        the transformer is put back exactly as it was."""
        start = time.perf_counter()
        try:
            state, settings = _read(path)
            self._check_base_model(settings.get("base_model_name_or_path"), "its metadata")
            self._check_layers(state, settings)
        except BaseException:
            path.unlink(missing_ok=True)  # not kept: the same URL may serve a good file later
            raise
        transformer = self.pipe.transformer
        before = _Snapshot(self.pipe)
        try:
            with warnings.catch_warnings():  # peft warns of several adapters in one model: that is the point here
                warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
                # As diffusers loads a LoRA file itself, its adapter metadata (alpha) included.
                self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
            if name not in transformer.peft_config:
                raise ValueError("no layer of the transformer was adapted")
            transformer.eval()  # peft makes its dropout modules in training mode
            self.loaded[name] = source
        except BaseException as error:
            before.restore(name)
            path.unlink(missing_ok=True)
            if isinstance(error, Exception):
                detail = " ".join(str(error).split())[:300]
                raise InputError(f"Invalid input `lora_url`: the LoRA could not be loaded ({detail}).") from None
            raise
        while len(self.loaded) > KEEP_LOADED:
            evicted, _ = self.loaded.popitem(last=False)
            self.pipe.delete_adapters(evicted)
        seconds = time.perf_counter() - start
        record_metric("lora.load_s", seconds)
        logger.info("Loaded LoRA %s (%d tensors) in %.2f s", source, len(state), seconds)

    def _check_base_model(self, base_model: Any, where: str) -> None:
        """Refuse a LoRA stated to be for the other CogVideoX generation (1.0 vs 1.5): the shapes of their attention
        layers are the same, so only what its card or file says can tell."""
        if not isinstance(base_model, str):
            return
        if "cogvideox" in base_model.lower() and ("1.5" in base_model) != ("1.5" in self.model):
            shown = base_model if len(base_model) <= 100 else base_model[:100] + "..."
            raise InputError(f"Invalid input `lora_url`: this LoRA is for {shown} ({where} says so), not {self.model}.")

    def _check_layers(self, state: dict[str, torch.Tensor], settings: dict[str, Any]) -> None:
        """Refuse a LoRA for another model before anything is loaded: each of its tensors must be the lora_A (rank x
        inputs) or lora_B (outputs x rank) of a linear layer of this transformer, in pairs, with finite values, and
        no pair may change its layer by more than MAX_UPDATE_RATIO times the layer's weights."""
        unknown, problems, pairs = [], [], {}
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
            pairs.setdefault(layer_name, {})[part[0]] = tensor
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
        for name, pair in pairs.items():
            if len(pair) != 2:
                problems.append(f"{name} has only one of lora_A and lora_B")
            elif pair["A"].shape[0] != pair["B"].shape[1]:
                problems.append(f"{name} has two ranks")
        if problems:
            raise InputError(f"Invalid input `lora_url`: {problems[0]}.")
        scale = _largest_scale(settings, min(pair["A"].shape[0] for pair in pairs.values()))
        for name, pair in pairs.items():
            ratio = scale * _product_norm(pair["B"], pair["A"]) / max(_norm(self.layers[name].weight), 1e-12)
            if not ratio <= MAX_UPDATE_RATIO:
                raise InputError(
                    f"Invalid input `lora_url`: it would change {name} by {ratio:.3g} times the layer's own weights "
                    f"(trained LoRAs change a layer by a fraction of it; at most {MAX_UPDATE_RATIO:g} is accepted)."
                )


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA's tensors and its transformer adapter settings (diffusers' ``lora_adapter_metadata``, prefix removed;
    a plain ``base_model`` header entry too), read without unpickling anything. Settings a plain LoRA does not use
    are refused here, before diffusers sees them."""
    try:
        with safe_open(path, "pt") as file:
            state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
            header = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise InputError(f"Invalid input `lora_url`: not a .safetensors file ({error}).") from None
    settings: dict[str, Any] = {}
    if "lora_adapter_metadata" in header:
        try:
            packed = json.loads(header["lora_adapter_metadata"])
            assert isinstance(packed, dict)
        except (ValueError, AssertionError):
            raise InputError("Invalid input `lora_url`: its lora_adapter_metadata is not a JSON object.") from None
        for key, value in packed.items():
            component, _, field = key.partition(".")
            if component != "transformer":
                raise InputError(
                    f"Invalid input `lora_url`: its adapter metadata is for `{component}`, not the transformer."
                )
            settings[field] = value
    _check_settings(settings)
    base = next((v for k, v in header.items() if "base_model" in k), None)
    settings.setdefault("base_model_name_or_path", base)
    return state, settings


def _lora_defaults() -> dict[str, Any]:
    from peft import LoraConfig

    return json.loads(json.dumps(LoraConfig().to_dict(), default=lambda value: None))


def _check_settings(settings: dict[str, Any]) -> None:
    """Only what a plain LoRA needs may differ from peft's defaults: rank, alpha, targets and the like."""
    from peft import LoraConfig

    fields = {field.name for field in dataclasses.fields(LoraConfig)}
    defaults = _lora_defaults()
    for key, value in settings.items():
        if key not in fields:
            raise InputError(
                f"Invalid input `lora_url`: its adapter metadata sets `{key}`, which this server's peft does not know."
            )
        if key not in ADAPTER_SETTINGS and value != defaults.get(key):
            what = "DoRA adapters are not supported" if key == "use_dora" else "a plain LoRA does not use it"
            raise InputError(
                f"Invalid input `lora_url`: its adapter metadata sets `{key}` to {json.dumps(value)[:80]} ({what})."
            )
    for key in ("alpha_pattern", "rank_pattern"):
        if not isinstance(settings.get(key) or {}, dict):
            raise InputError(f"Invalid input `lora_url`: its adapter metadata's `{key}` is not a mapping.")
    numbers = [settings.get("lora_alpha"), settings.get("r")] + [
        value for key in ("alpha_pattern", "rank_pattern") for value in (settings.get(key) or {}).values()
    ]
    for value in numbers:
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= 1e4):
            raise InputError(
                f"Invalid input `lora_url`: its adapter metadata has a rank or alpha of {value!r} "
                "(expected a number from 1 to 10000)."
            )
    dropout = settings.get("lora_dropout", 0.0)
    if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
        raise InputError(f"Invalid input `lora_url`: its adapter metadata has a lora_dropout of {dropout!r}.")


def _largest_scale(settings: dict[str, Any], smallest_rank: int) -> float:
    """An upper bound of the scale peft gives any layer: alpha / rank (alpha / sqrt(rank) with rsLoRA); without
    metadata diffusers takes alpha = rank."""
    alphas = [settings.get("lora_alpha"), *(settings.get("alpha_pattern") or {}).values()]
    alpha = max((a for a in alphas if a is not None), default=None)
    if alpha is None:
        return 1.0
    ranks = [settings.get("r") or smallest_rank, *(settings.get("rank_pattern") or {}).values(), smallest_rank]
    rank = min(r for r in ranks if r)
    return alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def _norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(weight.detach().to(torch.float64)))


def _product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """|B @ A| (Frobenius) from two rank x rank products: |BA|^2 = sum((B^T B) * (A A^T))."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


class _Snapshot:
    """The transformer's module tree, adapters and the pipeline's offload hooks, to put back after a failed load."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, transformer = pipe, pipe.transformer
        self.children = [(module, dict(module._modules)) for module in transformer.modules()]
        self.attributes = {key: transformer.__dict__.get(key) for key in ("peft_config", "_hf_peft_config_loaded")}
        self.peft_config = dict(transformer.__dict__.get("peft_config") or {})
        self.structure = _structure(transformer)
        self.offload_device = getattr(pipe, "_offload_device", None) if _offloaded(pipe) else None

    def restore(self, name: str) -> None:
        transformer = self.pipe.transformer
        if name in (getattr(transformer, "peft_config", None) or {}):
            try:
                self.pipe.delete_adapters(name)
            except Exception as error:  # the tree is put back below either way
                logger.warning("Deleting the failed adapter %s: %s", name, error)
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for key, value in self.attributes.items():
            if value is None:
                transformer.__dict__.pop(key, None)
            else:
                transformer.__dict__[key] = value
        if "peft_config" in transformer.__dict__:
            transformer.peft_config.clear()
            transformer.peft_config.update(self.peft_config)
        if self.offload_device is not None and not _offloaded(self.pipe):
            self.pipe.enable_model_cpu_offload(device=self.offload_device)  # load_lora_weights took the hooks off
        if _structure(transformer) != self.structure:
            raise ServiceError("A failed LoRA load could not be undone; the server must be restarted.")


def _structure(model: torch.nn.Module) -> list[tuple[str, int]]:
    return [(name, id(module)) for name, module in model.named_modules()]


def _offloaded(pipe: Any) -> bool:
    return getattr(pipe.transformer, "_hf_hook", None) is not None


def _time_limit(size: int | None) -> float:
    """A LoRA download's time limit: $LORA_DOWNLOAD_TIMEOUT_S, or DOWNLOAD_BASE_S + size / DOWNLOAD_MIN_RATE."""
    if fixed := os.environ.get("LORA_DOWNLOAD_TIMEOUT_S"):
        return float(fixed)
    return DOWNLOAD_BASE_S + (size if size is not None else MAX_FILE_BYTES) / DOWNLOAD_MIN_RATE


def _make_room(folder: Path, size: int) -> None:
    """Before a download of ``size`` bytes: delete the least recently used LoRA files until the folder stays within
    CACHE_BYTES and the disk keeps DISK_RESERVE_BYTES free. ServiceError if even an empty folder leaves no room."""
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)

    def fits() -> bool:
        return total + size <= CACHE_BYTES and shutil.disk_usage(folder).free - size >= DISK_RESERVE_BYTES

    for old in files:
        if fits():
            break
        total -= old.stat().st_size
        old.unlink(missing_ok=True)
        logger.info("Removed least recently used LoRA file %s", old.name)
    if not fits():
        free = shutil.disk_usage(folder).free
        raise ServiceError(
            f"The server's disk has no room for a LoRA of {size / 1e6:.0f} MB ({free / 1e6:.0f} MB free); "
            "this is not a problem with the input."
        )
