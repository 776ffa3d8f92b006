"""The weights cache: each model's diffusers folder, fetched once from a tar URL or a Hugging Face hub repo.

``fetch_weights(source, dest, variable)`` makes ``dest`` a complete diffusers folder. A source is

  https://.../weights.tar       a tar of the folder: ``pget -x``, or the HTTP fallback (downloads.py)
  hf://OWNER/NAME[@REVISION]    a hub repo: model_index.json and the pipeline's component folders only

The folder is built in a temporary sibling of ``dest``; its ``model_index.json`` is normalised (libraries that
diffusers cannot import are replaced by the package that defines the class), every component is checked for its
files, a completion marker is written and the folder is renamed into place, all under a file lock: two processes
fetch once, and an interrupted install is never taken for a cache. ``cache_file`` does the same for one file (a
LoRA) in a folder of such files, under one lock per folder. The cache root is $WEIGHTS_CACHE_DIR (default
./model_cache); HF_TOKEN is used for private and gated repos.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

import downloads
from downloads import RETRIES, DownloadError
from errors import ServiceError, WeightsError
from reporting import logger

log = logger.getChild(__name__)  # "predict.weights": the predict logger's handler shows it in Cog's logs

MARKER = ".weights-complete.json"
HUB_WORKERS = 8  # files downloaded at once from the hub
HUB_RETRY_BASE_S = 1.0  # exponential backoff between whole-snapshot attempts (each resumes where the last stopped)
_HUB = re.compile(r"hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>\w[\w.-]*))?(?:/(?P<path>[^@]+))?")
MAX_URL_CHARS = 4096  # signed CDN URLs reach ~2,000 characters
_WEIGHT_FILES = {  # a model component's weights, by library: single file, sharded with an index, or pickle
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "transformers": ("model.safetensors", "pytorch_model.bin"),
}


@dataclass(frozen=True)
class Source:
    """Where weights come from: an http(s) URL, or a hub repo (with a revision, and a file in it)."""

    text: str
    url: str | None = None
    repo: str | None = None
    revision: str | None = None
    path: str | None = None
    size: int | None = None  # a hub file's size, once hub_file has looked it up

    @classmethod
    def parse(cls, text: str, *, file: bool = False) -> Source:
        """Parse a source; ValueError if malformed. With ``file``, an hf:// source may name a file in the repo.

        Checked here, before any request: a URL's length, characters and host, a hub repo id as the hub's own
        rules have it, a revision (no ``..``) and a file path inside the repo."""
        text = text.strip()
        if len(text) > MAX_URL_CHARS or not text.isprintable() or any(c.isspace() for c in text):
            raise ValueError(text)
        if text.startswith(("https://", "http://")) and len(text.split("/", 3)) == 4:
            import httpx

            try:
                url = httpx.URL(text)
                url.host.encode("idna")
            except (httpx.InvalidURL, UnicodeError, ValueError):
                raise ValueError(text) from None
            if not url.host or (url.port is not None and not 0 < url.port < 65536):
                raise ValueError(text)
            return cls(text, url=text)
        match = _HUB.fullmatch(text)
        if not match or (match["path"] and not file) or ".." in (match["revision"] or ""):
            raise ValueError(text)
        if match["path"] and (".." in match["path"].split("/") or match["path"].startswith("/")):
            raise ValueError(text)
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(match["repo"])
        except HFValidationError:
            raise ValueError(text) from None
        return cls(text, repo=match["repo"], revision=match["revision"], path=match["path"])


def cache_dir() -> Path:
    """Root of the weights cache: $WEIGHTS_CACHE_DIR, default ./model_cache."""
    return Path(os.environ.get("WEIGHTS_CACHE_DIR", "model_cache"))


def fetch_weights(source: str, dest: Path, variable: str) -> dict[str, float]:
    """Make ``dest`` a complete diffusers folder from ``source``, the value of the environment ``variable``.

    Returns metrics: download_s, bytes, mb_per_s (1 MB = 1e6 bytes) and cached (1.0 when ``dest`` already held
    ``source`` and nothing was fetched). Errors are one WeightsError sentence naming the variable.
    """
    try:
        parsed = Source.parse(source)
    except ValueError:
        raise WeightsError(
            f"{variable} is {source!r}: use an http(s):// URL of a .tar of the diffusers folder, "
            "or hf://OWNER/NAME[@REVISION] for a Hugging Face hub repo."
        ) from None
    with _locked(dest) as tmp:
        marker = _read_marker(dest)
        if marker.get("source") == parsed.text:
            log.info("Weights for %s already in %s", parsed.text, dest)
            return {"download_s": 0.0, "bytes": float(marker.get("bytes", 0)), "mb_per_s": 0.0, "cached": 1.0}
        start = time.monotonic()
        with _errors_named(f"Cannot set up the weights in {variable} ({parsed.text})", dest):
            if parsed.url:
                received, commit = downloads.fetch_tar(parsed.url, tmp), None
                root = _layout_root(tmp)
            else:
                received, commit = None, _hub_snapshot(parsed, tmp)
                root = tmp
            files, size = _check_folder(root)
            nbytes = received if received is not None else size
            info = {"source": parsed.text, "commit": commit, "bytes": nbytes, "files": files, "at": time.time()}
            _replace(dest, root, info)
    seconds = time.monotonic() - start
    rate = nbytes / 1e6 / seconds if seconds > 0 else 0.0
    log.info(
        "Installed %s into %s: %.1f MB, %d files in %.1f s (%.1f MB/s)",
        source,
        dest,
        nbytes / 1e6,
        files,
        seconds,
        rate,
    )
    return {"download_s": seconds, "bytes": float(nbytes), "mb_per_s": rate, "cached": 0.0}


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repo, pinned: ``source`` names the commit and the file, and knows its size."""

    source: Source
    base_model: str | None  # what the repo's model card names as ``base_model``, if anything


