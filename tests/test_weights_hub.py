"""Weights from a Hugging Face hub repo (hf://OWNER/NAME), and snapshots as the hub publishes them.

The hub is tests/fake_hub.py on 127.0.0.1 (HF_ENDPOINT), serving the tiny models in the real repos' layouts: the
real download code (huggingface_hub) runs against it. The same snapshots are loaded from tars too: both must give
pipelines whose every tensor equals the stored one.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import huggingface_hub.file_download
import huggingface_hub.utils._http
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_weights
import weights
from conftest import HUB_REPOS, MODULES
from errors import WeightsError
from fake_hub import FakeHub
from harness import ROOT
from memory import GpuMemory
from pipelines import load_pipeline
from weights import MARKER, fetch_weights

VARIABLE = "TEST_WEIGHTS_URL"


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, tmp_path: Path) -> None:
    """Point huggingface_hub at the stand-in and shorten every wait between retries (theirs and ours)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(weights, "HUB_RETRY_BASE_S", 0.01)
    http = huggingface_hub.utils._http
    monkeypatch.setitem(http.http_backoff.__kwdefaults__, "base_wait_time", 0.01)
    monkeypatch.setitem(http.http_backoff.__kwdefaults__, "max_wait_time", 0.02)
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)


def paths(hub: FakeHub, start: int = 0) -> list[str]:
    return [path for _, path, _ in hub.requests[start:]]


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def published(folder: Path) -> dict[str, bytes]:
    """What a snapshot of the repo must hold: model_index.json and the pipeline's folders, nothing else."""
    return {name: data for name, data in files(folder).items() if not name.startswith(("zs2_XL/", "README"))}


# --- the downloads -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["i2v", "v2v"])
def test_snapshot_holds_the_pipeline_folders_only(
    hub: FakeHub, tiny_folders: dict[str, Path], tmp_path: Path, model: str
) -> None:
    start = len(hub.requests)
    dest = tmp_path / "model"
    metrics = fetch_weights(f"hf://{HUB_REPOS[model]}", dest, VARIABLE)
    got, expected = files(dest), published(tiny_folders[model])
    marker = json.loads(got.pop(MARKER))
    index = json.loads(got.pop("model_index.json"))
    expected_index = json.loads(expected.pop("model_index.json"))
    assert got == expected  # byte for byte, every file of every component; no .cache, README or zs2_XL/
    assert not any("zs2_XL" in path or "README" in path for path in paths(hub, start))  # never even requested
    if model == "v2v":  # the hub's custom library, normalised at install time
        assert expected_index["unet"] == ["models.unet_3d_condition", "UNet3DConditionModel"]
        expected_index["unet"] = ["diffusers", "UNet3DConditionModel"]
    assert index == expected_index
    assert marker["source"] == f"hf://{HUB_REPOS[model]}" and len(marker["commit"]) == 40
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file() and p.name != MARKER)
    assert metrics["cached"] == 0.0 and metrics["bytes"] == size

    again = len(hub.requests)
    assert fetch_weights(f"hf://{HUB_REPOS[model]}", dest, VARIABLE)["cached"] == 1.0
    assert len(hub.requests) == again  # a complete cache costs no request


def test_revision_pins_a_commit(hub: FakeHub, tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    first = hub.add_repo("someone/pinned", tiny_folders["v2v"], branches=("main", "v1"))
    folder = shutil.copytree(tiny_folders["v2v"], tmp_path / "repo")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "v": 2}))
    second = hub.add_repo("someone/pinned", folder)  # main moves on; v1 stays
    for revision, commit in (("v1", first), (first, first), ("main", second)):
        dest = tmp_path / f"at-{revision[:8]}"
        fetch_weights(f"hf://someone/pinned@{revision}", dest, VARIABLE)
        assert json.loads((dest / MARKER).read_text())["commit"] == commit
        assert ('"v": 2' in (dest / "scheduler" / "scheduler_config.json").read_text()) == (commit == second)


def test_server_errors_are_retried(hub: FakeHub, tmp_path: Path) -> None:
    hub.fail("vae/diffusion_pytorch_model.bin", status=500, times=2, method="GET")
    hub.fail("tree/" + _commit(hub), status=503, times=1)
    dest = tmp_path / "model"
    fetch_weights(f"hf://{HUB_REPOS['v2v']}", dest, VARIABLE)
    assert (dest / "vae" / "diffusion_pytorch_model.bin").stat().st_size > 0


def test_dropped_connection_resumes(hub: FakeHub, tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    name = "unet/diffusion_pytorch_model.bin"
    hub.drop(name, after_bytes=1000)
    dest = tmp_path / "model"
    fetch_weights(f"hf://{HUB_REPOS['v2v']}", dest, VARIABLE)
    assert (dest / name).read_bytes() == (tiny_folders["v2v"] / name).read_bytes()
    assert len([p for p in paths(hub) if p.endswith(name) and "/lfs/" in p]) >= 2  # dropped, then fetched again


def test_persistent_server_errors_fail_clearly(hub: FakeHub, tmp_path: Path) -> None:
    hub.fail("vae/config.json", status=502, times=1000)
    with pytest.raises(WeightsError) as error:
        fetch_weights(f"hf://{HUB_REPOS['v2v']}", tmp_path / "model", VARIABLE)
    message = str(error.value)
    assert message.startswith(f"Cannot set up the weights in {VARIABLE} (hf://{HUB_REPOS['v2v']}): ")
    assert "gave up after 5 attempts" in message and "\n" not in message
    hub.clear()
    assert_nothing_installed(tmp_path / "model")


@pytest.mark.parametrize(
    ("source", "detail"),
    [
        ("hf://nobody/nothing", "repository nobody/nothing not found (HF_TOKEN is not set; a private repo needs one)"),
        ("hf://cerspense/zeroscope_v2_XL@v9", "revision 'v9' not found in cerspense/zeroscope_v2_XL"),
        ("hf://someone/not-diffusers", "not a diffusers pipeline: someone/not-diffusers has no model_index.json"),
    ],
)
def test_missing_repo_revision_or_pipeline(hub: FakeHub, tmp_path: Path, source: str, detail: str) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    hub.add_repo("someone/not-diffusers", tmp_path / "repo")
    with pytest.raises(WeightsError) as error:
        fetch_weights(source, tmp_path / "model", VARIABLE)
    assert str(error.value) == f"Cannot set up the weights in {VARIABLE} ({source}): {detail}."
    assert_nothing_installed(tmp_path / "model")


def test_gated_repo_names_hf_token(
    hub: FakeHub, tiny_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("THUDM/gated-i2v", tiny_folders["i2v"], gated_token="hf_right")
    source = "hf://THUDM/gated-i2v"
    with pytest.raises(WeightsError) as error:
        fetch_weights(source, tmp_path / "model", VARIABLE)
    assert str(error.value) == (
        f"Cannot set up the weights in {VARIABLE} ({source}): THUDM/gated-i2v is gated (HF_TOKEN is not set): accept "
        "its terms on huggingface.co and set HF_TOKEN to a token of that account."
    )
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(WeightsError, match=r"is gated \(HF_TOKEN gives no access to it\)"):
        fetch_weights(source, tmp_path / "model", VARIABLE)
    assert_nothing_installed(tmp_path / "model")
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    fetch_weights(source, tmp_path / "model", VARIABLE)
    assert files(tmp_path / "model").keys() >= published(tiny_folders["i2v"]).keys()


def test_disk_full(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub.file_download, "http_get", full)
    with pytest.raises(WeightsError) as error:
        fetch_weights(f"hf://{HUB_REPOS['v2v']}", tmp_path / "model", VARIABLE)
    assert str(error.value).endswith(f": disk full while writing into {tmp_path}.")
    assert_nothing_installed(tmp_path / "model")


def test_two_processes_download_once(hub: FakeHub, tmp_path: Path) -> None:
    start = len(hub.requests)
    code = (
        "import sys; from pathlib import Path; import weights; "
        "print(weights.fetch_weights(sys.argv[1], Path(sys.argv[2]), 'TEST_WEIGHTS_URL')['cached'])"
    )
    cmd = [sys.executable, "-c", code, f"hf://{HUB_REPOS['v2v']}", str(tmp_path / "model")]
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(out.strip() for out in outputs) == ["0.0", "1.0"]
    body = [p for p in paths(hub, start) if p.endswith("unet/diffusion_pytorch_model.bin") and "/lfs/" in p]
    assert len(body) == 1


@pytest.mark.parametrize(
    "source",
    ["hf://justone", "hf://a/b/c", "s3://bucket/weights.tar", "weights.tar", "hf://a/b@", "https://"],
)
def test_bad_sources_name_the_variable_and_what_is_allowed(tmp_path: Path, source: str) -> None:
    with pytest.raises(WeightsError) as error:
        fetch_weights(source, tmp_path / "model", "ZEROSCOPE_XL_WEIGHTS_URL")
    assert str(error.value) == (
        f"ZEROSCOPE_XL_WEIGHTS_URL is {source!r}: use an http(s):// URL of a .tar of the diffusers folder, "
        "or hf://OWNER/NAME[@REVISION] for a Hugging Face hub repo."
    )


def _commit(hub: FakeHub) -> str:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url).model_info(HUB_REPOS["v2v"]).sha


def assert_nothing_installed(dest: Path) -> None:
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if ".tmp-" in p.name]