def hub_file(source: Source, suffix: str) -> HubFile:
    """Resolve an hf:// file source to the commit its revision names now, and to one file: ``source.path``, or the
    repo's only ``*suffix`` file. One request. Errors are WeightsError fragments for the caller to name."""
    api = _hub_api()
    info = _hub_call(source, lambda: api.model_info(source.repo, revision=source.revision, files_metadata=True))
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
    name = source.path
    if name is None:
        candidates = sorted(f for f in sizes if f.endswith(suffix))
        if len(candidates) != 1:
            found = ", ".join(candidates) if candidates else "none"
            raise WeightsError(
                f"{source.repo} must hold exactly one {suffix} file, or the URL must name one (found: {found})"
            )
        name = candidates[0]
    if name not in sizes:
        raise WeightsError(f"{source.repo} has no file {name}")
    card = info.card_data or {}
    base = card.get("base_model")
    base = base[0] if isinstance(base, list) and base else base if isinstance(base, str) else None
    pinned = Source(
        f"hf://{source.repo}@{info.sha}/{name}", repo=source.repo, revision=info.sha, path=name, size=sizes[name]
    )
    return HubFile(pinned, base)


def cache_file(
    source: Source,
    dest: Path,
    *,
    max_bytes: int,
    time_limit: Callable[[int | None], float],
    make_room: Callable[[int], None],
) -> dict[str, float]:
    """Make ``dest`` a complete copy of one file: an http(s) URL, or a pinned file of a hub repo (see hub_file).

    A file over ``max_bytes`` is refused; the download must end within ``time_limit(size)`` seconds; ``make_room(n)``
    runs before the first byte is written (see downloads.fetch_file). One lock serves the whole folder, so temporary
    files that a killed process left there are removed by the next download, whatever its URL. Returns metrics:
    download_s, bytes, cached. Errors are WeightsError fragments for the caller to name; a full disk is a
    ServiceError.
    """
    with _locked(dest, lock=dest.parent / ".lock", stale_prefix=".") as tmp:
        if dest.is_file():
            os.utime(dest)  # last use, for the caller's LRU eviction
            return {"download_s": 0.0, "bytes": float(dest.stat().st_size), "cached": 1.0}
        start = time.monotonic()
        tmp.mkdir()
        try:
            with _errors_named("", dest):
                if source.url:
                    nbytes = downloads.fetch_file(
                        source.url, tmp / "file", max_bytes=max_bytes, time_limit=time_limit, make_room=make_room
                    )
                else:
                    nbytes = _hub_file(
                        source, tmp / "file", max_bytes=max_bytes, time_limit=time_limit, make_room=make_room
                    )
                os.replace(tmp / "file", dest)
        except WeightsError as error:
            if isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC:
                raise ServiceError(
                    f"The server's disk is full ({dest.parent}); this is not a problem with the input."
                ) from error
            raise
    return {"download_s": time.monotonic() - start, "bytes": float(nbytes), "cached": 0.0}