# --- snapshots as published: normalised, complete, loaded exactly -------------------------------------------------


def broken_copy(folder: Path, dest: Path, remove: list[str]) -> Path:
    """A copy without the files `remove`; a folder left empty keeps a README (a hub repo has no empty folders)."""
    shutil.copytree(folder, dest)
    for name in remove:
        (dest / name).unlink()
        if not any((dest / name).parent.iterdir()):
            (dest / name).parent.joinpath("README.md").write_text("moved")
    return dest


@pytest.mark.parametrize(
    ("model", "remove", "detail"),
    [
        (
            "v2v",
            ["tokenizer/vocab.json", "tokenizer/merges.txt"],
            "tokenizer/vocab.json is missing (CLIPTokenizer needs vocab.json and merges.txt, or tokenizer.json)",
        ),
        (
            "i2v",
            ["tokenizer/spiece.model"],
            "tokenizer/spiece.model is missing (T5Tokenizer needs spiece.model, or tokenizer.json)",
        ),
        (
            "i2v",
            ["transformer/diffusion_pytorch_model-00002-of-00003.safetensors"],
            "transformer/diffusion_pytorch_model-00002-of-00003.safetensors is missing (named in "
            "diffusion_pytorch_model.safetensors.index.json)",
        ),
        (
            "v2v",
            ["unet/diffusion_pytorch_model.bin"],
            "unet/its weights are missing (diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin, "
            "or a sharded index)",
        ),
        ("v2v", ["scheduler/scheduler_config.json"], "scheduler/scheduler_config.json is missing"),
        ("i2v", ["vae/config.json"], "vae/config.json is missing"),
    ],
)
@pytest.mark.parametrize("kind", ["hub", "tar"])
def test_incomplete_snapshot_is_refused(
    hub: FakeHub,
    tiny_folders: dict[str, Path],
    weights_server: str,
    served_dir: Path,
    tmp_path: Path,
    model: str,
    remove: list[str],
    detail: str,
    kind: str,
) -> None:
    """transformers would build a 2-token CLIPTokenizer from tokenizer_config.json alone, silently: refused here."""
    repo = broken_copy(tiny_folders[model], tmp_path / "repo", remove)
    if kind == "hub":
        hub.add_repo("someone/incomplete", repo)
        source = "hf://someone/incomplete"
    else:
        tiny_weights.make_tar(repo, served_dir / f"{tmp_path.name}.tar")
        source = f"{weights_server}/{tmp_path.name}.tar"
    with pytest.raises(WeightsError) as error:
        fetch_weights(source, tmp_path / "model", VARIABLE)
    assert str(error.value) == (
        f"Cannot set up the weights in {VARIABLE} ({source}): the snapshot is incomplete: {detail}."
    )
    assert_nothing_installed(tmp_path / "model")