@contextmanager
def _locked(dest: Path, *, lock: Path | None = None, stale_prefix: str | None = None) -> Iterator[Path]:
    """Hold the file lock (``dest``'s own by default); yield a fresh temporary sibling path, removed afterwards
    whatever happens. Temporary siblings left by killed processes (``.<dest name>.tmp-*``, or every ``.*.tmp-*`` of
    the folder with ``stale_prefix="."``) are removed first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock or f"{dest}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for another process to finish %s", dest)
        lock.acquire()
    prefix = f".{dest.name}.tmp-"
    tmp = dest.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        for stale in dest.parent.iterdir():
            if stale.name.startswith(stale_prefix or prefix) and ".tmp-" in stale.name:
                log.warning("Removing stale temporary download %s", stale)
                _remove(stale)
        yield tmp
    finally:
        _remove(tmp)
        lock.release()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _errors_named(context: str, dest: Path) -> Iterator[None]:
    """Turn download and disk errors into one WeightsError sentence: ``context: detail.``"""
    try:
        yield
    except ServiceError:
        raise
    except (DownloadError, WeightsError) as exc:
        raise WeightsError(f"{context}: {exc}." if context else str(exc)) from exc
    except OSError as exc:
        cause = f"disk full while writing into {dest.parent}" if exc.errno == errno.ENOSPC else str(exc)
        raise WeightsError(f"{context}: {cause}." if context else cause) from exc
    except (ValueError, TypeError, RuntimeError) as exc:  # a library's surprise: still one sentence, in context
        cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        raise WeightsError(f"{context}: {cause}." if context else cause) from exc


def _read_marker(dest: Path) -> dict:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) and (dest / "model_index.json").is_file() else {}


def _replace(dest: Path, root: Path, info: dict[str, Any]) -> None:
    """Mark ``root`` complete and move it to ``dest``, replacing whatever incomplete or outdated folder was there."""
    (root / MARKER).write_text(json.dumps(info))
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        log.warning("Removing incomplete or outdated %s", dest)
        shutil.rmtree(dest)
    os.replace(root, dest)


def _layout_root(tmp: Path) -> Path:
    """The folder holding model_index.json: ``tmp`` or its single top-level directory."""
    entries = list(tmp.iterdir()) if tmp.is_dir() else []
    if len(entries) == 1 and not entries[0].is_symlink() and (entries[0] / "model_index.json").is_file():
        return entries[0]
    return tmp


# --- the hub ----------------------------------------------------------------------------------------------------------


def _hub_snapshot(source: Source, tmp: Path) -> str:
    """Download model_index.json and the pipeline's component folders of a hub repo into ``tmp``; return the commit.

    Pinned to the commit the revision names when the download starts, so a branch moving meanwhile cannot mix two
    versions. Every file of those folders that the repo lists must arrive (huggingface_hub can return without some).
    """
    api = _hub_api()
    info = _hub_call(source, lambda: api.model_info(source.repo, revision=source.revision))
    listed = {sibling.rfilename for sibling in info.siblings or []}
    if "model_index.json" not in listed:
        raise WeightsError(f"not a diffusers pipeline: {source.repo} has no model_index.json")
    _hub_call(source, lambda: api.hf_hub_download(source.repo, "model_index.json", revision=info.sha, local_dir=tmp))
    folders = list(_components(tmp))
    wanted = sorted(name for name in listed if name == "model_index.json" or name.split("/")[0] in folders)
    log.info(
        "Downloading %s at %s: model_index.json and %s (%d files)",
        source.repo,
        info.sha,
        ", ".join(folders),
        len(wanted),
    )

    def download() -> None:
        api.snapshot_download(
            source.repo,
            revision=info.sha,
            allow_patterns=["model_index.json", *(f"{f}/*" for f in folders)],
            local_dir=tmp,
            cache_dir=tmp / ".cache" / "hub",
            max_workers=HUB_WORKERS,
        )
        missing = [name for name in wanted if not (tmp / name).is_file()]
        if missing:
            raise _Incomplete(f"{len(missing)} of {len(wanted)} files did not arrive (e.g. {missing[0]})")

    _hub_call(source, download)
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    return info.sha


def _hub_file(
    source: Source,
    dest: Path,
    *,
    max_bytes: int,
    time_limit: Callable[[int | None], float],
    make_room: Callable[[int], None],
) -> int:
    """Download the pinned file ``source`` (see hub_file) of a hub repo to ``dest``, within ``time_limit(size)``;
    the calling thread returns at once when interrupted (huggingface_hub's own timeouts end the download)."""
    size = source.size if source.size is not None else hub_file(source, "").source.size  # one lookup, not two
    if size > max_bytes:
        raise WeightsError(f"{source.path} is {size:,} bytes, over the limit of {max_bytes:,}")
    make_room(size)
    api = _hub_api()

    def download() -> str:
        return _hub_call(
            source,
            lambda: api.hf_hub_download(
                source.repo,
                source.path,
                revision=source.revision,
                local_dir=dest.parent,
                cache_dir=dest.parent / ".cache" / "hub",
            ),
        )

    local = downloads.interruptible(download, deadline=[time.monotonic() + time_limit(size)])
    os.replace(local, dest)
    if dest.stat().st_size > max_bytes:
        raise WeightsError(f"{source.path} is over the limit of {max_bytes:,} bytes")
    return dest.stat().st_size


def _hub_api() -> Any:
    """huggingface_hub's client, with HF_ENDPOINT and HF_TOKEN as they are now (huggingface_hub reads its
    defaults once, at import)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None)


class _Incomplete(Exception):
    """A snapshot download returned without all of its files: worth another attempt."""


def _hub_call(source: Source, call: Callable[[], Any]) -> Any:
    """Run a huggingface_hub call, retrying transient failures (5xx, 429, dropped connections, files that did not
    arrive: each attempt keeps the files already complete); turn its errors into one WeightsError fragment."""
    import httpx2
    from huggingface_hub import errors
    from huggingface_hub.utils import HFValidationError

    token = "HF_TOKEN gives no access to it" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except HFValidationError:
            raise WeightsError(f"{source.repo!r} is not a valid hub repository id") from None
        except errors.GatedRepoError:
            raise WeightsError(
                f"{source.repo} is gated ({token}): accept its terms on huggingface.co and set "
                "HF_TOKEN to a token of that account"
            ) from None
        except errors.RepositoryNotFoundError:
            raise WeightsError(f"repository {source.repo} not found ({token}; a private repo needs one)") from None
        except errors.RevisionNotFoundError:
            raise WeightsError(f"revision {source.revision!r} not found in {source.repo}") from None
        except errors.RemoteEntryNotFoundError as exc:
            raise WeightsError(f"a file is missing from {source.repo} ({exc})") from None
        except errors.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if 400 <= status < 500 and status not in (408, 429):
                raise WeightsError(f"the hub answered HTTP {status} for {source.repo}") from None
            failure: Exception = exc
        except OSError as exc:  # also huggingface_hub's LocalEntryNotFoundError: it could not reach the hub
            if exc.errno == errno.ENOSPC:
                raise
            failure = exc
        except (httpx2.TransportError, _Incomplete) as exc:
            failure = exc
        cause = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
        if attempt >= RETRIES:
            raise WeightsError(f"{cause} (gave up after {attempt} attempts)")
        delay = HUB_RETRY_BASE_S * 2 ** (attempt - 1)
        log.warning("Retrying %s in %.1f s after %s", source.text, delay, cause)
        time.sleep(delay)


# --- checking and normalising a diffusers folder --------------------------------------------------------------------


def _components(root: Path) -> dict[str, tuple[str | None, str]]:
    """model_index.json's components: {folder: (library, class)}, without the absent ([null, null]) ones."""
    try:
        index = json.loads((root / "model_index.json").read_text())
    except FileNotFoundError:
        raise WeightsError("not a diffusers folder: model_index.json is missing") from None
    except ValueError as exc:
        raise WeightsError(f"model_index.json is not valid JSON ({exc})") from None
    components = {
        name: (entry[0], entry[1])
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[1]
    }
    for name in components:
        if not name.isidentifier():  # diffusers names components as Python identifiers: never "..", "a/b"
            raise WeightsError(f"model_index.json names a component {name!r}, which is not a folder name")
    return components


def _check_folder(root: Path) -> tuple[int, int]:
    """Normalise model_index.json and check every component's files: (files, bytes)."""
    components = _normalise_index(root)
    for name, (library, cls) in components.items():
        if not (root / name).is_dir():
            raise WeightsError(f"the snapshot is incomplete: the folder {name}/ is missing")
        if missing := _missing_file(root / name, library, cls):
            raise WeightsError(f"the snapshot is incomplete: {name}/{missing}")
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return len(files), sum(p.stat().st_size for p in files)


def _normalise_index(root: Path) -> dict[str, tuple[str | None, str]]:
    """Rewrite entries whose library diffusers cannot import (the hub's zeroscope names `models.unet_3d_condition`,
    some repos null) to the package that defines the class: diffusers 0.42 refuses them otherwise. Returns the
    components as they are now (see _components)."""
    components = _components(root)
    path = root / "model_index.json"
    index = json.loads(path.read_text())
    changed = False
    for name, (library, cls) in list(components.items()):
        if library and library.isidentifier() and importlib.util.find_spec(library):
            continue
        package = _defining_package(cls)
        if package is None:
            raise WeightsError(
                f"model_index.json: {name} is {library}.{cls}, a class neither diffusers nor transformers defines"
            )
        log.info("model_index.json: %s library %r -> %r (defines %s)", name, library, package, cls)
        index[name][0] = package
        components[name] = (package, cls)
        changed = True
    if changed:
        path.write_text(json.dumps(index, indent=2) + "\n")
    return components


def _defining_package(cls: str) -> str | None:
    import diffusers
    import transformers

    for package in (diffusers, transformers):
        if hasattr(package, cls):
            return package.__name__
    return None


def _missing_file(folder: Path, library: str | None, cls: str) -> str | None:
    """What a component folder lacks to load, as "file is missing (why)", or None when complete."""
    if cls.endswith("Scheduler"):
        return None if (folder / "scheduler_config.json").is_file() else "scheduler_config.json is missing"
    if "Tokenizer" in cls:
        import transformers

        names = dict(getattr(getattr(transformers, cls, None), "vocab_files_names", {}))
        fast = names.pop("tokenizer_file", "tokenizer.json")
        files = list(names.values())
        absent = [f for f in files if not (folder / f).is_file()]
        if (folder / fast).is_file() or (files and not absent):
            return None
        needs = f"{' and '.join(files)}, or {fast}" if files else fast
        return f"{(absent or [fast])[0]} is missing ({cls} needs {needs})"
    if cls.endswith(("ImageProcessor", "FeatureExtractor")):
        return None if (folder / "preprocessor_config.json").is_file() else "preprocessor_config.json is missing"
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    for weights in _WEIGHT_FILES.get(library or "", ()):
        if (folder / weights).is_file():
            return None
        index = folder / f"{weights}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            absent = [s for s in shards if not (folder / s).is_file()]
            return f"{absent[0]} is missing (named in {index.name})" if absent or not shards else None
    expected = " or ".join(_WEIGHT_FILES.get(library or "", ("weights",)))
    return f"its weights are missing ({expected}, or a sharded index)"