# --- loaded by the production loader: every stored tensor, nothing random, no code run --------------------------------


@pytest.mark.parametrize("kind", ["tar", "hub"])
@pytest.mark.parametrize("model", ["i2v", "i2v15", "v2v", "t2v"])
def test_loads_every_stored_tensor_exactly(
    weights_urls: dict[str, str],
    tiny_folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    kind: str,
) -> None:
    """bf16 sharded safetensors with an index (T5 without embed_tokens), fp16 .bin pickles, the hub's model_index.json:
    load_pipeline gives every stored tensor (in float32 on the CPU), and nothing it did not store but the tied T5
    embeddings and the fused Q/K/V projections."""
    checkpoint = importlib.import_module(MODULES[model]).CHECKPOINT
    source = weights_urls[model] if kind == "tar" else f"hf://{HUB_REPOS[model]}"
    monkeypatch.setenv(checkpoint.variable, source)
    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path))
    pipe, _ = load_pipeline(checkpoint, GpuMemory(checkpoint.name))
    tiny_weights.assert_loads_exactly(pipe, tiny_folders[model])


def load_from_hub(repo: str, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> Any:
    hub.add_repo(repo, folder)
    checkpoint = importlib.import_module("predict_i2v").CHECKPOINT
    monkeypatch.setenv(checkpoint.variable, f"hf://{repo}")
    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path / "cache"))
    return load_pipeline(checkpoint, GpuMemory(checkpoint.name))


def rewrite_shard(folder: Path, component: str, change: Any) -> None:
    """Apply `change` to the tensors of a component's first shard, and keep its index in step."""
    index_path = next((folder / component).glob("*.index.json"))
    index = json.loads(index_path.read_text())
    shard = folder / component / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("component", "change", "report"),
    [
        ("transformer", lambda t: t.pop(sorted(t)[0]), "newly initialized"),
        ("transformer", lambda t: t.update(extra=torch.zeros(2)), "were not used when initializing"),
        ("text_encoder", lambda t: t.pop(sorted(k for k in t if k != "shared.weight")[0]), "LOAD REPORT"),
        ("text_encoder", lambda t: t.update(extra=torch.zeros(2)), "LOAD REPORT"),
    ],
    ids=["diffusers-missing", "diffusers-unused", "transformers-missing", "transformers-unused"],
)
def test_weights_left_random_or_unused_fail_setup(
    hub: FakeHub,
    tiny_folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    component: str,
    change: Any,
    report: str,
) -> None:
    folder = shutil.copytree(tiny_folders["i2v"], tmp_path / "repo")
    rewrite_shard(folder, component, change)
    with pytest.raises(WeightsError) as error:
        load_from_hub("someone/mismatched", folder, tmp_path, monkeypatch, hub)
    message = str(error.value)
    assert message.startswith(
        "The weights in COGVIDEOX_I2V_WEIGHTS_URL (hf://someone/mismatched) do not match the model: "
    )
    assert report in message and "\n" not in message and "\x1b" not in message


class Payload:
    """Pickled, it runs code when unpickled: what a .bin from an untrusted repo may hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("component", ["unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"])
def test_bin_pickles_load_weights_only(
    hub: FakeHub, tiny_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, component: str
) -> None:
    folder = shutil.copytree(tiny_folders["v2v"], tmp_path / "repo")
    marker = tmp_path / "code-ran"
    torch.save({"weight": Payload(marker)}, folder / component)
    hub.add_repo("someone/pickled", folder)
    checkpoint = importlib.import_module("predict_v2v").CHECKPOINT
    monkeypatch.setenv(checkpoint.variable, "hf://someone/pickled")
    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(WeightsError) as error:
        load_pipeline(checkpoint, GpuMemory(checkpoint.name))
    assert str(error.value).startswith(
        "The weights in ZEROSCOPE_XL_WEIGHTS_URL (hf://someone/pickled) could not be loaded: "
    )
    assert not marker.exists()  # refused, never executed
